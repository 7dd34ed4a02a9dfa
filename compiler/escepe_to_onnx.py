"""Write the network inside a .escepe file as a plain fp32 ONNX model (for onnxruntime / TensorRT).

    escepe_to_onnx("m.escepe", "m.onnx")              # one output per exit: exit0_logits, ...
    escepe_to_onnx("m.escepe", "e1.onnx", exit=1)     # only exit 1 and what it needs

The file is opened with ``escepe_rt.load`` (so it is fully verified: a bad file is a
``FormatError``) and every weight is read through the runtime's own decoder, so the ONNX graph
holds exactly the decompressed (clustered) weights that escepe_rt computes with.

Op mapping, chosen for onnxruntime speed while staying exact to escepe_rt's semantics
(schema/SPEC.md):

* CONV2D / LINEAR: ``y = op(x) * scale + shift`` is folded into the weights and a bias
  (``W * scale``, ``b = shift``): one Conv / Gemm, which ORT fuses with a following Relu/Clip.
* AFFINE: Mul + Add with (1, C, 1, 1) or (1, F) constants.
* fused activations: Relu, or Clip(0, 6) for RELU6.
* MAX_POOL2D: MaxPool. For ``ceil_mode`` the extra bottom/right padding torch's ceil mode
  implies is written out explicitly (with torch's rule that a window starting in the right
  padding is dropped, taken from the verified output shape), so ORT's own ceil-mode rule never
  matters.
* AVG_POOL2D: AveragePool when not ceil_mode and no divisor_override (then ORT's and torch's
  divisors agree). Otherwise: an AveragePool over an explicitly padded extent that divides every
  window by kh*kw, times a constant (1, 1, Ho, Wo) map ``kh*kw / divisor[oy, ox]`` computed with
  the runtime's rule (window clipped to the padded extent, count_include_pad, divisor_override).
* ADAPTIVE_AVG_POOL2D: GlobalAveragePool for 1x1; AveragePool when the bins are equal;
  otherwise two MatMuls with constant bin-averaging matrices (exact torch bins).
* FLATTEN: Flatten(axis=1) (NCHW order, as torch.flatten(x, 1)); ADD: Add; CONCAT: Concat(axis=1).

The input is ``input``, float32 NCHW with a dynamic batch dimension ``batch``. Labels, exit
thresholds, the exit policy, input normalisation and the file's metadata are stored in the
ONNX model's metadata_props (values are JSON where they are lists).
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from compiler.atomic import atomic_write

log = logging.getLogger("escepe.escepe_to_onnx")

OPSET = 17
INPUT_NAME = "input"
__all__ = ["OPSET", "INPUT_NAME", "escepe_to_onnx", "build_onnx", "exit_output_name"]


def exit_output_name(index: int) -> str:
    return f"exit{index}_logits"


def escepe_to_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    exit: int | None = None,
    *,
    opset: int = OPSET,
) -> list[str]:
    """Convert ``src`` (.escepe) to ``dst`` (.onnx), atomically; returns the output names.

    exit: None -> one output per exit (``exit0_logits`` ... shallowest first); an int
        (negative counts from the end) -> only that exit's logits, and only the nodes it needs.
    Raises escepe_rt.FormatError for a bad .escepe file, ValueError for a bad exit index.
    """
    import onnx

    import escepe_rt

    model = escepe_rt.load(src, decode="lazy")
    proto = build_onnx(model, exit=exit, opset=opset)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(dst, proto.SerializeToString())
    names = [o.name for o in proto.graph.output]
    log.info("wrote %s (%d nodes, outputs %s)", dst, len(proto.graph.node), names)
    return names


# ------------------------------------------------------------------------------- graph builder


class _Graph:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self):
        self.nodes = []
        self.initializers = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def add(self, op: str, inputs: list[str], output: str | None = None, hint="", **attrs) -> str:
        from onnx import helper

        output = output or self.name(hint or op.lower())
        self.nodes.append(
            helper.make_node(op, inputs, [output], name=self.name(hint or op), **attrs)
        )
        return output


def build_onnx(model, exit: int | None = None, *, opset: int = OPSET):
    """ONNX ModelProto of a loaded escepe_rt.Model (all exits, or only ``exit``)."""
    import onnx
    from onnx import TensorProto, helper

    from escepe_rt._fbs.ExitPolicy import ExitPolicy

    spec = model.spec
    n_exits = len(spec.exits)
    if exit is None:
        chosen = list(range(n_exits))
    else:
        if isinstance(exit, bool) or not isinstance(exit, (int, np.integer)):
            raise ValueError(f"exit must be an int exit index or None, got {exit!r}")
        if not -n_exits <= int(exit) < n_exits:
            raise ValueError(f"exit {exit} out of range: the model has {n_exits} exits")
        chosen = [int(exit) % n_exits]

    # only the nodes the chosen exits' logits depend on, in file (execution) order
    producer = {node.output: i for i, node in enumerate(spec.nodes)}
    needed: set[int] = set()
    stack = [spec.exits[e].logits for e in chosen]
    while stack:
        v = stack.pop()
        i = producer.get(v)
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(spec.nodes[i].inputs)

    g = _Graph()
    names = {0: INPUT_NAME}
    outputs: dict[int, str] = {}  # value -> the graph output name it is first exported as
    for e in chosen:
        outputs.setdefault(spec.exits[e].logits, exit_output_name(e))
    executor = model._executor  # escepe_rt's decoder: the weights exactly as the runtime sees
    for i in sorted(needed):
        node = spec.nodes[i]
        y = _emit_node(g, spec, executor, i, node, [names[v] for v in node.inputs])
        if node.output in outputs:
            y = g.add("Identity", [y], outputs[node.output], hint="exit")
        names[node.output] = y

    graph_outputs = []
    for e in chosen:
        v = spec.exits[e].logits
        name = exit_output_name(e)
        if outputs[v] != name:  # two exits on one value: a second name for it
            g.add("Identity", [names[v]], name, hint="exit")
        graph_outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *spec.values[v].shape])
        )
    graph = helper.make_graph(
        g.nodes,
        "escepe",
        [
            helper.make_tensor_value_info(
                INPUT_NAME, TensorProto.FLOAT, ["batch", *spec.input_shape]
            )
        ],
        graph_outputs,
        initializer=g.initializers,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="escepe",
        producer_version=_version(),
        doc_string=f"converted from {os.path.basename(model.path)} by compiler.escepe_to_onnx",
    )
    proto.ir_version = min(proto.ir_version, 9)  # readable by older onnxruntime builds too
    policy = {ExitPolicy.MAX_SOFTMAX: "max_softmax", ExitPolicy.ENTROPY: "entropy"}
    meta = {
        "escepe.exits": json.dumps(chosen),
        "escepe.exit_names": json.dumps([spec.exits[e].name for e in chosen]),
        # float32 thresholds written at their shortest repr (0.58, not 0.5799999833)
        "escepe.thresholds": json.dumps(
            [float(str(np.float32(spec.exits[e].threshold))) for e in chosen]
        ),
        "escepe.exit_policy": policy.get(spec.exit_policy, str(spec.exit_policy)),
        "escepe.labels": json.dumps(list(spec.labels)),
        "escepe.input_shape": json.dumps(list(spec.input_shape)),
        "escepe.input_mean": json.dumps(list(spec.input_mean)),
        "escepe.input_std": json.dumps(list(spec.input_std)),
        "escepe.schema_version": "{}.{}".format(*spec.schema_version),
        "escepe.writer": spec.writer,
    }
    meta.update({f"escepe.meta.{k}": v for k, v in spec.metadata.items()})
    onnx.helper.set_model_props(proto, meta)
    return proto


def _version() -> str:
    import escepe_rt

    return escepe_rt.__version__


def _tensor(executor, index: int) -> np.ndarray | None:
    return None if index < 0 else np.asarray(executor.tensor(index), dtype=np.float32)


def _activation(g: _Graph, y: str, act: int) -> str:
    from escepe_rt._fbs.Activation import Activation

    if act == Activation.NONE:
        return y
    if act == Activation.RELU:
        return g.add("Relu", [y])
    if act == Activation.RELU6:
        lo = g.const("zero", np.array(0.0, np.float32))
        hi = g.const("six", np.array(6.0, np.float32))
        return g.add("Clip", [y, lo, hi], hint="relu6")
    raise ValueError(f"unsupported activation {act}")  # verify.py refuses these


def _folded(executor, node, cout: int, weight: np.ndarray):
    """(W * scale per output channel, bias = shift), in float32, as the runtime's epilogue."""
    scale = _tensor(executor, node.scale)
    shift = _tensor(executor, node.shift)
    w = weight.astype(np.float64)
    if scale is not None:
        w = w * scale.astype(np.float64).reshape(cout, *([1] * (w.ndim - 1)))
    bias = np.zeros(cout, np.float32) if shift is None else shift.reshape(cout)
    return w.astype(np.float32), bias.astype(np.float32)


def _emit_node(g: _Graph, spec, executor, i: int, node, xs: list[str]) -> str:
    from escepe_rt._fbs.OpCode import OpCode

    op = node.op
    where = f"nodes[{i}] '{node.name}'"
    in_shape = spec.values[node.inputs[0]].shape if node.inputs else ()
    out_shape = spec.values[node.output].shape
    if op == OpCode.CONV2D:
        o = node.options["conv"]
        w, b = _folded(executor, node, out_shape[0], _tensor(executor, node.weight))
        ph, pw = o["padding"]
        y = g.add(
            "Conv",
            [xs[0], g.const("conv_w", w), g.const("conv_b", b)],
            kernel_shape=list(w.shape[2:]),
            strides=list(o["stride"]),
            pads=[ph, pw, ph, pw],
            dilations=list(o["dilation"]),
            group=int(o["groups"]),
        )
    elif op == OpCode.LINEAR:
        w, b = _folded(executor, node, out_shape[0], _tensor(executor, node.weight))
        y = g.add("Gemm", [xs[0], g.const("fc_w", w), g.const("fc_b", b)], transB=1)
    elif op == OpCode.AFFINE:
        bshape = (1, -1, 1, 1) if len(in_shape) == 3 else (1, -1)
        y = xs[0]
        scale = _tensor(executor, node.scale)
        shift = _tensor(executor, node.shift)
        if scale is not None:
            y = g.add("Mul", [y, g.const("affine_scale", scale.reshape(bshape))])
        if shift is not None:
            y = g.add("Add", [y, g.const("affine_shift", shift.reshape(bshape))])
        if y == xs[0]:
            y = g.add("Identity", [y])
    elif op == OpCode.ACTIVATION:
        y = g.add("Identity", [xs[0]]) if node.activation == 0 else xs[0]
    elif op == OpCode.ADD:
        y = g.add("Add", xs)
    elif op == OpCode.CONCAT:
        y = g.add("Concat", xs, axis=1)
    elif op == OpCode.FLATTEN:
        y = g.add("Flatten", [xs[0]], axis=1)
    elif op == OpCode.MAX_POOL2D:
        y = _max_pool(g, xs[0], node.options["pool"], in_shape, out_shape)
    elif op == OpCode.AVG_POOL2D:
        y = _avg_pool(g, xs[0], node.options["pool"], in_shape, out_shape)
    elif op == OpCode.ADAPTIVE_AVG_POOL2D:
        y = _adaptive_avg_pool(g, xs[0], in_shape, out_shape)
    else:
        raise ValueError(f"{where}: op code {op} has no ONNX mapping")
    return _activation(g, y, node.activation)


def _tail_pads(in_hw, out_hw, kernel, stride, padding, dilation) -> list[int]:
    """Bottom/right padding so that floor-mode pooling yields exactly out_hw windows, all
    starting where torch's (ceil-mode) windows start: last window end - (input + top pad)."""
    return [
        max(0, (o - 1) * s + d * (k - 1) + 1 - n - p)
        for n, o, k, s, p, d in zip(in_hw, out_hw, kernel, stride, padding, dilation)
    ]


def _floor_out(n, k, s, p_head, p_tail, d) -> int:
    return (n + p_head + p_tail - d * (k - 1) - 1) // s + 1


def _pool_with_tail(g, x, op, o, in_shape, out_shape, dilation, pad_value, **attrs) -> str:
    """`op` (MaxPool / AveragePool, floor mode) over x padded to torch's ceil-mode extent."""
    kernel, stride, padding = list(o["kernel"]), list(o["stride"]), list(o["padding"])
    in_hw, out_hw = list(in_shape[1:]), list(out_shape[1:])
    tail = _tail_pads(in_hw, out_hw, kernel, stride, padding, dilation)
    pads = padding + tail
    if all(p < k for p, k in zip(pads, kernel + kernel)):
        # ORT's pools take pads smaller than the kernel; they pad with -inf (max) / count them
        y = g.add(op, [x], kernel_shape=kernel, strides=stride, pads=pads, **attrs)
    else:
        onnx_pads = [0, 0, *padding, 0, 0, *tail]
        pad_const = g.const("pad_value", np.array(pad_value, np.float32))
        xp = g.add("Pad", [x, g.const("pads", np.array(onnx_pads, np.int64)), pad_const])
        y = g.add(op, [xp], kernel_shape=kernel, strides=stride, pads=[0, 0, 0, 0], **attrs)
    got = [_floor_out(*a) for a in zip(in_hw, kernel, stride, padding, tail, dilation)]
    if got != out_hw:  # never more than one extra row/column; keep torch's count
        y = g.add(
            "Slice",
            [
                y,
                g.const("starts", np.array([0, 0], np.int64)),
                g.const("ends", np.array(out_hw, np.int64)),
                g.const("axes", np.array([2, 3], np.int64)),
            ],
        )
    return y


def _max_pool(g, x, o, in_shape, out_shape) -> str:
    dilation = list(o["dilation"])
    if not o["ceil_mode"]:
        ph, pw = o["padding"]
        return g.add(
            "MaxPool",
            [x],
            kernel_shape=list(o["kernel"]),
            strides=list(o["stride"]),
            pads=[ph, pw, ph, pw],
            dilations=dilation,
        )
    return _pool_with_tail(
        g, x, "MaxPool", o, in_shape, out_shape, dilation, -np.inf, dilations=dilation
    )


def _avg_divisors(o, in_shape, out_shape) -> np.ndarray:
    """(Ho, Wo) divisor of every window, exactly as escepe_rt.kernels._avg_pool computes it."""
    (kh, kw), (sh, sw), (ph, pw) = o["kernel"], o["stride"], o["padding"]
    _, h, w = in_shape
    _, ho, wo = out_shape
    div = np.empty((ho, wo), np.float64)
    for oy in range(ho):
        y0 = oy * sh - ph
        y1 = min(y0 + kh, h + ph)
        pool_h, vy = y1 - y0, min(y1, h) - max(y0, 0)
        for ox in range(wo):
            x0 = ox * sw - pw
            x1 = min(x0 + kw, w + pw)
            pool_w, vx = x1 - x0, min(x1, w) - max(x0, 0)
            if o["divisor_override"]:
                div[oy, ox] = o["divisor_override"]
            elif o["count_include_pad"]:
                div[oy, ox] = pool_h * pool_w
            else:
                div[oy, ox] = vy * vx
    return div


def _avg_pool(g, x, o, in_shape, out_shape) -> str:
    kernel, stride = list(o["kernel"]), list(o["stride"])
    ph, pw = o["padding"]
    if not o["ceil_mode"] and not o["divisor_override"]:
        # floor mode never clips a window at the padded edge: ORT's divisors are torch's
        return g.add(
            "AveragePool",
            [x],
            kernel_shape=kernel,
            strides=stride,
            pads=[ph, pw, ph, pw],
            count_include_pad=int(bool(o["count_include_pad"])),
        )
    # sum of every window / (kh*kw) over zero padding, then * (kh*kw / torch's divisor)
    y = _pool_with_tail(
        g, x, "AveragePool", o, in_shape, out_shape, [1, 1], 0.0, count_include_pad=1
    )
    factor = (kernel[0] * kernel[1]) / _avg_divisors(o, in_shape, out_shape)
    if np.all(factor == 1.0):
        return y
    return g.add("Mul", [y, g.const("avg_factor", factor.astype(np.float32)[None, None])])


def _adaptive_avg_pool(g, x, in_shape, out_shape) -> str:
    _, h, w = in_shape
    _, oh, ow = out_shape
    if oh == 1 and ow == 1:
        return g.add("GlobalAveragePool", [x])
    if h % oh == 0 and w % ow == 0:  # equal bins: torch's bins are exactly these windows
        k = [h // oh, w // ow]
        return g.add("AveragePool", [x], kernel_shape=k, strides=k)
    # unequal (overlapping) bins: y = A_h @ x @ A_w^T with bin-averaging matrices
    a_w = _bin_matrix(w, ow).T  # (W, ow)
    a_h = _bin_matrix(h, oh)  # (oh, H)
    y = g.add("MatMul", [x, g.const("adaptive_w", a_w)])
    return g.add("MatMul", [g.const("adaptive_h", a_h), y])


def _bin_matrix(n: int, bins: int) -> np.ndarray:
    """(bins, n): row i averages torch's adaptive bin [floor(i*n/bins), ceil((i+1)*n/bins))."""
    m = np.zeros((bins, n), np.float32)
    for i in range(bins):
        a, b = (i * n) // bins, -(-((i + 1) * n) // bins)
        m[i, a:b] = 1.0 / (b - a)
    return m
