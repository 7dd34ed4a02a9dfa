"""compiler.export.repack: any readable file rewritten in the current format, same logits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import escepe_rt  # noqa: E402
from compiler.export import repack  # noqa: E402
from escepe_rt import format as fmt  # noqa: E402

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
EXAMPLE = HERE.parent / "examples" / "fashion_resnet18.escepe"


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _make_golden()
OLDER = [p for p in sorted(GOLDEN.glob("tiny_v*.escepe")) if p != make_golden.GOLDEN_FILE]


def _load(tmp_path, blob: bytes, name: str) -> escepe_rt.Model:
    path = tmp_path / name
    path.write_bytes(blob)
    return escepe_rt.load(path)


def test_repacking_the_previous_golden_file_gives_the_current_one():
    """The 1.1 file's tensors, rewritten by today's writer, are today's golden bytes."""
    previous = GOLDEN / f"tiny_v{fmt.SCHEMA_MAJOR}.{fmt.SCHEMA_MINOR - 1}.escepe"
    assert repack(previous.read_bytes()) == make_golden.GOLDEN_FILE.read_bytes()


@pytest.mark.parametrize("path", OLDER, ids=[p.name for p in OLDER])
def test_repacked_old_files_give_identical_logits(tmp_path, path):
    x = np.load(GOLDEN / path.name.replace(".escepe", "_input.npy"))
    old = escepe_rt.load(path)
    new = _load(tmp_path, repack(path.read_bytes()), "new.escepe")
    assert new.spec.schema_version == (fmt.SCHEMA_MAJOR, fmt.SCHEMA_MINOR)
    assert len(new.spec.buffers) > len(new.spec.tensors)  # data buffers + one view each
    for a, b in zip(old.run_all_exits(x), new.run_all_exits(x)):
        np.testing.assert_array_equal(a, b)
    assert [e.threshold for e in new.spec.exits] == [e.threshold for e in old.spec.exits]
    assert new.spec.metadata == old.spec.metadata and new.spec.labels == old.spec.labels


def test_repack_is_idempotent():
    blob = make_golden.GOLDEN_FILE.read_bytes()
    assert repack(blob) == blob


def test_final_exit_only_keeps_the_last_exit(tmp_path):
    path = make_golden.GOLDEN_FILE
    x = np.load(make_golden.INPUT_FILE)
    old = escepe_rt.load(path)
    blob = repack(path.read_bytes(), final_exit_only=True, metadata={"fp32_param_bytes": "123"})
    new = _load(tmp_path, blob, "static.escepe")
    assert len(new.spec.exits) == len(new.spec.sections) == 1
    assert len(new.spec.nodes) < len(old.spec.nodes)
    assert len(blob) < path.stat().st_size
    assert new.spec.metadata["fp32_param_bytes"] == "123"
    np.testing.assert_array_equal(new.run_all_exits(x)[0], old.run_all_exits(x)[-1])
    np.testing.assert_array_equal(new.predict(x).logits, old.run_all_exits(x)[-1])


@pytest.mark.skipif(not EXAMPLE.exists(), reason="no shipped example")
def test_shipped_example_is_current_and_repack_changes_nothing():
    blob = EXAMPLE.read_bytes()
    spec = fmt.parse(blob)
    if spec.schema_version != (fmt.SCHEMA_MAJOR, fmt.SCHEMA_MINOR):
        pytest.skip(f"example is format {spec.schema_version}")
    assert repack(blob) == blob
