#!/usr/bin/env python3
"""Batch-1 threading in escepe_rt: what each way of using a second core buys, per model.

escepe_rt picks one of three ways to run a batch-1 predict (escepe_rt/executor.py,
escepe_rt/parallel.py); this script times all three on the same file, dense (every sample to
the last exit), so the choice can be checked on a new machine:

  single   numpy's OpenBLAS held at one thread, no im2col conv cut into chunks
  blas     each im2col conv whole, OpenBLAS threads its sgemm (the default for models with a
           conv of >= 2^24 MACs, e.g. ResNet-18 width 64)
  own      im2col convs of >= 2^--own-min-macs-log2 MACs cut into row / channel chunks that the
           runtime's own Python threads claim (the default at batch >= 2)

The modes only change convs on the im2col + sgemm path. Direct convs (ungrouped, Cout >= 8,
escepe_rt/microkernel.py) of >= 2^18 MACs always share their chunks with the spinning workers
(escepe_rt/spinpool.py) and smaller ones run on the caller, whatever the mode: for models made
only of those the three columns agree.

Modes are timed in rotating rounds of blocks with a pause before each (as latency.py does).
Two micro-measurements explain the result:

  hand-off  parallel.POOL.run of two half-sgemms of a 28x28x16 -> 16 conv (784 x 144 x 16)
            against the same two calls in a row: the price of handing work to a Python thread
  anatomy   one single-threaded conv per shape on the direct micro-kernels
            (escepe_rt/microkernel.py), and on im2col + sgemm split into its parts: the small
            convs of the Fashion model and ResNet-20, and a ResNet-18 one

Runtime only (no torch). Writes batch1_threads.json to --out and markdown to stdout.

    python3 benchmarks/batch1_threads.py examples/fashion_resnet18.escepe \\
        results/latency_resnet20/artifacts/resnet20.escepe results/latency/artifacts/resnet18.escepe
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib-only at import time)

THREADS = common.threads_from_argv()
common.set_thread_env(THREADS)

import numpy as np  # noqa: E402

import escepe_rt  # noqa: E402
from escepe_rt import executor, kernels, parallel  # noqa: E402

MODES = ("single", "blas", "own")
# (H, C, Cout) of 3x3 stride-1 convs at batch 1: Fashion / ResNet-20 stages, then ResNet-18's
ANATOMY_SHAPES = [
    (28, 16, 16),
    (32, 16, 16),
    (14, 32, 32),
    (7, 64, 64),
    (4, 128, 128),
    (4, 512, 512),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", help=".escepe files to time")
    p.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument("--samples", type=int, default=100, help="batch-1 predicts per block")
    p.add_argument("--rounds", type=int, default=5, help="rounds of blocks (rotating order)")
    p.add_argument("--cooldown", type=float, default=0.3, help="pause before each block, s")
    p.add_argument(
        "--own-min-macs-log2",
        type=int,
        default=20,
        help="'own' mode chunks convs of at least 2^N MACs (default 20; the runtime uses 24)",
    )
    p.add_argument("--out", default="results/batch1_threads", help="output folder")
    return p.parse_args(argv)


class _Mode:
    """Sets the runtime's batch-1 threading knobs for one mode; restores them on exit."""

    def __init__(self, ex, mode: str, own_min_macs: int):
        self.ex, self.mode, self.own_min_macs = ex, mode, own_min_macs

    def __enter__(self):
        self.saved = (
            self.ex._blas_threads_at_batch1,
            executor.OWN_THREADS_MIN_BATCH,
            kernels.PARALLEL_MIN_MACS,
        )
        self.ex._blas_threads_at_batch1 = self.mode == "blas"
        if self.mode == "own":
            executor.OWN_THREADS_MIN_BATCH = 1
            kernels.PARALLEL_MIN_MACS = self.own_min_macs
        else:  # batch 1 stays below OWN_THREADS_MIN_BATCH: no chunks
            executor.OWN_THREADS_MIN_BATCH = 2

    def __exit__(self, *exc):
        (
            self.ex._blas_threads_at_batch1,
            executor.OWN_THREADS_MIN_BATCH,
            kernels.PARALLEL_MIN_MACS,
        ) = self.saved


def time_modes(path: str, args) -> dict:
    model = escepe_rt.load(path, threshold=1.5, decode="eager")
    ex = model._executor
    shape = ex.spec.values[0].shape
    xs = np.random.default_rng(0).standard_normal((args.samples, 1, *shape), dtype=np.float32)
    per_round = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:
            with _Mode(ex, mode, 1 << args.own_min_macs_log2):
                time.sleep(args.cooldown)
                for x in xs[:5]:
                    model.predict(x)
                t0 = time.perf_counter()
                for x in xs:
                    model.predict(x)
                per_round[mode].append(1e3 * (time.perf_counter() - t0) / len(xs))
    return {
        "file": path,
        "default_mode": "blas" if ex._blas_threads_at_batch1 else "single",
        "ms_per_predict": {m: float(np.median(v)) for m, v in per_round.items()},
        "round_ms": per_round,
    }


def _best_us(fn, reps: int = 500) -> float:
    """Median microseconds of fn() over blocks of `reps` // 10 calls."""
    for _ in range(20):
        fn()
    blocks = []
    n = max(1, reps // 10)
    for _ in range(10):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        blocks.append(1e6 * (time.perf_counter() - t0) / n)
    return float(np.median(blocks))


def hand_off() -> dict:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((784, 144), dtype=np.float32)
    b = rng.standard_normal((144, 16), dtype=np.float32)
    o = np.empty((784, 16), np.float32)

    def half(i):
        np.dot(a[i * 392 : (i + 1) * 392], b, out=o[i * 392 : (i + 1) * 392])

    pool = parallel.POOL
    with pool.blas_single_threaded():
        serial = _best_us(lambda: (half(0), half(1)))
        threaded = _best_us(lambda: pool.run(half, 2))
        noop = _best_us(lambda: pool.run(lambda i: None, 2))
    return {
        "gemm": "two halves of 784 x 144 @ 144 x 16 (a 28x28x16 -> 16 conv's sgemm)",
        "pool_threads": pool.threads,
        "serial_us": serial,
        "pool_run_us": threaded,
        "pool_run_noop_us": noop,
    }


def _conv_anatomy(h: int, c: int, cout: int, rng) -> dict:
    """One 3x3 conv on the direct micro-kernels, and on im2col + sgemm split into its parts."""
    x = rng.standard_normal((1, h, h, c), dtype=np.float32)
    w = rng.standard_normal((cout, c, 3, 3), dtype=np.float32)
    sc = rng.random(cout, dtype=np.float32)
    sf = rng.random(cout, dtype=np.float32)
    relu = kernels.ACT_RELU
    direct = kernels.make_conv(kernels.prepare_conv_weight(w, 1), sc, sf, 1, 1, 1, relu)
    saved, kernels.DIRECT_CONV = kernels.DIRECT_CONV, False
    try:
        cw = kernels.prepare_conv_weight(w, 1)  # gemm layout: the im2col path
    finally:
        kernels.DIRECT_CONV = saved
    plain = kernels.make_conv(cw, sc, sf, 1, 1, 1, relu)
    cols = np.empty((h * h, 9 * c), np.float32)
    o = np.empty((h * h, cout), np.float32)
    geom = (3, 3, 1, 1, 1, 1, 1, 1, h, h)
    with parallel.POOL.blas_single_threaded():
        t_direct = _best_us(lambda: direct(x))
        t_plain = _best_us(lambda: plain(x))
        im2col = _best_us(lambda: kernels._im2col_rows(x, cols, 0, *geom))
        sgemm = _best_us(lambda: np.dot(cols, cw.gemm[0], out=o))
        epi = _best_us(lambda: kernels._epilogue(o, sc, sf, True, True, None, relu))
    flop = 2e-3 * h * h * 9 * c * cout  # x 1e-3: GFLOP/s from microseconds
    return {
        "shape": f"{h}x{h}x{c} -> {cout}",
        "direct_us": t_direct,
        "direct_gflop_s": flop / t_direct,
        "im2col_path_us": t_plain,
        "im2col_us": im2col,
        "sgemm_us": sgemm,
        "epilogue_us": epi,
        "sgemm_gflop_s": flop / sgemm,
        "im2col_path_gflop_s": flop / t_plain,
    }


def anatomy() -> list[dict]:
    rng = np.random.default_rng(2)
    return [_conv_anatomy(h, c, cout, rng) for h, c, cout in ANATOMY_SHAPES]


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    models = []
    for path in args.files:
        print(f"timing {path} ...", file=sys.stderr)
        models.append(time_modes(path, args))
    result = {
        "config": vars(args),
        "machine": common.machine_info(),
        "models": models,
        "hand_off": hand_off(),
        "anatomy": anatomy(),
        "total_seconds": time.perf_counter() - t0,
    }
    common.write_json(os.path.join(args.out, "batch1_threads.json"), result)
    print(
        f"### batch-1 dense predict, ms (median of {args.rounds} rounds), {args.threads} threads\n"
    )
    print(
        common.markdown_table(
            ["file", "single", "blas", "own", "default"],
            [
                [os.path.basename(m["file"])]
                + [m["ms_per_predict"][k] for k in MODES]
                + [m["default_mode"]]
                for m in models
            ],
        )
    )
    h = result["hand_off"]
    print(
        f"\nhand-off: {h['gemm']}: serial {h['serial_us']:.1f} us, parallel.POOL.run "
        f"{h['pool_run_us']:.1f} us ({h['pool_threads']} threads; empty run "
        f"{h['pool_run_noop_us']:.1f} us)\n"
    )
    print(
        common.markdown_table(
            [
                "conv, batch 1, 1 thread",
                "direct us",
                "GFLOP/s",
                "im2col path us",
                "im2col",
                "sgemm",
                "epilogue",
                "GFLOP/s",
            ],
            [
                [
                    r["shape"],
                    r["direct_us"],
                    r["direct_gflop_s"],
                    r["im2col_path_us"],
                    r["im2col_us"],
                    r["sgemm_us"],
                    r["epilogue_us"],
                    r["im2col_path_gflop_s"],
                ]
                for r in result["anatomy"]
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
