"""The escepe command line on the golden file: verify, inspect, warmup, threshold patching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import escepe_rt
from compiler import cli, export

GOLDEN = sorted((Path(__file__).resolve().parent / "golden").glob("tiny_v*.escepe"))[-1]


def test_verify_ok_and_invalid(tmp_path, capsys):
    assert cli.main(["verify", str(GOLDEN)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")
    bad = tmp_path / "bad.escepe"
    blob = bytearray(GOLDEN.read_bytes())
    blob[-100] ^= 0xFF
    bad.write_bytes(bytes(blob))
    assert cli.main(["verify", str(bad)]) == 1
    assert "INVALID" in capsys.readouterr().out


def test_inspect_json_describes_the_file(capsys):
    assert cli.main(["inspect", "--json", str(GOLDEN)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["labels"] == ["circle", "square", "triangle"]
    assert len(info["exits"]) == len(info["sections"]) == 2


def test_warmup_runs(capsys):
    assert cli.main(["warmup", str(GOLDEN)]) == 0
    assert "cached" in capsys.readouterr().out


def test_patch_thresholds_rewrites_only_the_thresholds(tmp_path):
    blob = GOLDEN.read_bytes()
    patched = export.patch_thresholds(blob, [0.25, 0.0])
    path = tmp_path / "p.escepe"
    path.write_bytes(patched)
    m = escepe_rt.load(path)  # CRC re-sealed
    assert m.thresholds == [0.25, 0.0]
    assert len(patched) == len(blob)
    assert sum(a != b for a, b in zip(blob, patched)) <= 8  # 4 threshold + 4 CRC bytes
    with pytest.raises(ValueError):
        export.patch_thresholds(blob, [0.5])


def test_help_of_every_command(capsys):
    for cmd in (
        "pipeline",
        "train",
        "compress",
        "export",
        "compile",
        "inspect",
        "warmup",
        "verify",
        "eval",
        "calibrate",
    ):
        with pytest.raises(SystemExit) as e:
            cli.main([cmd, "--help"])
        assert e.value.code == 0
        assert "usage: escepe " + cmd in capsys.readouterr().out
