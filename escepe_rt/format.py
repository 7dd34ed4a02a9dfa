"""Reading a .escepe file: mmap it, and turn the verified flatbuffer into plain specs.

`parse` must only run on bytes that verify.check_structure has accepted: the
generated accessors in _fbs/ follow offsets without bounds checks.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass, field

import numpy as np

from escepe_rt._fbs.Model import Model as FbModel
from escepe_rt.errors import FormatError

FILE_IDENTIFIER = b"ESCP"
SCHEMA_MAJOR = 1
SCHEMA_MINOR = 3
BUFFER_ALIGNMENT = 64
CHECKSUM_SLOT = 10  # vtable slot of Model.checksum_crc32 (4th field: 4 + 2*3)


@dataclass(frozen=True)
class ValueSpec:
    name: str
    shape: tuple[int, ...]  # per sample: (C, H, W) or (F,)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    encoding: int
    bits: int
    codebook: int
    buffer: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)  # Python ints: hostile shapes cannot overflow


@dataclass(frozen=True)
class NodeSpec:
    name: str
    op: int
    inputs: tuple[int, ...]
    output: int
    section: int
    activation: int
    weight: int
    scale: int
    shift: int
    options: dict = field(default_factory=dict)  # kernel/stride/padding/... by op


@dataclass(frozen=True)
class ExitSpec:
    name: str
    logits: int
    threshold: float


@dataclass(frozen=True)
class ModelSpec:
    schema_version: tuple[int, int]
    writer: str
    checksum: int
    input_shape: tuple[int, ...]
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    values: list[ValueSpec]
    nodes: list[NodeSpec]
    sections: list[tuple[int, int]]  # (node_begin, node_end)
    exits: list[ExitSpec]
    exit_policy: int
    tensors: list[TensorSpec]
    codebooks: list[tuple[int, np.ndarray]]  # (section, centroids float32)
    buffers: list[tuple[int, int]]  # (byte offset in file, byte length); views resolved
    labels: list[str]
    metadata: dict[str, str]
    # Per buffer, as stored: (view_of, offset, size); view_of = -1 for a data buffer.
    # verify.check_model checks every view before `buffers` is used (since 1.2).
    buffer_views: list[tuple[int, int, int]] = field(default_factory=list)
    raw_buffers: list[tuple[int, int]] = field(default_factory=list)  # each Buffer's own data
    buffer_tables: list[int] = field(default_factory=list)  # file offset of each Buffer table


def map_file(path: str | os.PathLike) -> memoryview:
    """Read-only mmap of the file as a memoryview (empty files are refused)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError("file is empty", field="file", offset=0)
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def buffer_bytes(buf, spec: ModelSpec, index: int) -> np.ndarray:
    """Zero-copy uint8 view of buffer `index`."""
    offset, length = spec.buffers[index]
    return np.frombuffer(buf, dtype=np.uint8, count=length, offset=offset)


def _ints(get_numpy, length: int) -> tuple[int, ...]:
    return tuple(int(v) for v in get_numpy()) if length else ()


def _vec2(table, name: str) -> tuple[int, ...]:
    return _ints(getattr(table, name + "AsNumpy"), getattr(table, name + "Length")())


def _node_options(node) -> dict:
    opts = {}
    conv = node.Conv()
    if conv is not None:
        opts["conv"] = {
            "kernel": _vec2(conv, "Kernel"),
            "stride": _vec2(conv, "Stride"),
            "padding": _vec2(conv, "Padding"),
            "dilation": _vec2(conv, "Dilation"),
            "groups": int(conv.Groups()),
        }
    pool = node.Pool()
    if pool is not None:
        opts["pool"] = {
            "kernel": _vec2(pool, "Kernel"),
            "stride": _vec2(pool, "Stride"),
            "padding": _vec2(pool, "Padding"),
            "dilation": _vec2(pool, "Dilation"),
            "ceil_mode": bool(pool.CeilMode()),
            "count_include_pad": bool(pool.CountIncludePad()),
            "divisor_override": int(pool.DivisorOverride()),
        }
    adaptive = node.AdaptivePool()
    if adaptive is not None:
        opts["adaptive_pool"] = {"output_size": _vec2(adaptive, "OutputSize")}
    return opts


def _str(b) -> str:
    return b.decode("utf-8") if b is not None else ""


def parse(buf) -> ModelSpec:
    """Plain-Python view of a structurally verified file (weights stay in the mmap)."""
    m = FbModel.GetRootAs(buf, 0)
    inp = m.Input()
    values = [
        ValueSpec(_str(v.Name()), _vec2(v, "Shape"))
        for v in (m.Values(i) for i in range(m.ValuesLength()))
    ]
    nodes = []
    for i in range(m.NodesLength()):
        n = m.Nodes(i)
        nodes.append(
            NodeSpec(
                name=_str(n.Name()),
                op=int(n.Op()),
                inputs=_vec2(n, "Inputs"),
                output=int(n.Output()),
                section=int(n.Section()),
                activation=int(n.Activation()),
                weight=int(n.Weight()),
                scale=int(n.Scale()),
                shift=int(n.Shift()),
                options=_node_options(n),
            )
        )
    sections = [
        (int(s.NodeBegin()), int(s.NodeEnd()))
        for s in (m.Sections(i) for i in range(m.SectionsLength()))
    ]
    exits = [
        ExitSpec(_str(e.Name()), int(e.Logits()), float(e.Threshold()))
        for e in (m.Exits(i) for i in range(m.ExitsLength()))
    ]
    tensors = [
        TensorSpec(
            _str(t.Name()),
            _vec2(t, "Shape"),
            int(t.Encoding()),
            int(t.Bits()),
            int(t.Codebook()),
            int(t.Buffer()),
        )
        for t in (m.Tensors(i) for i in range(m.TensorsLength()))
    ]
    codebooks = []
    for i in range(m.CodebooksLength()):
        c = m.Codebooks(i)
        cents = c.CentroidsAsNumpy() if c.CentroidsLength() else np.zeros(0, np.float32)
        codebooks.append((int(c.Section()), np.asarray(cents, dtype=np.float32)))
    buffers, views, tables = [], [], []
    for i in range(m.BuffersLength()):
        b = m.Buffers(i)
        o = b._tab.Offset(4)
        if o == 0:
            buffers.append((0, 0))
        else:
            buffers.append((b._tab.Vector(o), b._tab.VectorLen(o)))
        views.append((int(b.ViewOf()), int(b.Offset()), int(b.Size())))
        tables.append(b._tab.Pos)
    raw_buffers, buffers = buffers, resolve_views(buffers, views)
    meta = {}
    for i in range(m.MetadataLength()):
        kv = m.Metadata(i)
        meta[_str(kv.Key())] = _str(kv.Value())
    return ModelSpec(
        schema_version=(int(m.SchemaMajor()), int(m.SchemaMinor())),
        writer=_str(m.Writer()),
        checksum=int(m.ChecksumCrc32()),
        input_shape=_vec2(inp, "Shape") if inp is not None else (),
        input_mean=tuple(float(v) for v in inp.MeanAsNumpy()) if inp and inp.MeanLength() else (),
        input_std=tuple(float(v) for v in inp.StdAsNumpy()) if inp and inp.StdLength() else (),
        values=values,
        nodes=nodes,
        sections=sections,
        exits=exits,
        exit_policy=int(m.ExitPolicy()),
        tensors=tensors,
        codebooks=codebooks,
        buffers=buffers,
        labels=[_str(m.Labels(i)) for i in range(m.LabelsLength())],
        metadata=meta,
        buffer_views=views,
        raw_buffers=raw_buffers,
        buffer_tables=tables,
    )


def resolve_views(data: list[tuple[int, int]], views: list[tuple[int, int, int]]):
    """(file offset, length) of every buffer, a view's taken from the data buffer it views.

    No bounds are checked here (verify._check_buffers does that); a view that
    names no data buffer resolves to (0, 0).
    """
    out = []
    for i, (view_of, offset, size) in enumerate(views):
        if view_of == -1:
            out.append(data[i])
        elif 0 <= view_of < len(data) and views[view_of][0] == -1:
            out.append((data[view_of][0] + offset, size))
        else:
            out.append((0, 0))
    return out


def checksum_position(buf) -> int | None:
    """Byte offset of Model.checksum_crc32 in the file, or None if the field is absent."""
    m = FbModel.GetRootAs(buf, 0)
    o = m._tab.Offset(CHECKSUM_SLOT)
    return m._tab.Pos + o if o else None
