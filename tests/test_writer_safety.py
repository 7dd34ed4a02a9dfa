"""The writer never leaves a broken file: atomic replace, and nothing its own verifier refuses.

- a write that fails midway (fsync raising, as on a full disk) leaves the old file as it was
  and no temp file behind;
- a process SIGKILLed during export leaves the old file intact (a stray temp file beside it
  may remain: nothing cleans up after SIGKILL, and it never has the target's name);
- a writer bug that produces a file the verifier rejects (here: a wrong CRC) raises
  FormatError and writes nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import escepe_rt  # noqa: E402
from compiler import atomic as atomic_mod  # noqa: E402
from compiler import export as export_mod  # noqa: E402
from escepe_rt.errors import FormatError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

MODEL_SRC = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return [self.fc(torch.flatten(torch.relu(self.conv(x)), 1))]

def net(seed):
    torch.manual_seed(seed)
    return Net().eval()

EXAMPLE = torch.zeros(1, 1, 6, 6)
"""
_ns: dict = {}
exec(MODEL_SRC, _ns)  # the same definition runs in the SIGKILL child below


def _write(path: Path, seed: int) -> bytes:
    export_mod.export(_ns["net"](seed), _ns["EXAMPLE"], path)
    return path.read_bytes()


@pytest.fixture
def old(tmp_path) -> tuple[Path, bytes]:
    path = tmp_path / "m.escepe"
    return path, _write(path, 0)


def _assert_intact(path: Path, before: bytes, allow_temp: bool = False) -> None:
    assert path.read_bytes() == before
    others = [p.name for p in path.parent.iterdir() if p != path]
    if allow_temp:
        assert all(n.startswith(path.name + ".") and n.endswith(".tmp") for n in others), others
    else:
        assert others == []
    escepe_rt.load(path).predict(np.zeros((1, 1, 6, 6), np.float32))


def test_write_failing_midway_keeps_the_old_file(old, monkeypatch):
    path, before = old

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_mod.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        _write(path, 1)
    _assert_intact(path, before)


def test_short_write_keeps_the_old_file(old, monkeypatch):
    """The temp file gets half the bytes, then the write fails."""
    path, before = old
    real_open = open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(5, "Input/output error")

        def __getattr__(self, name):
            return getattr(self.f, name)

    # compiler.atomic writes the temp file with the builtin open(): shadow it there only
    monkeypatch.setattr(
        atomic_mod, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False
    )
    with pytest.raises(OSError, match="Input/output"):
        _write(path, 1)
    _assert_intact(path, before)


def test_writer_refuses_a_file_its_verifier_rejects(old, monkeypatch):
    path, before = old

    def bad_seal(blob):  # a writer bug: the CRC of the wrong bytes
        pos = escepe_rt.format.checksum_position(blob)
        blob[pos : pos + 4] = b"\x01\x02\x03\x04"
        return bytes(blob)

    monkeypatch.setattr(export_mod, "seal", bad_seal)
    with pytest.raises(FormatError) as e:
        _write(path, 1)
    assert e.value.field == "checksum_crc32"
    _assert_intact(path, before)


CHILD = (
    MODEL_SRC
    + """
import sys, time
from compiler import export as export_mod
path, mode = sys.argv[1], sys.argv[2]
if mode == "before-rename":
    # Stop between fsync of the complete temp file and the rename, and wait to be killed.
    real_replace = export_mod.os.replace
    def replace(src, dst):
        print("READY", flush=True)
        time.sleep(600)
    export_mod.os.replace = replace
    export_mod.export(net(1), EXAMPLE, path)
else:
    # Rewrite the file over and over with new weights until killed.
    print("READY", flush=True)
    seed = 1
    while True:
        export_mod.export(net(seed), EXAMPLE, path)
        seed += 1
"""
)


@pytest.mark.parametrize("mode", ["before-rename", "any-time"])
def test_sigkill_during_export_keeps_a_whole_file(old, mode):
    path, before = old
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        if mode == "any-time":
            time.sleep(1.5)  # several exports, killed somewhere inside one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    if mode == "before-rename":
        _assert_intact(path, before, allow_temp=True)
    else:
        # Some complete file: the old one or one of the child's, never a partial one.
        escepe_rt.load(path).predict(np.zeros((1, 1, 6, 6), np.float32))
        _assert_intact(path, path.read_bytes(), allow_temp=True)


def test_threshold_patch_refuses_what_the_verifier_rejects(old):
    """Found by review: patch_thresholds (escepe calibrate) sealed a NaN threshold into a
    file that load() then refused. It now verifies its output; the old file stays."""
    path, before = old
    with pytest.raises(FormatError) as e:
        export_mod.patch_thresholds(before, [float("nan")])
    assert e.value.field == "exits[0].threshold"
    patched = export_mod.patch_thresholds(before, [0.25])
    spec = escepe_rt.format.parse(patched)
    assert [x.threshold for x in spec.exits] == [0.25]
    _assert_intact(path, before)


def test_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_mode(tmp_path):
    """mkstemp makes 0600 files: the writer must not hide a model from other users."""
    umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.escepe"
        _write(fresh, 0)
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.escepe"
        _write(kept, 0)
        os.chmod(kept, 0o640)
        _write(kept, 1)
        assert kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
