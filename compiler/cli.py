"""The `escepe` command line. Logs go to stderr; results to stdout (or --json files).

Commands that only read .escepe files (inspect, verify, run) import no torch,
so they work on a device where only the runtime is installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

DEFAULT_CONFIG = "configs/fashion_resnet18.json"


def _cmd_pipeline(args) -> int:
    from compiler.pipeline import PipelineConfig, run_pipeline
    from compiler.train import init_distributed, rank

    if init_distributed() and rank() != 0:
        raise SystemExit(
            "escepe pipeline runs on one process; use `torchrun ... -m "
            "compiler.cli train` for multi-process training"
        )

    cfg = PipelineConfig.from_file(args.config) if args.config else PipelineConfig()
    results = run_pipeline(cfg, args.run_dir, args.output)
    _print_results(results)
    return 0


def _stage(args, which: str) -> int:
    from compiler import pipeline as p
    from compiler.train import init_distributed

    if which == "train":
        init_distributed()  # under torchrun: DistributedDataParallel, gloo on CPU

    cfg = p.PipelineConfig.from_file(args.config) if args.config else p.PipelineConfig()
    run = p.Run(cfg, args.run_dir)
    if which == "train":
        p.stage_train(run)
    elif which == "compress":
        p.stage_compress(
            run, run.load("trained.pt") if _exists(run.path("trained.pt")) else p.stage_train(run)
        )
    elif which == "export":
        model = run.load("compressed.pt")
        out = p.stage_export(run, model, args.output)
        print(out["report"].summary())
    return 0


def _exists(path: str) -> bool:
    import os

    return os.path.exists(path)


def _cmd_compile(args) -> int:
    """Compile a model from the zoo (random or checkpoint weights), clustered per section."""
    import torch

    from compiler import cluster, export, models

    c, h, w = (int(v) for v in args.input.split("x"))
    torch.manual_seed(args.seed)
    model = models.build_model(
        args.model, num_classes=args.classes, in_channels=c, width=args.width
    ).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    example = torch.zeros(1, c, h, w)
    clusters = _clusters(args.clusters)
    if clusters is not None:
        cluster.cluster_sections(model, example, clusters, seed=args.seed)
    report = export.export(model, example, args.output, clusters=clusters)
    print(report.summary())
    return 0


def _clusters(text: str | None):
    if not text or text == "none":
        return None
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def _cmd_inspect(args) -> int:
    import escepe_rt

    info = escepe_rt.load(args.file).info
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    ratio = info.get("compression_ratio")
    print(f"{args.file}: schema {info['schema_version']}, written by {info['writer']}")
    print(
        f"  input {info['input_shape']}, {info['num_classes']} classes"
        + (f" ({', '.join(info['labels'][:4])}...)" if info["labels"] else "")
    )
    print(
        f"  {info['parameters']:,} parameters, {info['file_bytes']:,} bytes"
        + (f", {ratio:.1f}x smaller than float32" if ratio else "")
    )
    for s, e in zip(info["sections"], info["exits"]):
        k = ",".join(map(str, s["clusters"])) or "raw"
        print(
            f"  section {s['index']}: {s['weights']:>10,} weights  k={k:<4} "
            f"{s['bits_per_weight']:5.2f} bits/w  {s['stored_bytes']:>10,} B   "
            f"exit '{e['name']}': {e['macs'] / 1e6:8.2f} MMACs, threshold {e['threshold']:.4f}"
        )
    return 0


def _cmd_warmup(args) -> int:
    """Compile every kernel a model uses into numba's cache, so later processes start fast."""
    import time

    import escepe_rt

    t0 = time.perf_counter()
    escepe_rt.load(args.file, warmup=True)  # the one implementation: Model.warmup
    print(
        f"{args.file}: kernels compiled and cached in {time.perf_counter() - t0:.2f} s "
        "(set NUMBA_CACHE_DIR to a writable folder if the package folder is read-only)"
    )
    return 0


def _cmd_export_onnx(args) -> int:
    """Write the network of a .escepe file (weights decompressed) as fp32 ONNX for onnxruntime /
    TensorRT. Default: every exit, one output each (exit0_logits, exit1_logits, ...)."""
    import escepe_rt
    from compiler.escepe_to_onnx import escepe_to_onnx

    try:
        names = escepe_to_onnx(args.file, args.output, exit=args.exit)
    except (escepe_rt.FormatError, OSError, ValueError) as e:
        print(f"{args.file}: cannot export: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: input 'input' (batch, C, H, W) float32, outputs {', '.join(names)}")
    return 0


def _cmd_verify(args) -> int:
    import escepe_rt

    try:
        escepe_rt.load(args.file)
    except (escepe_rt.FormatError, OSError) as e:
        print(f"{args.file}: INVALID: {e}")
        return 1
    print(f"{args.file}: OK")
    return 0


def _cmd_bench(args) -> int:
    """Time a .escepe file with the runtime alone: load, lazy decode per section, batch latency
    (mean/p50/p99) with early exit and dense, exit histogram, peak RSS. Imports no torch."""
    import numpy as np

    from escepe_rt.bench import benchmark, format_report

    inputs = np.load(args.inputs) if args.inputs else None
    if inputs is not None and args.limit:
        inputs = inputs[: args.limit]
    result = benchmark(
        args.file,
        batches=tuple(args.batches),
        seconds=args.seconds,
        inputs=inputs,
        threshold=args.threshold,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


def _load_images(dataset: str, root: str | None, split: str, limit: int | None):
    from compiler import data

    ds = data.load_dataset(dataset, root=root, split=split)
    if limit:
        import numpy as np

        ds = ds.subset(np.arange(min(limit, len(ds))))
    return ds


def _cmd_eval(args) -> int:
    from compiler.pipeline import evaluate_file

    ds = _load_images(args.dataset, args.data_root, args.split, args.limit)
    results = evaluate_file(args.file, ds)
    _print_results(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return 0


def _cmd_calibrate(args) -> int:
    import escepe_rt
    from compiler import calibrate, data, export
    from compiler.pipeline import runtime_logits

    full = _load_images(args.dataset, args.data_root, "train", None)
    _, val = data.train_val_split(full, args.val_fraction, args.seed)
    m = escepe_rt.load(args.file)
    macs = [e["macs"] for e in m.info["exits"]]
    outcome = calibrate.calibrate(
        runtime_logits(m, val),
        val.labels,
        macs,
        m.policy,
        max_acc_drop=args.max_acc_drop,
        max_macs=args.max_macs,
    )
    with open(args.file, "rb") as f:
        blob = export.patch_thresholds(f.read(), outcome.thresholds)
    export.atomic_write(args.output or args.file, blob)
    print(
        json.dumps(
            {
                "thresholds": outcome.thresholds,
                "val_accuracy": outcome.accuracy,
                "avg_macs": outcome.avg_macs,
                "exit_fraction": outcome.exit_fraction,
            },
            indent=2,
        )
    )
    return 0


def _print_results(r: dict) -> None:
    print(
        f"{r['file']}: {r['file_bytes']:,} bytes"
        + (
            f" = {r['compression_ratio']:.1f}x smaller than fp32 "
            f"(zipped {r['zipped_compression_ratio']:.1f}x)"
            if r.get("compression_ratio")
            else ""
        )
    )
    print(f"  {r['samples']} test images")
    for i, acc in enumerate(r["per_exit_accuracy"]):
        print(
            f"  exit {i}: accuracy {acc:6.2f}%   threshold {r['thresholds'][i]:.4f}   "
            f"answered {100 * r['exit_fraction'][i]:5.1f}%"
        )
    print(f"  ensemble accuracy {r['ensemble_accuracy']:.2f}%")
    print(
        f"  early-exit accuracy {r['early_exit_accuracy']:.2f}% at "
        f"{100 * r['avg_macs'] / r['full_macs']:.1f}% of the full model's MACs"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="escepe",
        description="Compile early-exit PyTorch networks into compressed .escepe files and run "
        "them with the escepe_rt runtime.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def staged(name, help_text, fn, output=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config",
            default=None,
            help=f"pipeline config JSON (e.g. {DEFAULT_CONFIG}); default: built-in",
        )
        p.add_argument(
            "--run-dir",
            default="runs/default",
            help="folder for checkpoints and results; reruns resume from it",
        )
        if output:
            p.add_argument("-o", "--output", default="model.escepe", help="output .escepe file")
        p.set_defaults(fn=fn)
        return p

    staged(
        "pipeline",
        "train -> compress -> export -> calibrate -> evaluate, resumable",
        _cmd_pipeline,
        output=True,
    )
    staged(
        "train", "self-distillation training of the early-exit model", lambda a: _stage(a, "train")
    )
    staged(
        "compress",
        "section-wise k-means clustering with KD retraining",
        lambda a: _stage(a, "compress"),
    )
    staged(
        "export",
        "write the compressed model as .escepe with calibrated thresholds",
        lambda a: _stage(a, "export"),
        output=True,
    )

    p = sub.add_parser(
        "compile",
        help="compile a zoo model (random or checkpoint weights)",
        description=_cmd_compile.__doc__,
    )
    p.add_argument("--model", default="resnet18", help="resnet18|resnet20|resnet56|mobilenet|wrn")
    p.add_argument("--input", default="3x32x32", help="per-sample input CxHxW")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=16, help="base channel count")
    p.add_argument(
        "--clusters",
        default="32,16,8,4",
        help="clusters per section (comma list), one int for all, or 'none' = raw fp32",
    )
    p.add_argument("--checkpoint", help="state_dict .pt to load before compiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default="model.escepe")
    p.set_defaults(fn=_cmd_compile)

    p = sub.add_parser("inspect", help="sections, bits, clusters, MACs and sizes of a file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full info as JSON")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser(
        "warmup",
        help="compile the runtime's kernels into numba's cache",
        description=_cmd_warmup.__doc__,
    )
    p.add_argument("file")
    p.set_defaults(fn=_cmd_warmup)

    p = sub.add_parser(
        "export-onnx",
        help="write a .escepe file's network as fp32 ONNX (all exits by default)",
        description=_cmd_export_onnx.__doc__,
    )
    p.add_argument("file", help="the .escepe file (verified as escepe_rt.load does)")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write (atomically)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--exit",
        type=int,
        default=None,
        metavar="N",
        help="only exit N's logits (output exitN_logits) and the nodes it needs; "
        "negative counts from the last exit",
    )
    which.add_argument(
        "--all-exits",
        action="store_true",
        help="one output per exit, exit0_logits ... (the default)",
    )
    p.set_defaults(fn=_cmd_export_onnx)

    p = sub.add_parser(
        "bench",
        help="time a .escepe file: load, decode, latency, exit histogram, peak RSS",
        description=_cmd_bench.__doc__,
    )
    p.add_argument("file")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size")
    p.add_argument(
        "--inputs",
        default=None,
        help=".npy of float32 NCHW samples or uint8 NHWC images (default: random N(0,1), "
        "which makes the exit histogram meaningless)",
    )
    p.add_argument("--limit", type=int, default=None, help="use the first N input samples")
    p.add_argument("--threshold", type=float, default=None, help="one threshold for all exits")
    p.add_argument("--json", action="store_true", help="print every number as JSON")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("verify", help="check a file; prints OK or what is wrong, exit 1 if bad")
    p.add_argument("file")
    p.set_defaults(fn=_cmd_verify)

    def dataset_args(p):
        p.add_argument(
            "--dataset", default="fashion-mnist", help="fashion-mnist|mnist|cifar10|cifar100|digits"
        )
        p.add_argument("--data-root", default=None, help="dataset folder (default: installed)")

    p = sub.add_parser("eval", help="accuracy per exit and with the exit policy, via the runtime")
    p.add_argument("file")
    dataset_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(fn=_cmd_eval)

    p = sub.add_parser("calibrate", help="set exit thresholds from a validation split")
    p.add_argument("file")
    dataset_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--max-acc-drop",
        type=float,
        help="points of accuracy the early exit may lose vs the last exit",
    )
    target.add_argument("--max-macs", type=float, help="average MACs as a fraction of the full")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", default=None, help="write here instead of in place")
    p.set_defaults(fn=_cmd_calibrate)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
