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
    """The previous file's indices, re-encoded by today's writer as make_golden asks (1.3:
    section 0 interleaved rANS), are today's golden bytes."""
    previous = GOLDEN / f"tiny_v{fmt.SCHEMA_MAJOR}.{fmt.SCHEMA_MINOR - 1}.escepe"
    blob = repack(previous.read_bytes(), index_encoding=make_golden.INDEX_ENCODING)
    assert blob == make_golden.GOLDEN_FILE.read_bytes()


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


# ----------------------------------------------------------------- RAW_F16 (format 1.2)


def _f16_golden() -> bytes:
    return repack(make_golden.GOLDEN_FILE.read_bytes(), channel_dtype="f16")


def test_f16_channel_vectors_halve_their_bytes_and_keep_the_logits(tmp_path):
    from escepe_rt._fbs.Encoding import Encoding

    x = np.load(make_golden.INPUT_FILE)
    old = escepe_rt.load(make_golden.GOLDEN_FILE)
    blob = _f16_golden()
    new = _load(tmp_path, blob, "f16.escepe")
    channel = {t for n in new.spec.nodes for t in (n.scale, n.shift) if t >= 0}
    assert channel and all(new.spec.tensors[t].encoding == Encoding.RAW_F16 for t in channel)
    for t in channel:
        assert new.spec.buffers[new.spec.tensors[t].buffer][1] == 2 * new.spec.tensors[t].count

    # Tensor bytes, not the file size: Finish pads the file to a multiple of 64, and the
    # tiny model's 15 channel values save 30 bytes (under 64 since 1.3's golden file).
    def tensor_bytes(m):
        return sum(m.spec.buffers[t.buffer][1] for t in m.spec.tensors)

    assert tensor_bytes(new) < tensor_bytes(old)
    assert len(blob) <= make_golden.GOLDEN_FILE.stat().st_size
    for a, b in zip(old.run_all_exits(x), new.run_all_exits(x)):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2)
    assert repack(blob) == blob  # f16 is kept as it is


def test_f16_tensor_holding_nan_is_refused(tmp_path):
    from escepe_rt._fbs.Encoding import Encoding
    from escepe_rt.errors import FormatError

    blob = bytearray(_f16_golden())
    spec = fmt.parse(bytes(blob))
    i = next(i for i, t in enumerate(spec.tensors) if t.encoding == Encoding.RAW_F16)
    at = spec.buffers[spec.tensors[i].buffer][0]
    blob[at : at + 2] = np.float16(np.nan).tobytes()
    from compiler.export import seal

    path = tmp_path / "nan.escepe"
    path.write_bytes(seal(blob))
    with pytest.raises(FormatError) as e:
        escepe_rt.load(path)
    assert e.value.field == f"tensors[{i}]" and "NaN" in str(e.value)
    assert e.value.offset == at


def test_f16_falls_back_to_f32_out_of_range():
    from compiler.export import _Writer
    from escepe_rt._fbs.Encoding import Encoding

    w = _Writer(1024)
    small = w.raw(np.array([0.5, -2.0], np.float32), 0, "f16")
    huge = w.raw(np.array([1e6, 1.0], np.float32), 0, "f16")
    assert w.records[small].encoding == Encoding.RAW_F16
    assert w.records[huge].encoding == Encoding.RAW_F32
