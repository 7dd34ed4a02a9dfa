"""Runs a verified model section by section, with the early-exit policy.

Activations are channels-last (N, H, W, C) inside; the API speaks NCHW like
PyTorch. A sample that exits leaves the batch: later sections never compute it.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from escepe_rt import decode, kernels, parallel, program, rans, rans_interleaved
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt._fbs.ExitPolicy import ExitPolicy
from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.errors import FormatError
from escepe_rt.format import ModelSpec, buffer_bytes
from escepe_rt.summary import node_macs

# Samples per chunk: bounds peak memory for big batches (activations of the
# widest layer x CHUNK), large enough that sgemm stays efficient.
CHUNK = 256
# Threads that decode one section's weight tensors in parallel (lazy decode is on the path of
# the first sample that reaches a section).
DECODE_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
PARALLEL_DECODE_MIN = 1 << 20  # weights in a section; below it a thread pool costs more
POLICIES = {"max_softmax": ExitPolicy.MAX_SOFTMAX, "entropy": ExitPolicy.ENTROPY}


@dataclass
class Prediction:
    labels: np.ndarray  # (N,) int64
    exit_index: np.ndarray  # (N,) int64, which exit answered each sample
    confidence: np.ndarray  # (N,) float32, the policy's confidence at that exit
    logits: np.ndarray  # (N, K) float32 from the answering exit

    @staticmethod
    def concat(parts: list[Prediction]) -> Prediction:
        """The predictions of consecutive parts of a batch, as one."""
        if len(parts) == 1:
            return parts[0]
        return Prediction(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("labels", "exit_index", "confidence", "logits")
            )
        )


def confidence(logits: np.ndarray, policy: int) -> np.ndarray:
    """(N,) confidence in [0, 1]: max softmax, or 1 - normalised entropy."""
    if policy == ExitPolicy.ENTROPY:
        return (1.0 - kernels.entropy(logits)).astype(np.float32)
    return kernels.max_softmax(logits).astype(np.float32)


class Executor:
    """Decodes sections on demand and runs them as flat step lists built once per section.

    A section's plan is a list of (kernel, input value ids, output value id) with every weight,
    option and activation bound at decode time, so a predict call does no per-node option
    parsing. With ``fuse`` (the default) a residual ADD whose one input is a convolution read
    by nothing else is folded into that convolution's epilogue (``act(conv * scale + shift +
    other)``); ``fuse=False`` runs every node on its own (the plain reference path the tests
    compare against).
    """

    def __init__(
        self,
        spec: ModelSpec,
        buf,
        decode_mode: str = "lazy",
        fuse: bool = True,
        programs: bool = True,
    ):
        self.spec = spec
        self._buf = buf
        self._params: list[dict | None] = [None] * len(spec.sections)
        self._plans: list[list | None] = [None] * len(spec.sections)
        self._body_plans: list[list | None] = [None] * len(spec.sections)
        self._drops: dict[tuple[int, bool], list[list[int]]] = {}
        self._decode_lock = threading.Lock()
        self.decoded_sections: set[int] = set()
        self._live_after = [sorted(v) for v in self._live_values()]
        self._fused = _fusable_adds(spec) if fuse else {}
        # Batch 1 hands threading to BLAS only where an im2col + sgemm conv is big enough to be
        # cut into chunks (direct convs share work with their own worker and call no BLAS);
        # other models keep BLAS single-threaded, so no idle BLAS thread spins after predict.
        self._blas_threads_at_batch1 = any(
            n.op == OpCode.CONV2D
            and node_macs(spec, n) >= kernels.PARALLEL_MIN_MACS
            and not kernels.runs_direct(
                spec.values[n.output].shape[0],
                n.options["conv"]["groups"],
                n.options["conv"]["dilation"][1],
            )
            for n in spec.nodes
        )
        # Batches of up to PROGRAM_MAX_BATCH samples run each section as one nogil program
        # over a preallocated arena where the model allows it (escepe_rt/program.py); the step
        # lists stay for bigger batches, for a call while another holds the arena, and for
        # fuse=False.
        if not (fuse and programs):
            self.program_unavailable = "fuse=False" if programs else "programs=False"
        else:
            self.program_unavailable = program.eligible(spec)
        self._layout = None
        if self.program_unavailable is None:
            steps = [self._steps(s) for s in range(len(spec.sections))]
            self._layout = program.Layout(spec, steps, [e.logits for e in spec.exits])
        # a batch the programs take runs in sub-batches of this many samples, so that the arena
        # stays under ARENA_BYTES whatever the batch
        per_sample = 4 * self._layout.per_sample if self._layout is not None else 1
        self._arena_batch = max(1, min(PROGRAM_MAX_BATCH, ARENA_BYTES // per_sample))
        self._programs: dict[tuple[int, bool], program.Program] = {}
        self._arena: np.ndarray | None = None
        self._arena_views: dict | None = None
        self._arena_lock = threading.Lock()
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
        if t.encoding == Encoding.RAW_F16:  # format 1.2: widened to float32 once, at decode
            return data.view("<f2").astype(np.float32).reshape(t.shape)
        codebook = self.spec.codebooks[t.codebook][1]
        if t.encoding in _RANS:
            return self._decode_rans(index, codebook).reshape(t.shape)
        return decode.decode_packed(data, t.bits, t.count, codebook).reshape(t.shape)

    def _decode_rans(self, index: int, codebook: np.ndarray | None) -> np.ndarray:
        """An entropy-coded tensor: (count,) float32 = codebook[i], or the uint8 indices i
        without a codebook; FormatError naming the tensor and the file offset."""
        t = self.spec.tensors[index]
        coder = rans_interleaved if t.encoding == Encoding.RANS_INTERLEAVED else rans
        data = buffer_bytes(self._buf, self.spec, t.buffer)
        try:
            return coder.decode(data, codebook, expected_count=t.count)
        except rans.RansError as e:
            at = self.spec.buffers[t.buffer][0] + (e.offset or 0)
            raise FormatError(e.reason, field=f"tensors[{index}]", offset=at) from None

    def section_params(self, s: int) -> dict:
        """Per node of section s, its weights in kernel-ready form; decoded once."""
        params = self._params[s]
        if params is not None:
            return params
        self._section_plan(s)
        return self._params[s]

    def _section_plan(self, s: int) -> list:
        plan = self._plans[s]
        if plan is not None:
            return plan
        with self._decode_lock:
            if self._plans[s] is None:
                params = self._decode_section(s)
                plan = self._build_plan(s, params)
                self._params[s] = params
                self._plans[s] = plan  # published last: a reader seeing it sees params too
                self.decoded_sections.add(s)
        return self._plans[s]

    def _decode_section(self, s: int) -> dict:
        begin, end = self.spec.sections[s]
        weights = [i for i in range(begin, end) if self.spec.nodes[i].op in _WEIGHTED]
        prepared = {}
        count = sum(self.spec.tensors[self.spec.nodes[i].weight].count for i in weights)
        if len(weights) > 1 and DECODE_THREADS > 1 and count >= PARALLEL_DECODE_MIN:
            # The decode kernels release the GIL: a section's tensors decode side by side
            # (the rANS streams are sequential within a tensor, independent across tensors).
            with ThreadPoolExecutor(min(DECODE_THREADS, len(weights))) as pool:
                prepared = dict(zip(weights, pool.map(self._prepared_weight, weights)))
        else:
            prepared = {i: self._prepared_weight(i) for i in weights}
        out = {}
        for i in range(begin, end):
            node = self.spec.nodes[i]
            p = {
                "scale": self._vector(node.scale),
                "shift": self._vector(node.shift),
            }
            if i in prepared:
                p["weight"] = prepared[i]
            out[i] = p
        return out

    def _prepared_weight(self, i: int):
        node = self.spec.nodes[i]
        if node.op == OpCode.CONV2D:
            o = node.options["conv"]
            groups = o["groups"]
            t = self.spec.tensors[node.weight]
            cout, cin_g, kh, kw = t.shape
            _, ho, wo = self.spec.values[node.output].shape
            wino = kernels.runs_winograd(
                cout, cin_g * groups, groups, (kh, kw), o["stride"], o["dilation"], (ho, wo)
            )
            if t.encoding in (Encoding.RAW_F16, Encoding.RAW_F32):
                exact = t.encoding == Encoding.RAW_F16
            else:
                codebook = self.spec.codebooks[t.codebook][1]
                exact = kernels.half_exact(codebook)
            f16 = kernels.runs_f16(cout, groups, o["dilation"][1], wino, exact)
            if t.encoding in _RANS:  # indices gathered straight into the sgemm layout
                idx = self._decode_rans(node.weight, None)
                return kernels.prepare_conv_weight_from_indices(
                    idx, codebook, t.shape, groups, wino, f16
                )
            return kernels.prepare_conv_weight(self.tensor(node.weight), groups, wino, f16)
        return kernels.prepare_linear_weight(self.tensor(node.weight))

    def _vector(self, index: int):
        return None if index < 0 else np.ascontiguousarray(self.tensor(index), dtype=np.float32)

    def _build_plan(self, s: int, params: dict) -> list:
        """[(kernel, input value ids, output value id, node index)] for section s."""
        plan = []
        for ins, out, i in self._steps(s):
            node = self.spec.nodes[i]
            if i in self._fused:
                add = self.spec.nodes[self._fused[i][0]]
                plan.append((_conv_step(node, params[i], add.activation), ins, out, i))
            else:
                plan.append((_node_step(node, params[i]), ins, out, i))
        return plan

    def _steps(self, s: int) -> list[tuple[tuple, int, int]]:
        """Section s's steps as (input value ids, output value id, node index): every node but
        the residual adds folded into a conv, whose step reads (conv input, other) and writes
        the add's output. Needs no weights (the programs' arena is planned from it)."""
        begin, end = self.spec.sections[s]
        skip = {j for j, _ in self._fused.values()}
        steps = []
        for i in range(begin, end):
            if i in skip:
                continue
            node = self.spec.nodes[i]
            if i in self._fused:
                j, other = self._fused[i]
                steps.append(((node.inputs[0], other), self.spec.nodes[j].output, i))
            else:
                steps.append((tuple(node.inputs), node.output, i))
        return steps

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

    def run_section(
        self, s: int, env: list, with_exit: bool = True, keep_values: bool = False
    ) -> None:
        """Run section s on env in place; without `with_exit`, only the steps that later
        sections need (exit s's head is skipped: nobody can leave there). Each value is
        dropped from env after its last reader unless a later section or the caller needs it
        (exit s's logits, the values live after s), so big batches hold about their largest
        live set, not every activation (`keep_values` keeps them all, for tests)."""
        plan = self._section_plan(s) if with_exit else self._body_plan(s)
        drops = self._drops.get((s, with_exit))
        if drops is None:
            drops = self._drops[(s, with_exit)] = self._drop_lists(s, plan, with_exit)
        for (fn, ins, out, _), dead in zip(plan, drops):
            env[out] = fn(*[env[v] for v in ins])
            if not keep_values:
                for v in dead:
                    env[v] = None

    def _drop_lists(self, s: int, plan: list, with_exit: bool) -> list[list[int]]:
        """Per step of plan, the values nothing after it reads (this section's later steps,
        later sections, the caller)."""
        keep = set(self._live_after[s]) | {0}  # the input belongs to the caller
        if with_exit:
            keep.add(self.spec.exits[s].logits)
        last = {}
        for k, (_, ins, out, _) in enumerate(plan):
            last[out] = k
            for v in ins:
                last[v] = k
        drops: list[list[int]] = [[] for _ in plan]
        for v, k in last.items():
            if v not in keep:
                drops[k].append(v)
        return drops

    def _body_plan(self, s: int) -> list:
        """Section s's steps minus those that only feed exit s's head (cached)."""
        body = self._body_plans[s]
        if body is None:
            needed = set(self._live_after[s])
            keep = []
            for step in reversed(self._section_plan(s)):
                _, ins, out, _ = step
                if out in needed:
                    keep.append(step)
                    needed.update(ins)
            body = self._body_plans[s] = keep[::-1]
        return body

    def _env(self, x_nhwc: np.ndarray) -> list:
        env = [None] * len(self.spec.values)
        env[0] = x_nhwc
        return env

    def _threading_for(self, batch: int):
        if batch < OWN_THREADS_MIN_BATCH and self._blas_threads_at_batch1:
            return parallel.POOL.blas_threaded()
        return parallel.POOL.blas_single_threaded()

    def warm(self, x_nhwc: np.ndarray, thresholds: list[float], policy: int) -> None:
        """Run x through every path a call of its batch size can take (Model.warmup): the
        programs where they apply, and the step lists (which a call takes while another holds
        the arena)."""
        self.run_all_exits(x_nhwc)
        self.predict(x_nhwc, thresholds, policy)
        if self._programs_apply(x_nhwc.shape[0]):  # the step lists too, at this batch size
            with self._threading_for(x_nhwc.shape[0]):
                self._run_all_exits(x_nhwc)
                self._predict(x_nhwc, thresholds, policy)

    # ------------------------------------------------------------------ programs
    def _claim_arena(self, x_nhwc: np.ndarray) -> np.ndarray | None:
        """The arena holding x with its lock held, or None: the step lists run (no program for
        this model, a batch above the programs' limit, or another thread holds the arena). The
        arena grows to the biggest batch (or sub-batch, see ARENA_BYTES) seen and is kept."""
        n = x_nhwc.shape[0]
        if not self._programs_apply(n) or not self._arena_lock.acquire(blocking=False):
            return None
        if self._arena is None or self._arena.size < n * self._layout.per_sample:
            self._arena = self._arena_views = None  # released before a bigger one is allocated
            self._arena = self._layout.arena(n)
            self._arena_views = {}
        views = self._views(n)
        if 0 in self._layout.dirty:
            views["input"][...] = 0.0  # its border: the memory holds other values later on
        views["input interior"][...] = x_nhwc
        return self._arena

    def _programs_apply(self, n: int) -> bool:
        """Whether a batch of n runs as programs (when it finds the arena free)."""
        return self._layout is not None and 1 <= n <= PROGRAM_MAX_BATCH

    def _views(self, n: int) -> dict:
        """Views of the arena for a batch of n (the input, every exit's logits), made once."""
        views = self._arena_views.get(n)
        if views is None:
            arena, layout = self._arena, self._layout
            views = {
                "input": layout.whole(arena, 0, n),
                "input interior": layout.view(arena, 0, n),
                "logits": [layout.view(arena, e.logits, n) for e in self.spec.exits],
            }
            self._arena_views[n] = views
        return views

    def _run_program(self, s: int, with_exit: bool, arena: np.ndarray, n: int) -> None:
        prog = self._programs.get((s, with_exit))
        if prog is None:
            plan = self._section_plan(s) if with_exit else self._body_plan(s)
            prog = program.build(self.spec, self._layout, plan, self._params[s], self._fused)
            self._programs[(s, with_exit)] = prog
        program.execute(prog, arena, n, arena.size // self._layout.per_sample)

    def _logits_in(self, s: int, n: int) -> np.ndarray:
        """Exit s's logits (n, K): a view of the arena (valid until the next program runs)."""
        return self._views(n)["logits"][s]

    def _keep_rows(self, arena: np.ndarray, s: int, n: int, keep: np.ndarray) -> None:
        """Move the rows in `keep` of every value live after section s to the front (in place:
        each value's samples are contiguous in the arena, borders included)."""
        for v in self._live_after[s]:
            whole = self._layout.whole(arena, v, n)
            whole[: int(keep.sum())] = whole[keep]

    # ------------------------------------------------------------------ running
    def _sub_batches(self, x_nhwc: np.ndarray) -> list[np.ndarray] | None:
        """x cut in sub-batches of the arena's size, or None when it runs whole (it fits, or
        the programs do not take it)."""
        n, sub = x_nhwc.shape[0], self._arena_batch
        if n <= sub or not self._programs_apply(n):
            return None
        return [x_nhwc[i : i + sub] for i in range(0, n, sub)]

    def run_all_exits(self, x_nhwc: np.ndarray) -> list[np.ndarray]:
        parts = self._sub_batches(x_nhwc)
        if parts is not None:
            outs = [self.run_all_exits(p) for p in parts]
            return [np.concatenate(per_exit) for per_exit in zip(*outs)]
        arena = self._claim_arena(x_nhwc)
        if arena is not None:
            try:
                n = x_nhwc.shape[0]
                out = []
                for s in range(len(self.spec.exits)):
                    self._run_program(s, True, arena, n)
                    out.append(self._logits_in(s, n).copy())
                return out
            finally:
                self._arena_lock.release()
        with self._threading_for(x_nhwc.shape[0]):
            return self._run_all_exits(x_nhwc)

    def _run_all_exits(self, x_nhwc: np.ndarray) -> list[np.ndarray]:
        env = self._env(x_nhwc)
        out = []
        for s, ex in enumerate(self.spec.exits):
            self.run_section(s, env)
            out.append(env[ex.logits])
        return out

    def predict(self, x_nhwc: np.ndarray, thresholds: list[float], policy: int) -> Prediction:
        parts = self._sub_batches(x_nhwc)
        if parts is not None:
            return Prediction.concat([self.predict(p, thresholds, policy) for p in parts])
        arena = self._claim_arena(x_nhwc)
        if arena is not None:
            try:
                if x_nhwc.shape[0] == 1:
                    return self._predict_one(arena, thresholds, policy)
                return self._predict_arena(arena, x_nhwc.shape[0], thresholds, policy)
            finally:
                self._arena_lock.release()
        with self._threading_for(x_nhwc.shape[0]):
            return self._predict(x_nhwc, thresholds, policy)

    def _predict_one(self, arena: np.ndarray, thresholds: list[float], policy: int) -> Prediction:
        """_predict_arena for one sample, without the row bookkeeping (~10 us of numpy calls,
        a tenth of a small model's first exit)."""
        last = len(self.spec.exits) - 1
        for s in range(last + 1):
            if s != last and not thresholds[s] <= 1.0:  # nobody leaves at s (see _predict)
                self._run_program(s, False, arena, 1)
                continue
            self._run_program(s, True, arena, 1)
            logits = self._logits_in(s, 1)
            conf = confidence(logits, policy)
            if s == last or conf[0] >= thresholds[s]:
                labels = np.argmax(logits, axis=1)
                return Prediction(labels, np.full(1, s, np.int64), conf, logits.copy())
        raise AssertionError("the last exit answers every sample")

    def _predict_arena(
        self, arena: np.ndarray, n: int, thresholds: list[float], policy: int
    ) -> Prediction:
        """_predict on the n samples held in the arena, section by section as programs."""

        def run(s: int, with_exit: bool, rows: int) -> None:
            self._run_program(s, with_exit, arena, rows)

        def keep_rows(s: int, rows: int, keep: np.ndarray) -> None:
            self._keep_rows(arena, s, rows, keep)

        return self._early_exit(n, thresholds, policy, run, self._logits_in, keep_rows)

    def _predict(self, x_nhwc: np.ndarray, thresholds: list[float], policy: int) -> Prediction:
        """Early exit on the step lists: env holds the values; samples that leave are dropped
        from the values later sections read."""
        env = self._env(x_nhwc)

        def run(s: int, with_exit: bool, rows: int) -> None:
            self.run_section(s, env, with_exit)

        def keep_rows(s: int, rows: int, keep: np.ndarray) -> None:
            for v in self._live_after[s]:
                env[v] = env[v][keep]

        logits_of = lambda s, rows: env[self.spec.exits[s].logits]  # noqa: E731
        return self._early_exit(x_nhwc.shape[0], thresholds, policy, run, logits_of, keep_rows)

    def _early_exit(self, n, thresholds, policy, run, logits_of, keep_rows) -> Prediction:
        """The early-exit loop of both paths: run(s, with_exit, rows) runs section s on the
        `rows` samples still active, logits_of(s, rows) is exit s's (rows, K) logits, and
        keep_rows(s, rows, keep) keeps only the samples in `keep` for the later sections."""
        k = self.spec.values[self.spec.exits[0].logits].shape[0]
        labels = np.empty(n, np.int64)
        exit_index = np.empty(n, np.int64)
        conf_out = np.empty(n, np.float32)
        logits_out = np.empty((n, k), np.float32)
        active = np.arange(n)  # rows of the original batch still running
        last = len(self.spec.exits) - 1
        for s in range(last + 1):
            if s != last and not thresholds[s] <= 1.0:
                # Confidences lie in [0, 1]: a threshold above 1 (or NaN) means nobody leaves
                # here, so exit s's head is not computed at all (the dense setting).
                run(s, False, len(active))
                continue
            run(s, True, len(active))
            logits = logits_of(s, len(active))
            conf = confidence(logits, policy)
            if s == last or bool((done := conf >= thresholds[s]).all()):
                # every remaining sample answers here: no row selection
                labels[active] = np.argmax(logits, axis=1)
                exit_index[active] = s
                conf_out[active] = conf
                logits_out[active] = logits
                break
            rows = active[done]
            labels[rows] = np.argmax(logits[done], axis=1)
            exit_index[rows] = s
            conf_out[rows] = conf[done]
            logits_out[rows] = logits[done]
            keep = ~done
            keep_rows(s, len(active), keep)
            active = active[keep]
        return Prediction(labels, exit_index, conf_out, logits_out)


_WEIGHTED = (OpCode.CONV2D, OpCode.LINEAR)
_RANS = (Encoding.RANS_INDICES, Encoding.RANS_INTERLEAVED)


def _fusable_adds(spec: ModelSpec) -> dict[int, tuple[int, int]]:
    """{conv node i: (add node j, other input value)} for residual adds that can run as conv i's
    epilogue: the conv has no activation of its own, the add is its output's only reader (no
    exit, no later node), and the add's other input exists when the conv runs (it is produced
    by an earlier node, or is the model input). Of two candidate convs, the later one."""
    nodes = spec.nodes
    readers: dict[int, int] = {}
    for n in nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    for e in spec.exits:
        readers[e.logits] = readers.get(e.logits, 0) + 1
    producer = {n.output: i for i, n in enumerate(nodes)}
    fused = {}
    for j, add in enumerate(nodes):
        if add.op != OpCode.ADD or len(add.inputs) != 2 or add.inputs[0] == add.inputs[1]:
            continue
        best = None
        for k in (0, 1):
            v, other = add.inputs[k], add.inputs[1 - k]
            i = producer.get(v)
            if i is None or i in fused:
                continue
            conv = nodes[i]
            if (
                conv.op != OpCode.CONV2D
                or conv.options["conv"]["groups"] != 1
                or conv.activation != kernels.ACT_NONE
                or conv.section != add.section
                or readers.get(v) != 1
                or producer.get(other, -1) >= i
                or spec.values[v].shape != spec.values[other].shape
            ):
                continue
            if best is None or i > best[0]:
                best = (i, other)
        if best is not None:
            fused[best[0]] = (j, best[1])
    return fused


def _conv_step(node, p: dict, activation: int):
    o = node.options["conv"]
    return kernels.make_conv(
        p["weight"],
        p["scale"],
        p["shift"],
        tuple(o["stride"]),
        tuple(o["padding"]),
        tuple(o["dilation"]),
        activation,
    )


def _node_step(node, p: dict):
    """A callable running one node on its input arrays, everything else bound now."""
    op, act = node.op, node.activation
    if op == OpCode.CONV2D:
        return _conv_step(node, p, act)
    if op == OpCode.CONCAT:
        return lambda *xs: _act(kernels.concat_channels(list(xs)), act)
    return lambda *xs: _run_node(node, p, list(xs))


def _run_node(node, p: dict, xs: list[np.ndarray]) -> np.ndarray:
    """Every op but CONV2D and CONCAT, which _node_step binds directly."""
    op, act = node.op, node.activation
    if op == OpCode.LINEAR:
        return kernels.linear(xs[0], p["weight"], p["scale"], p["shift"], act)
    if op == OpCode.AFFINE:
        return kernels.affine(xs[0], p["scale"], p["shift"], act)
    if op == OpCode.ACTIVATION:
        return kernels.activate(xs[0], act)
    if op == OpCode.ADD:
        return kernels.add(xs[0], xs[1], act)
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


# Batches smaller than this let BLAS thread each big conv's sgemm (models with a conv of at least
# kernels.PARALLEL_MIN_MACS); larger ones use the runtime's own chunked threads
# (escepe_rt.parallel). Only batch 1 and 32 were measured (see Pool.blas_threaded).
OWN_THREADS_MIN_BATCH = 2
# Batches up to this size run as section programs (escepe_rt/program.py) on models that allow
# them; the arena is kept and grows to the biggest such batch, or sub-batch (ResNet-18 width
# 64's batch-32 peak RSS fell from 302 to 248 MB, benchmarks/memory.py, because the step lists
# kept every activation of a pass alive).
PROGRAM_MAX_BATCH = 64
# Arena bytes above which a batch runs through the programs in sub-batches: per-sample results
# do not depend on the batch, and a few samples already reuse the convs' weights enough.
# ResNet-18 width 64 (888 KB a sample) runs batch 32 as 18 + 14: peak RSS 12-16 MB lower, the
# same ms per sample (4 alternating processes each, dense and early exit, ad hoc).
ARENA_BYTES = 16 << 20
