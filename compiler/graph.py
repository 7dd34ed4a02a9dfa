"""Capture an early-exit nn.Module as an op graph, fold batch-norm, find the sections.

The model's forward(x) returns a list of logits, shallowest exit first. We
trace it with torch.fx, propagate shapes with an example input, lower every
node to one of the format's ops (an unsupported node is an error naming it),
fuse BN into the conv before it (as a per-channel scale/shift kept apart from
the weight, so clustered codebooks keep their meaning) and ReLU/ReLU6 into
their producer, then assign each node to the first exit that needs it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from escepe_rt._fbs.Activation import Activation
from escepe_rt._fbs.OpCode import OpCode


class UnsupportedOpError(ValueError):
    """The model uses an op the format cannot express; names the node and the op."""


@dataclass
class IRNode:
    name: str  # fx node name
    op: int  # OpCode
    inputs: list[str]  # names of producer IRNodes ("input" for the model input)
    shape: tuple[int, ...]  # per-sample output shape (C, H, W) or (F,)
    module: str | None = None  # conv/linear/bn module path
    bn: str | None = None  # folded BatchNorm2d module path (CONV2D only)
    activation: int = Activation.NONE
    options: dict = field(default_factory=dict)
    section: int = -1


@dataclass
class Graph:
    input_shape: tuple[int, ...]
    nodes: list[IRNode]  # execution order, grouped by section
    exits: list[str]  # IRNode name of each exit's logits
    exit_names: list[str]

    @property
    def num_sections(self) -> int:
        return len(self.exits)

    def weighted_nodes(self) -> list[IRNode]:
        return [n for n in self.nodes if n.op in (OpCode.CONV2D, OpCode.LINEAR)]


_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d)
_SUPPORTED = (
    "Conv2d, BatchNorm2d, ReLU, ReLU6, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Linear, "
    "Flatten, Identity, Dropout (eval), torch.flatten, x.view/reshape(N, -1), +, torch.add, "
    "torch.cat(dim=1), F.relu, F.relu6"
)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unsupported(node: fx.Node, what: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"node '{node.name}' ({node.op} {_target_name(node)}): {what}. Supported: {_SUPPORTED}"
    )


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _unsupported(node, "does not produce a single tensor")
    return tuple(int(d) for d in meta.shape[1:])


def trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds; all mean "not traceable"
        raise UnsupportedOpError(f"torch.fx could not trace the model: {e}") from e


def capture(model: nn.Module, example_input: torch.Tensor) -> Graph:
    """Trace `model` (put in eval mode for the call) and lower it to a Graph."""
    was_training = model.training
    model.eval()
    try:
        gm = trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
        return _lower(gm, model, tuple(int(d) for d in example_input.shape[1:]))
    finally:
        model.train(was_training)


def _lower(gm: fx.GraphModule, model: nn.Module, input_shape) -> Graph:
    modules = dict(model.named_modules())
    nodes: dict[str, IRNode] = {}
    alias: dict[str, str] = {}  # fx name -> IR name it stands for (pass-through ops)
    order: list[str] = []
    exits: list[str] = []

    # An in-place op (ReLU(inplace=True), relu_) rewrites its input's storage:
    # every LATER reader of that value sees the result, so redirect them.
    rewritten: dict[str, str] = {}

    def src(a) -> str:
        if not isinstance(a, fx.Node):
            raise TypeError
        name = alias.get(a.name, a.name)
        return rewritten.get(name, name)

    def add(n: fx.Node, op: int, inputs, **kw) -> None:
        nodes[n.name] = IRNode(n.name, op, [src(a) for a in inputs], _shape(n), **kw)
        order.append(n.name)
        if _is_inplace(n, modules):
            # Later readers see the rewritten value (handled by `rewritten`);
            # a view taken EARLIER would too, which the graph cannot express.
            source = n.args[0]
            views = sorted(
                u.name
                for u in source.users
                if u is not n and _is_view(u, modules) and position[u.name] < position[n.name]
            )
            if views:
                raise _unsupported(
                    n,
                    f"in-place op on '{source.name}', of which {views} took a view "
                    "before it; use the out-of-place form",
                )
            rewritten[nodes[n.name].inputs[0]] = n.name

    position = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if alias:
                raise _unsupported(n, "the model must take exactly one input")
            alias[n.name] = "input"
        elif n.op == "output":
            outs = n.args[0]
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            if not outs or not all(isinstance(o, fx.Node) for o in outs):
                raise _unsupported(n, "forward must return a list of logits tensors")
            exits = [src(o) for o in outs]
        elif n.op == "call_module":
            _lower_module(n, modules[n.target], add, alias, src)
        elif n.op in ("call_function", "call_method"):
            _lower_function(n, add, alias, src)
        else:
            raise _unsupported(n, "parameters and buffers may only be used through modules")

    for e, name in enumerate(exits):
        if name == "input" or len(nodes[name].shape) != 1:
            raise UnsupportedOpError(f"exit {e} ('{name}') must be (N, num_classes) logits")
    _fuse(nodes, order, modules, exits)
    ordered = _assign_sections([nodes[k] for k in order if k in nodes], exits)
    names = list(getattr(model, "exit_names", [])) or [f"exit{i + 1}" for i in range(len(exits))]
    if len(names) != len(exits):
        names = [f"exit{i + 1}" for i in range(len(exits))]
    return Graph(tuple(input_shape), ordered, exits, names)


def _lower_module(n: fx.Node, mod: nn.Module, add, alias, src) -> None:
    x = n.args[0]
    if isinstance(mod, _PASS_THROUGH):
        alias[n.name] = src(x)
    elif isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise _unsupported(n, f"padding_mode={mod.padding_mode!r} (only zeros)")
        if isinstance(mod.padding, str):
            raise _unsupported(n, f"padding={mod.padding!r}; give explicit integers")
        add(
            n,
            OpCode.CONV2D,
            [x],
            module=n.target,
            options={
                "kernel": _pair(mod.kernel_size),
                "stride": _pair(mod.stride),
                "padding": _pair(mod.padding),
                "dilation": _pair(mod.dilation),
                "groups": int(mod.groups),
            },
        )
    elif isinstance(mod, nn.Linear):
        if len(_shape(x)) != 1:
            raise _unsupported(n, f"Linear on a {len(_shape(x)) + 1}-D tensor; flatten first")
        add(n, OpCode.LINEAR, [x], module=n.target)
    elif isinstance(mod, nn.BatchNorm2d):
        if not mod.track_running_stats or mod.running_mean is None:
            raise _unsupported(n, "BatchNorm2d without running statistics")
        add(n, OpCode.AFFINE, [x], module=n.target)
    elif isinstance(mod, (nn.ReLU, nn.ReLU6)):
        act = Activation.RELU6 if isinstance(mod, nn.ReLU6) else Activation.RELU
        add(n, OpCode.ACTIVATION, [x], activation=act)
    elif isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise _unsupported(n, "return_indices=True")
        add(
            n,
            OpCode.MAX_POOL2D,
            [x],
            options=_pool_options(
                mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode
            ),
        )
    elif isinstance(mod, nn.AvgPool2d):
        add(
            n,
            OpCode.AVG_POOL2D,
            [x],
            options=_pool_options(
                mod.kernel_size,
                mod.stride,
                mod.padding,
                1,
                mod.ceil_mode,
                mod.count_include_pad,
                mod.divisor_override,
            ),
        )
    elif isinstance(mod, nn.AdaptiveAvgPool2d):
        (_, h, w), (_, oh, ow) = _shape(x), _shape(n)
        if oh > h or ow > w:
            raise _unsupported(n, f"AdaptiveAvgPool2d upsamples {(h, w)} to {(oh, ow)}")
        add(n, OpCode.ADAPTIVE_AVG_POOL2D, [x], options={"output_size": (oh, ow)})
    elif isinstance(mod, nn.Flatten):
        _flatten(n, add, alias, src, mod.start_dim, mod.end_dim)
    else:
        raise _unsupported(n, f"module type {type(mod).__name__} is not supported")


def _pool_options(
    kernel, stride, padding, dilation, ceil_mode, count_include_pad=True, divisor_override=None
) -> dict:
    return {
        "kernel": _pair(kernel),
        "stride": _pair(stride if stride else kernel),
        "padding": _pair(padding),
        "dilation": _pair(dilation),
        "ceil_mode": bool(ceil_mode),
        "count_include_pad": bool(count_include_pad),
        "divisor_override": int(divisor_override or 0),
    }


def _flatten(n: fx.Node, add, alias, src, start: int, end: int) -> None:
    in_shape = _shape(n.args[0])
    if start != 1 or end not in (-1, len(in_shape)):
        raise _unsupported(n, f"flatten(start_dim={start}, end_dim={end}); only (1, -1)")
    if len(in_shape) == 1:
        alias[n.name] = src(n.args[0])
    else:
        add(n, OpCode.FLATTEN, [n.args[0]])


def _is_view(n: fx.Node, modules) -> bool:
    """Ops whose output shares storage with their input (flatten, view, pass-through)."""
    if n.op == "call_module":
        return isinstance(modules[n.target], (nn.Flatten, *_PASS_THROUGH))
    return n.target in (torch.flatten, torch.reshape, "flatten", "view", "reshape")


def _is_inplace(n: fx.Node, modules) -> bool:
    if n.op == "call_module":
        return bool(getattr(modules[n.target], "inplace", False))
    if n.target is operator.iadd:
        return True
    return n.kwargs.get("inplace", False) or (isinstance(n.target, str) and n.target.endswith("_"))


_ADDS = (operator.add, torch.add, "add", operator.iadd, "add_")
_RELUS = (F.relu, torch.relu, "relu", "relu_")


def _lower_function(n: fx.Node, add, alias, src) -> None:
    t = n.target
    if t == "size" or t is getattr or (t is operator.getitem and not _is_tensor(n)):
        return  # shape queries (x.size(0), x.shape[0]) feed view/reshape; checked via shapes
    if t in _ADDS:
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or n.kwargs.get("alpha", 1) != 1:
            raise _unsupported(n, "only tensor + tensor (residual add) is supported")
        if _shape(a) != _shape(b):
            raise _unsupported(n, f"broadcasting add of {_shape(a)} and {_shape(b)}")
        add(n, OpCode.ADD, [a, b])
    elif t in _RELUS:
        add(n, OpCode.ACTIVATION, [n.args[0]], activation=Activation.RELU)
    elif t in (F.relu6,):
        add(n, OpCode.ACTIVATION, [n.args[0]], activation=Activation.RELU6)
    elif t is torch.cat:
        xs = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        rank = len(_shape(n)) + 1
        if dim not in (1, 1 - rank):
            raise _unsupported(n, f"torch.cat along dim {dim}; only channels (dim=1)")
        add(n, OpCode.CONCAT, list(xs))
    elif t in (torch.flatten, "flatten"):
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        _flatten(n, add, alias, src, start, end)
    elif t in ("view", "reshape", torch.reshape):
        in_shape, out_shape = _shape(n.args[0]), _shape(n)
        if len(out_shape) != 1 or out_shape[0] != _numel(in_shape):
            raise _unsupported(n, f"reshape {in_shape} -> {out_shape}; only flattening to (N, -1)")
        _flatten(n, add, alias, src, 1, -1)
    else:
        raise _unsupported(n, "op is not supported")


def _is_tensor(n: fx.Node) -> bool:
    return hasattr(n.meta.get("tensor_meta"), "shape")


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _fuse(nodes: dict[str, IRNode], order: list[str], modules, exits: list[str]) -> None:
    """Fold BN into the conv it follows and ReLU/ReLU6 into its producer.

    Only when the producer's output feeds nothing else (and is no exit), so
    no consumer ever needs the unfused value.
    """
    users: dict[str, list[str]] = {}
    for k in order:
        for i in nodes[k].inputs:
            users.setdefault(i, []).append(k)

    def rewire(old: str, new: str) -> None:
        for k in users.get(old, []):
            nodes[k].inputs = [new if i == old else i for i in nodes[k].inputs]
        users.setdefault(new, [])
        users[new] = [u for u in users[new] if u != old] + users.get(old, [])
        exits[:] = [new if e == old else e for e in exits]
        del nodes[old]

    for k in order:
        node = nodes.get(k)
        if node is None or len(node.inputs) != 1:
            continue
        prod = nodes.get(node.inputs[0])
        if prod is None or users.get(prod.name) != [k] or prod.name in exits:
            continue
        if (
            node.op == OpCode.AFFINE
            and prod.op == OpCode.CONV2D
            and prod.bn is None
            and prod.activation == Activation.NONE
        ):
            prod.bn = node.module
            rewire(k, prod.name)
        elif (
            node.op == OpCode.ACTIVATION
            and prod.activation == Activation.NONE
            and prod.op != OpCode.ACTIVATION
        ):
            prod.activation = node.activation
            rewire(k, prod.name)


def _assign_sections(nodes: list[IRNode], exits: list[str]) -> list[IRNode]:
    """Node's section = the first exit whose logits depend on it; unused nodes dropped."""
    by_name = {n.name: n for n in nodes}
    for e, logits in enumerate(exits):
        stack = [logits]
        while stack:
            name = stack.pop()
            node = by_name.get(name)
            if node is None or node.section != -1:
                continue  # the input, or already claimed by an earlier exit
            node.section = e
            stack.extend(node.inputs)
    used = [n for n in nodes if n.section >= 0]
    return sorted(used, key=lambda n: n.section)  # stable: keeps topological order inside
