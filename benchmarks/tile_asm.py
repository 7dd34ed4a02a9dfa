#!/usr/bin/env python3
"""The micro-kernels' 8-pixel vs 4-pixel tiles: register spills per target, and their speed here.

The direct conv kernels run 8-pixel tiles where a conv has 8 pixels left, unless
ESCEPE_WIDE_TILES=0 (escepe_rt/vector_ir.py). An 8-pixel tile needs more vector registers than
AVX2 and NEON have; this script shows what that costs, with what can be checked off the board:

  static   microkernel.conv_direct's LLVM IR (captured from numba in a child process with a
           fresh cache, before numba's own optimisation for this host), optimised and compiled
           for each --targets CPU with llvmlite. For every loop of the assembly with >= 8
           vector FMAs: FMAs per iteration, stack accesses per iteration (spilled
           accumulators) and, where llvm-mca is installed, its estimate of cycles per
           iteration on that CPU's scheduling model (-iterations 200; no cache misses).
  timed    single-threaded convs on this machine through spinpool.run_alone, in child
           processes with ESCEPE_WIDE_TILES=1 and =0 alternating (--rounds), optionally with
           NUMBA_CPU_NAME (e.g. haswell: AVX2 code on an AVX-512 host); median per conv.

Writes tile_asm.json to --out and markdown to stdout; logs go to stderr.

    python3 benchmarks/tile_asm.py --out results/tile_asm
    python3 benchmarks/tile_asm.py --timed-cpu haswell --out results/tile_asm_avx2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one small conv: numba lowers all of conv_direct's tiles (float32, float16, half-width) anyway
_COMPILE_CHILD = """
import numpy as np
from escepe_rt import kernels as K, microkernel
x = np.zeros((1, 6, 6, 16), np.float32)
cw = K.prepare_conv_weight(np.ones((16, 16, 3, 3), np.float32), 1)
out = np.zeros((1, 4, 4, 16), np.float32)
epi = np.zeros(32, np.float32)
geom = (3, 3, 1, 1, 1, 0, 0, 0)
microkernel.conv_direct(x, cw.panels, out, out, False, epi, 0, geom, 0, 1, 0, 16)
"""

_TIMED_CHILD = """
import json, sys, time
import numpy as np
from escepe_rt import kernels as K, spinpool, vector_ir
rng = np.random.default_rng(0)
out = {"wide_tiles": vector_ir.WIDE_TILES, "us": {}}
for h, cin, cout in json.loads(sys.argv[1]):
    x = rng.standard_normal((1, h, h, cin), dtype=np.float32)
    cw = K.prepare_conv_weight(rng.standard_normal((cout, cin, 3, 3), dtype=np.float32), 1)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = np.empty((1, h, h, cout), np.float32)
    epi = np.concatenate([np.ones(cout, np.float32), np.zeros(cout, np.float32)])
    args = (xp, cw.panel_array(), y, y, False, epi, 0, (3, 3, 1, 1, 1, 0, 0, cw.kind))
    entry = spinpool.with_entry(np.zeros(spinpool.CTRL_WORDS, np.int64))[spinpool.ENTRY]
    for _ in range(20):
        spinpool.run_alone(entry, *args)
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        for _ in range(10):
            spinpool.run_alone(entry, *args)
        ts.append((time.perf_counter() - t) / 10)
    out["us"][f"{h}x{h}x{cin}->{cout}"] = 1e6 * float(np.median(ts))
print(json.dumps(out))
"""

SHAPES = [(28, 16, 16), (32, 64, 64), (16, 128, 128), (8, 256, 256), (4, 512, 512)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def conv_direct_ir() -> str:
    """conv_direct's LLVM IR as numba lowered it (NUMBA_DUMP_LLVM, fresh cache), target-neutral:
    the host's CPU attributes, triple and data layout removed."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, NUMBA_DUMP_LLVM="1", PYTHONPATH=REPO)
        r = subprocess.run(
            [sys.executable, "-c", _COMPILE_CHILD], env=env, capture_output=True, text=True
        )
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    start = r.stdout.index("LLVM DUMP <function descriptor 'conv_direct")
    body = r.stdout[r.stdout.index("\n", start) + 1 :]
    body = body[: body.find("\n=====")]
    for pattern in (r'"target-cpu"="[^"]*"', r'"target-features"="[^"]*"'):
        body = re.sub(pattern, "", body)
    return re.sub(r"^target (triple|datalayout) = .*$", "", body, flags=re.M)


def assembly(ir_text: str, triple: str, cpu: str) -> str:
    import llvmlite.binding as llvm

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=3)
    mod = llvm.parse_assembly(ir_text)
    mod.triple, mod.data_layout = triple, str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(3))
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_assembly(mod)


def loops(asm: str, arm: bool, mca: str | None, triple: str, cpu: str) -> list[dict]:
    """Every basic block that branches back to itself with >= 8 vector FMAs."""
    fma = r"\bfmla\b" if arm else r"\bvfmadd"
    stack = r"\[sp\b" if arm else r"\(%rsp\)"
    blocks, name, cur = [], None, []
    for line in asm.split("\n"):
        m = re.match(r"^(\.?L\w+):", line)
        if m:
            blocks.append((name, cur))
            name, cur = m.group(1), []
        else:
            cur.append(line)
    blocks.append((name, cur))
    rows = []
    for name, lines in blocks:
        text = "\n".join(lines)
        n_fma = len(re.findall(fma, text))
        if (
            name is None
            or n_fma < 8
            or not re.search(r"\s" + re.escape(name) + r"\s*$", text, re.M)
        ):
            continue
        row = {
            "block": name,
            "fma_per_iter": n_fma,
            "stack_accesses_per_iter": len(re.findall(stack, text)),
            "float16_widenings": len(re.findall(r"fcvtl|vcvtph2ps", text)),
        }
        if mca:
            code = "\n".join(
                s for s in lines if s.strip() and not s.strip().startswith((".", "//", "#"))
            )
            r = subprocess.run(
                [mca, f"-mtriple={triple}", f"-mcpu={cpu}", "-iterations=200"],
                input=code, capture_output=True, text=True,
            )  # fmt: skip
            m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
            if m:
                row["mca_cycles_per_iter"] = int(m.group(1)) / 200
                row["mca_fma_per_cycle"] = n_fma / row["mca_cycles_per_iter"]
        rows.append(row)
    return rows


def timed(cpu: str | None, rounds: int) -> dict:
    res: dict = {"wide": [], "narrow": []}
    caches = {w: tempfile.mkdtemp(prefix=f"escepe-tiles-{w}-") for w in ("1", "0")}
    try:
        for r in range(rounds):
            for w in ("1", "0"):
                env = dict(os.environ, ESCEPE_WIDE_TILES=w, NUMBA_CACHE_DIR=caches[w])
                env["PYTHONPATH"] = REPO
                if cpu:
                    env["NUMBA_CPU_NAME"] = cpu
                out = subprocess.run(
                    [sys.executable, "-c", _TIMED_CHILD, json.dumps(SHAPES)],
                    env=env, capture_output=True, text=True, check=True,
                )  # fmt: skip
                got = json.loads(out.stdout.strip().split("\n")[-1])
                res["wide" if got["wide_tiles"] else "narrow"].append(got["us"])
                log(f"round {r + 1}/{rounds} ESCEPE_WIDE_TILES={w}: {got['us']}")
    finally:
        for c in caches.values():
            shutil.rmtree(c, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--targets",
        default="aarch64:cortex-a72,aarch64:cortex-a76,x86_64:haswell,x86_64:znver4",
        help="comma-separated ARCH:CPU to compile for (static part)",
    )
    ap.add_argument("--mca", default=None, help="llvm-mca binary (default: found on PATH)")
    ap.add_argument("--timed-cpu", default=None, help="NUMBA_CPU_NAME for the timed children")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds (0: none)")
    ap.add_argument("--out", default="results/tile_asm")
    args = ap.parse_args()
    mca = args.mca or shutil.which("llvm-mca") or shutil.which("llvm-mca-14")
    log("capturing conv_direct's IR (a child compiles it with a fresh cache) ...")
    ir_text = conv_direct_ir()
    report: dict = {"llvm_mca": mca, "static": {}, "timed_cpu": args.timed_cpu or "host"}
    print("### Loops of microkernel.conv_direct with >= 8 vector FMAs, per target\n")
    print(
        "| target | loop | FMAs / iter | stack accesses / iter | f16 widenings "
        "| llvm-mca cycles / iter | FMAs / cycle |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in args.targets.split(","):
        arch, cpu = spec.split(":")
        triple = f"{arch}-unknown-linux-gnu"
        rows = loops(assembly(ir_text, triple, cpu), arch == "aarch64", mca, triple, cpu)
        report["static"][spec] = rows
        for r in rows:
            print(
                f"| {cpu} | {r['block']} | {r['fma_per_iter']} | {r['stack_accesses_per_iter']} "
                f"| {r['float16_widenings']} | {r.get('mca_cycles_per_iter', '-')} "
                f"| {r.get('mca_fma_per_cycle', 0):.2f} |"
            )
    if args.rounds:
        res = timed(args.timed_cpu, args.rounds)
        report["timed"] = res
        print(f"\n### One thread, this machine ({report['timed_cpu']} code), median us per conv\n")
        print("| conv | 8-pixel tiles (each round) | 4-pixel tiles (each round) |")
        print("|---|---|---|")
        for shape in res["wide"][0]:
            wide = " / ".join(f"{r[shape]:.0f}" for r in res["wide"])
            narrow = " / ".join(f"{r[shape]:.0f}" for r in res["narrow"])
            print(f"| {shape} | {wide} | {narrow} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tile_asm.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"wrote {os.path.join(args.out, 'tile_asm.json')}")


if __name__ == "__main__":
    main()
