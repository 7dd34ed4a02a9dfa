"""escepe_rt: run compressed early-exit networks (.escepe files) with numpy + numba.

    import escepe_rt
    m = escepe_rt.load("model.escepe")          # verifies every byte; FormatError if bad
    r = m.predict(x)                            # x: float32 (N, C, H, W)
    r.labels, r.exit_index, r.confidence, r.logits

This package never imports torch or onnx.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import numpy as np

# first: numba's cache stamps for the package, before any kernel applies @njit(cache=True)
from escepe_rt import _numba_cache  # noqa: F401  (isort: skip)
from escepe_rt import kernels, parallel, spinpool
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.errors import FormatError
from escepe_rt.executor import CHUNK, POLICIES, Executor, Prediction, confidence

CHUNK_BYTES = 512 << 20  # activations of one chunk (all its values), float32

__version__ = "0.1.0"
__all__ = ["load", "Model", "Prediction", "FormatError", "__version__"]


def load(
    path: str | os.PathLike,
    threshold: float | Sequence[float] | None = None,
    decode: str = "lazy",
    policy: str | None = None,
    warmup: bool = False,
) -> Model:
    """Open, verify and prepare a .escepe file.

    Every byte is checked once, here, before any kernel touches it (escepe_rt.verify);
    a bad file of any kind raises FormatError (a ValueError) naming the field and byte
    offset. Inputs are checked at predict/run_all_exits: float32 NCHW of the model's
    shape, all finite (a NaN or inf is a ValueError naming the first bad sample).

    threshold: one float for every exit, one per exit, or None for the
        calibrated thresholds stored in the file. 0 exits everything at the
        first exit; anything above 1 runs every sample to the last exit.
    decode: "lazy" decodes a section's weights the first time a sample reaches
        it; "eager" decodes all of them now.
    policy: "max_softmax" or "entropy"; None uses the file's policy.
    warmup: True runs a tiny dummy batch through every section now (Model.warmup), so that
        every numba kernel the model uses is compiled, or loaded from numba's on-disk cache,
        before the first real predict, which then pays no JIT. Lazy decoding keeps its
        meaning: with decode="lazy" the warm-up decodes every section into a throwaway copy
        and releases it, so `decoded_sections` is still [] afterwards and a section is decoded
        (again) the first time a sample reaches it; peak memory during load is then that of
        decode="eager". With decode="eager" the model's own decoded weights are used.
    """
    from escepe_rt import format as fmt
    from escepe_rt import verify

    if decode not in ("lazy", "eager"):
        raise ValueError(f"decode must be 'lazy' or 'eager', got {decode!r}")
    buf = fmt.map_file(path)
    verify.check_structure(buf)
    spec = fmt.parse(buf)
    verify.check_model(buf, spec)
    model = Model(spec, buf, threshold=threshold, decode=decode, policy=policy, path=str(path))
    if warmup:
        model.warmup()
    return model


class Model:
    """A loaded model. Thread-safe: concurrent predict() calls share decoded weights."""

    def __init__(self, spec, buf, threshold=None, decode="lazy", policy=None, path=""):
        self.spec = spec
        self.path = path
        self._buf = buf
        self._decode = decode
        self._executor = Executor(spec, buf, decode)
        self._chunk = chunk_size(spec)
        self.thresholds = self._resolve_thresholds(threshold)
        if policy is None:
            self.policy = spec.exit_policy
        elif policy in POLICIES:
            self.policy = POLICIES[policy]
        else:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")

    def _resolve_thresholds(self, threshold) -> list[float]:
        n = len(self.spec.exits)
        if threshold is None:
            return [e.threshold for e in self.spec.exits]
        if np.isscalar(threshold):
            values = [float(threshold)] * n
        else:
            values = [float(t) for t in threshold]
            if len(values) != n:
                raise ValueError(f"threshold needs {n} values (one per exit), got {len(values)}")
        if any(np.isnan(v) for v in values):
            raise ValueError("threshold must not be NaN")
        return values

    # ------------------------------------------------------------------ inputs
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Per-sample (C, H, W)."""
        return self.spec.input_shape

    @property
    def num_classes(self) -> int:
        return self.spec.values[self.spec.exits[0].logits].shape[0]

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels)

    def _check_input(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise ValueError(f"expected a numpy array, got {type(x).__name__}")
        want = self.input_shape
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"expected input of shape (N, {', '.join(map(str, want))}) (NCHW), got {x.shape}"
            )
        if x.dtype != np.float32:
            hint = " (use Model.preprocess for uint8 images)" if x.dtype == np.uint8 else ""
            raise ValueError(f"expected float32 input, got {x.dtype}{hint}")
        for i in range(0, len(x), CHUNK):  # chunked: no N-sized temporary for big batches
            bad = kernels.first_nonfinite_row(x[i : i + CHUNK])
            if bad >= 0:
                bad += i
                raise ValueError(
                    f"input sample {bad} holds NaN or inf; expected finite values (a non-finite "
                    "input makes every exit's confidence meaningless, so no sample is answered)"
                )
        return x

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, C), or (N, H, W) for one channel -> normalised float32 NCHW."""
        images = np.asarray(images)
        c, h, w = self.input_shape
        if images.dtype != np.uint8:
            raise ValueError(f"preprocess expects uint8 images, got {images.dtype}")
        if images.ndim == 3 and c == 1:
            images = images[..., None]
        if images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise ValueError(
                f"preprocess expects uint8 images of shape (N, {h}, {w}, {c})"
                f"{f' or (N, {h}, {w})' if c == 1 else ''}, got {images.shape}"
            )
        x = images.astype(np.float32) / 255.0
        if self.spec.input_mean:
            x -= np.asarray(self.spec.input_mean, np.float32)
        if self.spec.input_std:
            x /= np.asarray(self.spec.input_std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    # ------------------------------------------------------------------ running
    def predict(self, x: np.ndarray) -> Prediction:
        """Early-exit inference; results in input order. Big batches run in chunks.

        x: float32 (N, C, H, W), any strides (N = 0 gives empty results). Anything else is
        a ValueError saying what was expected: another shape or dtype, or a NaN/inf
        anywhere in the batch (named by the first bad sample's index; the whole batch is
        refused, since a non-finite input makes every exit's confidence meaningless).
        Memory beyond x and the results is bounded by the chunk size, not by N.
        """
        x = self._check_input(x)
        if len(x) == 0:
            k = self.num_classes
            return Prediction(
                np.zeros(0, np.int64),
                np.zeros(0, np.int64),
                np.zeros(0, np.float32),
                np.zeros((0, k), np.float32),
            )
        n = self._chunk
        parts = [
            self._executor.predict(_to_nhwc(x[i : i + n]), self.thresholds, self.policy)
            for i in range(0, len(x), n)
        ]
        return Prediction.concat(parts)

    def run_all_exits(self, x: np.ndarray) -> list[np.ndarray]:
        """Logits (N, K) of every exit for every sample (no early exit)."""
        x = self._check_input(x)
        if len(x) == 0:
            return [np.zeros((0, self.num_classes), np.float32) for _ in self.spec.exits]
        n = self._chunk
        chunks = [self._executor.run_all_exits(_to_nhwc(x[i : i + n])) for i in range(0, len(x), n)]
        return [np.concatenate([c[e] for c in chunks]) for e in range(len(self.spec.exits))]

    def confidence(self, logits: np.ndarray) -> np.ndarray:
        return confidence(logits, self.policy)

    def warmup(self) -> float:
        """Compile (or load from numba's cache) every kernel this model uses; returns seconds.

        Runs zeros at batch 1 and 2 through every section, both as run_all_exits and as
        predict with no early exit (thresholds above 1), with this model's policy. Every
        section is decoded for that; with lazy decoding into a throwaway executor whose
        weights are released on return, so decoded_sections does not change.
        """
        t0 = time.perf_counter()
        if self._decode == "eager":
            executor = self._executor
        else:
            executor = Executor(self.spec, self._buf, "lazy")
        never = [2.0] * len(self.spec.exits)  # no confidence reaches 2: every section runs
        for n in (1, 2):
            x = self._check_input(np.zeros((n, *self.input_shape), np.float32))  # its kernel too
            executor.warm(_to_nhwc(x), never, self.policy)
        if parallel.POOL.threads > 1:
            spinpool.warm()  # big direct convs share their chunks with the spinning workers
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ introspection
    @property
    def decoded_sections(self) -> list[int]:
        return sorted(self._executor.decoded_sections)

    @property
    def exits(self) -> list[dict]:
        return self.info["exits"]

    @property
    def sections(self) -> list[dict]:
        return self.info["sections"]

    @property
    def info(self) -> dict:
        from escepe_rt.summary import model_info

        return model_info(self.spec, self.path, self.thresholds)


def chunk_size(spec) -> int:
    """Samples per chunk: CHUNK, fewer where one sample needs much memory, so that a chunk's
    values (all kept until the chunk is done) plus the largest im2col scratch (a grouped conv
    builds every group's columns at once) stay under CHUNK_BYTES."""
    cols = 0
    for node in spec.nodes:
        if node.op == OpCode.CONV2D:
            _, ho, wo = spec.values[node.output].shape
            cin = spec.values[node.inputs[0]].shape[0]
            kh, kw = spec.tensors[node.weight].shape[2:]
            cols = max(cols, ho * wo * cin * kh * kw)
    per_sample = 4 * (sum(math.prod(v.shape) for v in spec.values) + cols)
    return max(1, min(CHUNK, CHUNK_BYTES // max(per_sample, 1)))


def _to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
