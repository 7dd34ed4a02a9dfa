"""numba's on-disk cache goes stale with any change to escepe_rt's sources
(escepe_rt/_numba_cache.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import escepe_rt  # noqa: F401  (installs the package-stamped locators)
from escepe_rt import _numba_cache, kernels, microkernel, spinpool, vector_ir


def test_package_kernels_are_stamped_with_the_whole_package():
    digest = _numba_cache.package_digest()
    for fn in (microkernel.conv_direct, spinpool._run_job, kernels._gather_gemm):
        locator = fn._cache._impl.locator
        assert locator.get_source_stamp() == ("escepe_rt", digest, vector_ir.WIDE_TILES)


def test_digest_changes_with_any_source_file(tmp_path):
    copy = tmp_path / "escepe_rt"
    shutil.copytree(_numba_cache.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _numba_cache.package_digest(str(copy))
    assert before == _numba_cache.package_digest()
    with open(copy / "microkernel.py", "a") as f:
        f.write("\n# an edit\n")
    assert _numba_cache.package_digest(str(copy)) != before


_RUN = textwrap.dedent(
    """
    import numpy as np
    from escepe_rt import kernels, microkernel, spinpool
    x = np.ones((1, 4, 4, 8), np.float32)
    cw = kernels.prepare_conv_weight(np.ones((16, 8, 1, 1), np.float32), 1)
    out = np.zeros((1, 4, 4, 16), np.float32)
    epi = np.concatenate([np.ones(16, np.float32), np.zeros(16, np.float32)])
    ctrl = spinpool.with_entry(np.zeros(spinpool.CTRL_WORDS, np.int64))
    spinpool._run_job(ctrl, 1, x, cw.panels, out, out, False, epi, 0, (1, 1, 1, 1, 1, 0, 0, 0),
                      True, 1, 16, 1)
    print(float(out[0, 0, 0, 0]))
    """
)


def test_a_caller_cached_before_its_callee_changed_is_recompiled(tmp_path):
    """spinpool's C entry (spinpool._chunk) compiles microkernel.conv_direct into itself. Edit
    conv_direct in a copy of the package after the entry was cached: a fresh process must run
    the new code."""
    copy = tmp_path / "escepe_rt"
    shutil.copytree(_numba_cache.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    # the copy first; the rest of the path stays (the arm64 check finds its wheels through it)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)

    def run() -> float:
        out = subprocess.run(
            [sys.executable, "-c", _RUN], env=env, cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return float(out.stdout.split()[-1])

    assert run() == 8.0  # ones * ones summed over 8 input channels
    assert list((copy / "__pycache__").glob("spinpool._chunk*.nbi"))  # cached
    src = (copy / "microkernel.py").read_text()
    marker = "    kh, kw, sh, sw, dh, origin, pad_out, _ = geom\n    _, hp, wp, c = xp.shape\n"
    assert src.count(marker) == 1
    edited = src.replace(marker, marker + "    out[0, 0, 0, 0] = -1.0\n    return\n")
    (copy / "microkernel.py").write_text(edited)
    assert run() == -1.0
