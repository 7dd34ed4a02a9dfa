"""Shared helpers for the benchmark scripts in this folder.

Import order matters: thread-count environment variables only take effect if they are set before
numpy / torch / numba / onnxruntime are first imported, so this module imports nothing heavy at
module level. Scripts call :func:`set_thread_env` first, then import the rest.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

log = logging.getLogger("escepe.bench")

# Thread-pool variables of every library in play (OpenMP for torch/numba, OpenBLAS for numpy,
# MKL/oneDNN inside torch). Set before import, then enforced again at run time.
THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
)
# Variables recorded (never changed) because they change BLAS / OpenMP behaviour.
RECORDED_ENV_PREFIXES = ("OMP_", "OPENBLAS", "MKL_", "NUMBA_", "KMP_", "GOMP_", "NVPL_", "ORT_")

# Stated up front in every result: weights are random, so nothing here measures accuracy.
ACCURACY_NOTE = (
    "Accuracy is NOT measured by this benchmark: weights are random (Kaiming init, clustered, "
    "BN statistics randomised), and exit thresholds are set from quantiles of the max-softmax "
    "on the benchmark inputs only to make a stated fraction of samples leave at each exit."
)


def threads_from_argv(default: int = 2) -> int:
    """--threads from the command line, read before numpy & co. are imported."""
    import argparse

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=default)
    return pre.parse_known_args()[0].threads


def set_thread_env(threads: int) -> None:
    """Pin every library's thread count via the environment (call before importing numpy)."""
    for k in THREAD_ENV:
        os.environ[k] = str(threads)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def limit_threads(threads: int) -> dict:
    """Enforce `threads` in torch, numba and (threadpoolctl) BLAS/OpenMP; returns the settings."""
    import numba
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # only possible before torch runs any parallel work
    except RuntimeError:
        pass
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    info: dict = {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "numba_num_threads": numba.get_num_threads(),
        "numba_threading_layer_config": numba.config.THREADING_LAYER,
    }
    try:
        import threadpoolctl

        threadpoolctl.threadpool_limits(threads)
        info["threadpoolctl"] = threadpoolctl.threadpool_info()
    except ImportError:
        info["threadpoolctl"] = "not installed (thread counts set via environment only)"
    return info


# ---------------------------------------------------------------------------- machine info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags(wanted=("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma")) -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": dirty}


def machine_info() -> dict:
    import numba
    import numpy
    import onnxruntime
    import psutil
    import torch

    try:
        import onnx

        onnx_version = onnx.__version__
    except ImportError:
        onnx_version = None
    vm = psutil.virtual_memory()
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_gb": round(vm.total / 1e9, 2),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "numpy": numpy.__version__,
            "numba": numba.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx_version,
        },
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(RECORDED_ENV_PREFIXES)},
        "git": git_state(),
    }


# ---------------------------------------------------------------------------- timing


def summarize(samples_s: Sequence[float], batch: int) -> dict:
    """Latency statistics (ms) per batch and per sample, plus throughput."""
    import numpy as np

    t = np.asarray(samples_s, dtype=np.float64)
    mean = float(t.mean())
    out = {
        "runs": len(t),
        "batch": batch,
        "mean_ms": 1e3 * mean,
        "p50_ms": 1e3 * float(np.percentile(t, 50)),
        "p99_ms": 1e3 * float(np.percentile(t, 99)),
        "min_ms": 1e3 * float(t.min()),
        "max_ms": 1e3 * float(t.max()),
        "std_ms": 1e3 * float(t.std(ddof=1)) if len(t) > 1 else 0.0,
    }
    for k in ("mean", "p50", "p99", "min"):
        out[f"{k}_ms_per_sample"] = out[f"{k}_ms"] / batch
    out["throughput_sps"] = batch / mean
    return out


def measure(
    fn: Callable[[int], object],
    batch: int,
    *,
    seconds: float,
    warmup_s: float,
    min_runs: int,
    max_runs: int,
    runs: int | None = None,
    min_warmup: int = 2,
) -> dict:
    """Time fn(i) for i = 0, 1, 2, ... (fn picks its input from i).

    Warm-up: at least `min_warmup` calls and `warmup_s` seconds. Then either `runs` timed calls,
    or as many as fit in `seconds` (estimated from the warm-up), clamped to [min_runs, max_runs]
    and stopped early once past 2 x `seconds` (with at least min_runs done).
    Each call is timed on its own with perf_counter. CPU time of the process is recorded too,
    so a reader can tell how many cores the runtime kept busy.
    """
    i = 0
    t_start = time.perf_counter()
    warm = []
    while len(warm) < min_warmup or time.perf_counter() - t_start < warmup_s:
        t0 = time.perf_counter()
        fn(i)
        warm.append(time.perf_counter() - t0)
        i += 1
    est = min(warm[-3:])
    n = runs if runs is not None else int(min(max(seconds / max(est, 1e-9), min_runs), max_runs))
    samples = []
    load0 = os.getloadavg()[0]
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
        i += 1
        # the warm-up estimate can be far off on a busy machine: cap the time at 2 x seconds
        if runs is None and len(samples) >= min_runs and t0 - wall0 > 2 * seconds:
            break
    wall = time.perf_counter() - wall0
    out = summarize(samples, batch)
    out.update(
        warmup_runs=len(warm),
        first_call_ms=1e3 * warm[0],
        cpu_utilisation=(time.process_time() - cpu0) / wall if wall > 0 else math.nan,
        loadavg_1min=[load0, os.getloadavg()[0]],
        samples_s=samples,
    )
    return out


def measure_rounds(
    fns: dict[str, Callable[[int], object]],
    batch: int,
    *,
    rounds: int,
    cooldown_s: float,
    seconds: float,
    runs: int | None = None,
    log_fn: Callable[[str], None] | None = None,
    **kwargs,
) -> dict[str, dict]:
    """Time several runtimes side by side: `rounds` rounds, each timing every fn as one block
    (:func:`measure` with seconds / rounds, or runs / rounds), the block order rotated by one
    from round to round, with a `cooldown_s` pause before each block.

    Why: on a shared machine the speed of memory and caches drifts by tens of percent over
    minutes (other tenants), so one long block per runtime compares different machines; and a
    runtime's thread pool keeps spinning for a moment after its last call, so calls interleaved
    one by one slow whichever runtime comes next. Rotating blocks share the drift; the pause
    lets each pool go idle. Returns {name: summary of all rounds' samples}, with the per-round
    means (`round_means_ms`) so a reader can see the drift.
    """
    names = list(fns)
    rounds = max(1, int(rounds))
    per_round: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            time.sleep(cooldown_s)
            res = measure(
                fns[name],
                batch,
                seconds=seconds / rounds,
                runs=None if runs is None else max(1, runs // rounds),
                **kwargs,
            )
            per_round[name].append(res)
            if log_fn is not None:
                log_fn(f"  round {r + 1}/{rounds} {name} b{batch}: {res['mean_ms']:.3f} ms/batch")
    out = {}
    for name, parts in per_round.items():
        samples = [t for p in parts for t in p["samples_s"]]
        walls = [p["mean_ms"] * p["runs"] for p in parts]
        res = summarize(samples, batch)
        res.update(
            rounds=rounds,
            round_means_ms=[p["mean_ms"] for p in parts],
            warmup_runs=sum(p["warmup_runs"] for p in parts),
            first_call_ms=parts[0]["first_call_ms"],
            cpu_utilisation=sum(p["cpu_utilisation"] * w for p, w in zip(parts, walls))
            / max(sum(walls), 1e-12),
            loadavg_1min=[parts[0]["loadavg_1min"][0], parts[-1]["loadavg_1min"][1]],
        )
        out[name] = res
    return out


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts_sorted = sorted(ts)
    return ts_sorted[len(ts) // 2], ts


# ---------------------------------------------------------------------------- models


def randomise_bn(model, calib_x, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial, well-scaled statistics and affine parameters.

    Running mean/var are first measured on `calib_x` (so activations keep a sane scale through a
    deep random network instead of exploding), then jittered at random (var x U(0.5, 2), mean +
    N(0, 0.1 std)); gamma ~ U(0.5, 1.5), beta ~ N(0, 0.1). BN folding is then never a no-op.
    """
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for chunk in torch.split(calib_x, 64):
            model(chunk)
        model.eval()
        for bn in bns:
            n = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(n, generator=g) * 0.1 * std)
            bn.running_var.mul_(2.0 ** (torch.rand(n, generator=g) * 2 - 1))
            bn.momentum = 0.1


def default_clusters(num_sections: int) -> list[int]:
    """[32, 16, 8, 4] for four sections; halving from 32 (floor 4) for any other count."""
    return [max(4, 32 >> i) for i in range(num_sections)]


def default_exit_fractions(num_exits: int) -> list[float]:
    """Share of samples meant to leave at each exit (shallowest first), summing to 1."""
    table = {1: [1.0], 2: [0.6, 0.4], 3: [0.5, 0.3, 0.2], 4: [0.5, 0.25, 0.15, 0.10]}
    if num_exits in table:
        return table[num_exits]
    w = [0.5**i for i in range(num_exits)]
    return [x / sum(w) for x in w]


def thresholds_for_fractions(confidences, fractions: Sequence[float]) -> list[float]:
    """Per-exit thresholds so that (about) fractions[e] of all samples leave at exit e.

    confidences: per exit, (N,) confidence of every sample at that exit. Exits are decided in
    order, so exit e's threshold is chosen among the samples still running. Thresholds sit
    midway between neighbouring confidences, so tiny float differences between runtimes do not
    flip a sample. The last exit's threshold is irrelevant (everything left exits there); 0.
    """
    import numpy as np

    conf = [np.asarray(c, dtype=np.float64) for c in confidences]
    n = len(conf[0])
    if len(fractions) != len(conf):
        raise ValueError(f"need {len(conf)} fractions, got {len(fractions)}")
    remaining = np.arange(n)
    thresholds = []
    for e in range(len(conf) - 1):
        want = int(round(fractions[e] * n))
        c = np.sort(conf[e][remaining])[::-1]  # descending
        if want <= 0 or len(c) == 0:
            t = 1.5  # above any confidence: nobody leaves here
        elif want >= len(c):
            t = float(c[-1]) / 2
        else:
            t = float((c[want - 1] + c[want]) / 2)
        thresholds.append(t)
        remaining = remaining[conf[e][remaining] < t]
    thresholds.append(0.0)
    return thresholds


def prepare_model_files(
    name: str,
    width: int,
    work: str,
    *,
    pool_size: int = 256,
    seed: int = 0,
    clusters: Sequence[int] | None = None,
    fractions: Sequence[float] | None = None,
    int8: bool = True,
) -> dict:
    """The benchmark model and every file the runtimes load, written into `work`.

    Random-init model -> per-section clustering -> randomised BN -> exit thresholds from
    max-softmax quantiles on `pool_size` N(0, 1) inputs -> .escepe (exactly the clustered
    weights), ONNX fp32 (all exits; last exit only), ONNX int8 QDQ, torch state_dict.
    """
    import numpy as np
    import torch

    from compiler.cluster import cluster_sections
    from compiler.export import export
    from compiler.graph import capture
    from compiler.models import build_model
    from compiler.onnx_export import export_onnx, quantize_int8_static
    from escepe_rt.kernels import max_softmax

    os.makedirs(work, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(name, width=width).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    pool = torch.randn(pool_size, 3, 32, 32, generator=gen)
    calib = torch.randn(256, 3, 32, 32, generator=gen)  # BN statistics + int8 calibration

    n_sections = capture(model, pool[:1]).num_sections
    if clusters is None:
        clusters = default_clusters(n_sections)
    elif len(clusters) == 1:
        clusters = list(clusters) * n_sections
    clusters = [int(k) for k in clusters]
    t0 = time.perf_counter()
    cluster_sections(model, pool[:1], clusters, seed=seed)
    randomise_bn(model, calib, seed=seed)
    log.info("clustered %s w%d (k=%s) in %.1f s", name, width, clusters, time.perf_counter() - t0)

    with torch.inference_mode():
        ref_logits = [t.numpy() for t in model(pool)]
    n_exits = len(ref_logits)
    fractions = list(fractions or default_exit_fractions(n_exits))
    if len(fractions) != n_exits or abs(sum(fractions) - 1) > 1e-6:
        raise SystemExit(f"exit fractions need {n_exits} values summing to 1, got {fractions}")
    thresholds = thresholds_for_fractions([max_softmax(lg) for lg in ref_logits], fractions)

    files = {
        "escepe": os.path.join(work, f"{name}.escepe"),
        "onnx_fp32": os.path.join(work, f"{name}.onnx"),
        "onnx_fp32_last": os.path.join(work, f"{name}.last.onnx"),
        "torch_state_dict": os.path.join(work, f"{name}.pt"),
    }
    if int8:
        files["onnx_int8"] = os.path.join(work, f"{name}.int8.onnx")
    timings = {}
    t0 = time.perf_counter()
    report = export(model, pool[:1], files["escepe"], clusters=clusters, thresholds=thresholds)
    timings["escepe_export_s"] = time.perf_counter() - t0
    log.info("%s", report.summary())
    t0 = time.perf_counter()
    export_onnx(model, pool[:2], files["onnx_fp32"])
    export_onnx(model, pool[:2], files["onnx_fp32_last"], exits=-1)
    timings["onnx_export_s"] = time.perf_counter() - t0
    if int8:
        t0 = time.perf_counter()
        batches = [b.numpy() for b in torch.split(calib, 32)]
        quantize_int8_static(files["onnx_fp32"], files["onnx_int8"], batches)
        timings["int8_quantize_s"] = time.perf_counter() - t0
    torch.save(model.state_dict(), files["torch_state_dict"])
    log.info("model files written in %s", work)
    return {
        "model": model,
        "pool": np.ascontiguousarray(pool.numpy()),
        "ref_logits": ref_logits,
        "n_exits": n_exits,
        "clusters": clusters,
        "fractions": fractions,
        "thresholds": thresholds,
        "files": files,
        "export_report": {
            "file_bytes": report.file_bytes,
            "zipped_bytes": report.zipped_bytes,
            "fp32_param_bytes": report.fp32_param_bytes,
            "ratio_vs_fp32_params": report.ratio,
            "sections": [vars(s) for s in report.sections],
        },
        "timings": timings,
        "param_count": sum(p.numel() for p in model.parameters()),
    }


# ---------------------------------------------------------------------------- output


def write_json(path: str, data) -> None:
    """Atomic JSON write (temp file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            a = abs(v)
            if a >= 100:
                return f"{v:,.0f}"
            if a >= 10:
                return f"{v:.1f}"
            if a >= 0.1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        return str(v)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def file_size(path: str) -> int:
    return os.path.getsize(path)
