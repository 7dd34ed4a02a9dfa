"""Accuracy / size table of pipeline runs (or .escepe files) on the real test split.

    python3 benchmarks/compression_table.py runs/fashion_pruned runs/fashion_uniform \
        --out results/compression
    python3 benchmarks/compression_table.py --file "shipped=examples/fashion_resnet18.escepe" \
        --out results/compression

For the first run folder it also exports the uncompressed trained model
(raw float32) as the baseline row; `--file LABEL=PATH` rows need no run folder
(Fashion-MNIST test split; the ratio uses the file's fp32_param_bytes). Every
number comes from the .escepe files through escepe_rt; nothing is copied from
logs. Per section it reports the packed index width ceil(log2 k), the bits per
weight the weight buffers actually take (packed or rANS), and the empirical
entropy of the indices (what an ideal entropy coder would need), plus the
file's payload bytes (all tensor bytes) against its structure bytes.
Writes table.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

log = logging.getLogger("escepe.bench")


def index_stats(path: str) -> list[dict]:
    """Per section: codebook sizes, packed bits, stored bits and index entropy per weight.

    Entropy is given two ways: per tensor (each tensor's own order-0 entropy,
    weighted by its size: the bound for a coder with one frequency table per
    tensor, as the writer's rANS streams are) and pooled over the section's
    indices of one codebook (what one shared table would need).
    """
    import numpy as np

    import escepe_rt
    from escepe_rt import decode, rans
    from escepe_rt._fbs.Encoding import Encoding
    from escepe_rt.encodings import index_bits
    from escepe_rt.format import buffer_bytes

    m = escepe_rt.load(path)
    spec, buf = m.spec, m._buf
    out = []
    for begin, end in spec.sections:
        ids = [n.weight for n in spec.nodes[begin:end] if n.weight >= 0]
        coded = [spec.tensors[t] for t in ids if spec.tensors[t].codebook >= 0]
        weights = sum(spec.tensors[t].count for t in ids)
        if not coded:
            out.append(
                {
                    "clusters": None,
                    "packed_bits": 32,
                    "stored_bits": 32.0,
                    "entropy_bits": 32.0,
                    "pooled_entropy_bits": 32.0,
                }
            )
            continue
        by_book: dict[int, list] = {}
        stored = packed = per_tensor = 0.0
        for t in coded:
            data = buffer_bytes(buf, spec, t.buffer)
            k = len(spec.codebooks[t.codebook][1])
            stored += 8 * len(data)
            packed += index_bits(k) * t.count
            ident = np.arange(k, dtype=np.float32)
            if t.encoding == Encoding.RANS_INDICES:
                vals = rans.decode(data, ident, expected_count=t.count)
            else:
                vals = decode.decode_packed(data, t.bits, t.count, ident)
            idx = np.asarray(vals).astype(np.int64).ravel()
            per_tensor += rans.entropy_bits(idx, k) * t.count
            by_book.setdefault(t.codebook, []).append(idx)
        pooled = sum(
            rans.entropy_bits(np.concatenate(v), len(spec.codebooks[c][1])) * sum(map(len, v))
            for c, v in by_book.items()
        )
        n = sum(t.count for t in coded)
        out.append(
            {
                "clusters": ",".join(str(len(spec.codebooks[c][1])) for c in sorted(by_book)),
                "packed_bits": round(packed / n, 3),
                "stored_bits": round(stored / weights, 3),
                "entropy_bits": round(per_tensor / n, 3),
                "pooled_entropy_bits": round(pooled / n, 3),
            }
        )
    return out


def payload_bytes(path: str) -> int:
    import escepe_rt

    spec = escepe_rt.load(path).spec
    return sum(spec.buffers[t.buffer][1] for t in spec.tensors)


def row(name: str, r: dict) -> dict:
    stats = index_stats(r["file"])
    return {
        "run": name,
        "per_exit_accuracy": [round(a, 2) for a in r["per_exit_accuracy"]],
        "ensemble_accuracy": round(r["ensemble_accuracy"], 2),
        "early_exit_accuracy": round(r["early_exit_accuracy"], 2),
        "avg_macs_fraction": round(r["avg_macs"] / r["full_macs"], 3),
        "file_bytes": r["file_bytes"],
        "zipped_bytes": r["zipped_bytes"],
        "ratio": round(r["compression_ratio"], 2) if r["compression_ratio"] else None,
        "zipped_ratio": round(r["zipped_compression_ratio"], 2)
        if r["zipped_compression_ratio"]
        else None,
        "bits_per_weight": [round(s["bits_per_weight"], 3) for s in r["sections"]],
        "packed_bits": [s["packed_bits"] for s in stats],
        "index_entropy_bits": [s["entropy_bits"] for s in stats],
        "pooled_index_entropy_bits": [s["pooled_entropy_bits"] for s in stats],
        "clusters": [s["clusters"] for s in stats],
        "schema": ".".join(map(str, __import__("escepe_rt").load(r["file"]).spec.schema_version)),
        "payload_bytes": payload_bytes(r["file"]),
        "fp32_param_bytes": r["fp32_param_bytes"],
        "thresholds": [round(t, 4) for t in r["thresholds"]],
        "exit_fraction": [round(f, 3) for f in r["exit_fraction"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="pipeline run folders (with model.escepe)")
    parser.add_argument(
        "--file", action="append", default=[], metavar="LABEL=PATH", help="a .escepe file row"
    )
    parser.add_argument("--out", default="results/compression")
    args = parser.parse_args()
    if not args.runs and not args.file:
        parser.error("give run folders and/or --file LABEL=PATH")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    from compiler import data, export
    from compiler.pipeline import PipelineConfig, Run, evaluate_file

    os.makedirs(args.out, exist_ok=True)
    rows = []
    if args.runs:
        first = args.runs[0]
        with open(os.path.join(first, "config.json")) as f:
            cfg = PipelineConfig(**json.load(f))
        run = Run(cfg, first)
        test_set = run.test_set
        teacher = run.load("trained.pt")
        raw = os.path.join(args.out, "uncompressed.escepe")
        export.export(
            teacher, run.example, raw, labels=run.classes, input_mean=run.mean, input_std=run.std
        )
        # The uncompressed model runs every sample to the last exit (no calibration).
        rows.append(row("uncompressed (fp32)", evaluate_file(raw, test_set)))
    else:
        cfg = PipelineConfig()
        test_set = data.load_dataset(cfg.dataset, split="test")
    for spec in args.file:
        label, _, path = spec.rpartition("=")
        rows.append(row(label, evaluate_file(path, test_set)))
        log.info("%s done", path)
    for folder in args.runs:
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)["compress"]
        label = (
            f"{os.path.basename(folder)}: {c.get('mode')} k={c['clusters']} "
            f"prune={c.get('prune', 0)} kd={c.get('kd')}"
        )
        rows.append(row(label, evaluate_file(os.path.join(folder, "model.escepe"), test_set)))
        log.info("%s done", folder)

    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(
            {
                "dataset": cfg.dataset,
                "model": cfg.model,
                "model_args": cfg.model_args,
                "test_samples": len(test_set),
                "rows": rows,
            },
            f,
            indent=2,
        )
    lines = [
        "| run | format | per-exit acc % | ensemble % | early-exit % | MACs used | file B "
        "(payload) | fp32 B | ratio | zipped ratio | k | packed bits | stored bits/weight | "
        "index entropy per tensor | pooled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['schema']} | {' / '.join(map(str, r['per_exit_accuracy']))} | "
            f"{r['ensemble_accuracy']} | {r['early_exit_accuracy']} | "
            f"{100 * r['avg_macs_fraction']:.1f}% | {r['file_bytes']:,} "
            f"({r['payload_bytes']:,}) | {int(r['fp32_param_bytes'] or 0):,} | {r['ratio']}x | "
            f"{r['zipped_ratio']}x | {' / '.join(map(str, r['clusters']))} | "
            f"{' / '.join(map(str, r['packed_bits']))} | "
            f"{' / '.join(map(str, r['bits_per_weight']))} | "
            f"{' / '.join(map(str, r['index_entropy_bits']))} | "
            f"{' / '.join(map(str, r['pooled_index_entropy_bits']))} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
