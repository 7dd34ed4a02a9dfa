"""Accuracy / size table of pipeline runs on the real test split, via the runtime.

    python3 benchmarks/compression_table.py runs/fashion_pruned runs/fashion_uniform \
        --out results/compression

For the first run folder it also exports the uncompressed trained model
(raw float32) as the baseline row. Every number comes from the .escepe files
through escepe_rt; nothing is copied from logs. Writes table.json and table.md.
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


def row(name: str, r: dict) -> dict:
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
        "thresholds": [round(t, 4) for t in r["thresholds"]],
        "exit_fraction": [round(f, 3) for f in r["exit_fraction"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="pipeline run folders (with model.escepe)")
    parser.add_argument("--out", default="results/compression")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    from compiler import export
    from compiler.pipeline import PipelineConfig, Run, evaluate_file

    os.makedirs(args.out, exist_ok=True)
    rows = []
    first = args.runs[0]
    with open(os.path.join(first, "config.json")) as f:
        cfg = PipelineConfig(**json.load(f))
    run = Run(cfg, first)
    teacher = run.load("trained.pt")
    raw = os.path.join(args.out, "uncompressed.escepe")
    export.export(
        teacher, run.example, raw, labels=run.classes, input_mean=run.mean, input_std=run.std
    )
    # The uncompressed model runs every sample to the last exit (no calibration).
    rows.append(row("uncompressed (fp32)", evaluate_file(raw, run.test_set)))
    for folder in args.runs:
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)["compress"]
        label = (
            f"{os.path.basename(folder)}: {c.get('mode')} k={c['clusters']} "
            f"prune={c.get('prune', 0)} kd={c.get('kd')}"
        )
        rows.append(row(label, evaluate_file(os.path.join(folder, "model.escepe"), run.test_set)))
        log.info("%s done", folder)

    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump(
            {
                "dataset": cfg.dataset,
                "model": cfg.model,
                "model_args": cfg.model_args,
                "test_samples": len(run.test_set),
                "rows": rows,
            },
            f,
            indent=2,
        )
    lines = [
        "| run | per-exit acc % | ensemble % | early-exit % | MACs used | file B | ratio | "
        "zipped ratio | bits/weight per section |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {' / '.join(map(str, r['per_exit_accuracy']))} | "
            f"{r['ensemble_accuracy']} | {r['early_exit_accuracy']} | "
            f"{100 * r['avg_macs_fraction']:.1f}% | {r['file_bytes']:,} | {r['ratio']}x | "
            f"{r['zipped_ratio']}x | {' / '.join(map(str, r['bits_per_weight']))} |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
