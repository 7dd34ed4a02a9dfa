"""numba's on-disk cache, made stale by a change to any of the package's sources.

numba stamps a cached function with its own source file only, but a kernel compiles in the
numba functions it calls from other modules: spinpool's C entry (spinpool._chunk) carries a
copy of microkernel.conv_direct. After microkernel.py changed (an upgrade, a git pull, an
edit), a cached caller kept running the old conv_direct: in development that silently
returned NaNs.
Here every escepe_rt function's stamp is a digest of all of escepe_rt's .py files, so any
change recompiles every kernel once. Functions outside the package keep numba's own stamps.
Installed when this module is imported (escepe_rt/__init__.py imports it first).
"""

from __future__ import annotations

import hashlib
import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))


def package_digest(folder: str = PACKAGE) -> str:
    """sha256 over the names and bytes of the .py files directly in `folder` (the kernels)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def _package_stamped(base: type, digest: str) -> type:
    class Locator(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != PACKAGE:
                return None  # not ours: the next locator in numba's list takes it
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            # numba keeps a global's value from compile time, and the tile width is one that
            # an environment variable can change (ESCEPE_WIDE_TILES, escepe_rt/vector_ir.py)
            from escepe_rt import vector_ir

            return ("escepe_rt", digest, vector_ir.WIDE_TILES)

    Locator.__name__ = f"EscepeRt{base.__name__}"
    return Locator


def install() -> bool:
    """Put package-stamped versions of numba's file-backed locators first in its list (same
    order, so NUMBA_CACHE_DIR and the fallbacks behave as before). Must run before the first
    @njit(cache=True) of the package is applied. False (numba's per-file stamps stay) if this
    numba has no such list."""
    try:
        from numba.core import caching

        impl = caching.CacheImpl
        bases = [
            caching.UserProvidedCacheLocator,
            caching.InTreeCacheLocator,
            caching.UserWideCacheLocator,
        ]
    except AttributeError:
        return False
    if any(getattr(k, "_escepe_rt", False) for k in impl._locator_classes):
        return True
    digest = package_digest()
    ours = [_package_stamped(b, digest) for b in bases]
    for k in ours:
        k._escepe_rt = True
    impl._locator_classes = ours + list(impl._locator_classes)
    return True


install()
