#!/usr/bin/env python3
"""What verification adds to escepe_rt.load(): load() total vs each verifier pass.

For each file, in one process after a warm-up load (numba's max_index kernel compiled or
read from its cache), R repetitions of:
  load             escepe_rt.load(path) (mmap, both verifier passes, parse, Model with lazy decode)
  map_file         mmap only
  check_structure  the structural walk (every table, vtable, vector, string)
  parse            flatbuffer -> ModelSpec
  check_model      versions, CRC-32, tensors (every packed index < codebook size), graph
  crc32            zlib.crc32 over the file (part of check_model, shown for scale)
  model_init       escepe_rt.Model(spec, buf): executor set-up, no decoding (lazy)
Medians and minima in milliseconds; verify share = (check_structure + check_model) / load.
The first load in the process (cold numba dispatch) is reported separately.

    escepe compile --model resnet18 --width 64 --clusters 32,16,8,4 -o /tmp/r18.escepe
    python3 benchmarks/verify_time.py examples/fashion_resnet18.escepe /tmp/r18.escepe \\
        --out results/verify_time.json

Timings are noisy on a shared machine: compare shares within one run, not across machines.
Nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _time(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(path: str, repeat: int) -> dict:
    import escepe_rt
    from escepe_rt import format as fmt
    from escepe_rt import verify

    t0 = time.perf_counter()
    escepe_rt.load(path)
    first = (time.perf_counter() - t0) * 1e3
    buf = fmt.map_file(path)
    spec = fmt.parse(buf)
    steps = {
        "load": _time(lambda: escepe_rt.load(path), repeat),
        "map_file": _time(lambda: fmt.map_file(path), repeat),
        "check_structure": _time(lambda: verify.check_structure(buf), repeat),
        "parse": _time(lambda: fmt.parse(buf), repeat),
        "check_model": _time(lambda: verify.check_model(buf, spec), repeat),
        "crc32": _time(lambda: zlib.crc32(buf), repeat),
        "model_init": _time(lambda: escepe_rt.Model(spec, buf), repeat),
    }
    med = {k: statistics.median(v) for k, v in steps.items()}
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "tensors": len(spec.tensors),
        "nodes": len(spec.nodes),
        "repeat": repeat,
        "first_load_ms": round(first, 3),
        "median_ms": {k: round(v, 3) for k, v in med.items()},
        "min_ms": {k: round(min(v), 3) for k, v in steps.items()},
        "verify_ms": round(med["check_structure"] + med["check_model"], 3),
        "verify_share_of_load": round(
            (med["check_structure"] + med["check_model"]) / med["load"], 3
        ),
        "verify_share_of_load_min": round(
            (min(steps["check_structure"]) + min(steps["check_model"])) / min(steps["load"]), 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", default=["examples/fashion_resnet18.escepe"])
    p.add_argument("--repeat", type=int, default=20, help="repetitions per step (default 20)")
    p.add_argument("--out", default="results/verify_time.json")
    args = p.parse_args(argv)
    results = []
    for f in args.files:
        r = measure(f, args.repeat)
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    report = {
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        "| file | bytes | load ms | check_structure ms | parse ms | check_model ms (of it CRC) "
        "| verify share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m, lo = r["median_ms"], r["min_ms"]

        def cell(k, m=m, lo=lo):
            return f"{m[k]:.2f} ({lo[k]:.2f})"

        print(
            f"| {os.path.basename(r['file'])} | {r['bytes']:,} | {cell('load')} "
            f"| {cell('check_structure')} | {cell('parse')} "
            f"| {cell('check_model')} [{m['crc32']:.2f}] "
            f"| {100 * r['verify_share_of_load']:.0f}% "
            f"({100 * r['verify_share_of_load_min']:.0f}%) |"
        )
    print(
        "\nmedian (min) over the repetitions; [CRC-32 median]; verify share = medians of "
        "(check_structure + check_model) / load"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
