#!/usr/bin/env python3
"""Cold start and peak memory of escepe_rt vs onnxruntime vs torch, each in a fresh process.

For every scenario a new Python child process runs: import the runtime -> load the model ->
first predict (batch 1) -> N more predictions; it reports the time of each step (measured inside
the child from its first line, so interpreter start-up is excluded but reported separately as
the parent's wall time of the whole child) and its peak RSS: VmHWM from /proc/self/status.
getrusage ru_maxrss is recorded too, but on Linux it inherits the parent's RSS across
fork + exec, so for a child of this (torch-importing) process it is not the child's own peak.

Scenarios:
  escepe_numba_cold   NUMBA_CACHE_DIR = a fresh empty folder: every kernel is JIT-compiled
  escepe_numba_warm   NUMBA_CACHE_DIR = a folder filled by a previous run: kernels load from cache
  onnxruntime         fp32 ONNX (all exits), InferenceSession
  torch               import torch + compiler.models, build, load_state_dict, eval, forward

Every child uses the same thread settings as benchmarks/latency.py (default 2).
Accuracy is not measured (random weights).

    python3 benchmarks/cold_start.py --model resnet20 --out results/cold_start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (stdlib-only at import time)

CHILD_PRELUDE = """
import time
_t0 = time.perf_counter()
import json, resource, sys
import numpy as np
"""

CHILD_CODE = {
    "escepe": """
import escepe_rt
t_import = time.perf_counter()
m = escepe_rt.load(MODEL)
t_load = time.perf_counter()
x = np.load(INPUT)
m.predict(x[:1])
t_first = time.perf_counter()
for i in range(RUNS):
    m.predict(x[i % len(x) : i % len(x) + 1])
t_end = time.perf_counter()
""",
    "onnxruntime": """
import onnxruntime as ort
t_import = time.perf_counter()
opts = ort.SessionOptions()
opts.intra_op_num_threads = THREADS
opts.inter_op_num_threads = 1
sess = ort.InferenceSession(MODEL, opts, providers=["CPUExecutionProvider"])
t_load = time.perf_counter()
x = np.load(INPUT)
sess.run(None, {"input": x[:1]})
t_first = time.perf_counter()
for i in range(RUNS):
    sess.run(None, {"input": x[i % len(x) : i % len(x) + 1]})
t_end = time.perf_counter()
""",
    "torch": """
import torch
from compiler.models import build_model
torch.set_num_threads(THREADS)
t_import = time.perf_counter()
model = build_model(MODEL_NAME, width=WIDTH)
model.load_state_dict(torch.load(MODEL, weights_only=True))
model.eval()
t_load = time.perf_counter()
x = torch.from_numpy(np.load(INPUT))
with torch.inference_mode():
    model(x[:1])
    t_first = time.perf_counter()
    for i in range(RUNS):
        model(x[i % len(x) : i % len(x) + 1])
t_end = time.perf_counter()
""",
}

CHILD_EPILOGUE = """
def _vm_hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")
print(json.dumps({
    "import_ms": 1e3 * (t_import - _t0),
    "load_ms": 1e3 * (t_load - t_import),
    "first_predict_ms": 1e3 * (t_first - t_load),
    "import_load_first_ms": 1e3 * (t_first - _t0),
    "runs": RUNS,
    "steady_ms_per_predict": 1e3 * (t_end - t_first) / max(RUNS, 1),
    "peak_rss_mb": _vm_hwm_mb(),
    "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def child_source(kind: str, **consts) -> str:
    head = "".join(f"{k} = {v!r}\n" for k, v in consts.items())
    return CHILD_PRELUDE + head + CHILD_CODE[kind] + CHILD_EPILOGUE


def run_child(source: str, env: dict, python: str | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python or sys.executable, "-c", source],
        env=env,
        cwd=common.REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_ms"] = 1e3 * wall  # includes interpreter start-up and exit
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="resnet20", help="resnet18 / resnet20 / ...")
    p.add_argument("--width", type=int, default=None, help="default: the model's own")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=100, help="predictions after the first")
    p.add_argument("--repeat", type=int, default=3, help="children per scenario (median kept)")
    p.add_argument("--out", default="results/cold_start")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.width is None:
        args.width = {"resnet18": 64, "mobilenet": 32}.get(args.model, 16)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_thread_env(args.threads)
    common.setup_logging()
    log = common.log
    work = os.path.join(args.out, "artifacts")
    os.makedirs(work, exist_ok=True)

    import numpy as np

    setup = common.prepare_model_files(
        args.model, args.width, work, pool_size=64, seed=args.seed, int8=False
    )
    inputs = os.path.join(work, "inputs.npy")
    np.save(inputs, setup["pool"])
    files = setup["files"]

    base_env = dict(os.environ)
    base_env["PYTHONPATH"] = common.REPO + os.pathsep + base_env.get("PYTHONPATH", "")
    consts = {"INPUT": inputs, "RUNS": args.runs, "THREADS": args.threads}
    scenarios = {}
    warm_cache = tempfile.mkdtemp(prefix="numba-warm-")
    try:
        # fill the warm cache once (not timed)
        env = dict(base_env, NUMBA_CACHE_DIR=warm_cache)
        run_child(child_source("escepe", MODEL=files["escepe"], **consts), env)
        for name in ("escepe_numba_cold", "escepe_numba_warm", "onnxruntime", "torch"):
            results = []
            for r in range(args.repeat):
                env = dict(base_env)
                cold = None
                if name == "escepe_numba_cold":
                    cold = tempfile.mkdtemp(prefix="numba-cold-")
                    env["NUMBA_CACHE_DIR"] = cold
                elif name == "escepe_numba_warm":
                    env["NUMBA_CACHE_DIR"] = warm_cache
                kind = name.split("_numba")[0]
                model = {
                    "escepe": files["escepe"],
                    "onnxruntime": files["onnx_fp32"],
                    "torch": files["torch_state_dict"],
                }[kind]
                extra = {"MODEL_NAME": args.model, "WIDTH": args.width} if kind == "torch" else {}
                try:
                    results.append(
                        run_child(child_source(kind, MODEL=model, **consts, **extra), env)
                    )
                finally:
                    if cold:
                        shutil.rmtree(cold, ignore_errors=True)
                log.info("%s #%d: %s", name, r, results[-1])
            keys = results[0].keys()
            scenarios[name] = {
                "median": {k: statistics.median(x[k] for x in results) for k in keys},
                "all": results,
            }
    finally:
        shutil.rmtree(warm_cache, ignore_errors=True)

    result = {
        "accuracy_note": "Accuracy is not measured (random weights).",
        "config": vars(args),
        "machine": common.machine_info(),
        "sizes_bytes": {k: common.file_size(v) for k, v in files.items()},
        "scenarios": scenarios,
        "notes": {
            "import_ms": "from the child's first line: importing the runtime (+numpy)",
            "load_ms": "escepe_rt.load / InferenceSession / build_model+load_state_dict",
            "first_predict_ms": "first batch-1 prediction (numba compile or cache load, "
            "lazy decode of the sections reached, allocations)",
            "process_wall_ms": "parent's wall time of the whole child, incl. interpreter start "
            "and the steady runs",
            "peak_rss_mb": "child's VmHWM (peak RSS of its own address space) after all runs",
            "ru_maxrss_mb": "child's getrusage ru_maxrss; on Linux this keeps the parent's RSS "
            "at fork across exec, so it is at least the (large, torch-importing) parent's RSS "
            "and is NOT the child's own peak; kept only to show that",
        },
    }
    common.write_json(os.path.join(args.out, "cold_start.json"), result)
    cols = [
        "import_ms",
        "load_ms",
        "first_predict_ms",
        "import_load_first_ms",
        "steady_ms_per_predict",
        "peak_rss_mb",
        "process_wall_ms",
    ]
    rows = [[name] + [s["median"][c] for c in cols] for name, s in scenarios.items()]
    print(
        f"### cold start, {args.model} w{args.width}, {args.threads} threads (median of "
        f"{args.repeat})\n"
    )
    print(common.markdown_table(["scenario"] + cols, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
