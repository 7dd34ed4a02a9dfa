"""Every check on untrusted bytes, done once at load, before any kernel runs.

Two passes:
1. `check_structure` walks the flatbuffer like flatc's C++ Verifier: every
   table, vtable, vector and string must lie inside the file, be aligned, and
   strings must be UTF-8. It is driven by LAYOUT, a mirror of schema/escepe.fbs
   (a test checks that the two agree). After it, the generated accessors can
   follow any offset without reading outside the file. Tables and vectors reached
   more than once count each time (<= READ_BUDGET x the file), so shared offsets
   cannot make parse() expand a small file.
2. `check_model` checks meaning: versions, checksum, graph consistency and
   shape inference, tensor buffers against shapes and bit widths, every index
   < its codebook size (a numba scan), sections and exits.
Nothing a small file declares can cost much more than its size says: decoded
weights <= MAX_DECODED_PER_BYTE per byte, all of a sample's values <= 2^26
elements, im2col columns and pooling windows bounded per sample (tests/test_fuzz.py
builds a small file for each bound that once asked for GBs or hours).
Every failure is a FormatError naming the field and the byte offset.
"""

from __future__ import annotations

import math
import re
import struct
import zlib

import numpy as np

from escepe_rt import decode
from escepe_rt._fbs.Activation import Activation
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt._fbs.ExitPolicy import ExitPolicy
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.encodings import ENCODINGS, RANS_ENCODINGS, RAW_DTYPES
from escepe_rt.errors import FormatError
from escepe_rt.format import (
    BUFFER_ALIGNMENT,
    FILE_IDENTIFIER,
    SCHEMA_MAJOR,
    SCHEMA_MINOR,
    ModelSpec,
    NodeSpec,
    buffer_bytes,
    checksum_position,
)

# Per-sample activation size cap (elements): a small file must not be able to
# ask for a huge allocation per sample. 2**26 floats = 256 MiB per sample.
MAX_VALUE_ELEMENTS = 1 << 26
MAX_FILE_BYTES = (1 << 31) - 1  # flatbuffers' 32-bit offsets
READ_BUDGET = 8  # reached tables + vectors + strings <= 8 x file size (see _Walker)
# Decoded (index-coded) weights per byte of file: 1024 is 0.008 bits per weight, far below
# any real clustered model (a few bits; well under 1 with rANS over a pruned zero cluster).
MAX_DECODED_PER_BYTE = 1024
# Window elements one sample's pooling visits (outputs x channels x window): real nets use
# thousands to millions; 2^32 is seconds of work.
MAX_POOL_WORK = 1 << 32

# Field types: scalar struct codes, "str", "[x]" vectors of scalars, "[str]",
# "T:Name" tables and "[T:Name]" vectors of tables. Order = schema order.
LAYOUT: dict[str, list[tuple[str, str]]] = {
    "Buffer": [("data", "[B]"), ("view_of", "i"), ("offset", "I"), ("size", "I")],
    "Codebook": [("section", "I"), ("centroids", "[f]")],
    "Tensor": [
        ("name", "str"),
        ("shape", "[I]"),
        ("encoding", "B"),
        ("bits", "B"),
        ("codebook", "i"),
        ("buffer", "I"),
    ],
    "Conv2DOptions": [
        ("kernel", "[I]"),
        ("stride", "[I]"),
        ("padding", "[I]"),
        ("dilation", "[I]"),
        ("groups", "I"),
    ],
    "Pool2DOptions": [
        ("kernel", "[I]"),
        ("stride", "[I]"),
        ("padding", "[I]"),
        ("dilation", "[I]"),
        ("ceil_mode", "?"),
        ("count_include_pad", "?"),
        ("divisor_override", "I"),
    ],
    "AdaptivePoolOptions": [("output_size", "[I]")],
    "Value": [("name", "str"), ("shape", "[I]")],
    "Node": [
        ("name", "str"),
        ("op", "B"),
        ("inputs", "[I]"),
        ("output", "I"),
        ("section", "I"),
        ("activation", "B"),
        ("weight", "i"),
        ("scale", "i"),
        ("shift", "i"),
        ("conv", "T:Conv2DOptions"),
        ("pool", "T:Pool2DOptions"),
        ("adaptive_pool", "T:AdaptivePoolOptions"),
    ],
    "Section": [("node_begin", "I"), ("node_end", "I")],
    "Exit": [("name", "str"), ("logits", "I"), ("threshold", "f")],
    "InputSpec": [("shape", "[I]"), ("mean", "[f]"), ("std", "[f]")],
    "KeyValue": [("key", "str"), ("value", "str")],
    "Model": [
        ("schema_major", "H"),
        ("schema_minor", "H"),
        ("writer", "str"),
        ("checksum_crc32", "I"),
        ("input", "T:InputSpec"),
        ("values", "[T:Value]"),
        ("nodes", "[T:Node]"),
        ("sections", "[T:Section]"),
        ("exits", "[T:Exit]"),
        ("exit_policy", "B"),
        ("tensors", "[T:Tensor]"),
        ("codebooks", "[T:Codebook]"),
        ("buffers", "[T:Buffer]"),
        ("labels", "[str]"),
        ("metadata", "[T:KeyValue]"),
    ],
}
# Vectors whose data must start on a 64-byte boundary (zero-copy views).
ALIGNED_VECTORS = {("Buffer", "data")}


class _Walker:
    """Bounds-checking flatbuffer walker over a read-only byte buffer."""

    def __init__(self, buf):
        self.buf = buf
        self.size = len(buf)
        # Bytes of tables, vectors and strings reached so far, counted each time they are
        # reached. Writers share only small things (vtables, which are not counted; since
        # 1.2 identical shape/option vectors and tables), so more than READ_BUDGET x the
        # file means shared offsets that would make parse() expand a small file into a
        # huge one (a quadratic "bomb"), e.g. 20,000 labels that all point at one 200 kB
        # string: 4 GB of Python strings from a 280 kB file.
        self.reached = 0
        self.budget = READ_BUDGET * self.size + 4096

    def _reach(self, n: int, path: str, pos: int) -> None:
        self.reached += n
        if self.reached > self.budget:
            raise FormatError(
                f"tables, vectors and strings reached from the root add up to more than "
                f"{READ_BUDGET}x the file's {self.size} bytes: offsets are shared to make the "
                "file expand when read",
                field=path,
                offset=pos,
            )

    def _u32(self, pos: int, path: str) -> int:
        self._need(pos, 4, path, 4)
        return struct.unpack_from("<I", self.buf, pos)[0]

    def _need(self, pos: int, n: int, path: str, align: int = 1) -> None:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise FormatError(
                f"{n} bytes at offset {pos} run past the end of the file ({self.size} bytes)",
                field=path,
                offset=pos,
            )
        if pos % align:
            raise FormatError(f"offset {pos} is not {align}-byte aligned", field=path, offset=pos)

    def table(self, pos: int, kind: str, path: str) -> None:
        here = path or "root"  # errors about the root table itself name it
        self._need(pos, 4, here, 4)
        vtable = pos - struct.unpack_from("<i", self.buf, pos)[0]
        self._need(vtable, 4, here + " (vtable)", 2)
        vt_size, obj_size = struct.unpack_from("<HH", self.buf, vtable)
        if vt_size < 4 or vt_size % 2:
            raise FormatError(f"bad vtable size {vt_size}", field=here, offset=vtable)
        self._need(vtable, vt_size, here + " (vtable)")
        if obj_size < 4:
            raise FormatError(f"bad table size {obj_size}", field=here, offset=pos)
        self._need(pos, obj_size, here)
        self._reach(obj_size, here, pos)
        n_slots = (vt_size - 4) // 2
        for i, (name, ftype) in enumerate(LAYOUT[kind]):
            if i >= n_slots:
                break  # older writer: absent fields take their defaults
            field_off = struct.unpack_from("<H", self.buf, vtable + 4 + 2 * i)[0]
            if field_off == 0:
                continue
            fpath = f"{path}.{name}" if path else name
            fpos = pos + field_off
            width = struct.calcsize("<" + ftype) if _is_scalar(ftype) else 4
            if field_off + width > obj_size:
                raise FormatError("field lies outside its table", field=fpath, offset=fpos)
            self._need(fpos, width, fpath, width)
            if not _is_scalar(ftype):
                self.reference(fpos + self._u32(fpos, fpath), ftype, fpath, kind, name)
        # Fields beyond LAYOUT belong to a newer minor version; their offsets are
        # not followed by this reader, so they need no checks here.

    def reference(self, target: int, ftype: str, path: str, kind: str, name: str) -> None:
        if ftype.startswith("T:"):
            self.table(target, ftype[2:], path)
            return
        n = self._u32(target, path)
        data = target + 4
        if ftype == "str":
            self._need(data, n + 1, path)
            self._reach(4 + n, path, target)
            try:
                bytes(self.buf[data : data + n]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise FormatError(
                    f"string is not UTF-8 ({e.reason})", field=path, offset=data
                ) from None
            return
        elem = ftype[1:-1]
        width = 4 if elem in ("str",) or elem.startswith("T:") else struct.calcsize("<" + elem)
        if n > (self.size - data) // max(width, 1):
            raise FormatError(
                f"vector of {n} x {width} bytes runs past the end of the file ({self.size} bytes)",
                field=path,
                offset=target,
            )
        self._need(data, n * width, path, min(width, 4))
        self._reach(4 + n * width, path, target)
        if (kind, name) in ALIGNED_VECTORS and data % BUFFER_ALIGNMENT:
            raise FormatError(
                f"buffer data is not {BUFFER_ALIGNMENT}-byte aligned", field=path, offset=data
            )
        if elem == "str" or elem.startswith("T:"):
            offsets = np.frombuffer(self.buf, dtype="<u4", count=n, offset=data)
            for j in range(n):
                at = data + 4 * j
                self.reference(at + int(offsets[j]), elem, f"{path}[{j}]", kind, name)


def _is_scalar(ftype: str) -> bool:
    return ftype not in ("str",) and not ftype.startswith(("[", "T:"))


def check_structure(buf) -> None:
    """Identifier, root offset and every table/vector/string inside the file."""
    size = len(buf)
    if size < 8:
        raise FormatError(f"file is {size} bytes, too short for a flatbuffer", "file", 0)
    if size > MAX_FILE_BYTES:
        raise FormatError(f"file is {size} bytes; the format's limit is 2 GiB", "file", 0)
    ident = bytes(buf[4:8])
    if ident != FILE_IDENTIFIER:
        raise FormatError(
            f"file identifier is {ident!r}, expected {FILE_IDENTIFIER!r}: not a .escepe file",
            field="file_identifier",
            offset=4,
        )
    walker = _Walker(buf)
    walker.table(walker._u32(0, "root"), "Model", "")


# --------------------------------------------------------------------------- meaning


def _fail(msg: str, field: str, offset: int | None = None):
    raise FormatError(msg, field=field, offset=offset)


def pool_output_size(size, kernel, stride, padding, dilation, ceil_mode) -> int:
    """torch's pooling output length (incl. the ceil_mode last-window rule)."""
    eff = dilation * (kernel - 1) + 1
    num = size + 2 * padding - eff
    if num < 0:
        return 0
    out = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pairs(opts: dict, keys, field: str) -> list[tuple[int, int]]:
    out = []
    for k in keys:
        v = opts.get(k, ())
        if len(v) != 2:
            _fail(f"{k} must have 2 entries, has {len(v)}", f"{field}.{k}")
        out.append(tuple(v))
    return out


def infer_shape(node: NodeSpec, shapes: list[tuple], spec: ModelSpec, path: str) -> tuple:
    """Per-sample output shape of `node` from its input shapes; FormatError if they don't fit."""
    op = node.op
    arity = {OpCode.ADD: 2}.get(op, 1)
    if op == OpCode.CONCAT:
        if len(shapes) < 1:
            _fail("CONCAT needs at least one input", path + ".inputs")
    elif len(shapes) != arity:
        _fail(f"op needs {arity} input(s), has {len(shapes)}", path + ".inputs")
    x = shapes[0]
    if op == OpCode.CONV2D:
        if len(x) != 3:
            _fail(f"CONV2D input must be (C, H, W), is {x}", path + ".inputs")
        opts = node.options.get("conv")
        if opts is None:
            _fail("CONV2D without conv options", path + ".conv")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pairs(
            opts, ("kernel", "stride", "padding", "dilation"), path + ".conv"
        )
        groups = opts["groups"]
        if min(kh, kw, sh, sw, dh, dw, groups) < 1:
            _fail("kernel, stride, dilation and groups must be >= 1", path + ".conv")
        w = _tensor(spec, node.weight, path + ".weight")
        if len(w.shape) != 4 or w.shape[2:] != (kh, kw):
            _fail(f"weight shape {w.shape} does not match kernel {(kh, kw)}", path + ".weight")
        cout, cin_g = w.shape[0], w.shape[1]
        if x[0] != cin_g * groups or cout % groups:
            _fail(
                f"weight {w.shape} with groups={groups} does not fit input channels {x[0]}",
                path + ".weight",
            )
        ho = pool_output_size(x[1], kh, sh, ph, dh, False)
        wo = pool_output_size(x[2], kw, sw, pw, dw, False)
        if ho < 1 or wo < 1:
            _fail(f"output would be empty for input {x}", path)
        # All groups' columns: the grouped kernel builds them at once (a cin_g-only bound
        # let groups multiply it).
        if ho * wo * x[0] * kh * kw > MAX_VALUE_ELEMENTS:
            _fail("im2col buffer would exceed the per-sample limit", path)
        _channel_tensors(spec, node, cout, path)
        return (cout, ho, wo)
    if op == OpCode.LINEAR:
        if len(x) != 1:
            _fail(f"LINEAR input must be (F,), is {x}", path + ".inputs")
        w = _tensor(spec, node.weight, path + ".weight")
        if len(w.shape) != 2 or w.shape[1] != x[0]:
            _fail(f"weight shape {w.shape} does not fit input features {x[0]}", path + ".weight")
        _channel_tensors(spec, node, w.shape[0], path)
        return (w.shape[0],)
    if op == OpCode.AFFINE:
        _channel_tensors(spec, node, x[0], path)
        return x
    if op == OpCode.ACTIVATION:
        return x
    if op in (OpCode.MAX_POOL2D, OpCode.AVG_POOL2D):
        if len(x) != 3:
            _fail(f"pooling input must be (C, H, W), is {x}", path + ".inputs")
        opts = node.options.get("pool")
        if opts is None:
            _fail("pooling node without pool options", path + ".pool")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pairs(
            opts, ("kernel", "stride", "padding", "dilation"), path + ".pool"
        )
        if min(kh, kw, sh, sw, dh, dw) < 1:
            _fail("kernel, stride and dilation must be >= 1", path + ".pool")
        if 2 * ph > kh or 2 * pw > kw:
            _fail("padding must be at most half the kernel size", path + ".pool.padding")
        if op == OpCode.AVG_POOL2D and (dh, dw) != (1, 1):
            _fail("AVG_POOL2D has no dilation", path + ".pool.dilation")
        ho = pool_output_size(x[1], kh, sh, ph, dh, opts["ceil_mode"])
        wo = pool_output_size(x[2], kw, sw, pw, dw, opts["ceil_mode"])
        if ho < 1 or wo < 1:
            _fail(f"output would be empty for input {x}", path)
        # Padding up to half the kernel lets a window be far larger than the input; the
        # kernels visit every window row: a 464-byte file (a 16384 x 16384 max pool over
        # (1, 64, 64)) took 11 s per sample, and the window size is only bounded by 2^32.
        if ho * wo * x[0] * kh * kw > MAX_POOL_WORK:
            _fail(
                f"{ho}x{wo} outputs x {x[0]} channels x a {kh}x{kw} window is over the "
                f"per-sample limit of {MAX_POOL_WORK} window elements",
                path + ".pool.kernel",
            )
        return (x[0], ho, wo)
    if op == OpCode.ADAPTIVE_AVG_POOL2D:
        if len(x) != 3:
            _fail(f"pooling input must be (C, H, W), is {x}", path + ".inputs")
        opts = node.options.get("adaptive_pool")
        if opts is None:
            _fail("ADAPTIVE_AVG_POOL2D without options", path + ".adaptive_pool")
        ((oh, ow),) = _pairs(opts, ("output_size",), path + ".adaptive_pool")
        if not (1 <= oh <= x[1] and 1 <= ow <= x[2]):
            _fail(f"output size {(oh, ow)} does not fit input {x}", path + ".adaptive_pool")
        return (x[0], oh, ow)
    if op == OpCode.FLATTEN:
        return (math.prod(x),)
    if op == OpCode.ADD:
        if shapes[0] != shapes[1]:
            _fail(f"ADD of shapes {shapes[0]} and {shapes[1]}", path + ".inputs")
        return x
    if op == OpCode.CONCAT:
        if any(len(s) != len(x) or s[1:] != x[1:] for s in shapes):
            _fail(f"CONCAT of incompatible shapes {shapes}", path + ".inputs")
        return (sum(s[0] for s in shapes),) + tuple(x[1:])
    _fail(f"unknown op code {op}; this reader knows 0..{max(_OP_NAMES)}", path + ".op")


_OP_NAMES = {v: k for k, v in vars(OpCode).items() if not k.startswith("_")}
_WEIGHTED = (OpCode.CONV2D, OpCode.LINEAR)
_CHANNELWISE = (OpCode.CONV2D, OpCode.LINEAR, OpCode.AFFINE)


def _tensor(spec: ModelSpec, index: int, path: str):
    if not 0 <= index < len(spec.tensors):
        _fail(f"tensor index {index} out of range (0..{len(spec.tensors) - 1})", path)
    return spec.tensors[index]


def _channel_tensors(spec: ModelSpec, node: NodeSpec, channels: int, path: str) -> None:
    for name, idx in (("scale", node.scale), ("shift", node.shift)):
        if idx == -1:
            continue
        t = _tensor(spec, idx, f"{path}.{name}")
        if t.encoding not in RAW_DTYPES or t.count != channels:
            _fail(f"must be {channels} raw float values, is {t.shape}", f"{path}.{name}")


def check_model(buf, spec: ModelSpec) -> None:
    """Semantic checks; raise FormatError on the first problem.

    A check that names only a field gets that field's byte offset from `locate`.
    """
    try:
        _check_model(buf, spec)
    except FormatError as e:
        if e.offset is None and e.field:
            raise FormatError(e.reason, e.field, locate(buf, e.field)) from None
        raise


def locate(buf, path: str) -> int | None:
    """Byte offset of what a schema path names in a structurally verified file.

    "nodes[3].inputs[1]" -> that uint; "exits[0]" -> the table; "labels" -> the vector's
    length field. An absent field or an index past a vector's end gives the position of
    the table or vector that would hold it. None if the path does not fit the schema.
    """
    try:
        pos = struct.unpack_from("<I", buf, 0)[0]
        kind = "T:Model"
        for name, index in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", path.split(" (")[0]):
            if name:
                if not kind.startswith("T:"):
                    return None
                fields = [f for f, _ in LAYOUT[kind[2:]]]
                slot = fields.index(name)
                vtable = pos - struct.unpack_from("<i", buf, pos)[0]
                vt_size = struct.unpack_from("<H", buf, vtable)[0]
                fo = 0
                if 4 + 2 * slot < vt_size:
                    fo = struct.unpack_from("<H", buf, vtable + 4 + 2 * slot)[0]
                if not fo:
                    return pos
                ftype = LAYOUT[kind[2:]][slot][1]
                pos += fo
                if not _is_scalar(ftype):
                    pos += struct.unpack_from("<I", buf, pos)[0]
                kind = ftype
            else:
                if not kind.startswith("["):
                    return None
                elem = kind[1:-1]
                i = int(index)
                if i >= struct.unpack_from("<I", buf, pos)[0]:
                    return pos
                width = 4 if not _is_scalar(elem) else struct.calcsize("<" + elem)
                pos += 4 + i * width
                if not _is_scalar(elem):
                    pos += struct.unpack_from("<I", buf, pos)[0]
                kind = elem
        return pos
    except (ValueError, KeyError, struct.error):
        return None


def _check_model(buf, spec: ModelSpec) -> None:
    major, minor = spec.schema_version
    if major != SCHEMA_MAJOR:
        _fail(
            f"schema version {major}.{minor} is not supported; this reader reads "
            f"{SCHEMA_MAJOR}.x files (versions {SCHEMA_MAJOR}.0 to {SCHEMA_MAJOR}.{SCHEMA_MINOR}, "
            f"and newer {SCHEMA_MAJOR}.x minors without their new fields); upgrade escepe_rt "
            "for other majors",
            "schema_major",
        )
    _check_checksum(buf, spec)
    _check_buffers(spec)
    _check_tensors(buf, spec)
    _check_graph(spec)


def _check_checksum(buf, spec: ModelSpec) -> None:
    pos = checksum_position(buf)
    if pos is None:
        _fail("checksum is missing", "checksum_crc32")
    crc = zlib.crc32(buf[:pos])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    crc = zlib.crc32(buf[pos + 4 :], crc)
    if crc != spec.checksum:
        _fail(
            f"CRC-32 mismatch: file says {spec.checksum:08x}, contents give {crc:08x} "
            "(corrupt or truncated file)",
            "checksum_crc32",
            pos,
        )


def _check_buffers(spec: ModelSpec) -> None:
    """Buffer views (1.2): each lies inside a data buffer, 4-byte aligned; no views of views."""
    for i, (view_of, offset, size) in enumerate(spec.buffer_views):
        if view_of == -1:
            continue
        path = f"buffers[{i}]"
        table = spec.buffer_tables[i]
        if not 0 <= view_of < len(spec.buffer_views):
            _fail(
                f"view_of {view_of} out of range (0..{len(spec.buffer_views) - 1})",
                path + ".view_of",
                table,
            )
        if spec.buffer_views[view_of][0] != -1:
            _fail(
                f"views buffer {view_of}, itself a view (views of views are not allowed)",
                path + ".view_of",
                table,
            )
        if spec.raw_buffers[i][1]:
            _fail("a view must not hold data of its own", path + ".data", spec.raw_buffers[i][0])
        start, length = spec.raw_buffers[view_of]
        if offset % 4:
            _fail(f"offset {offset} is not 4-byte aligned", path + ".offset", start + offset)
        if offset > length or size > length - offset:
            _fail(
                f"view [{offset}, {offset + size}) runs past the {length} bytes "
                f"of buffer {view_of}",
                path + (".offset" if offset > length else ".size"),
                start + min(offset, length),
            )


def _check_tensors(buf, spec: ModelSpec) -> None:
    for c, (section, cents) in enumerate(spec.codebooks):
        if len(cents) < 1 or len(cents) > 256:
            _fail(f"codebook has {len(cents)} centroids; 1..256 allowed", f"codebooks[{c}]")
        if not np.all(np.isfinite(cents)):
            _fail("centroids must be finite", f"codebooks[{c}].centroids")
        if section >= max(len(spec.sections), 1):
            _fail(f"section {section} does not exist", f"codebooks[{c}].section")
    for i, t in enumerate(spec.tensors):
        path = f"tensors[{i}]"
        info = ENCODINGS.get(t.encoding)
        if info is None:
            _fail(
                f"unknown encoding {t.encoding}; this reader knows {sorted(ENCODINGS)}",
                path + ".encoding",
            )
        if not t.shape or min(t.shape) < 1:
            _fail(f"shape {t.shape} must be non-empty with positive dims", path + ".shape")
        if t.count > MAX_VALUE_ELEMENTS * 4:
            _fail(f"{t.count} elements is over the format's limit", path + ".shape")
        if not 0 <= t.buffer < len(spec.buffers):
            _fail(f"buffer index {t.buffer} out of range", path + ".buffer")
        if not info.min_bits <= t.bits <= info.max_bits:
            _fail(
                f"bits={t.bits}; {info.name} needs {info.min_bits}..{info.max_bits}", path + ".bits"
            )
        offset, length = spec.buffers[t.buffer]
        want = info.nbytes(t.count, t.bits)
        if want is None:
            want = length  # entropy-coded: the header is checked below
        if length != want:
            _fail(
                f"buffer {t.buffer} has {length} bytes; shape {t.shape} at {info.name}"
                f"{'' if not t.bits else f' {t.bits} bits'} needs {want}",
                path,
                offset,
            )
        if info.uses_codebook:
            if not 0 <= t.codebook < len(spec.codebooks):
                _fail(f"codebook index {t.codebook} out of range", path + ".codebook")
            k = len(spec.codebooks[t.codebook][1])
            data = buffer_bytes(buf, spec, t.buffer)
            if t.encoding in RANS_ENCODINGS:
                _check_rans(data, t, k, path, offset)
                continue
            top = decode.max_index(data, t.bits, t.count)
            if top >= k:
                _fail(f"index {top} >= codebook size {k}", path, offset)
        else:
            data = np.frombuffer(buf, dtype=RAW_DTYPES[t.encoding], count=t.count, offset=offset)
            if not np.all(np.isfinite(data)):
                _fail(f"{info.name} tensor holds NaN or inf", path, offset)
    # Raw tensors are views of the file; index-coded ones are decoded to float32. Packed
    # indices take >= 1 bit each, but an rANS index can cost ~0 bits (a one-symbol or very
    # skewed codebook), so without this a 576-byte file declared 2^28 weights and took
    # 2.2 GB at its first predict.
    decoded = sum(t.count for t in spec.tensors if t.encoding != Encoding.RAW_F32)
    if decoded > MAX_DECODED_PER_BYTE * len(buf):
        _fail(
            f"index-coded tensors declare {decoded} weights in all, more than "
            f"{MAX_DECODED_PER_BYTE} per byte of this {len(buf)}-byte file: a small file must "
            "not ask for a huge allocation",
            "tensors",
        )


def _check_rans(data: np.ndarray, t, k: int, path: str, offset: int) -> None:
    """Header of an rANS stream: symbols == codebook size, count == tensor size.

    Symbols are < S by construction of the frequency table, so no index can
    exceed the codebook; the stream's end-state check runs when it is decoded.
    """
    from escepe_rt import rans, rans_interleaved

    coder = rans_interleaved if t.encoding == Encoding.RANS_INTERLEAVED else rans
    try:
        header = coder.parse_header(data)
    except rans.RansError as e:
        _fail(e.reason, path, offset + (e.offset or 0))
    if header.num_symbols != k:
        _fail(f"rANS stream has {header.num_symbols} symbols, codebook has {k}", path, offset)
    if header.count != t.count:
        _fail(
            f"rANS stream holds {header.count} indices, shape {t.shape} needs {t.count}",
            path,
            offset,
        )


def _check_graph(spec: ModelSpec) -> None:
    values, nodes = spec.values, spec.nodes
    if not values:
        _fail("graph has no values", "values")
    if len(spec.input_shape) != 3 or min(spec.input_shape) < 1:
        _fail(f"input shape must be (C, H, W) > 0, is {spec.input_shape}", "input.shape")
    if values[0].shape != spec.input_shape:
        _fail(f"value 0 {values[0].shape} is not the input {spec.input_shape}", "values[0].shape")
    c = spec.input_shape[0]
    for name, vec in (("mean", spec.input_mean), ("std", spec.input_std)):
        if vec and len(vec) != c:
            _fail(f"has {len(vec)} entries for {c} channels", f"input.{name}")
        if not all(math.isfinite(v) for v in vec):
            _fail("must be finite", f"input.{name}")
    if any(v <= 0 for v in spec.input_std):
        _fail("must be > 0", "input.std")
    for j, v in enumerate(values):
        if not 1 <= len(v.shape) <= 3 or min(v.shape) < 1:
            _fail(f"shape {v.shape} must have 1..3 positive dims", f"values[{j}].shape")
        if math.prod(v.shape) > MAX_VALUE_ELEMENTS:
            _fail(f"{v.shape} is over the per-sample limit", f"values[{j}].shape")
    # The executor keeps a chunk's values until the chunk is done, so the limit is on their
    # sum: with a per-value limit alone, a 2 kB file chaining 8 ACTIVATIONs after a
    # 2^26-element CONCAT needed more than 2.5 GB for one sample.
    total = sum(math.prod(v.shape) for v in values)
    if total > MAX_VALUE_ELEMENTS:
        _fail(
            f"values hold {total} elements per sample in all; the limit is "
            f"{MAX_VALUE_ELEMENTS} (256 MiB of float32 per sample)",
            "values",
        )
    if not spec.sections:
        _fail("model has no sections", "sections")
    if len(spec.exits) != len(spec.sections):
        _fail(f"{len(spec.exits)} exits for {len(spec.sections)} sections", "exits")
    expected_begin = 0
    for s, (begin, end) in enumerate(spec.sections):
        if begin != expected_begin or end < begin or end > len(nodes):
            _fail(
                f"node range [{begin}, {end}) must start at {expected_begin} and lie "
                f"within {len(nodes)} nodes",
                f"sections[{s}]",
            )
        expected_begin = end
    if expected_begin != len(nodes):
        _fail(f"sections cover {expected_begin} of {len(nodes)} nodes", "sections")

    produced_in = {0: -1}  # value -> section that produced it (input: before all)
    for i, node in enumerate(nodes):
        path = f"nodes[{i}]"
        begin, end = spec.sections[min(node.section, len(spec.sections) - 1)]
        if node.section >= len(spec.sections) or not begin <= i < end:
            _fail(f"section {node.section} does not contain node {i}", path + ".section")
        if node.activation not in (Activation.NONE, Activation.RELU, Activation.RELU6):
            _fail(f"unknown activation {node.activation}", path + ".activation")
        if node.op in _WEIGHTED:
            if node.weight < 0:
                _fail("op needs a weight tensor", path + ".weight")
        elif node.weight != -1:
            _fail("op takes no weight tensor", path + ".weight")
        if node.op not in _CHANNELWISE:
            for name, idx in (("scale", node.scale), ("shift", node.shift)):
                if idx != -1:
                    _fail(f"op takes no {name} tensor", f"{path}.{name}")
        for k, v in enumerate(node.inputs):
            if v not in produced_in:
                _fail(f"value {v} is not produced before this node", f"{path}.inputs[{k}]")
        if not 0 < node.output < len(values) or node.output in produced_in:
            _fail(f"output value {node.output} is out of range or produced twice", path + ".output")
        shape = infer_shape(node, [values[v].shape for v in node.inputs], spec, path)
        if shape != values[node.output].shape:
            _fail(
                f"op gives shape {shape}, value {node.output} declares {values[node.output].shape}",
                path + ".output",
            )
        produced_in[node.output] = node.section

    classes = None
    for e, ex in enumerate(spec.exits):
        path = f"exits[{e}]"
        if ex.logits not in produced_in or produced_in[ex.logits] > e or ex.logits == 0:
            _fail(f"logits value {ex.logits} is not produced by section {e} or earlier", path)
        shape = values[ex.logits].shape
        if len(shape) != 1 or (classes is not None and shape[0] != classes):
            _fail(f"logits shape {shape}; every exit must give ({classes or 'K'},)", path)
        classes = shape[0]
        if math.isnan(ex.threshold):
            _fail("threshold is NaN", path + ".threshold")
    if spec.labels and len(spec.labels) != classes:
        _fail(f"{len(spec.labels)} labels for {classes} classes", "labels")
    if spec.exit_policy not in (ExitPolicy.MAX_SOFTMAX, ExitPolicy.ENTROPY):
        _fail(f"unknown exit policy {spec.exit_policy}", "exit_policy")
