"""Atomic file writes: a step that fails or is killed never leaves a half-written file.

Every file the compiler writes (.escepe, ONNX, checkpoints) goes to a temp file beside the
target, is fsynced, optionally checked, and only then renamed over the target. The temp file
gets the mode a plain open() would have given (mkstemp's is 0600), or the replaced file's mode.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _target_mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # keep what the user had
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_path(
    path: str | os.PathLike, check: Callable[[str], None] | None = None
) -> Iterator[str]:
    """Yield a temp path beside `path`; on success fsync it, check(temp), rename over `path`.

    On any exception (or a failing check) the temp file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, _target_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(
    path: str | os.PathLike, blob: bytes, check: Callable[[str], None] | None = None
) -> None:
    """Write `blob` to `path` atomically (see atomic_path)."""
    with atomic_path(path, check) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
