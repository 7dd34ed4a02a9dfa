#!/usr/bin/env python3
"""Latency / throughput of escepe_rt against PyTorch and onnxruntime, on one early-exit CNN.

All runtimes run in this one process, on the same model (same clustered weights) and the same
inputs, with the same thread count everywhere (default 2: torch, onnxruntime intra-op, numba,
OpenBLAS/MKL/OpenMP via environment variables set before any import, and threadpoolctl).

Runtimes:
  escepe_ee        escepe_rt.Model.predict with the file's exit thresholds (early exit)
  escepe_dense     escepe_rt with threshold 1.5: every sample runs to the last exit
  torch_full       torch.inference_mode, full model (every exit head; torch has no early exit)
  torch_last       torch, fx graph of the last exit only (other heads dead-code eliminated)
  ort_fp32         onnxruntime, fp32 ONNX with every exit as an output
  ort_fp32_last    onnxruntime, fp32 ONNX of the last exit only (heads pruned)
  ort_int8         onnxruntime, static int8 QDQ (per-channel weights) of the all-exits model

Timing protocol: for each batch size, --rounds rounds; in each round every runtime is timed as
one block (--seconds / --rounds of calls, after its own warm-up), the block order rotating by one
from round to round, with a --cooldown pause before each block. On a shared machine memory and
cache speed drift by tens of percent from minute to minute, so one long block per runtime would
compare different machines; calls interleaved one by one would let each runtime's spinning
thread pool slow the next. The per-round means are in latency.json (round_means_ms).

Accuracy is NOT measured: the weights are random. The thresholds stored in the .escepe file are
chosen from quantiles of the max-softmax on the benchmark inputs so that a stated fraction of the
samples leaves at each exit (--exit-fractions); the resulting exit histogram is recorded.

Outputs in --out: latency.json (every number, machine info, versions, thread settings),
latency.png (per-sample latency by runtime and batch), artifacts/ (the model files). Progress goes
to stderr; markdown tables to stdout.

    python3 benchmarks/latency.py --model resnet18 --width 64 --quick    # smoke run, ~2 min
    python3 benchmarks/latency.py --model resnet18                       # full, ~10 s per config
    python3 benchmarks/latency.py --model resnet20 --out results/latency_r20
"""

from __future__ import annotations

import argparse
import os
import sys

# Thread env vars must be in place before numpy / torch / numba / onnxruntime are imported.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib-only at import time)

THREADS = common.threads_from_argv()
common.set_thread_env(THREADS)

import logging  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import escepe_rt  # noqa: E402
from compiler.models import MODELS  # noqa: E402
from compiler.onnx_export import SingleExit  # noqa: E402
from escepe_rt import kernels as rt_kernels  # noqa: E402
from escepe_rt._fbs.OpCode import OpCode  # noqa: E402

log = logging.getLogger("escepe.bench.latency")

RUNTIMES = (
    "escepe_ee",
    "escepe_dense",
    "torch_full",
    "torch_last",
    "ort_fp32",
    "ort_fp32_last",
    "ort_int8",
)
BASELINE = "ort_fp32"
OPCODE_NAMES = {v: k for k, v in vars(OpCode).items() if not k.startswith("_")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="base width (resnet18 default 64 = the real CIFAR ResNet-18; resnet20 16)",
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime")
    p.add_argument(
        "--seconds", type=float, default=10.0, help="target timed seconds per config (default 10)"
    )
    p.add_argument("--warmup", type=float, default=1.0, help="min warm-up seconds per config")
    p.add_argument("--runs", type=int, default=None, help="fixed timed runs (overrides --seconds)")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="rounds of blocks: each runtime's timed runs are split over this many rounds, the "
        "block order rotating, so that machine drift hits every runtime alike (default 4)",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        default=0.3,
        help="seconds of pause before each block, for the last runtime's spinning threads to "
        "go idle (default 0.3)",
    )
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--max-runs", type=int, default=20000)
    p.add_argument(
        "--pool", type=int, default=256, help="distinct benchmark input samples (cycled)"
    )
    p.add_argument(
        "--clusters",
        type=int,
        nargs="+",
        default=None,
        help="cluster count per section (default 32,16,8,4 halving; one int = all sections)",
    )
    p.add_argument(
        "--exit-fractions",
        type=float,
        nargs="+",
        default=None,
        help="share of samples meant to leave at each exit (default 4 exits: .5 .25 .15 .10; "
        "3 exits: .5 .3 .2)",
    )
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument(
        "--profile-runs",
        type=int,
        default=20,
        help="batch-1 runs for the per-op profiles (batch 32: a quarter of it); 0 disables",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/latency", help="output folder")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 s per config, 3 runs min, pool 64, short profiles",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
        args.warmup = min(args.warmup, 0.2)
        args.min_runs = min(args.min_runs, 3)
        args.pool = min(args.pool, 64)
        args.profile_runs = min(args.profile_runs, 4)
    if args.width is None:
        args.width = {"resnet18": 64, "resnet20": 16, "resnet56": 16, "mobilenet": 32}.get(
            args.model, 16
        )
    if args.pool < max(args.batches):
        p.error(f"--pool ({args.pool}) must be >= the largest batch ({max(args.batches)})")
    return args


# ---------------------------------------------------------------------------- model set-up


def prepare(args, work: str) -> dict:
    """Build, cluster, randomise BN, choose thresholds and write every model file."""
    return common.prepare_model_files(
        args.model,
        args.width,
        work,
        pool_size=args.pool,
        seed=args.seed,
        clusters=args.clusters,
        fractions=args.exit_fractions,
    )


# ---------------------------------------------------------------------------- runtimes


def ort_session(path: str, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def make_runners(setup: dict, threads: int, names) -> dict:
    """name -> callable(x_numpy, x_torch) running one batch."""
    files = setup["files"]
    model = setup["model"]
    runners = {}
    if "escepe_ee" in names:
        # eager decode: lazy decode cost is measured on its own (load_and_decode), and must not
        # land in whichever timed run first reaches a deep section
        m_ee = escepe_rt.load(files["escepe"], decode="eager")  # thresholds from the file
        runners["escepe_ee"] = lambda x, xt: m_ee.predict(x)
    if "escepe_dense" in names:
        m_dense = escepe_rt.load(files["escepe"], threshold=1.5, decode="eager")
        runners["escepe_dense"] = lambda x, xt: m_dense.predict(x)
    if "torch_full" in names:

        def torch_full(x, xt):
            with torch.inference_mode():
                return model(xt)

        runners["torch_full"] = torch_full
    if "torch_last" in names:
        gm = torch.fx.symbolic_trace(SingleExit(model, -1))
        gm.graph.eliminate_dead_code()
        gm.recompile()
        gm.eval()

        def torch_last(x, xt):
            with torch.inference_mode():
                return gm(xt)

        runners["torch_last"] = torch_last
    for name, key in (
        ("ort_fp32", "onnx_fp32"),
        ("ort_fp32_last", "onnx_fp32_last"),
        ("ort_int8", "onnx_int8"),
    ):
        if name in names:
            sess = ort_session(files[key], threads)
            runners[name] = lambda x, xt, s=sess: s.run(None, {"input": x})
    return {n: runners[n] for n in names}


def batches_of(pool: np.ndarray, batch: int) -> list[tuple[np.ndarray, torch.Tensor]]:
    xs = [np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)]
    return [(x, torch.from_numpy(x)) for x in xs]


# ---------------------------------------------------------------------------- checks


def sanity(setup: dict, runners: dict, threads: int) -> dict:
    """Every runtime computes the same function (max |diff| vs torch), int8 agreement reported."""
    x = setup["pool"][:32]
    ref = [r[:32] for r in setup["ref_logits"]]
    out: dict = {}

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    m = escepe_rt.load(setup["files"]["escepe"])
    esc = m.run_all_exits(x)
    out["escepe_vs_torch_max_rel_diff_per_exit"] = [rel(a, b) for a, b in zip(esc, ref)]
    sess = ort_session(setup["files"]["onnx_fp32"], threads)
    onx = sess.run(None, {"input": x})
    out["ort_fp32_vs_torch_max_rel_diff_per_exit"] = [rel(a, b) for a, b in zip(onx, ref)]
    q = ort_session(setup["files"]["onnx_int8"], threads).run(None, {"input": x})
    out["ort_int8_top1_agreement_with_fp32_per_exit"] = [
        float((a.argmax(1) == b.argmax(1)).mean()) for a, b in zip(q, ref)
    ]
    out["note"] = "int8 agreement on random weights and inputs is reported, not asserted"

    pred = m.predict(setup["pool"])
    counts = np.bincount(pred.exit_index, minlength=setup["n_exits"])
    out["exit_histogram"] = {
        "samples": len(setup["pool"]),
        "counts": counts.tolist(),
        "fractions": (counts / counts.sum()).tolist(),
        "target_fractions": list(setup["fractions"]),
        "thresholds": list(setup["thresholds"]),
        "mean_exit_index": float(pred.exit_index.mean()),
    }
    return out


# ---------------------------------------------------------------------------- load / decode


def load_and_decode(path: str, repeat: int) -> dict:
    """escepe load (verify + parse) time, and per-section lazy decode time and throughput."""
    t0 = time.perf_counter()
    m = escepe_rt.load(path)
    first = time.perf_counter() - t0
    load_s, all_load = common.median_time(lambda: escepe_rt.load(path), repeat)
    spec = m.spec
    sections = []
    for s, (begin, end) in enumerate(spec.sections):
        decode_ts, unpack_ts = [], []
        kept = unpacked = 0
        for _ in range(repeat):
            ex = escepe_rt.load(path)._executor  # fresh: nothing decoded yet
            t0 = time.perf_counter()
            params = ex.section_params(s)
            decode_ts.append(time.perf_counter() - t0)
            kept = sum(_nbytes(v) for p in params.values() for v in p.values())
            weights = [spec.nodes[i].weight for i in range(begin, end)]
            weights = [w for w in weights if w >= 0]
            t0 = time.perf_counter()
            arrays = [ex.tensor(w) for w in weights]
            unpack_ts.append(time.perf_counter() - t0)
            unpacked = sum(a.nbytes for a in arrays)  # float32: 4 bytes a weight
        d = sorted(decode_ts)[len(decode_ts) // 2]
        u = sorted(unpack_ts)[len(unpack_ts) // 2]
        sections.append(
            {
                "section": s,
                "nodes": end - begin,
                "section_params_ms": 1e3 * d,
                # throughput counts float32 weights (float16 panels keep half those bytes)
                "f32_bytes_produced": unpacked,
                "bytes_kept": kept,
                "section_params_gb_per_s": unpacked / d / 1e9 if d > 0 else None,
                "unpack_only_ms": 1e3 * u,
                "f32_weight_bytes_unpacked": unpacked,
                "unpack_only_gb_per_s": unpacked / u / 1e9 if u > 0 else None,
            }
        )
    return {
        "load_first_in_process_ms": 1e3 * first,
        "load_median_ms": 1e3 * load_s,
        "load_all_ms": [1e3 * t for t in all_load],
        "sections": sections,
        "note": "section_params = unpack indices + gather codebook + re-layout for sgemm "
        "(what lazy decode does on first use); unpack_only = decode_packed of the "
        "section's conv/linear weights alone. GB/s counts the weights as float32 (4 bytes "
        "each), whatever the runtime keeps: bytes_kept (float16 panels: 2 bytes a weight).",
    }


def _nbytes(v) -> int:
    if v is None:
        return 0
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, tuple):  # kernels.ConvWeight
        return sum(a.nbytes for a in v if isinstance(a, np.ndarray))
    return 0


# ---------------------------------------------------------------------------- profiles


def profile_escepe(path: str, data, runs: int) -> dict:
    """Per op type time of escepe_rt dense predict (wraps the executor's plan steps in-process).

    Every step of every section's plan is wrapped with a timer keyed by op type (a conv with a
    fused residual add is its own key, "+add"). Conv sub-steps are split out by wrapping the
    numba kernels the conv calls (im2col, epilogue, depthwise); with escepe_rt's own threads
    these sub-step times are summed over threads (CPU-like), so they can exceed the conv's wall
    time; "sgemm+rest" is the conv's wall time minus them (only for convs with such sub-steps:
    direct micro-kernel convs have none). GFLOP/s counts 2 x MACs of the direct conv (a
    "winograd" conv does fewer multiplies: its figure is the direct conv's equivalent).
    """
    acc: dict[str, list[float]] = {}  # key -> [seconds, flops, calls]
    state = {"conv": None}
    lock = threading.Lock()

    def add(key, dt, flops=0.0):
        with lock:
            a = acc.setdefault(key, [0.0, 0.0, 0])
            a[0] += dt
            a[1] += flops
            a[2] += 1

    names = ("_im2col_rows", "_epilogue", "_depthwise", "_im2col")
    originals = {k: getattr(rt_kernels, k) for k in names if hasattr(rt_kernels, k)}

    def wrap_kernel(name, fn):
        def wrapped(*a):
            t0 = time.perf_counter()
            r = fn(*a)
            conv = state["conv"]
            if conv is not None:
                add(f"{conv} / {name.strip('_')}", time.perf_counter() - t0)
            return r

        return wrapped

    m = escepe_rt.load(path, threshold=1.5, decode="eager")
    ex = m._executor
    # per-op times come from the step lists: a batch-1 section program (escepe_rt/program.py)
    # is one nogil call with no op boundaries to time, so the profile turns programs off
    ex._layout = None
    m.predict(data[0])
    spec = m.spec
    plans = list(ex._plans)
    wrapped_plans = []
    for plan in plans:
        new = []
        for fn, ins, out, i in plan:
            node = spec.nodes[i]
            key = OPCODE_NAMES.get(node.op, str(node.op))
            flops = 0.0
            if node.op == OpCode.CONV2D:
                w = ex.section_params(node.section)[i]["weight"]
                kind = "dw" if w.depthwise else " winograd" if w.winograd else ""
                st = node.options["conv"]["stride"]
                fused = "+add" if i in ex._fused else ""
                key = f"CONV2D {w.kh}x{w.kw}{kind}{' s2' if max(st) > 1 else ''}{fused}"
                macs_per_out = w.kh * w.kw * (w.Cin // w.groups)
                flops = 2.0 * macs_per_out
            elif node.op == OpCode.LINEAR:
                flops = 2.0 * ex.section_params(node.section)[i]["weight"].shape[0]

            def timed(*xs, fn=fn, key=key, flops=flops, conv=node.op == OpCode.CONV2D):
                if conv:
                    state["conv"] = key
                t0 = time.perf_counter()
                y = fn(*xs)
                dt = time.perf_counter() - t0
                state["conv"] = None
                add(key, dt, flops * y.size)
                return y

            new.append((timed, ins, out, i))
        wrapped_plans.append(new)
    ex._plans = wrapped_plans
    ex._body_plans = [None] * len(wrapped_plans)  # rebuilt from the wrapped steps
    for k, fn in originals.items():
        setattr(rt_kernels, k, wrap_kernel(k, fn))
    try:
        t_total = 0.0
        for i in range(runs):
            t0 = time.perf_counter()
            m.predict(data[i % len(data)])
            t_total += time.perf_counter() - t0
    finally:
        ex._plans = plans
        for k, fn in originals.items():
            setattr(rt_kernels, k, fn)
    per_run = t_total / runs
    rows = []
    node_total = 0.0
    for key, (sec, flops, calls) in acc.items():
        if " / " not in key:
            node_total += sec
        rows.append(
            {
                "op": key,
                "ms_per_run": 1e3 * sec / runs,
                "share": sec / t_total,
                "calls_per_run": calls / runs,
                "gflop_per_s": flops / sec / 1e9 if flops and sec > 0 else None,
            }
        )
    for key in [k for k in acc if k.startswith("CONV2D") and " / " not in k]:
        subs = [v[0] for k, v in acc.items() if k.startswith(key + " / ")]
        if not subs:  # direct micro-kernel convs: no im2col / epilogue sub-steps to split off
            continue
        sub = sum(subs)
        rows.append(
            {
                "op": f"{key} / sgemm+rest",
                "ms_per_run": 1e3 * (acc[key][0] - sub) / runs,
                "share": (acc[key][0] - sub) / t_total,
                "calls_per_run": acc[key][2] / runs,
                "gflop_per_s": None,
            }
        )
    rows.append(
        {
            "op": "outside nodes (input check, NCHW->NHWC, softmax, exit bookkeeping)",
            "ms_per_run": 1e3 * (t_total - node_total) / runs,
            "share": (t_total - node_total) / t_total,
            "calls_per_run": 1,
            "gflop_per_s": None,
        }
    )
    rows.sort(key=lambda r: -r["ms_per_run"])
    return {"runs": runs, "ms_per_run": 1e3 * per_run, "ops": rows}


def profile_ort(path: str, threads: int, data, runs: int, work: str) -> dict:
    """Per op type time from onnxruntime's own profiler."""
    import json

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(work, "ort_profile")
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for i in range(3):
        sess.run(None, {"input": data[i % len(data)]})
    t0 = time.perf_counter()
    for i in range(runs):
        sess.run(None, {"input": data[i % len(data)]})
    per_run = (time.perf_counter() - t0) / runs
    prof = sess.end_profiling()
    with open(prof) as f:
        events = json.load(f)
    os.unlink(prof)
    # only the timed runs: node events inside the last `runs` model_run spans (skip warm-up)
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[-runs:]
    t_lo = spans[0][0]
    run_total = sum(b - a for a, b in spans) * 1e-6
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t_lo:
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"] * 1e-6
    rows = [
        {"op": op, "ms_per_run": 1e3 * s / runs, "share": s / run_total} for op, s in by_op.items()
    ]
    rows.sort(key=lambda r: -r["ms_per_run"])
    return {"runs": runs, "ms_per_run": 1e3 * per_run, "ops": rows}


def profile_torch(model, data, runs: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(data[0])
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(runs):
                model(data[i % len(data)])
        per_run = (time.perf_counter() - t0) / runs
    rows = [
        {
            "op": e.key,
            "ms_per_run": e.self_cpu_time_total / 1e3 / runs,
            "calls_per_run": e.count / runs,
        }
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["ms_per_run"])
    return {"runs": runs, "ms_per_run_with_profiler": 1e3 * per_run, "ops": rows[:12]}


# ---------------------------------------------------------------------------- output


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["runtime"] for r in results))
    batches = sorted({r["batch"] for r in results})
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(names)), 4.5))
    width = 0.8 / len(batches)
    for j, b in enumerate(batches):
        vals = []
        for n in names:
            r = next((r for r in results if r["runtime"] == n and r["batch"] == b), None)
            vals.append(r["mean_ms_per_sample"] if r else np.nan)
        xs = np.arange(len(names)) + (j - (len(batches) - 1) / 2) * width
        p50 = [
            next(
                (r["p50_ms_per_sample"] for r in results if r["runtime"] == n and r["batch"] == b),
                np.nan,
            )
            for n in names
        ]
        ax.bar(xs, vals, width, label=f"batch {b} (mean)")
        ax.plot(xs, p50, "k.", label="p50" if j == 0 else None)
        for x, v in zip(xs, vals):
            if np.isfinite(v):
                ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("mean latency per sample (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(result: dict) -> str:
    out = []
    lat = result["latency"]
    out.append(
        f"### {result['config']['model']} (width {result['config']['width']}, "
        f"{result['model']['params']:,} params), {result['config']['threads']} threads, "
        f"{result['machine']['cpu_model']}\n"
    )
    rows = [
        [
            r["runtime"],
            r["batch"],
            r["runs"],
            r["mean_ms"],
            r["p50_ms"],
            r["p99_ms"],
            r["mean_ms_per_sample"],
            r["throughput_sps"],
            r.get("latency_ratio_vs_ort_fp32", float("nan")),
            r.get("p50_latency_ratio_vs_ort_fp32", float("nan")),
            r["cpu_utilisation"],
            max(r["loadavg_1min"]),
        ]
        for r in lat
    ]
    out.append(
        common.markdown_table(
            [
                "runtime",
                "batch",
                "runs",
                "mean ms",
                "p50 ms",
                "p99 ms",
                "ms/sample",
                "samples/s",
                "x ORT fp32 (mean)",
                "x ORT fp32 (p50)",
                "CPU util",
                "loadavg",
            ],
            rows,
        )
    )
    h = result["sanity"]["exit_histogram"]
    fr = ", ".join(f"{f:.0%}" for f in h["fractions"])
    target = ", ".join(f"{f:.0%}" for f in h["target_fractions"])
    thr = ", ".join(f"{t:.4f}" for t in h["thresholds"])
    out.append(
        f"\nexit histogram (escepe_ee, {h['samples']} samples): {fr} (target {target}), "
        f"thresholds {thr}"
    )
    sizes = result["sizes_bytes"]
    out.append(
        "\n" + common.markdown_table(["file", "bytes"], [[k, f"{v:,}"] for k, v in sizes.items()])
    )
    ld = result["escepe_load_decode"]
    out.append(
        f"\nescepe load: first {ld['load_first_in_process_ms']:.2f} ms, "
        f"median {ld['load_median_ms']:.2f} ms\n"
    )
    out.append(
        common.markdown_table(
            ["section", "decode ms", "MB f32", "MB kept", "GB/s", "unpack-only ms", "unpack GB/s"],
            [
                [
                    s["section"],
                    s["section_params_ms"],
                    s["f32_bytes_produced"] / 1e6,
                    s.get("bytes_kept", float("nan")) / 1e6,
                    s["section_params_gb_per_s"] or float("nan"),
                    s["unpack_only_ms"],
                    s["unpack_only_gb_per_s"] or float("nan"),
                ]
                for s in ld["sections"]
            ],
        )
    )
    for key, prof in result.get("profiles", {}).items():
        ms = prof.get("ms_per_run", prof.get("ms_per_run_with_profiler"))
        out.append(f"\nprofile {key}: {ms:.2f} ms/run, top ops\n")
        out.append(
            common.markdown_table(
                ["op", "ms/run", "share", "GFLOP/s"],
                [
                    [
                        r["op"],
                        r["ms_per_run"],
                        r.get("share", float("nan")),
                        r.get("gflop_per_s") or float("nan"),
                    ]
                    for r in prof["ops"][:10]
                ],
            )
        )
    out.append("\n" + common.ACCURACY_NOTE)
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    threads_info = common.limit_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "artifacts")
    os.makedirs(work, exist_ok=True)
    machine = common.machine_info()
    log.info("machine: %s, %d cpus, load %s", machine["cpu_model"], os.cpu_count(), os.getloadavg())

    t_start = time.perf_counter()
    setup = prepare(args, work)
    runners = make_runners(setup, args.threads, args.runtimes)
    checks = sanity(setup, runners, args.threads)
    log.info("sanity: %s", checks)

    latency = []
    for batch in args.batches:
        data = batches_of(setup["pool"], batch)
        log.info("timing batch %d: %d rounds of blocks ...", batch, args.rounds)
        fns = {
            name: (lambda i, run=run, data=data: run(*data[i % len(data)]))
            for name, run in runners.items()
        }
        timed = common.measure_rounds(
            fns,
            batch,
            rounds=args.rounds,
            cooldown_s=args.cooldown,
            seconds=args.seconds,
            runs=args.runs,
            log_fn=log.info,
            warmup_s=args.warmup / args.rounds,
            min_runs=args.min_runs,
            max_runs=args.max_runs,
            min_warmup=1 if args.quick else 2,
        )
        for name, r in timed.items():
            r["runtime"] = name
            latency.append(r)
            log.info(
                "  %s b%d: %.3f ms/batch mean, p99 %.3f, %.1f samples/s (%d runs)",
                name,
                batch,
                r["mean_ms"],
                r["p99_ms"],
                r["throughput_sps"],
                r["runs"],
            )
    for r in latency:
        base = next(
            (b for b in latency if b["runtime"] == BASELINE and b["batch"] == r["batch"]), None
        )
        if base:
            r["latency_ratio_vs_ort_fp32"] = r["mean_ms"] / base["mean_ms"]
            r["p50_latency_ratio_vs_ort_fp32"] = r["p50_ms"] / base["p50_ms"]
            r["throughput_ratio_vs_ort_fp32"] = r["throughput_sps"] / base["throughput_sps"]

    log.info("escepe load / decode ...")
    load_decode = load_and_decode(setup["files"]["escepe"], repeat=3 if args.quick else 5)

    profiles = {}
    if args.profile_runs > 0:
        for batch in args.batches:
            data = batches_of(setup["pool"], batch)
            n = args.profile_runs if batch == 1 else max(2, args.profile_runs // 4)
            log.info("profiling batch %d (%d runs) ...", batch, n)
            profiles[f"escepe_dense_b{batch}"] = profile_escepe(
                setup["files"]["escepe"], [d[0] for d in data], n
            )
            profiles[f"ort_fp32_b{batch}"] = profile_ort(
                setup["files"]["onnx_fp32"], args.threads, [d[0] for d in data], n, work
            )
            profiles[f"torch_full_b{batch}"] = profile_torch(
                setup["model"], [d[1] for d in data], n
            )

    sizes = {k: common.file_size(v) for k, v in setup["files"].items()}
    result = {
        "accuracy_note": common.ACCURACY_NOTE,
        "config": {
            **{k: v for k, v in vars(args).items()},
            "clusters": setup["clusters"],
            "exit_fractions": setup["fractions"],
            "baseline": BASELINE,
            "runtimes_described": {
                "escepe_ee": "escepe_rt predict, thresholds from the file (early exit)",
                "escepe_dense": "escepe_rt predict, threshold 1.5 (all samples to the last exit)",
                "torch_full": "torch inference_mode, all exit heads computed",
                "torch_last": "torch fx graph of the last exit only (heads removed)",
                "ort_fp32": "onnxruntime fp32, all exits as outputs",
                "ort_fp32_last": "onnxruntime fp32, last exit only (heads pruned)",
                "ort_int8": "onnxruntime static int8 QDQ, per-channel weights, all exits",
            },
            "inputs": f"{len(setup['pool'])} random N(0,1) samples 3x32x32, cycled; batch b uses "
            "consecutive disjoint slices",
        },
        "machine": machine,
        "threads": threads_info,
        "model": {
            "name": args.model,
            "width": args.width,
            "params": setup["param_count"],
            "exits": setup["n_exits"],
            "export": setup["export_report"],
        },
        "setup_timings_s": setup["timings"],
        "sanity": checks,
        "sizes_bytes": sizes,
        "escepe_load_decode": load_decode,
        "latency": latency,
        "profiles": profiles,
        "loadavg_at_end": os.getloadavg(),
        "total_seconds": time.perf_counter() - t_start,
    }
    common.write_json(os.path.join(args.out, "latency.json"), result)
    plot(
        latency,
        os.path.join(args.out, "latency.png"),
        f"{args.model} w{args.width}, {args.threads} threads, {machine['cpu_model']} "
        f"(random weights; accuracy not measured)",
    )
    log.info("wrote %s/latency.json and latency.png (%.0f s)", args.out, result["total_seconds"])
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
