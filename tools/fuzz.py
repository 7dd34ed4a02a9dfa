"""Fuzz the .escepe verifier: mutate valid files, load them, run them.

Every mutated file must either load and run (giving the unmutated file's outputs
when the CRC was left alone), or raise escepe_rt.FormatError. Anything else is a
bug: another exception, a crash (the worker process dies of a signal), a hang, or
a mutated file that loads with other outputs although its CRC was not re-sealed.

    python3 tools/fuzz.py --cases 20000 --seed 1 --out results/fuzz.json
    python3 tools/fuzz.py --seconds 600 --file examples/fashion_resnet18.escepe

Mutations are plain data (JSON lists), so every bug report carries the exact
mutation that reproduces it (`--replay results/fuzz.json`). Where mutations land
is found by walking each base file with verify.LAYOUT (the schema's mirror), never
from hard-coded offsets. Half the cases re-seal the CRC after mutating, so that
the structural and semantic checks behind the checksum are exercised too.

Cases run in a worker subprocess (many per process); a worker that dies of a
signal or stops answering is restarted after the culprit case.
tests/test_fuzz.py drives the same machinery with hypothesis-generated mutations.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("fuzz")

U32 = 0xFFFFFFFF
# Outcomes that are fine; anything else is a bug.
OK_OUTCOMES = ("identical", "different", "format")
BUG_OUTCOMES = ("error", "crash", "hang", "crc-bypass")


# ----------------------------------------------------------------------------- file map


@dataclass
class FileMap:
    """Where the structure of a valid file lies (found by walking it with verify.LAYOUT)."""

    size: int
    checksum: int  # position of Model.checksum_crc32
    u32: list[int] = field(default_factory=list)  # uoffsets, vector lengths, 4-byte scalars
    i32: list[int] = field(default_factory=list)  # table soffsets to their vtables
    u16: list[int] = field(default_factory=list)  # vtable entries, 2-byte scalars
    u8: list[int] = field(default_factory=list)  # 1-byte scalars (enums, bits, bools)
    offsets: list[int] = field(default_factory=list)  # uoffset fields (swappable)
    lengths: list[int] = field(default_factory=list)  # vector / string lengths
    elems: list[tuple[int, int]] = field(default_factory=list)  # (pos, width) of integer
    # vector elements: shapes, kernel/stride/padding, node inputs (not buffer data bytes)
    boundaries: list[int] = field(default_factory=list)  # starts/ends of tables and vectors
    end: int = 0  # one past the last byte of any table, vtable or vector (padding follows)

    @property
    def ints(self) -> list[tuple[int, int]]:
        """(position, width) of every integer the structure is made of."""
        return (
            [(p, 4) for p in self.u32 + self.i32]
            + [(p, 2) for p in self.u16]
            + [(p, 1) for p in self.u8]
            + self.elems
        )


def file_map(blob: bytes) -> FileMap:
    """Walk a valid file like verify's structural pass and record every field's position."""
    from escepe_rt import format as fmt
    from escepe_rt import verify

    fm = FileMap(size=len(blob), checksum=fmt.checksum_position(blob))
    bounds = {0, 4, 8, len(blob)}
    seen: set[int] = set()

    def u32(p: int) -> int:
        return struct.unpack_from("<I", blob, p)[0]

    def table(pos: int, kind: str) -> None:
        if pos in seen:
            return
        seen.add(pos)
        fm.i32.append(pos)
        vt = pos - struct.unpack_from("<i", blob, pos)[0]
        vt_size, obj_size = struct.unpack_from("<HH", blob, vt)
        fm.u16.extend(range(vt, vt + vt_size, 2))
        bounds.update((vt, vt + vt_size, pos, pos + obj_size))
        for i, (_, ftype) in enumerate(verify.LAYOUT[kind]):
            if 4 + 2 * i >= vt_size:
                break
            fo = struct.unpack_from("<H", blob, vt + 4 + 2 * i)[0]
            if not fo:
                continue
            fpos = pos + fo
            if ftype == "str" or ftype.startswith(("[", "T:")):
                fm.u32.append(fpos)
                fm.offsets.append(fpos)
                reference(fpos + u32(fpos), ftype)
            else:
                width = struct.calcsize("<" + ftype)
                {4: fm.u32, 2: fm.u16, 1: fm.u8}.get(width, fm.u32).append(fpos)

    def reference(target: int, ftype: str) -> None:
        if ftype.startswith("T:"):
            table(target, ftype[2:])
            return
        n = u32(target)
        fm.u32.append(target)
        fm.lengths.append(target)
        elem = "B" if ftype == "str" else ftype[1:-1]
        width = 4 if elem == "str" or elem.startswith("T:") else struct.calcsize("<" + elem)
        bounds.update((target, target + 4, target + 4 + n * width))
        if elem in ("I", "i", "H", "h"):
            fm.elems.extend((target + 4 + width * j, width) for j in range(min(n, 64)))
        if elem == "str" or elem.startswith("T:"):
            for j in range(n):
                at = target + 4 + 4 * j
                fm.u32.append(at)
                fm.offsets.append(at)
                reference(at + u32(at), elem)

    fm.u32.append(0)  # the root offset
    fm.offsets.append(0)
    table(u32(0), "Model")
    fm.end = max(b for b in bounds - {len(blob)} if b <= len(blob))
    fm.boundaries = sorted(b for b in bounds if 0 <= b <= len(blob))
    for name in ("u32", "i32", "u16", "u8", "offsets", "lengths", "elems"):
        setattr(fm, name, sorted(set(getattr(fm, name))))
    return fm


def edge_values(size: int, orig: int, width: int) -> list[int]:
    """Values a hostile writer would try for an integer field of `width` bytes."""
    mask = (1 << (8 * width)) - 1
    top = mask >> 1
    vals = [0, 1, 2, 3, 4, 7, 8, top, top + 1, mask, mask - 1, mask - 3]
    vals += [orig + 1, orig - 1, orig + 4, orig - 4, orig * 2, orig + 64, orig ^ 0x80]
    if width >= 2:
        vals += [size, size - 1, size + 1, size - 4, size + 4, size // 2, -size, 0x10000]
    return sorted({v & mask for v in vals})


# ----------------------------------------------------------------------------- mutations
# A case is {"base": name, "muts": [mutation, ...], "reseal": bool}; a mutation is a list:
#   ["flip", pos, bit]        flip one bit
#   ["bytes", pos, hex]       overwrite a run of bytes (clipped at the end of the file)
#   ["int", pos, width, v]    write an unsigned little-endian integer (v wraps)
#   ["swap", a, b]            two uoffset fields trade targets (vectors/tables swapped)
#   ["truncate", n]           keep the first n bytes
#   ["insert", pos, hex]      insert bytes (everything after moves)
#   ["delete", pos, n]        delete n bytes


def apply(blob: bytes, case: dict, checksum: int) -> bytes:
    """The mutated file: mutations in order, then the CRC re-sealed if asked."""
    b = bytearray(blob)
    for m in case["muts"]:
        kind = m[0]
        if kind == "flip":
            if m[1] < len(b):
                b[m[1]] ^= 1 << m[2]
        elif kind == "bytes":
            data = bytes.fromhex(m[2])[: max(0, len(b) - m[1])]
            b[m[1] : m[1] + len(data)] = data
        elif kind == "int":
            pos, width, v = m[1:]
            if pos + width <= len(b):
                b[pos : pos + width] = (v & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
        elif kind == "swap":
            a, c = m[1:]
            if max(a, c) + 4 <= len(b):
                ta = a + struct.unpack_from("<I", b, a)[0]
                tc = c + struct.unpack_from("<I", b, c)[0]
                struct.pack_into("<I", b, a, (tc - a) & U32)
                struct.pack_into("<I", b, c, (ta - c) & U32)
        elif kind == "truncate":
            del b[m[1] :]
        elif kind == "insert":
            b[m[1] : m[1]] = bytes.fromhex(m[2])
        elif kind == "delete":
            del b[m[1] : m[1] + m[2]]
        elif kind.startswith("_"):
            pass  # harness self-test hooks, acted on by the worker
        else:
            raise ValueError(f"unknown mutation {m!r}")
    if case.get("reseal") and checksum + 4 <= len(b):
        b[checksum : checksum + 4] = bytes(4)
        b[checksum : checksum + 4] = zlib.crc32(b).to_bytes(4, "little")
    return bytes(b)


def random_mutation(rng: random.Random, blob: bytes, fm: FileMap) -> list:
    """One mutation, weighted towards the structure (offsets, lengths, vtables)."""
    size = fm.size
    r = rng.random()
    if r < 0.15:
        return ["flip", rng.randrange(size), rng.randrange(8)]
    if r < 0.25:
        n = rng.choice([1, 2, 4, 8, 16, 64])
        fill = rng.choice(["00", "ff", None])
        data = bytes(rng.randrange(256) for _ in range(n)).hex() if fill is None else fill * n
        return ["bytes", rng.randrange(size), data]
    if r < 0.35:
        return ["truncate", rng.choice(fm.boundaries + [rng.randrange(size)])]
    if r < 0.80:
        pool, width = rng.choice(
            [(fm.offsets, 4), (fm.lengths, 4), (fm.u32, 4), (fm.i32, 4), (fm.u16, 2), (fm.u8, 1)]
            + [(fm.elems, 0)] * 2
        )
        pos = rng.choice(pool)
        if not width:
            pos, width = pos
        orig = int.from_bytes(blob[pos : pos + width], "little")
        return ["int", pos, width, rng.choice(edge_values(size, orig, width))]
    if r < 0.92 and len(fm.offsets) > 1:
        a, b = rng.sample(fm.offsets, 2)
        return ["swap", a, b]
    if r < 0.96:
        return ["insert", rng.randrange(size), "00" * rng.choice([1, 4, 8, 64])]
    return ["delete", rng.randrange(size), rng.choice([1, 4, 8, 64])]


def random_case(rng: random.Random, base: str, blob: bytes, fm: FileMap) -> dict:
    muts = [random_mutation(rng, blob, fm) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
    return {"base": base, "muts": muts, "reseal": rng.random() < 0.5}


def boundary_cases(base: str, fm: FileMap) -> list[dict]:
    """Truncation at every table/vector boundary, with and without a re-sealed CRC."""
    return [
        {"base": base, "muts": [["truncate", n]], "reseal": reseal}
        for n in fm.boundaries
        if n < fm.size
        for reseal in (False, True)
    ]


# ----------------------------------------------------------------------------- bases


def build_zoo(folder: str | os.PathLike) -> dict[str, str]:
    """Compile two tiny models covering conv/pool/linear/add/concat (needs torch).

    zoo_coded: clustered, section 0 rANS-coded, section 1 bit-packed, float16 scale/shift;
    zoo_raw: the same net with float32 weights.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from compiler.cluster import cluster_sections
    from compiler.export import export

    class Zoo(nn.Module):
        exit_names = ["early", "final"]

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.pool1 = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.pool2 = nn.AvgPool2d(2)
            self.head1 = nn.Linear(8 * 2 * 2, 3)
            self.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)
            self.pool3 = nn.AvgPool2d(2, ceil_mode=True)
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.head2 = nn.Linear(6, 3)

        def forward(self, x):
            h = self.pool1(F.relu(self.bn1(self.conv1(x))))  # (4, 4, 4)
            r = F.relu(self.conv2(h) + h)  # residual add
            c = torch.cat([h, r], 1)  # (8, 4, 4)
            e1 = self.head1(torch.flatten(self.pool2(c), 1))
            g = self.gap(self.pool3(F.relu6(self.conv3(c))))
            return [e1, self.head2(torch.flatten(g, 1))]

    torch.manual_seed(0)
    model = Zoo().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    example = torch.zeros(1, 3, 8, 8)
    folder = Path(folder)
    out = {}
    raw = folder / "zoo_raw.escepe"
    export(model, example, raw, thresholds=[0.6, 0.0], labels=["a", "b", "c"])
    out["zoo_raw"] = str(raw)
    cluster_sections(model, example, [8, 4])
    coded = folder / "zoo_coded.escepe"
    export(
        model,
        example,
        coded,
        clusters=[8, 4],
        thresholds=[0.6, 0.0],
        index_encoding=["rans", "packed"],
        metadata={"fuzz": "base"},
        channel_dtype="f16",
    )
    out["zoo_coded"] = str(coded)
    return out


def golden_bases() -> dict[str, str]:
    return {p.stem: str(p) for p in sorted((ROOT / "tests" / "golden").glob("*.escepe"))}


# ----------------------------------------------------------------------------- worker


def _field_kind(field: str | None) -> str:
    return re.sub(r"\[\d+\]", "[]", field or "?")


def _worker(case_file: str) -> int:
    """Run cases from a JSON file; one line per case on stdout: 'S i' then 'R {json}'."""
    import resource
    import warnings

    import numpy as np

    import escepe_rt
    from escepe_rt import format as fmt
    from escepe_rt import verify
    from escepe_rt.errors import FormatError

    # A small file must not get a huge allocation: cap the address space (MemoryError
    # is then reported as a bug like any other exception).
    limit = int(os.environ.get("ESCEPE_FUZZ_AS_BYTES", str(6 << 30)))
    if limit:
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):  # e.g. a hard limit already lower: keep that one
            pass
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")  # a mutated weight may overflow float32: not an error

    job = json.loads(Path(case_file).read_text())
    bases = {}
    for name, path in job["bases"].items():
        blob = Path(path).read_bytes()
        spec = fmt.parse(blob)
        x = np.random.default_rng(0).standard_normal((3, *spec.input_shape)).astype(np.float32)
        want = escepe_rt.Model(spec, blob, decode="eager").run_all_exits(x)
        bases[name] = (blob, fmt.checksum_position(blob), x, want)

    def run(case: dict) -> dict:
        blob, checksum, x, want = bases[case["base"]]
        for m in case["muts"]:  # harness self-test hooks (tests/test_fuzz.py), never generated
            if m[0] == "_signal":
                os.kill(os.getpid(), m[1])
            if m[0] == "_sleep":
                time.sleep(m[1])
        b = apply(blob, case, checksum)
        stage = "load"
        try:
            verify.check_structure(b)
            spec = fmt.parse(b)
            verify.check_model(b, spec)
            stage = "run"
            m = escepe_rt.Model(spec, b, decode="eager")
            got = m.run_all_exits(x)
            m.predict(x)
        except FormatError as e:
            return {
                "outcome": "format",
                "stage": stage,
                "field": e.field,
                "offset": e.offset,
                "message": str(e),
            }
        except Exception as e:  # noqa: BLE001 - any other exception is what we look for
            import traceback

            return {
                "outcome": "error",
                "stage": stage,
                "message": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=-6),
            }
        same = len(got) == len(want) and all(
            g.shape == w.shape and np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want)
        )
        if same:
            return {"outcome": "identical"}
        if not case.get("reseal") and b != blob:
            return {"outcome": "crc-bypass", "message": "loaded with other outputs, CRC intact"}
        return {"outcome": "different"}

    out = sys.stdout
    for i, case in enumerate(job["cases"]):
        out.write(f"S {i}\n")
        out.flush()
        result = run(case)
        out.write("R " + json.dumps(result) + "\n")
        out.flush()
    return 0


# ----------------------------------------------------------------------------- driver


def run_cases(
    bases: dict[str, str],
    cases: list[dict],
    *,
    case_timeout: float = 60.0,
    start_timeout: float = 600.0,
    progress=None,
) -> list[dict]:
    """Run `cases` in worker subprocesses; one result dict per case (same order).

    A worker that dies (signal, exit) or is silent for case_timeout seconds on one case
    is killed and the case recorded as "crash" / "hang"; a new worker takes the rest.
    start_timeout covers a worker's imports, numba compilation and its first case.
    """
    results: list[dict | None] = [None] * len(cases)
    start = 0
    with tempfile.TemporaryDirectory(prefix="escepe-fuzz-") as tmp:
        while start < len(cases):
            job = Path(tmp) / "job.json"
            job.write_text(json.dumps({"bases": bases, "cases": cases[start:]}))
            err_path = Path(tmp) / "stderr.txt"
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-X", "faulthandler", __file__, "--worker", str(job)],
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=ROOT,
                    bufsize=0,
                )
            start = _drain(
                proc, start, cases, results, case_timeout, start_timeout, err_path, progress
            )
    return results  # type: ignore[return-value]


def _drain(proc, start, cases, results, case_timeout, start_timeout, err_path, progress) -> int:
    """Read one worker's answers; returns the index of the first case still to run."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    current = None  # absolute index of the case in flight
    started = False  # the worker began its first case
    answered = 0  # cases this worker finished: its first also pays for first-call overheads

    def bug(at: int, outcome: str, message: str) -> int:
        if not started:
            raise RuntimeError(
                f"fuzz worker failed before its first case ({message}):\n" + _tail(err_path)
            )
        results[at] = {"outcome": outcome, "message": message, "stderr": _tail(err_path)}
        if progress:
            progress(results[at])
        return at + 1

    pending = b""  # bytes read but not yet split into lines (select sees only the pipe)
    fd = proc.stdout.fileno()
    try:
        while True:
            if b"\n" not in pending:
                timeout = case_timeout if answered else start_timeout
                if not sel.select(timeout):
                    proc.kill()
                    proc.wait()
                    return bug(
                        current if current is not None else start,
                        "hang",
                        f"no answer within {timeout:.0f} s",
                    )
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # EOF: the worker ended
                    rc = proc.wait()
                    if rc == 0 and current is None:
                        return len(cases)
                    why = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
                    return bug(current if current is not None else start, "crash", why)
                pending += chunk
                continue
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode("utf-8", "replace")
            if line.startswith("S "):
                current = start + int(line[2:])
                started = True
            elif line.startswith("R ") and current is not None:
                results[current] = json.loads(line[2:])
                answered += 1
                if progress:
                    progress(results[current])
                current = None
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def summarize(cases: list[dict], results: list[dict]) -> dict:
    """Counts by outcome, FormatError fields, and every bug with its reproducing case."""
    outcomes = Counter(r["outcome"] for r in results)
    fields = Counter(
        f"{r['stage']}:{_field_kind(r.get('field'))}" for r in results if r["outcome"] == "format"
    )
    by_kind = Counter()
    for c, r in zip(cases, results):
        by_kind[
            ("resealed " if c["reseal"] else "crc kept ")
            + "+".join(m[0] for m in c["muts"])
            + " -> "
            + r["outcome"]
        ] += 1
    bugs = [{"case": c, **r} for c, r in zip(cases, results) if r["outcome"] in BUG_OUTCOMES]
    return {
        "cases": len(results),
        "outcomes": dict(outcomes.most_common()),
        "format_error_fields": dict(fields.most_common()),
        "by_mutation": dict(sorted(by_kind.items())),
        "bugs": bugs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Fuzz escepe_rt's verifier with mutated .escepe files (see module doc).",
    )
    p.add_argument("--cases", type=int, default=2000, help="mutated files to try (default 2000)")
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop generating new batches after this many seconds",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="results/fuzz.json", help="JSON report path")
    p.add_argument(
        "--file", action="append", default=[], help="extra base file(s) to mutate (repeatable)"
    )
    p.add_argument(
        "--no-zoo", action="store_true", help="only the golden files (+ --file), no torch needed"
    )
    p.add_argument("--batch", type=int, default=2000, help="cases per worker batch")
    p.add_argument(
        "--replay",
        default=None,
        help="re-run the bugs listed in a previous report and print their outcome",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    with tempfile.TemporaryDirectory(prefix="escepe-fuzz-bases-") as tmp:
        bases = golden_bases()
        for f in args.file:
            bases[Path(f).stem] = str(Path(f).resolve())
        if not args.no_zoo:
            log.info("compiling the zoo models")
            bases.update(build_zoo(tmp))
        if args.replay:
            return _replay(args.replay, bases)
        return _fuzz(args, bases)


def _replay(report: str, bases: dict[str, str]) -> int:
    bugs = json.loads(Path(report).read_text())["bugs"]
    cases = [b["case"] for b in bugs]
    results = run_cases(bases, cases)
    for c, r in zip(cases, results):
        print(json.dumps(c), "->", r["outcome"], r.get("message", ""))
    return 1 if any(r["outcome"] in BUG_OUTCOMES for r in results) else 0


def _fuzz(args, bases: dict[str, str]) -> int:
    from tqdm import tqdm

    rng = random.Random(args.seed)
    blobs = {name: Path(path).read_bytes() for name, path in bases.items()}
    maps = {name: file_map(blob) for name, blob in blobs.items()}
    names = sorted(bases)
    log.info("bases: %s", ", ".join(f"{n} ({len(blobs[n])} bytes)" for n in names))
    cases: list[dict] = []
    for n in names:  # the deterministic part: truncation at every boundary
        cases += boundary_cases(n, maps[n])
    results: list[dict] = []
    t0 = time.monotonic()
    bar = tqdm(total=args.cases, desc="fuzz", unit="case", file=sys.stderr)
    bugs_seen = 0

    def progress(r: dict) -> None:
        nonlocal bugs_seen
        bar.update(1)
        if r["outcome"] in BUG_OUTCOMES:
            bugs_seen += 1
            bar.set_postfix(bugs=bugs_seen)

    pending = cases[: args.cases]
    tried: list[dict] = []
    while True:
        while len(pending) < args.batch and len(tried) + len(pending) < args.cases:
            n = rng.choice(names)
            pending.append(random_case(rng, n, blobs[n], maps[n]))
        if not pending:
            break
        results += run_cases(bases, pending, progress=progress)
        tried += pending
        pending = []
        if args.seconds is not None and time.monotonic() - t0 > args.seconds:
            log.info("time budget of %.0f s spent", args.seconds)
            break
        if len(tried) >= args.cases:
            break
    bar.close()
    elapsed = time.monotonic() - t0
    report = summarize(tried, results)
    report.update(
        {
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "seed": args.seed,
            "seconds": round(elapsed, 1),
            "bases": {n: len(blobs[n]) for n in names},
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    log.info("%d cases in %.0f s: %s", len(tried), elapsed, report["outcomes"])
    for b in report["bugs"][:20]:
        log.info(
            "BUG %s: %s\n  case: %s", b["outcome"], b.get("message", ""), json.dumps(b["case"])
        )
    log.info("report: %s", out)
    return 1 if report["bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
