#!/usr/bin/env python3
"""Memory on small boards: peak RSS of escepe_rt (lazy / eager decode) vs onnxruntime.

Every scenario runs in a fresh Python child process, which: imports the runtime, loads the
model, then runs RUNS predictions of BATCH samples. It reports

  rss_after_import_mb   VmRSS once the runtime (escepe_rt or onnxruntime, + numpy) is imported
  rss_after_load_mb     VmRSS after escepe_rt.load / InferenceSession
  peak_rss_mb           VmHWM at the end: the process's own peak RSS
  ru_maxrss_mb          getrusage; on Linux it keeps the parent's RSS at fork across exec
                        (see benchmarks/cold_start.py), so it is not the child's own peak
  decoded_sections      escepe only: the sections lazy decoding actually decoded

Models (same weights for both runtimes; ONNX written by compiler/escepe_to_onnx.py from the
.escepe file, so onnxruntime runs the decompressed network, every exit as an output):

  resnet18   `escepe compile --model resnet18 --width 64 --clusters 32,16,8,4` (CIFAR-style,
             3x32x32, random weights: thresholds are the compiler's defaults), N(0, 1) inputs
  fashion    examples/fashion_resnet18.escepe (the shipped model), real Fashion-MNIST test
             images when the dataset is installed (else N(0, 1) inputs)

Scenarios: escepe lazy with the file's thresholds, escepe lazy with threshold 0 (only section 0
is ever decoded), escepe eager, onnxruntime (all exits), onnxruntime exit 0 only (`--exit 0`).
numba's cache is filled once beforehand (`escepe_rt.load(..., warmup=True)` in a child), as
`escepe warmup` does on a device, so JIT compilation is not in the figures.

`--runtime-python PY` adds the escepe scenarios run by another interpreter (suffix
`_runtime_only`), meant to be one with only the runtime's dependencies, as on a device. Why:
numba imports scipy, when it is installed, the first time it compiles or loads a cached
function (to find BLAS for np.dot; escepe_rt does not use it), and the compiler's and the
tests' dependencies install scipy. Each row records whether scipy was imported.

    python3 benchmarks/memory.py --out results/memory
    python3 -m venv /tmp/rt && /tmp/rt/bin/pip install .    # numpy, numba, flatbuffers only
    python3 benchmarks/memory.py --out results/memory --runtime-python /tmp/rt/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cold_start  # noqa: E402  (stdlib + common only at import time)
import common  # noqa: E402

CHILD_PRELUDE = """
import json, resource, sys, time
def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")
rss_start = _status("VmRSS")
import numpy as np
"""

CHILD_CODE = {
    "escepe": """
import escepe_rt
rss_import = _status("VmRSS")
m = escepe_rt.load(MODEL, threshold=THRESHOLD, decode=DECODE)
rss_load = _status("VmRSS")
x = np.load(INPUT)
exits = []
t0 = time.perf_counter()
for i in range(RUNS):
    j = (i * BATCH) % (len(x) - BATCH + 1)
    exits.append(m.predict(x[j : j + BATCH]).exit_index)
elapsed = time.perf_counter() - t0
extra = {
    "decoded_sections": m.decoded_sections,
    "num_sections": len(m.spec.sections),
    "exit_histogram": np.bincount(np.concatenate(exits), minlength=len(m.spec.exits)).tolist(),
}
""",
    "onnxruntime": """
import onnxruntime as ort
rss_import = _status("VmRSS")
opts = ort.SessionOptions()
opts.intra_op_num_threads = THREADS
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(MODEL, opts, providers=["CPUExecutionProvider"])
rss_load = _status("VmRSS")
x = np.load(INPUT)
t0 = time.perf_counter()
for i in range(RUNS):
    j = (i * BATCH) % (len(x) - BATCH + 1)
    sess.run(None, {"input": x[j : j + BATCH]})
elapsed = time.perf_counter() - t0
extra = {"outputs": [o.name for o in sess.get_outputs()]}
""",
}

CHILD_EPILOGUE = """
print(json.dumps({
    "rss_at_start_mb": rss_start,
    "rss_after_import_mb": rss_import,
    "rss_after_load_mb": rss_load,
    "rss_end_mb": _status("VmRSS"),
    "peak_rss_mb": _status("VmHWM"),
    "scipy_imported": "scipy" in sys.modules,
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "runs": RUNS,
    "batch": BATCH,
    "ms_per_predict": 1e3 * elapsed / RUNS,
    **extra,
}))
"""

# name -> (runtime, options)
SCENARIOS = {
    "escepe_lazy": ("escepe", {"THRESHOLD": None, "DECODE": "lazy"}),
    "escepe_lazy_threshold0": ("escepe", {"THRESHOLD": 0.0, "DECODE": "lazy"}),
    "escepe_eager": ("escepe", {"THRESHOLD": None, "DECODE": "eager"}),
    "onnxruntime": ("onnxruntime", {"ONNX": "all"}),
    "onnxruntime_exit0": ("onnxruntime", {"ONNX": "exit0"}),
}


def child_source(kind: str, **consts) -> str:
    head = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    return CHILD_PRELUDE + head + CHILD_CODE[kind] + CHILD_EPILOGUE


def prepare_models(work: str, width: int, n_inputs: int, seed: int) -> dict:
    """{name: {"escepe": path, "onnx": {"all": path, "exit0": path}, "inputs": npy, ...}}."""
    import numpy as np

    import escepe_rt
    from compiler.escepe_to_onnx import escepe_to_onnx

    models = {}
    resnet = os.path.join(work, f"resnet18_w{width}.escepe")
    cmd = [
        sys.executable, "-m", "compiler.cli", "compile", "--model", "resnet18",
        "--width", str(width), "--clusters", "32,16,8,4", "--seed", str(seed), "-o", resnet,
    ]  # fmt: skip
    if not os.path.exists(resnet):
        common.log.info("compiling: %s", " ".join(cmd[1:]))
        subprocess.run(cmd, cwd=common.REPO, check=True, stdout=subprocess.DEVNULL)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_inputs, 3, 32, 32)).astype(np.float32)
    models["resnet18"] = {"escepe": resnet, "inputs_kind": "N(0, 1)", "x": x, "command": cmd}

    fashion = os.path.join(common.REPO, "examples", "fashion_resnet18.escepe")
    m = escepe_rt.load(fashion)
    try:
        from compiler.data import load_fashion_mnist

        images = load_fashion_mnist(split="test").images[:n_inputs, 0]  # (N, 28, 28) uint8
        x, kind = m.preprocess(images), "Fashion-MNIST test images"
    except Exception as e:  # dataset not installed: the memory figures hardly depend on it
        common.log.warning("Fashion-MNIST not available (%s); using N(0, 1) inputs", e)
        x = rng.standard_normal((n_inputs, *m.input_shape)).astype(np.float32)
        kind = "N(0, 1)"
    models["fashion"] = {"escepe": fashion, "inputs_kind": kind, "x": x}

    for name, d in models.items():
        d["inputs"] = os.path.join(work, f"{name}_inputs.npy")
        np.save(d["inputs"], d.pop("x"))
        d["onnx"] = {
            "all": os.path.join(work, f"{name}.onnx"),
            "exit0": os.path.join(work, f"{name}.exit0.onnx"),
        }
        escepe_to_onnx(d["escepe"], d["onnx"]["all"])
        escepe_to_onnx(d["escepe"], d["onnx"]["exit0"], exit=0)
        d["sizes_bytes"] = {
            "escepe": common.file_size(d["escepe"]),
            "onnx_all_exits": common.file_size(d["onnx"]["all"]),
            "onnx_exit0": common.file_size(d["onnx"]["exit0"]),
        }
        d["num_sections"] = len(escepe_rt.load(d["escepe"]).spec.sections)
    return models


def plot(path: str, results: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(results)  # "model / batch"
    names = list(SCENARIOS)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ys = [results[g][name]["peak_rss_mb"] for g in groups]
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("peak RSS (MB, VmHWM)")
    ax.set_title("Peak memory of a fresh process: import + load + predictions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="results/memory", help="results folder")
    p.add_argument("--models", default="resnet18,fashion", help="comma list: resnet18, fashion")
    p.add_argument("--batches", default="1,32", help="comma list of batch sizes")
    p.add_argument("--runs", type=int, default=100, help="predictions per process")
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--inputs", type=int, default=256, help="distinct input samples cycled over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--runtime-python",
        default=None,
        help="also run the escepe scenarios with this interpreter (one with only the runtime's "
        "dependencies, e.g. a venv with `pip install .`), as <scenario>_runtime_only",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite memory.md / memory.png from an existing OUT/memory.json, measuring nothing",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_thread_env(args.threads)
    common.setup_logging()
    log = common.log
    if args.report_only:
        with open(os.path.join(args.out, "memory.json")) as f:
            write_report(args.out, json.load(f))
        return 0
    work = os.path.join(args.out, "artifacts")
    os.makedirs(work, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    wanted = args.models.split(",")
    if args.inputs < max(batches):
        raise SystemExit(f"--inputs ({args.inputs}) must be at least the largest batch")

    models = prepare_models(work, args.width, args.inputs, args.seed)
    models = {k: models[k] for k in wanted}
    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = common.REPO + os.pathsep + base_env.get("PYTHONPATH", "")
    numba_cache = tempfile.mkdtemp(prefix="numba-memory-")
    base_env["NUMBA_CACHE_DIR"] = numba_cache
    results: dict = {}
    try:
        pythons = [None] + ([args.runtime_python] if args.runtime_python else [])
        for d in models.values():  # fill numba's cache (as `escepe warmup` does)
            warm = f"import escepe_rt, json; escepe_rt.load({d['escepe']!r}, warmup=True)\n"
            for py in pythons:
                cold_start.run_child(warm + "print(json.dumps({}))", base_env, py)
        scenarios = [(name, kind, opts, None) for name, (kind, opts) in SCENARIOS.items()]
        if args.runtime_python:
            scenarios += [
                (f"{name}_runtime_only", kind, opts, args.runtime_python)
                for name, (kind, opts) in SCENARIOS.items()
                if kind == "escepe"
            ]
        for name, d in models.items():
            for batch in batches:
                group = f"{name} / batch {batch}"
                results[group] = {}
                for scenario, kind, opts, py in scenarios:
                    consts = {"INPUT": d["inputs"], "RUNS": args.runs, "BATCH": batch}
                    if kind == "escepe":
                        consts.update(MODEL=d["escepe"], **opts)
                    else:
                        consts.update(MODEL=d["onnx"][opts["ONNX"]], THREADS=args.threads)
                    r = cold_start.run_child(child_source(kind, **consts), base_env, py)
                    results[group][scenario] = r
                    log.info(
                        "%s %s: peak %.1f MB, after import %.1f MB, after load %.1f MB%s",
                        group,
                        scenario,
                        r["peak_rss_mb"],
                        r["rss_after_import_mb"],
                        r["rss_after_load_mb"],
                        f", decoded {r['decoded_sections']}" if "decoded_sections" in r else "",
                    )
    finally:
        shutil.rmtree(numba_cache, ignore_errors=True)

    lazy_ok = {
        g: r["escepe_lazy_threshold0"]["decoded_sections"] == [0]
        and r["escepe_lazy_threshold0"]["peak_rss_mb"] < r["escepe_eager"]["peak_rss_mb"]
        for g, r in results.items()
    }
    result = {
        "config": vars(args),
        "command": "python3 benchmarks/memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": common.machine_info(),
        "models": models,
        "results": results,
        "threshold0_decodes_only_section0_and_peaks_below_eager": lazy_ok,
        "runtime_python": _packages(args.runtime_python) if args.runtime_python else None,
        "notes": {
            "peak_rss_mb": "VmHWM of the child: import + load + all predictions",
            "numba": "numba's cache was filled first, so no JIT compilation is measured",
            "onnxruntime": "same weights (ONNX from the .escepe file by escepe export-onnx)",
        },
    }
    common.write_json(os.path.join(args.out, "memory.json"), result)

    write_report(args.out, result)
    return 0


def _packages(python: str) -> dict:
    """The interpreter and what its environment has installed (name -> version)."""
    proc = subprocess.run(
        [python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True
    )
    listed = json.loads(proc.stdout) if proc.returncode == 0 else []
    return {"python": python, "packages": {p["name"]: p["version"] for p in listed}}


def write_report(out: str, result: dict) -> None:
    """memory.md (table) and memory.png (bars) from a memory.json result; prints the table."""
    models, results, cfg = result["models"], result["results"], result["config"]
    cols = ["rss_after_import_mb", "rss_after_load_mb", "peak_rss_mb"]
    rows = []
    for group, by_scenario in results.items():
        for scenario, r in by_scenario.items():
            decoded = r.get("decoded_sections")
            n_sec = models[group.split(" / ")[0]]["num_sections"]
            rows.append(
                [group, scenario]
                + [r[c] for c in cols]
                + ["-" if decoded is None else f"{len(decoded)}/{n_sec}"]
                + [{True: "yes", False: "no"}.get(r.get("scipy_imported"), "?")]
            )
    head = ["model / batch", "scenario", *cols, "decoded", "scipy imported"]
    table = common.markdown_table(head, rows)
    rt = result.get("runtime_python")
    if rt:
        names = ", ".join(f"{k} {v}" for k, v in sorted(rt["packages"].items()))
        table += f"\n\n`_runtime_only` rows: {rt['python']} with {names}."
    text = (
        f"### Peak memory, fresh process per row ({cfg['runs']} predictions, "
        f"{cfg['threads']} threads)\n\n{table}\n\n"
        f"Made by `{result['command']}` at commit {result['machine']['git']['commit'] or '?'}. "
        "Speed is not measured here (ms_per_predict in memory.json is only a sanity "
        "figure; see latency.py). Sizes (bytes): "
        + "; ".join(f"{n}: {d['sizes_bytes']}" for n, d in models.items())
        + "\n"
    )
    with open(os.path.join(out, "memory.md"), "w") as f:
        f.write(text)
    if plot(os.path.join(out, "memory.png"), results):
        common.log.info("plot: %s", os.path.join(out, "memory.png"))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
