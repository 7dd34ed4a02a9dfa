"""Export early-exit PyTorch models to ONNX (fp32), and quantise them to int8 (static, QDQ).

Used as the baseline the escepe runtime is compared against (benchmarks/latency.py):

    export_onnx(model, x, "m.onnx")               # outputs exit0 .. exit{N-1}
    export_onnx(model, x, "last.onnx", exits=-1)  # only the last exit; shallow heads pruned
    quantize_int8_static("m.onnx", "m.int8.onnx", [batch0, batch1, ...])

Exporter choice (torch 2.13): both ``dynamo=False`` (legacy TorchScript tracer) and
``dynamo=True`` (torch.export + onnxscript) export these models correctly, but we default to the
TorchScript exporter because, for this fixed-control-flow conv vocabulary, it is the reliable one:

* it emits exactly the requested opset. The dynamo exporter builds opset 18 natively and its
  down-conversion to 17 fails inside onnx's C version converter (``axes_input_to_attribute``
  assertion on ReduceMean), after which it silently keeps opset 18;
* it is ~4x faster (about 1 s vs 4-5 s for a small ResNet-20) and prints nothing on stdout
  (the dynamo exporter logs its progress to stdout, which would pollute benchmark tables);
* in eval mode it folds BatchNorm into the preceding Conv, like the escepe compiler does.

It is deprecated upstream ("will be removed"), but torch is pinned to 2.13 by the [compiler]
extra; ``exporter="dynamo"`` is kept for when it goes away (it is covered by a test).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from compiler.atomic import atomic_path

log = logging.getLogger("escepe.onnx_export")

DEFAULT_OPSET = 17
INPUT_NAME = "input"

__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAME",
    "SingleExit",
    "export_onnx",
    "quantize_int8_static",
    "output_names",
]


class SingleExit(nn.Module):
    """Wraps an early-exit model so that forward returns only exit ``index``'s logits.

    Tracing through the wrapper drops every op whose result the chosen exit does not need, so
    the exported graph holds no other exit heads (and, for a shallow exit, no later stages).
    """

    def __init__(self, model: nn.Module, index: int):
        super().__init__()
        self.model = model
        self.index = int(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.index]


def output_names(n_exits: int, exits: str | int = "all") -> list[str]:
    """ONNX output names: ``exit0..exit{n-1}`` for "all", else the one chosen exit's name."""
    if exits == "all":
        return [f"exit{i}" for i in range(n_exits)]
    return [f"exit{_exit_index(exits, n_exits)}"]


def _exit_index(exits: int, n_exits: int) -> int:
    if isinstance(exits, bool) or not isinstance(exits, (int, np.integer)):
        raise ValueError(f"exits must be 'all' or an int exit index, got {exits!r}")
    i = int(exits)
    if not -n_exits <= i < n_exits:
        raise ValueError(f"exit index {i} out of range for a model with {n_exits} exits")
    return i % n_exits


def _count_exits(model: nn.Module, example_input: torch.Tensor) -> int:
    with torch.inference_mode():
        out = model(example_input)
    if not isinstance(out, (list, tuple)) or not out:
        raise ValueError("expected an early-exit model whose forward returns a list of logits")
    return len(out)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    exits: str | int = "all",
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "torchscript",
) -> list[str]:
    """Export an early-exit model to ONNX at ``path`` (atomically); returns the output names.

    exits: "all" -> one output per exit, named ``exit0..exit{N-1}`` (shallowest first);
        an int (negative counts from the end) -> only that exit's logits, named ``exit{i}``,
        with the unneeded heads pruned.
    The batch dimension of the input (named ``input``, NCHW float32) and of every output is
    dynamic. The model is put in eval mode (BatchNorm uses its running statistics).
    exporter: "torchscript" (default, see the module docstring) or "dynamo".
    """
    if opset < 17:
        raise ValueError(f"opset must be >= 17, got {opset}")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    model = model.eval()
    n_exits = _count_exits(model, example_input)
    names = output_names(n_exits, exits)
    module = model if exits == "all" else SingleExit(model, _exit_index(exits, n_exits)).eval()

    path = os.fspath(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings():
            # the legacy exporter warns that it is deprecated on every call
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            if exporter == "torchscript":
                torch.onnx.export(
                    module,
                    (example_input,),
                    tmp,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
                    do_constant_folding=True,
                )
            else:
                torch.onnx.export(
                    module,
                    (example_input,),
                    tmp,
                    dynamo=True,
                    opset_version=max(opset, 18),  # its native opset; down-conversion fails
                    input_names=[INPUT_NAME],
                    output_names=names,
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                    external_data=False,
                )
    log.info("exported %s (%s, outputs %s)", path, exporter, names)
    return names


class _BatchReader:
    """onnxruntime CalibrationDataReader over a list of NCHW float32 batches."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._input_name = input_name
        self._batches = [np.ascontiguousarray(b, dtype=np.float32) for b in batches]
        self._it = iter(self._batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self._input_name: b}

    def rewind(self):
        self._it = iter(self._batches)


def quantize_int8_static(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration_inputs: Sequence[np.ndarray] | np.ndarray,
    *,
    per_channel: bool = True,
    pre_process: bool = True,
) -> str:
    """Static int8 quantisation (QDQ format, per-channel weights) with onnxruntime.

    calibration_inputs: NCHW float32 batches (a list of arrays, or one 4-D array used as a
    single batch) fed through the model to collect activation ranges (MinMax calibration).
    pre_process runs onnxruntime's ``quant_pre_process`` (shape inference + graph
    optimisation, e.g. Conv+BN fusion if still present) first, as the ORT docs recommend.
    Activations are uint8 (asymmetric), weights int8 (symmetric). Writes ``out_path``
    atomically and returns it.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if isinstance(calibration_inputs, np.ndarray):
        calibration_inputs = [calibration_inputs]
    batches = list(calibration_inputs)
    if not batches:
        raise ValueError("calibration_inputs must hold at least one batch")
    onnx_path = os.fspath(onnx_path)
    out_path = os.fspath(out_path)
    input_name = onnx.load(onnx_path, load_external_data=False).graph.input[0].name

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    folder = os.path.dirname(os.path.abspath(out_path))
    with tempfile.TemporaryDirectory(dir=folder) as work:
        src = onnx_path
        if pre_process:
            src = os.path.join(work, "pre.onnx")
            quant_pre_process(onnx_path, src, skip_symbolic_shape=False)
        tmp = os.path.join(work, "int8.onnx")
        quantize_static(
            src,
            tmp,
            Reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        os.replace(tmp, out_path)  # same file system: work lives beside out_path
    log.info("quantised %s -> %s (%d calibration batches)", onnx_path, out_path, len(batches))
    return out_path
