"""Write a captured, (optionally) clustered model as a .escepe flatbuffer.

The writer checks its output with the runtime's own verifier before anything
touches the disk, then writes atomically (temp file in the same folder, fsync,
rename), so a failed export never leaves a half file or loses the old one.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field

import flatbuffers
import numpy as np
import torch
from torch import nn

import escepe_rt
from compiler import cluster
from compiler.atomic import atomic_write
from compiler.graph import Graph, IRNode, UnsupportedOpError, capture
from escepe_rt import format as fmt
from escepe_rt import rans, rans_interleaved, verify
from escepe_rt._fbs import (
    AdaptivePoolOptions,
    Buffer,
    Codebook,
    Conv2DOptions,
    Exit,
    InputSpec,
    KeyValue,
    Model,
    Node,
    Pool2DOptions,
    Section,
    Tensor,
    Value,
)
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt._fbs.ExitPolicy import ExitPolicy
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.decode import decode_packed
from escepe_rt.encodings import ENCODINGS, RAW_DTYPES, index_bits, pack_indices

log = logging.getLogger("escepe.export")
WRITER = f"escepe {escepe_rt.__version__}"
CHECKSUM_PLACEHOLDER = 0xFFFFFFFF  # non-default, so the field is always written
NEVER_EXIT = 2.0  # a threshold no confidence in [0, 1] reaches


@dataclass
class SectionReport:
    index: int
    weights: int  # clustered (or raw) conv/linear weight count
    clusters: int | None  # codebook size, None = raw float32
    bits: int  # bits per stored weight index (32 for raw)
    exact: bool  # codebook holds the exact weight values
    stored_bytes: int  # weight + scale/shift buffer bytes
    coded_bits_per_weight: float = 32.0  # what the weight buffers actually cost
    entropy_bits_per_weight: float = 32.0  # empirical entropy of the section's indices


@dataclass
class ExportReport:
    path: str
    sections: list[SectionReport]
    fp32_param_bytes: int  # every parameter of the uncompressed model in float32
    file_bytes: int
    zipped_bytes: int  # the file deflated in a .zip (what papers often quote)
    metadata: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.fp32_param_bytes / self.file_bytes

    @property
    def zipped_ratio(self) -> float:
        return self.fp32_param_bytes / self.zipped_bytes

    def summary(self) -> str:
        lines = [
            f"{self.path}: {self.file_bytes:,} bytes, {self.ratio:.1f}x smaller than fp32 "
            f"({self.fp32_param_bytes:,} B); zipped {self.zipped_bytes:,} B = "
            f"{self.zipped_ratio:.1f}x"
        ]
        for s in self.sections:
            k = (
                "raw f32"
                if s.clusters is None
                else (
                    f"k={s.clusters}: packed {s.bits} bits, stored {s.coded_bits_per_weight:.3f} "
                    f"bits/weight, index entropy {s.entropy_bits_per_weight:.3f}"
                )
            )
            lines.append(
                f"  section {s.index}: {s.weights:,} weights, {k}, {s.stored_bytes:,} B stored"
            )
        return "\n".join(lines)


INDEX_ENCODINGS = ("auto", "packed", "rans", "rans_interleaved")


def encode_indices(indices: np.ndarray, k: int, how: str = "auto") -> tuple[int, bytes]:
    """(encoding, payload) for one tensor's cluster indices.

    "packed": ceil(log2 k) bits each; "rans": entropy-coded (below 1 bit/index
    on skewed clusters, ~0.5-1 GB/s to decode); "rans_interleaved" (format 1.3):
    the same entropy at ~2.4 GB/s, lanes chosen by size; "auto": packed if it is
    the smallest (it decodes fastest), else the interleaved coder if it is within
    `rans_interleaved.size_margin` (1 %, at least 8 bytes) of the smallest, else
    the smaller of the other two.
    """
    if how not in INDEX_ENCODINGS:
        raise ValueError(f"index_encoding must be one of {INDEX_ENCODINGS}, got {how!r}")
    flat = np.ascontiguousarray(indices, dtype=np.uint8).ravel()
    if how == "rans_interleaved":
        return Encoding.RANS_INTERLEAVED, rans_interleaved.encode(flat, k)
    packed = pack_indices(flat, index_bits(k)).tobytes()
    if how == "packed":
        return Encoding.PACKED_INDICES, packed
    coded = rans.encode(flat, k)
    if how == "rans":
        return Encoding.RANS_INDICES, coded
    if len(packed) <= len(coded):
        return Encoding.PACKED_INDICES, packed
    fast = rans_interleaved.encode(
        flat, k, max_bytes=len(coded) + rans_interleaved.size_margin(len(coded))
    )
    if fast is not None:
        return Encoding.RANS_INTERLEAVED, fast
    return Encoding.RANS_INDICES, coded


def fp32_param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (weights, biases, BN affine) in float32."""
    return 4 * sum(p.numel() for p in model.parameters())


def export(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    clusters: int | list[int] | None = None,
    thresholds: float | list[float] | None = None,
    labels: list[str] | None = None,
    input_mean: list[float] | None = None,
    input_std: list[float] | None = None,
    metadata: dict[str, str] | None = None,
    exit_policy: str = "max_softmax",
    index_encoding: str | list[str] = "auto",
    channel_dtype: str = "f32",
    seed: int = 0,
) -> ExportReport:
    """Compile `model` to a .escepe file at `path`; returns sizes and ratios.

    clusters: None stores conv/linear weights as raw float32; an int (or one
    per section) stores them as bit-packed indices into one codebook per
    section. A section whose weights already have <= k distinct values (e.g.
    after cluster_sections) is stored exactly; otherwise it is clustered here
    (the model itself is left unchanged, and a warning says so).
    index_encoding: "auto" (per tensor, the smaller of bit-packed and
    rANS-coded indices), "packed" or "rans"; or one of these per section.
    channel_dtype: "f32" stores the per-channel scale/shift vectors as float32;
    "f16" as binary16 (format 1.2 RAW_F16, half the bytes; a vector whose values
    do not fit binary16 stays float32). The fidelity check then allows for the
    rounding (it still catches capture errors, which are not small).
    """
    graph = capture(model, example_input)
    data = build(
        graph,
        model,
        clusters=clusters,
        thresholds=thresholds,
        labels=labels,
        input_mean=input_mean,
        input_std=input_std,
        metadata=metadata,
        exit_policy=exit_policy,
        index_encoding=index_encoding,
        channel_dtype=channel_dtype,
        seed=seed,
    )
    blob, sections, meta = data
    exact = all(r.exact for r in sections)
    tol = 1e-3 if channel_dtype == "f32" else 3e-2
    atomic_write(
        path,
        blob,
        check=(lambda tmp: check_fidelity(model, example_input, tmp, tol=tol)) if exact else None,
    )
    return ExportReport(
        str(path),
        sections,
        fp32_param_bytes(model),
        len(blob),
        zipped_size(blob, os.path.basename(path)),
        meta,
    )


def zipped_size(blob: bytes, name: str = "model.escepe") -> int:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr(name, blob)
    return len(out.getvalue())


def check_fidelity(
    model: nn.Module, example_input: torch.Tensor, path: str, seed: int = 0, tol: float = 1e-3
) -> None:
    """The file must reproduce the model's logits on a random input, exit by exit.

    torch.fx records `y += z` as `y + z` and cannot see that an in-place op
    changes a tensor another name still refers to; comparing outputs catches
    such capture errors (and any other) before the file replaces anything.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *example_input.shape[1:]), generator=gen)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = [o.float().numpy() for o in model(x)]
    finally:
        model.train(was_training)
    got = escepe_rt.load(path).run_all_exits(x.numpy())
    for e, (w, g) in enumerate(zip(want, got)):
        err = float(np.abs(w - g).max())
        if not err <= tol * max(1.0, float(np.abs(w).max())):
            raise UnsupportedOpError(
                f"the compiled file does not reproduce the model at exit {e} (max |diff| "
                f"{err:.3g}): the graph capture missed something, e.g. an in-place op (`+=`, "
                "inplace=True) on a tensor that another name or view still refers to"
            )


# ---------------------------------------------------------------------------- building


@dataclass
class _TensorRecord:
    """A tensor waiting to be written: its bytes go into its section's shared buffer."""

    shape: tuple[int, ...]
    encoding: int
    payload: bytes
    section: int
    bits: int = 0
    codebook: int = -1


VIEW_ALIGNMENT = 4  # a view's offset inside its data buffer (float32 views stay aligned)


class _Writer:
    """Collects tensors, then serialises them; owns the flatbuffers Builder.

    Since format 1.2 every tensor's bytes lie in one data buffer per section
    (64-byte aligned, each tensor at a 4-byte aligned offset) and the tensor
    names a view of it, instead of one padded buffer per tensor. Identical
    uint vectors and option/value tables are written once and shared.
    """

    def __init__(self, size_hint: int):
        self.b = flatbuffers.Builder(max(1024, size_hint))
        # Write every scalar, defaults included, so tools can patch fields in
        # place (escepe calibrate rewrites exit thresholds without re-export).
        self.b.ForceDefaults(True)
        self.records: list[_TensorRecord] = []
        self._shared: dict = {}  # (kind, content) -> offset of an object already written

    def once(self, key, make) -> int:
        """The offset of `make()`, written the first time `key` is seen and shared after."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def u32s(self, values) -> int:
        values = tuple(int(v) for v in values)
        return self.once(
            ("u32s", values),
            lambda: self.b.CreateNumpyVector(np.asarray(values, dtype=np.uint32)),
        )

    def f32s(self, values) -> int:
        return self.b.CreateNumpyVector(np.asarray(values, dtype=np.float32))

    def tensor(
        self, shape, encoding: int, payload: bytes, section: int, bits: int = 0, codebook: int = -1
    ) -> int:
        self.records.append(
            _TensorRecord(tuple(int(d) for d in shape), encoding, payload, section, bits, codebook)
        )
        return len(self.records) - 1

    def raw(self, array: np.ndarray, section: int, dtype: str = "f32") -> int:
        """A raw tensor: float32, or binary16 (RAW_F16) if asked and every value fits it."""
        a = np.ascontiguousarray(array, dtype="<f4")
        if dtype == "f16":
            with np.errstate(over="ignore"):
                h = a.astype("<f2")
            if np.all(np.isfinite(h)):
                return self.tensor(a.shape, Encoding.RAW_F16, h.tobytes(), section)
        return self.tensor(a.shape, Encoding.RAW_F32, a.tobytes(), section)

    def _data_buffer(self, payload: bytes) -> int:
        """A Buffer whose data starts 64-byte aligned in the final file."""
        b = self.b
        b.StartVector(1, len(payload), fmt.BUFFER_ALIGNMENT)
        b.head -= len(payload)
        b.Bytes[b.head : b.head + len(payload)] = payload
        data = b.EndVector()
        Buffer.Start(b)
        Buffer.AddData(b, data)
        Buffer.AddViewOf(b, -1)
        return Buffer.End(b)

    def finish_tensors(self) -> tuple[list[int], list[int]]:
        """(Tensor offsets, Buffer offsets): data buffers first, then one view per tensor."""
        b = self.b
        sections = sorted({r.section for r in self.records})
        data_index = {s: i for i, s in enumerate(sections)}
        placed: list[tuple[int, int]] = [(0, 0)] * len(self.records)  # (offset, size)
        buffers = []
        for s in sections:
            blob = bytearray()
            for i, r in enumerate(self.records):
                if r.section != s:
                    continue
                blob += bytes(-len(blob) % VIEW_ALIGNMENT)
                placed[i] = (len(blob), len(r.payload))
                blob += r.payload
            buffers.append(self._data_buffer(bytes(blob)))
        for i, r in enumerate(self.records):
            Buffer.Start(b)
            Buffer.AddViewOf(b, data_index[r.section])
            Buffer.AddOffset(b, placed[i][0])
            Buffer.AddSize(b, placed[i][1])
            buffers.append(Buffer.End(b))
        tensors = []
        for i, r in enumerate(self.records):
            shape_off = self.u32s(r.shape)
            Tensor.Start(b)
            Tensor.AddShape(b, shape_off)
            Tensor.AddEncoding(b, r.encoding)
            Tensor.AddBits(b, r.bits)
            Tensor.AddCodebook(b, r.codebook)
            Tensor.AddBuffer(b, len(sections) + i)
            tensors.append(Tensor.End(b))
        return tensors, buffers

    def vector_of(self, offsets: list[int]) -> int:
        b = self.b
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()


def _channel_affine(node: IRNode, modules) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-output-channel (scale, shift) from folded BN and the layer's bias."""
    mod = modules[node.module] if node.module else None
    bias = None
    if node.op in (OpCode.CONV2D, OpCode.LINEAR) and mod.bias is not None:
        bias = mod.bias.detach().double().cpu().numpy()
    bn = modules[node.bn] if node.bn else (mod if node.op == OpCode.AFFINE else None)
    if bn is None:
        return None, None if bias is None else bias.astype(np.float32)
    var = bn.running_var.detach().double().cpu().numpy()
    mean = bn.running_mean.detach().double().cpu().numpy()
    gamma = bn.weight.detach().double().cpu().numpy() if bn.weight is not None else 1.0
    beta = bn.bias.detach().double().cpu().numpy() if bn.bias is not None else 0.0
    scale = gamma / np.sqrt(var + bn.eps) * np.ones_like(mean)
    shift = beta - mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return scale.astype(np.float32), shift.astype(np.float32)


def build(
    graph: Graph,
    model: nn.Module,
    *,
    clusters=None,
    thresholds=None,
    labels=None,
    input_mean=None,
    input_std=None,
    metadata=None,
    exit_policy="max_softmax",
    index_encoding: str | list[str] = "auto",
    channel_dtype: str = "f32",
    seed: int = 0,
) -> tuple[bytes, list[SectionReport], dict]:
    """Serialise and verify; returns (file bytes, per-section report, metadata)."""
    modules = dict(model.named_modules())
    n_sec = graph.num_sections
    ks = None if clusters is None else cluster.per_section(clusters, n_sec)
    encodings = [index_encoding] * n_sec if isinstance(index_encoding, str) else index_encoding
    if len(encodings) != n_sec:
        raise ValueError(f"index_encoding needs {n_sec} values (one per section)")
    thresholds = _per_exit(thresholds, n_sec)
    c = graph.input_shape[0]
    for name, vec in (("input_mean", input_mean), ("input_std", input_std)):
        if vec is not None and len(vec) != c:
            raise ValueError(f"{name} needs {c} values (one per input channel), got {len(vec)}")
    num_classes = graph.nodes[-1].shape[0] if graph.nodes else 0
    if labels is not None and len(labels) != num_classes:
        raise ValueError(f"labels needs {num_classes} names, got {len(labels)}")
    if exit_policy not in ("max_softmax", "entropy"):
        raise ValueError(f"exit_policy must be 'max_softmax' or 'entropy', got {exit_policy!r}")

    section_params = cluster.section_parameters(graph, model)
    size_hint = 4 * sum(p.numel() for ps in section_params for _, p in ps) // (8 if ks else 1)
    w = _Writer(size_hint + 64 * 1024)
    b = w.b

    # Codebooks and weight tensors, section by section.
    weight_tensor: dict[str, int] = {}
    codebook_offsets = []
    reports = []
    for s, params in enumerate(section_params):
        n_weights = sum(p.numel() for _, p in params)
        if ks is None:
            for name, p in params:
                weight_tensor[name] = w.raw(p.detach().cpu().numpy(), s)
            reports.append(SectionReport(s, n_weights, None, 32, True, 4 * n_weights))
            continue
        book = cluster.codebook_for(s, params, ks[s], seed=seed)
        if not book.exact:
            log.warning(
                "section %d has more than %d distinct weights: clustering it at export; "
                "the file will differ from the model (run cluster_sections first)",
                s,
                ks[s],
            )
        bits = index_bits(len(book.centroids))
        cents = w.f32s(book.centroids)
        Codebook.Start(b)
        Codebook.AddSection(b, s)
        Codebook.AddCentroids(b, cents)
        codebook_offsets.append(Codebook.End(b))
        stored, coded_bits = 0, 0
        for name, p in params:
            encoding, payload = encode_indices(
                book.indices[name], len(book.centroids), encodings[s]
            )
            stored += len(payload)
            coded_bits += 8 * len(payload)
            weight_tensor[name] = w.tensor(
                tuple(p.shape),
                encoding,
                payload,
                s,
                bits=bits if encoding == Encoding.PACKED_INDICES else 0,
                codebook=len(codebook_offsets) - 1,
            )
        everything = (
            np.concatenate([i.ravel() for i in book.indices.values()])
            if params
            else np.zeros(0, np.uint8)
        )
        reports.append(
            SectionReport(
                s,
                n_weights,
                len(book.centroids),
                bits,
                book.exact,
                stored,
                coded_bits_per_weight=coded_bits / max(n_weights, 1),
                entropy_bits_per_weight=rans.entropy_bits(everything, len(book.centroids))
                if n_weights
                else 0.0,
            )
        )

    # Nodes (value 0 = input, node i produces value i + 1).
    value_of = {"input": 0}
    for i, node in enumerate(graph.nodes):
        value_of[node.name] = i + 1
    node_offsets = []
    for node in graph.nodes:
        weight = (
            weight_tensor[f"{node.module}.weight"]
            if node.op in (OpCode.CONV2D, OpCode.LINEAR)
            else -1
        )
        scale, shift = _channel_affine(node, modules)
        scale_t = -1 if scale is None else w.raw(scale, node.section, channel_dtype)
        shift_t = -1 if shift is None else w.raw(shift, node.section, channel_dtype)
        for t in (scale_t, shift_t):
            if t >= 0:
                reports[node.section].stored_bytes += len(w.records[t].payload)
        node_offsets.append(_node(w, node, value_of, weight, scale_t, shift_t))

    section_ranges, begin = [], 0
    for s in range(n_sec):
        end = begin + sum(1 for n in graph.nodes if n.section == s)
        section_ranges.append((begin, end))
        begin = end
    meta = {
        "fp32_param_bytes": str(fp32_param_bytes(model)),
        "model_class": type(model).__name__,
        **(metadata or {}),
    }
    blob = _finish(
        w,
        codebook_offsets=codebook_offsets,
        node_offsets=node_offsets,
        value_shapes=[graph.input_shape] + [n.shape for n in graph.nodes],
        sections=section_ranges,
        exits=[
            (graph.exit_names[s], value_of[logits], thresholds[s])
            for s, logits in enumerate(graph.exits)
        ],
        exit_policy=ExitPolicy.ENTROPY if exit_policy == "entropy" else ExitPolicy.MAX_SOFTMAX,
        metadata=meta,
        labels=labels,
        input_shape=graph.input_shape,
        input_mean=input_mean,
        input_std=input_std,
    )
    return blob, reports, meta


def _finish(
    w: _Writer,
    *,
    codebook_offsets,
    node_offsets,
    value_shapes,
    sections,
    exits,
    exit_policy: int,
    metadata: dict,
    labels,
    input_shape,
    input_mean,
    input_std,
) -> bytes:
    """Tensors, buffers, values, sections, exits, metadata and the root; sealed and verified."""
    b = w.b
    tensor_offsets, buffer_offsets = w.finish_tensors()

    # Values carry only their shape (node i's name names value i + 1); values of
    # equal shape share one table.
    value_offsets = [
        w.once(("value", tuple(shape)), lambda shape=shape: _value(w, shape))
        for shape in value_shapes
    ]

    section_offsets = []
    for begin, end in sections:
        Section.Start(b)
        Section.AddNodeBegin(b, begin)
        Section.AddNodeEnd(b, end)
        section_offsets.append(Section.End(b))

    exit_offsets = []
    for name, logits, threshold in exits:
        name_off = b.CreateString(name)
        Exit.Start(b)
        Exit.AddName(b, name_off)
        Exit.AddLogits(b, logits)
        Exit.AddThreshold(b, threshold)
        exit_offsets.append(Exit.End(b))

    kv_offsets = []
    for key in sorted(metadata):  # `key` attribute: sorted for binary search
        k_off, v_off = b.CreateString(str(key)), b.CreateString(str(metadata[key]))
        KeyValue.Start(b)
        KeyValue.AddKey(b, k_off)
        KeyValue.AddValue(b, v_off)
        kv_offsets.append(KeyValue.End(b))
    label_offsets = [b.CreateString(str(lbl)) for lbl in (labels or [])]

    in_shape = w.u32s(input_shape)
    mean_off = w.f32s(input_mean) if input_mean is not None else None
    std_off = w.f32s(input_std) if input_std is not None else None
    InputSpec.Start(b)
    InputSpec.AddShape(b, in_shape)
    if mean_off is not None:
        InputSpec.AddMean(b, mean_off)
    if std_off is not None:
        InputSpec.AddStd(b, std_off)
    input_off = InputSpec.End(b)

    vectors = {
        name: w.vector_of(offs)
        for name, offs in (
            ("values", value_offsets),
            ("nodes", node_offsets),
            ("sections", section_offsets),
            ("exits", exit_offsets),
            ("tensors", tensor_offsets),
            ("codebooks", codebook_offsets),
            ("buffers", buffer_offsets),
            ("labels", label_offsets),
            ("metadata", kv_offsets),
        )
    }
    writer_off = b.CreateString(WRITER)
    Model.Start(b)
    Model.AddSchemaMajor(b, fmt.SCHEMA_MAJOR)
    Model.AddSchemaMinor(b, fmt.SCHEMA_MINOR)
    Model.AddWriter(b, writer_off)
    Model.AddChecksumCrc32(b, CHECKSUM_PLACEHOLDER)
    Model.AddInput(b, input_off)
    Model.AddValues(b, vectors["values"])
    Model.AddNodes(b, vectors["nodes"])
    Model.AddSections(b, vectors["sections"])
    Model.AddExits(b, vectors["exits"])
    Model.AddExitPolicy(b, exit_policy)
    Model.AddTensors(b, vectors["tensors"])
    Model.AddCodebooks(b, vectors["codebooks"])
    Model.AddBuffers(b, vectors["buffers"])
    Model.AddLabels(b, vectors["labels"])
    Model.AddMetadata(b, vectors["metadata"])
    b.Finish(Model.End(b), file_identifier=fmt.FILE_IDENTIFIER)
    blob = seal(bytearray(b.Output()))

    # Refuse to write anything the runtime would refuse to read.
    verify.check_structure(blob)
    verify.check_model(blob, fmt.parse(blob))
    return blob


def repack(
    blob: bytes,
    *,
    final_exit_only: bool = False,
    metadata: dict | None = None,
    channel_dtype: str | None = None,
    index_encoding: str | list[str] | None = None,
) -> bytes:
    """A verified .escepe file rewritten by this writer (current format version).

    Every tensor's bytes, the codebooks, the graph, thresholds, labels and
    metadata are carried over unchanged, so the model computes bit-identical
    logits; only the layout changes (e.g. 1.0/1.1 -> 1.2 buffer views).
    final_exit_only: drop the shallow exits and every node and tensor only
    they need, leaving the static model (one section, the last exit,
    threshold 0). metadata: entries to add or replace (e.g. fp32_param_bytes
    of the static model, which the file alone cannot know). channel_dtype
    "f16": float32 scale/shift vectors become RAW_F16 (rounded: logits then
    differ slightly); None keeps every tensor's bytes. index_encoding: None keeps
    every index tensor's bytes; one of INDEX_ENCODINGS re-encodes its indices
    (e.g. "auto" to move rANS tensors to the 1.3 interleaved coder), or one per
    section of the output: the same indices and codebooks, so the same logits.
    """
    if channel_dtype not in (None, "f32", "f16"):
        raise ValueError(f"channel_dtype must be None, 'f32' or 'f16', got {channel_dtype!r}")
    verify.check_structure(blob)
    spec = fmt.parse(blob)
    verify.check_model(blob, spec)
    nodes = list(range(len(spec.nodes)))
    exits = [(e.name, e.logits, e.threshold) for e in spec.exits]
    sections = list(spec.sections)
    section_of = [n.section for n in spec.nodes]
    if final_exit_only:
        producer = {n.output: i for i, n in enumerate(spec.nodes)}
        need, todo = set(), [spec.exits[-1].logits]
        while todo:
            v = todo.pop()
            if v in producer and producer[v] not in need:
                need.add(producer[v])
                todo.extend(spec.nodes[producer[v]].inputs)
        nodes = sorted(need)
        exits = [(spec.exits[-1].name, spec.exits[-1].logits, 0.0)]
        sections = [(0, len(nodes))]
        section_of = [0] * len(spec.nodes)
    # Values and tensors renumbered over what is kept, in file order.
    new_value = {0: 0}
    for j, i in enumerate(nodes):
        new_value[spec.nodes[i].output] = j + 1
    used = sorted({t for i in nodes for t in _node_tensors(spec.nodes[i])})
    new_tensor = {t: j for j, t in enumerate(used)}
    tensor_section = {t: section_of[i] for i in nodes for t in _node_tensors(spec.nodes[i])}
    books = sorted({spec.tensors[t].codebook for t in used if spec.tensors[t].codebook >= 0})
    new_book = {c: j for j, c in enumerate(books)}

    w = _Writer(len(blob))
    b = w.b
    codebook_offsets = []
    for c in books:
        section, cents = spec.codebooks[c]
        cents_off = w.f32s(cents)
        Codebook.Start(b)
        Codebook.AddSection(b, 0 if final_exit_only else section)
        Codebook.AddCentroids(b, cents_off)
        codebook_offsets.append(Codebook.End(b))
    channel = {t for i in nodes for t in (spec.nodes[i].scale, spec.nodes[i].shift) if t >= 0}
    for t in used:
        ts = spec.tensors[t]
        data = bytes(fmt.buffer_bytes(blob, spec, ts.buffer))
        if channel_dtype and t in channel and ts.encoding in RAW_DTYPES:
            values = np.frombuffer(data, dtype=RAW_DTYPES[ts.encoding]).reshape(ts.shape)
            w.raw(values, tensor_section[t], channel_dtype)
            continue
        encoding, bits = ts.encoding, ts.bits
        if index_encoding is not None and ENCODINGS[encoding].uses_codebook:
            k = len(spec.codebooks[ts.codebook][1])
            how = (
                index_encoding
                if isinstance(index_encoding, str)
                else index_encoding[tensor_section[t]]
            )
            encoding, data = encode_indices(_stored_indices(ts, data, k), k, how)
            bits = index_bits(k) if encoding == Encoding.PACKED_INDICES else 0
        w.tensor(ts.shape, encoding, data, tensor_section[t], bits, new_book.get(ts.codebook, -1))
    node_offsets = []
    for i in nodes:
        n = spec.nodes[i]
        node_offsets.append(
            _node_table(
                w,
                name=n.name,
                op=n.op,
                inputs=[new_value[v] for v in n.inputs],
                output=new_value[n.output],
                section=section_of[i],
                activation=n.activation,
                weight=new_tensor.get(n.weight, -1),
                scale=new_tensor.get(n.scale, -1),
                shift=new_tensor.get(n.shift, -1),
                options=next(iter(n.options.values()), {}),
            )
        )
    return _finish(
        w,
        codebook_offsets=codebook_offsets,
        node_offsets=node_offsets,
        value_shapes=[spec.values[0].shape]
        + [spec.values[spec.nodes[i].output].shape for i in nodes],
        sections=sections,
        exits=[(name, new_value[v], t) for name, v, t in exits],
        exit_policy=spec.exit_policy,
        metadata={**spec.metadata, **(metadata or {})},
        labels=spec.labels,
        input_shape=spec.input_shape,
        input_mean=spec.input_mean or None,
        input_std=spec.input_std or None,
    )


def _stored_indices(ts, data: bytes, k: int) -> np.ndarray:
    """A verified index tensor's cluster indices, (count,) uint8, whatever its encoding."""
    if ts.encoding == Encoding.RANS_INDICES:
        return rans.decode(data)
    if ts.encoding == Encoding.RANS_INTERLEAVED:
        return rans_interleaved.decode(data)
    identity = np.arange(k, dtype=np.float32)  # exact: k <= 256
    return decode_packed(np.frombuffer(data, np.uint8), ts.bits, ts.count, identity).astype(
        np.uint8
    )


def _node_tensors(node) -> list[int]:
    return [t for t in (node.weight, node.scale, node.shift) if t >= 0]


def seal(blob: bytearray) -> bytes:
    """Fill in Model.checksum_crc32: CRC-32 of the file with the field read as zero."""
    pos = fmt.checksum_position(blob)
    blob[pos : pos + 4] = b"\0\0\0\0"
    blob[pos : pos + 4] = zlib.crc32(blob).to_bytes(4, "little")
    return bytes(blob)


def _per_exit(thresholds, n: int) -> list[float]:
    if thresholds is None:
        # Uncalibrated: run everything to the last exit. Above 1, not 1: a
        # float32 max-softmax does reach exactly 1.0.
        return [NEVER_EXIT] * (n - 1) + [0.0]
    if np.isscalar(thresholds):
        return [float(thresholds)] * n
    values = [float(t) for t in thresholds]
    if len(values) != n:
        raise ValueError(f"thresholds needs {n} values (one per exit), got {len(values)}")
    return values


def _value(w: _Writer, shape) -> int:
    shape_off = w.u32s(shape)
    Value.Start(w.b)
    Value.AddShape(w.b, shape_off)
    return Value.End(w.b)


def _conv_options(w: _Writer, opts: dict) -> int:
    b = w.b
    vecs = [w.u32s(opts[k]) for k in ("kernel", "stride", "padding", "dilation")]
    Conv2DOptions.Start(b)
    Conv2DOptions.AddKernel(b, vecs[0])
    Conv2DOptions.AddStride(b, vecs[1])
    Conv2DOptions.AddPadding(b, vecs[2])
    Conv2DOptions.AddDilation(b, vecs[3])
    Conv2DOptions.AddGroups(b, opts["groups"])
    return Conv2DOptions.End(b)


def _pool_options(w: _Writer, opts: dict) -> int:
    b = w.b
    vecs = [w.u32s(opts[k]) for k in ("kernel", "stride", "padding", "dilation")]
    Pool2DOptions.Start(b)
    Pool2DOptions.AddKernel(b, vecs[0])
    Pool2DOptions.AddStride(b, vecs[1])
    Pool2DOptions.AddPadding(b, vecs[2])
    Pool2DOptions.AddDilation(b, vecs[3])
    Pool2DOptions.AddCeilMode(b, opts["ceil_mode"])
    Pool2DOptions.AddCountIncludePad(b, opts["count_include_pad"])
    Pool2DOptions.AddDivisorOverride(b, opts["divisor_override"])
    return Pool2DOptions.End(b)


def _adaptive_options(w: _Writer, opts: dict) -> int:
    size = w.u32s(opts["output_size"])
    AdaptivePoolOptions.Start(w.b)
    AdaptivePoolOptions.AddOutputSize(w.b, size)
    return AdaptivePoolOptions.End(w.b)


def _options_key(kind: str, opts: dict):
    return (kind,) + tuple(
        (k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(opts.items())
    )


def _node(w: _Writer, node: IRNode, value_of: dict, weight: int, scale: int, shift: int) -> int:
    return _node_table(
        w,
        name=node.name,
        op=node.op,
        inputs=[value_of[i] for i in node.inputs],
        output=value_of[node.name],
        section=node.section,
        activation=node.activation,
        weight=weight,
        scale=scale,
        shift=shift,
        options=node.options,
    )


def _node_table(
    w: _Writer, *, name, op, inputs, output, section, activation, weight, scale, shift, options
) -> int:
    """A Node table; identical option tables are shared between nodes."""
    b = w.b
    name_off = b.CreateString(name)
    inputs_off = w.u32s(inputs)
    opts = options
    conv = pool = adaptive = None
    if op == OpCode.CONV2D:
        conv = w.once(_options_key("conv", opts), lambda: _conv_options(w, opts))
    elif op in (OpCode.MAX_POOL2D, OpCode.AVG_POOL2D):
        pool = w.once(_options_key("pool", opts), lambda: _pool_options(w, opts))
    elif op == OpCode.ADAPTIVE_AVG_POOL2D:
        adaptive = w.once(_options_key("adaptive", opts), lambda: _adaptive_options(w, opts))
    Node.Start(b)
    Node.AddName(b, name_off)
    Node.AddOp(b, op)
    Node.AddInputs(b, inputs_off)
    Node.AddOutput(b, output)
    Node.AddSection(b, section)
    Node.AddActivation(b, activation)
    Node.AddWeight(b, weight)
    Node.AddScale(b, scale)
    Node.AddShift(b, shift)
    if conv is not None:
        Node.AddConv(b, conv)
    if pool is not None:
        Node.AddPool(b, pool)
    if adaptive is not None:
        Node.AddAdaptivePool(b, adaptive)
    return Node.End(b)


def patch_thresholds(blob: bytes, thresholds: list[float]) -> bytes:
    """The same file with new exit thresholds (written in place of the old, CRC re-sealed)."""
    import struct

    from escepe_rt._fbs.Model import Model as FbModel

    verify.check_structure(blob)
    verify.check_model(blob, fmt.parse(blob))
    model = FbModel.GetRootAs(blob, 0)
    values = _per_exit(thresholds, model.ExitsLength())
    out = bytearray(blob)
    for i, t in enumerate(values):
        ex = model.Exits(i)
        slot = ex._tab.Offset(8)  # Exit.threshold: third field, vtable slot 4 + 2*2
        if not slot:
            raise ValueError("this file stores no threshold fields to patch; re-export it")
        struct.pack_into("<f", out, ex._tab.Pos + slot, t)
    out = seal(out)
    # Never hand back what the runtime would refuse (e.g. a NaN threshold).
    verify.check_structure(out)
    verify.check_model(out, fmt.parse(out))
    return out


def main(argv: list[str] | None = None) -> None:
    """python3 -m compiler.export IN -o OUT [--final-exit-only --fp32-param-bytes N]"""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python3 -m compiler.export",
        description="Rewrite a .escepe file in the current format version (same tensor bytes, "
        "same logits), optionally as the static model (last exit only).",
    )
    parser.add_argument("input")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument(
        "--final-exit-only", action="store_true", help="drop the shallow exits and their nodes"
    )
    parser.add_argument(
        "--channel-f16",
        action="store_true",
        help="store the per-channel scale/shift vectors as binary16 (RAW_F16, format 1.2)",
    )
    parser.add_argument(
        "--index-encoding",
        choices=("keep",) + INDEX_ENCODINGS,
        default="keep",
        help="re-encode every index tensor ('auto': per tensor the smallest, preferring the "
        "1.3 interleaved rANS coder within 1%% of it); 'keep' (default) keeps their bytes",
    )
    parser.add_argument(
        "--fp32-param-bytes",
        type=int,
        help="metadata fp32_param_bytes to store (the static model's own parameter count x 4; "
        "the file alone cannot know it)",
    )
    args = parser.parse_args(argv)
    with open(args.input, "rb") as f:
        blob = f.read()
    meta = {} if args.fp32_param_bytes is None else {"fp32_param_bytes": str(args.fp32_param_bytes)}
    if args.final_exit_only and not meta:
        parser.error("--final-exit-only needs --fp32-param-bytes (the static model's fp32 bytes)")
    out = repack(
        blob,
        final_exit_only=args.final_exit_only,
        metadata=meta,
        channel_dtype="f16" if args.channel_f16 else None,
        index_encoding=None if args.index_encoding == "keep" else args.index_encoding,
    )
    atomic_write(args.output, out)
    print(f"{args.input}: {len(blob):,} B -> {args.output}: {len(out):,} B")


if __name__ == "__main__":
    main()
