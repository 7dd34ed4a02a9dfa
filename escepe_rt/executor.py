"""Runs a verified model section by section, with the early-exit policy.

Activations are channels-last (N, H, W, C) inside; the API speaks NCHW like
PyTorch. A sample that exits leaves the batch: later sections never compute it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from escepe_rt import decode, kernels, rans
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt._fbs.ExitPolicy import ExitPolicy
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.errors import FormatError
from escepe_rt.format import ModelSpec, buffer_bytes

# Samples per chunk: bounds peak memory for big batches (activations of the
# widest layer x CHUNK), large enough that sgemm stays efficient.
CHUNK = 256
POLICIES = {"max_softmax": ExitPolicy.MAX_SOFTMAX, "entropy": ExitPolicy.ENTROPY}


@dataclass
class Prediction:
    labels: np.ndarray  # (N,) int64
    exit_index: np.ndarray  # (N,) int64, which exit answered each sample
    confidence: np.ndarray  # (N,) float32, the policy's confidence at that exit
    logits: np.ndarray  # (N, K) float32 from the answering exit


def confidence(logits: np.ndarray, policy: int) -> np.ndarray:
    """(N,) confidence in [0, 1]: max softmax, or 1 - normalised entropy."""
    if policy == ExitPolicy.ENTROPY:
        return (1.0 - kernels.entropy(logits)).astype(np.float32)
    return kernels.max_softmax(logits).astype(np.float32)


class Executor:
    def __init__(self, spec: ModelSpec, buf, decode_mode: str = "lazy"):
        self.spec = spec
        self._buf = buf
        self._params: list[dict | None] = [None] * len(spec.sections)
        self._decode_lock = threading.Lock()
        self.decoded_sections: set[int] = set()
        self._live_after = self._live_values()
        if decode_mode == "eager":
            for s in range(len(spec.sections)):
                self.section_params(s)

    # ------------------------------------------------------------------ weights
    def tensor(self, index: int) -> np.ndarray:
        """Decoded float32 tensor in its stored shape (raw tensors are views of the file)."""
        t = self.spec.tensors[index]
        data = buffer_bytes(self._buf, self.spec, t.buffer)
        if t.encoding == Encoding.RAW_F32:
            return data.view("<f4").reshape(t.shape)
        codebook = self.spec.codebooks[t.codebook][1]
        if t.encoding == Encoding.RANS_INDICES:
            try:
                values = rans.decode(data, codebook, expected_count=t.count)
            except rans.RansError as e:
                at = self.spec.buffers[t.buffer][0] + (e.offset or 0)
                raise FormatError(e.reason, field=f"tensors[{index}]", offset=at) from None
            return values.reshape(t.shape)
        return decode.decode_packed(data, t.bits, t.count, codebook).reshape(t.shape)

    def section_params(self, s: int) -> dict:
        """Per node of section s, its weights in kernel-ready form; decoded once."""
        params = self._params[s]
        if params is not None:
            return params
        with self._decode_lock:
            if self._params[s] is None:
                self._params[s] = self._decode_section(s)
                self.decoded_sections.add(s)
        return self._params[s]

    def _decode_section(self, s: int) -> dict:
        begin, end = self.spec.sections[s]
        out = {}
        for i in range(begin, end):
            node = self.spec.nodes[i]
            p = {
                "scale": self._vector(node.scale),
                "shift": self._vector(node.shift),
            }
            if node.op == OpCode.CONV2D:
                p["weight"] = kernels.prepare_conv_weight(
                    self.tensor(node.weight), node.options["conv"]["groups"]
                )
            elif node.op == OpCode.LINEAR:
                p["weight"] = kernels.prepare_linear_weight(self.tensor(node.weight))
            out[i] = p
        return out

    def _vector(self, index: int):
        return None if index < 0 else np.ascontiguousarray(self.tensor(index), dtype=np.float32)

    # ------------------------------------------------------------------ graph
    def _live_values(self) -> list[set[int]]:
        """For each section s, the values produced up to s that later sections read."""
        spec = self.spec
        live = []
        for s in range(len(spec.sections)):
            end = spec.sections[s][1]
            later_inputs = {v for n in spec.nodes[end:] for v in n.inputs}
            later_inputs |= {e.logits for e in spec.exits[s + 1 :]}
            produced = {0} | {n.output for n in spec.nodes[:end]}
            live.append(produced & later_inputs)
        return live

    def run_section(self, s: int, env: dict[int, np.ndarray]) -> None:
        params = self.section_params(s)
        begin, end = self.spec.sections[s]
        for i in range(begin, end):
            node = self.spec.nodes[i]
            env[node.output] = _run_node(node, params[i], [env[v] for v in node.inputs])

    def run_all_exits(self, x_nhwc: np.ndarray) -> list[np.ndarray]:
        env = {0: x_nhwc}
        out = []
        for s, ex in enumerate(self.spec.exits):
            self.run_section(s, env)
            out.append(env[ex.logits])
        return out

    def predict(self, x_nhwc: np.ndarray, thresholds: list[float], policy: int) -> Prediction:
        n = x_nhwc.shape[0]
        k = self.spec.values[self.spec.exits[0].logits].shape[0]
        labels = np.empty(n, np.int64)
        exit_index = np.empty(n, np.int64)
        conf_out = np.empty(n, np.float32)
        logits_out = np.empty((n, k), np.float32)
        active = np.arange(n)  # rows of the original batch still running
        env = {0: x_nhwc}
        last = len(self.spec.exits) - 1
        for s, ex in enumerate(self.spec.exits):
            self.run_section(s, env)
            logits = env[ex.logits]
            conf = confidence(logits, policy)
            done = np.ones(len(active), bool) if s == last else conf >= thresholds[s]
            rows = active[done]
            labels[rows] = np.argmax(logits[done], axis=1)
            exit_index[rows] = s
            conf_out[rows] = conf[done]
            logits_out[rows] = logits[done]
            if s == last or done.all():
                break
            keep = ~done
            active = active[keep]
            env = {v: env[v][keep] for v in self._live_after[s]}
        return Prediction(labels, exit_index, conf_out, logits_out)


def _run_node(node, p: dict, xs: list[np.ndarray]) -> np.ndarray:
    op, act = node.op, node.activation
    if op == OpCode.CONV2D:
        o = node.options["conv"]
        return kernels.conv2d(
            xs[0],
            p["weight"],
            p["scale"],
            p["shift"],
            tuple(o["stride"]),
            tuple(o["padding"]),
            tuple(o["dilation"]),
            act,
        )
    if op == OpCode.LINEAR:
        return kernels.linear(xs[0], p["weight"], p["scale"], p["shift"], act)
    if op == OpCode.AFFINE:
        return kernels.affine(xs[0], p["scale"], p["shift"], act)
    if op == OpCode.ACTIVATION:
        return kernels.activate(xs[0], act)
    if op == OpCode.ADD:
        return kernels.add(xs[0], xs[1], act)
    if op == OpCode.CONCAT:
        return _act(kernels.concat_channels(xs), act)
    if op == OpCode.FLATTEN:
        return _act(kernels.flatten_nchw(xs[0]), act)
    if op == OpCode.MAX_POOL2D:
        o = node.options["pool"]
        y = kernels.max_pool2d(
            xs[0],
            tuple(o["kernel"]),
            tuple(o["stride"]),
            tuple(o["padding"]),
            tuple(o["dilation"]),
            o["ceil_mode"],
        )
        return _act(y, act)
    if op == OpCode.AVG_POOL2D:
        o = node.options["pool"]
        y = kernels.avg_pool2d(
            xs[0],
            tuple(o["kernel"]),
            tuple(o["stride"]),
            tuple(o["padding"]),
            o["ceil_mode"],
            o["count_include_pad"],
            o["divisor_override"] or None,
        )
        return _act(y, act)
    if op == OpCode.ADAPTIVE_AVG_POOL2D:
        y = kernels.adaptive_avg_pool2d(xs[0], tuple(node.options["adaptive_pool"]["output_size"]))
        return _act(y, act)
    raise AssertionError(f"verified model holds unknown op {op}")  # verify.py rejects these


def _act(y: np.ndarray, act: int) -> np.ndarray:
    return y if act == kernels.ACT_NONE else kernels.activate(y, act)
