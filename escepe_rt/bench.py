"""Benchmark one .escepe file with the runtime alone (the core of `escepe bench`).

numpy + the standard library only, like the rest of escepe_rt: it runs on the device. It
measures what a user of that file pays: load (mmap + verify + parse), lazy decode of each
section, the one-off kernel warm-up, and predict latency at each batch size with early exit
(the file's thresholds, or the given ones) and dense (every sample to the last exit), the exit
histogram on the inputs used, and the process's peak RSS.

Without inputs the samples are N(0, 1) noise: latency is then right, but the exit histogram
(and so the early-exit latency) says little about real data. Pass real samples for that.
Comparisons against other runtimes live in benchmarks/ (they need torch / onnxruntime).
"""

from __future__ import annotations

import os
import time

import numpy as np

DENSE_THRESHOLD = 2.0  # no confidence reaches it: every sample runs to the last exit


def _peak_rss_mb() -> float | None:
    """Peak resident set of this process (VmHWM on Linux, else getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
    except (ImportError, OSError):
        return None


def _stats(samples_s: list[float], batch: int) -> dict:
    t = np.asarray(samples_s, dtype=np.float64) * 1e3
    return {
        "runs": len(t),
        "batch": batch,
        "mean_ms": float(t.mean()),
        "p50_ms": float(np.percentile(t, 50)),
        "p99_ms": float(np.percentile(t, 99)),
        "min_ms": float(t.min()),
        "mean_ms_per_sample": float(t.mean()) / batch,
        "samples_per_s": 1e3 * batch / float(t.mean()),
    }


def _inputs(model, inputs: np.ndarray | None, pool: int, seed: int) -> tuple[np.ndarray, str]:
    if inputs is None:
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((pool, *model.input_shape), dtype=np.float32)
        return x, f"{pool} random N(0, 1) samples (no real data: the exit histogram is not real)"
    x = np.asarray(inputs)
    if x.dtype == np.uint8:
        x = model.preprocess(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(model.input_shape):
        raise ValueError(
            f"inputs must be (N, {', '.join(map(str, model.input_shape))}) float32 or uint8 "
            f"images, got {x.shape}"
        )
    return x, f"{len(x)} given samples"


def _time_interleaved(fns: dict, data: list[np.ndarray], seconds: float, min_runs: int) -> dict:
    """Time each callable on the same inputs, alternating between them every call."""
    for f in fns.values():  # warm-up: first-call costs are reported elsewhere
        f(data[0])
    t_start = time.perf_counter()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    i = 0
    while i < min_runs or time.perf_counter() - t_start < seconds:
        x = data[i % len(data)]
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(x)
            samples[k].append(time.perf_counter() - t0)
        i += 1
        if i >= 100_000:
            break
    return samples


def benchmark(
    path: str | os.PathLike,
    *,
    batches: tuple[int, ...] = (1, 32),
    seconds: float = 2.0,
    min_runs: int = 5,
    inputs: np.ndarray | None = None,
    threshold=None,
    repeat: int = 3,
    seed: int = 0,
) -> dict:
    """Every number of `escepe bench` for one file, as a dict (see the module docstring)."""
    import escepe_rt
    from escepe_rt import executor

    path = str(path)
    rss_start = _peak_rss_mb()
    t0 = time.perf_counter()
    first = escepe_rt.load(path)
    load_first = time.perf_counter() - t0
    loads = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        escepe_rt.load(path)
        loads.append(time.perf_counter() - t0)
    spec = first.spec

    sections = []
    for s in range(len(spec.sections)):
        ts = []
        kept = 0
        for _ in range(repeat):
            ex = escepe_rt.load(path)._executor  # nothing decoded yet
            t0 = time.perf_counter()
            params = ex.section_params(s)
            ts.append(time.perf_counter() - t0)
            kept = sum(_weight_bytes(p) for p in params.values())
        d = float(np.median(ts))
        # throughput in float32 weights decoded (float16 panels keep half those bytes)
        f32 = 4 * _weight_count(spec, s)
        sections.append(
            {
                "section": s,
                "decode_ms": 1e3 * d,
                "f32_weight_bytes": f32,
                "bytes_kept": kept,
                "gb_per_s": f32 / d / 1e9 if d > 0 else None,
            }
        )

    m_ee = escepe_rt.load(path, threshold=threshold, decode="eager")
    m_dense = escepe_rt.load(path, threshold=DENSE_THRESHOLD, decode="eager")
    warmup_s = None
    if hasattr(m_ee, "warmup"):
        warmup_s = m_ee.warmup()
        m_dense.warmup()

    pool = max(64, 2 * max(batches))
    x, inputs_note = _inputs(m_ee, inputs, pool, seed)
    latency = []
    for b in batches:
        if b > len(x):
            raise ValueError(f"batch {b} needs at least {b} input samples, got {len(x)}")
        data = [x[i : i + b] for i in range(0, len(x) - b + 1, b)]
        samples = _time_interleaved(
            {"early_exit": m_ee.predict, "dense": m_dense.predict}, data, seconds, min_runs
        )
        for mode, ts in samples.items():
            latency.append({"mode": mode, **_stats(ts, b)})

    pred = m_ee.predict(x)
    counts = np.bincount(pred.exit_index, minlength=len(spec.exits))
    macs = [e.get("macs") for e in m_ee.exits]
    mean_macs = None
    if all(isinstance(v, (int, float)) for v in macs):
        mean_macs = float(sum(c * v for c, v in zip(counts, macs)) / max(1, counts.sum()))
    return {
        "file": path,
        "file_bytes": os.path.getsize(path),
        "inputs": inputs_note,
        "threads": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
            if k in os.environ
        },
        "load_first_ms": 1e3 * load_first,
        "load_median_ms": 1e3 * float(np.median(loads)),
        "sections": sections,
        "warmup_s": warmup_s,
        "thresholds": list(m_ee.thresholds),
        # None: batches up to executor.PROGRAM_MAX_BATCH run as section programs
        "programs_unavailable": m_ee._executor.program_unavailable,
        "program_max_batch": executor.PROGRAM_MAX_BATCH,
        "arena_batch": m_ee._executor._arena_batch,
        "conv_kernels": conv_kernels(m_ee),
        "latency": latency,
        "exit_histogram": {
            "samples": int(len(x)),
            "counts": counts.tolist(),
            "fractions": (counts / max(1, counts.sum())).tolist(),
            "macs_per_exit": macs,
            "mean_macs": mean_macs,
        },
        "peak_rss_mb": _peak_rss_mb(),
        "rss_at_start_mb": rss_start,
    }


def conv_kernels(model) -> dict[str, int]:
    """How many of a loaded (eager) model's convs run on each kernel: Winograd, the direct
    micro-kernels (on float32 or float16 panels), depthwise, or im2col + sgemm (grouped convs,
    Cout < 8, width dilation)."""
    from escepe_rt import kernels
    from escepe_rt._fbs.OpCode import OpCode

    ex = model._executor
    counts = dict.fromkeys(("winograd", "direct", "direct_f16", "depthwise", "im2col_sgemm"), 0)
    for s, (begin, end) in enumerate(model.spec.sections):
        params = ex.section_params(s)
        for i in range(begin, end):
            node = model.spec.nodes[i]
            if node.op == OpCode.CONV2D:
                dilation_w = node.options["conv"]["dilation"][1]
                counts[kernels.conv_kernel(params[i]["weight"], dilation_w)] += 1
    return counts


def _weight_count(spec, s: int) -> int:
    """Weights of section s's nodes (their stored tensors' element counts)."""
    begin, end = spec.sections[s]
    nodes = [spec.nodes[i] for i in range(begin, end)]
    return sum(int(np.prod(spec.tensors[n.weight].shape)) for n in nodes if n.weight >= 0)


def _weight_bytes(p: dict) -> int:
    w = p.get("weight")
    if w is None:
        return 0
    if isinstance(w, np.ndarray):
        return w.nbytes
    return sum(a.nbytes for a in w if isinstance(a, np.ndarray))  # kernels.ConvWeight


def format_report(r: dict) -> str:
    """The short human-readable table `escepe bench` prints."""
    lines = [
        f"{r['file']}: {r['file_bytes']:,} bytes; inputs: {r['inputs']}",
        f"load (mmap + verify + parse): first {r['load_first_ms']:.1f} ms, "
        f"then {r['load_median_ms']:.1f} ms"
        + (f"; kernel warm-up {1e3 * r['warmup_s']:.0f} ms" if r.get("warmup_s") else ""),
        "",
        "| section | lazy decode ms | weights, MB as float32 | MB kept | GB/s of float32 |",
        "|---|---|---|---|---|",
    ]
    for s in r["sections"]:
        gbs = "-" if s["gb_per_s"] is None else f"{s['gb_per_s']:.2f}"
        lines.append(
            f"| {s['section']} | {s['decode_ms']:.2f} | {s['f32_weight_bytes'] / 1e6:.2f} | "
            f"{s['bytes_kept'] / 1e6:.2f} | {gbs} |"
        )
    lines += [
        "",
        "| mode | batch | runs | mean ms | p50 ms | p99 ms | ms/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["latency"]:
        lines.append(
            f"| {row['mode']} | {row['batch']} | {row['runs']} | {row['mean_ms']:.3f} | "
            f"{row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {row['mean_ms_per_sample']:.3f} |"
        )
    why = r.get("programs_unavailable")
    lines.append(
        f"\nbatches up to {r['program_max_batch']} run as section programs (one nogil call each"
        + (
            f"; in sub-batches of {r['arena_batch']}, the arena's budget"
            if r.get("arena_batch", r["program_max_batch"]) < r["program_max_batch"]
            else ""
        )
        + ")"
        if why is None
        else f"\nsection programs off ({why}): every batch runs the step lists"
    )
    kinds = r.get("conv_kernels")
    if kinds:
        label = {"direct_f16": "direct on float16 weights", "im2col_sgemm": "im2col + sgemm"}
        named = (f"{n} {label.get(kind, kind)}" for kind, n in kinds.items())
        lines.append("convs: " + ", ".join(named))
    h = r["exit_histogram"]
    frac = ", ".join(f"{f:.0%}" for f in h["fractions"])
    thr = ", ".join(f"{t:.4g}" for t in r["thresholds"])
    lines += ["", f"exit histogram ({h['samples']} samples): {frac} (thresholds {thr})"]
    if h.get("mean_macs") is not None and h["macs_per_exit"]:
        full = h["macs_per_exit"][-1]
        lines.append(
            f"mean MACs per sample {h['mean_macs'] / 1e6:.1f} M "
            f"({100 * h['mean_macs'] / full:.0f}% of the last exit's {full / 1e6:.1f} M)"
        )
    if r.get("peak_rss_mb") is not None:
        lines.append(f"peak RSS of this process: {r['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
