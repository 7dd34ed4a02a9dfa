"""Single-thread decode throughput of the index encodings on a file's real tensors.

    python3 benchmarks/decode.py [FILE ...] [--reps N] [--out results/decode/decode.json]

For every index-coded tensor of each file, its cluster indices are re-encoded as
PACKED_INDICES, RANS_INDICES and RANS_INTERLEAVED (the writer's own lane choice), and each
is decoded to float32 by the runtime's kernel, one thread, best of --reps. Throughput is
float32 bytes produced per second. Per section: the sum over its tensors. Writes JSON and
prints markdown. Imports no torch; timings are never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from escepe_rt import decode as packed_kernels
from escepe_rt import format as fmt
from escepe_rt import rans, rans_interleaved
from escepe_rt._fbs.Encoding import Encoding
from escepe_rt.encodings import index_bits, pack_indices

ROOT = Path(__file__).resolve().parent.parent
CODERS = ("packed", "rans", "rans_interleaved")


def _indices(blob: bytes, spec, t) -> np.ndarray:
    data = fmt.buffer_bytes(blob, spec, t.buffer)
    if t.encoding == Encoding.RANS_INDICES:
        return rans.decode(data)
    if t.encoding == Encoding.RANS_INTERLEAVED:
        return rans_interleaved.decode(data)
    k = len(spec.codebooks[t.codebook][1])
    ident = np.arange(k, dtype=np.float32)
    return packed_kernels.decode_packed(data, t.bits, t.count, ident).astype(np.uint8)


def _best(fn, reps: int) -> float:
    fn()  # compile / warm
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _coders(idx: np.ndarray, cb: np.ndarray):
    """(name, payload bytes, decode-to-float32 callable) per encoding."""
    k, n = cb.shape[0], idx.size
    bits = index_bits(k)
    packed = pack_indices(idx, bits)
    old = np.frombuffer(rans.encode(idx, k), np.uint8)
    new = np.frombuffer(rans_interleaved.encode(idx, k), np.uint8)
    return {
        "packed": (packed.size, lambda: packed_kernels.decode_packed(packed, bits, n, cb)),
        "rans": (old.size, lambda: rans.decode(old, cb)),
        "rans_interleaved": (new.size, lambda: rans_interleaved.decode(new, cb)),
    }, int(rans_interleaved.parse_header(new).lanes)


def bench_file(path: Path, reps: int) -> dict:
    blob = path.read_bytes()
    spec = fmt.parse(blob)
    section_of = {}
    for n in spec.nodes:
        if n.weight >= 0:
            section_of[n.weight] = n.section
    tensors = []
    for i, t in enumerate(spec.tensors):
        if t.encoding not in (
            Encoding.PACKED_INDICES,
            Encoding.RANS_INDICES,
            Encoding.RANS_INTERLEAVED,
        ):
            continue
        idx = _indices(blob, spec, t)
        cb = np.asarray(spec.codebooks[t.codebook][1], dtype=np.float32)
        coders, lanes = _coders(idx, cb)
        row = {"tensor": i, "section": section_of.get(i, -1), "count": t.count, "k": len(cb)}
        row["lanes"] = lanes
        for name, (nbytes, fn) in coders.items():
            sec = _best(fn, reps)
            row[name] = {"bytes": nbytes, "seconds": sec, "gbps": 4 * t.count / sec / 1e9}
        tensors.append(row)
    sections = []
    for s in sorted({r["section"] for r in tensors}):
        rows = [r for r in tensors if r["section"] == s]
        count = sum(r["count"] for r in rows)
        entry = {"section": s, "count": count}
        for name in CODERS:
            sec = sum(r[name]["seconds"] for r in rows)
            entry[name] = {
                "bytes": sum(r[name]["bytes"] for r in rows),
                "ms": 1e3 * sec,
                "gbps": 4 * count / sec / 1e9,
                "bits_per_weight": 8 * sum(r[name]["bytes"] for r in rows) / count,
            }
        sections.append(entry)
    return {"file": str(path), "tensors": tensors, "sections": sections}


def markdown(result: dict) -> str:
    lines = [f"### {result['file']}", ""]
    lines.append(
        "| section | weights | packed ms / GB/s | rans ms / GB/s / bits | "
        "rans_interleaved ms / GB/s / bits | speedup |"
    )
    lines.append("|---|---|---|---|---|---|")
    for s in result["sections"]:
        p, o, x = s["packed"], s["rans"], s["rans_interleaved"]
        lines.append(
            f"| {s['section']} | {s['count']:,} | {p['ms']:.3f} / {p['gbps']:.2f} | "
            f"{o['ms']:.3f} / {o['gbps']:.2f} / {o['bits_per_weight']:.3f} | "
            f"{x['ms']:.3f} / {x['gbps']:.2f} / {x['bits_per_weight']:.3f} | "
            f"{o['ms'] / x['ms']:.2f}x |"
        )
    big = max(result["tensors"], key=lambda r: r["count"])
    lines.append("")
    lines.append(
        f"largest tensor ({big['count']:,} weights, k={big['k']}, {big['lanes']} lanes): "
        + ", ".join(f"{n} {big[n]['gbps']:.2f} GB/s" for n in CODERS)
    )
    return "\n".join(lines)


def fresh_memory(mb: float = 33.6, reps: int = 5) -> dict:
    """GB/s of writing freshly allocated float32 memory (first touch: page faults + zeroing)
    against rewriting memory already touched: the ceiling for any decode that produces new
    arrays, as a lazy section decode does (ResNet-18's last section is 33.6 MB of float32)."""
    n = int(mb * 1e6) // 4
    keep, fresh = [], []
    for _ in range(reps):  # arrays are kept alive, so each allocation is new memory
        t0 = time.perf_counter()
        a = np.empty(n, dtype=np.float32)
        a.fill(1.0)
        fresh.append(time.perf_counter() - t0)
        keep.append(a)
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        keep[0].fill(2.0)
        warm.append(time.perf_counter() - t0)
    return {
        "mb": mb,
        "fresh_gbps": [4 * n / t / 1e9 for t in fresh],
        "rewrite_gbps": 4 * n / min(warm) / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "files", nargs="*", default=[str(ROOT / "examples" / "fashion_resnet18.escepe")]
    )
    parser.add_argument("--reps", type=int, default=7, help="timed runs per decode (best kept)")
    parser.add_argument("--out", default=str(ROOT / "results" / "decode" / "decode.json"))
    args = parser.parse_args(argv)
    results = [bench_file(Path(f), args.reps) for f in args.files]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mem = fresh_memory()
    doc = {
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "files": results,
        "fresh_memory": mem,
    }
    out.write_text(json.dumps(doc, indent=1))
    print("\n\n".join(markdown(r) for r in results))
    print(
        f"\nwriting {mem['mb']} MB of freshly allocated memory: "
        + ", ".join(f"{g:.2f}" for g in mem["fresh_gbps"])
        + f" GB/s; rewriting it: {mem['rewrite_gbps']:.1f} GB/s"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
