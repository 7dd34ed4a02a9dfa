#!/usr/bin/env bash
# Run the runtime's tests on aarch64 under qemu user-mode emulation, with no ARM board.
#
# 1. an arm64 Debian root (debootstrap --foreign, then the packages' files unpacked with
#    dpkg-deb -x: binfmt_misc is not needed because nothing in the root is executed by the
#    kernel, qemu-aarch64-static runs python3 explicitly)
# 2. the escepe wheel built from this working tree, plus aarch64 wheels of its declared
#    dependencies (and pytest, hypothesis) fetched by the host's pip
# 3. the torch-free runtime tests, run by the emulated python3 against the installed wheel
#    (python3 -P: the source tree is not on sys.path), and a cross-architecture check: the
#    shipped example model on real Fashion-MNIST images must give the host's labels and
#    exits, and logits within 1e-4.
# The root and the dependency wheels are cached (see --help); the escepe wheel and numba's
# cache are rebuilt every run, so every run JIT-compiles the kernels on arm64 from cold.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${ESCEPE_ARM64_CACHE:-$REPO/.arm64-check}"
SUITE="${ESCEPE_ARM64_SUITE:-bookworm}"
MIRROR="${ESCEPE_ARM64_MIRROR:-}"
export QEMU_CPU="${QEMU_CPU:-cortex-a72}"
# Test files to run; default: every tests/test_*.py that imports neither torch, onnx,
# onnxruntime nor the compiler (which needs torch) at module level (see select_tests).
TESTS="${ESCEPE_ARM64_TESTS:-}"
# Deselected unless --full: sweeps of the pure-Python verifier (nothing architecture-specific
# beyond what the other tests run) that take ~40% of the emulated time.
DESELECT_QUICK=(
    tests/test_fuzz.py
    tests/test_format.py::test_every_resealed_byte_flip_raises_format_error_or_loads
)
FULL=0
CROSS_CHECK=1
FRESH=0
PYTEST_ARGS=()

usage() {
    cat <<EOF
usage: bash tools/arm64-check.sh [--full] [--cache DIR] [--fresh] [--no-cross-check]
                                 [-- PYTEST_ARGS...]

Checks the escepe runtime on aarch64 under qemu user emulation (no ARM board needed):
builds an arm64 Debian $SUITE root with debootstrap, installs the escepe wheel built from
this working tree and aarch64 wheels of numpy, numba, flatbuffers, pytest and hypothesis,
then runs the torch-free runtime tests with the emulated python3, and compares the shipped
example model's outputs on arm64 with the host's. Exits non-zero if anything fails.
Needs root (or debootstrap and qemu-user-static already installed: they are apt-get
installed when missing), Debian's package archive and PyPI.

options:
  --full             also run the verifier fuzzing and byte-flip sweeps (pytest under qemu:
                     ~6.5 min instead of ~4 on an idle 2-core machine; twice that if busy)
  --cache DIR        where the root, wheels and logs are kept (default: .arm64-check/ in
                     the repository; the first run downloads ~90 MB of .debs and ~300 MB
                     of wheels, reruns reuse them)
  --fresh            delete the cached root and wheels first
  --no-cross-check   skip the example-model comparison with the host
  -- PYTEST_ARGS     passed to pytest (e.g. -- -k rans -x)
  -h, --help         this text

environment:
  ESCEPE_ARM64_CACHE   same as --cache
  ESCEPE_ARM64_MIRROR  Debian mirror for debootstrap (default: the first Debian archive
                       that apt on this machine uses, from /etc/apt/sources.list{,.d/})
  ESCEPE_ARM64_SUITE   Debian suite of the root (default: bookworm, python 3.11)
  ESCEPE_ARM64_TESTS   test files to run, space-separated (default: every tests/test_*.py
                       that imports neither torch, onnx, onnxruntime nor compiler at module
                       level; a test that needs torch inside uses pytest.importorskip)
  QEMU_CPU             emulated CPU (default: cortex-a72, a Raspberry Pi 4; qemu's default
                       CPU has SVE, which gives spurious floating-point warnings)
Deselected unless --full (slow, pure-Python, run natively by the normal test suite):
$(printf '  %s\n' "${DESELECT_QUICK[@]}")
sys.executable in the emulated python is a wrapper script that runs qemu again, so tests
that start python subprocesses run them on arm64 too (binfmt_misc is not needed).
In CI: ESCEPE_ARM64_CHECK=1 .ci/run
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --cache) CACHE="$2"; shift 2 ;;
        --cache=*) CACHE="${1#--cache=}"; shift ;;
        --fresh) FRESH=1; shift ;;
        --full) FULL=1; shift ;;
        --no-cross-check) CROSS_CHECK=0; shift ;;
        --) shift; PYTEST_ARGS=("$@"); break ;;
        *) echo "arm64-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { echo "arm64-check: $*" >&2; }
START=$SECONDS
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
ROOT="$CACHE/root-$SUITE"
if [ "$FRESH" = 1 ]; then
    log "removing the cached root and wheels in $CACHE"
    rm -rf "$ROOT" "$CACHE"/deps-*
fi

# --------------------------------------------------------------------------- 1. tools
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "installing debootstrap and qemu-user-static with apt-get"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq debootstrap qemu-user-static >/dev/null
fi

# The Debian mirror apt on this machine already uses: never a host name written down here.
debian_mirror() {
    python3 - "$SUITE" <<'PY'
import glob, re, sys

suite = sys.argv[1]
debian = {"buster", "bullseye", "bookworm", "trixie", "forky", "sid",
          "oldstable", "stable", "testing", "unstable"}
entries = []  # (uri, suites)
files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
for path in files:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            entries.append((words[1], words[2:3]))
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        stanzas = re.split(r"\n\s*\n", open(path).read())
    except OSError:
        continue
    for stanza in stanzas:
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" in fields.get("types", "").split():
            for uri in fields.get("uris", "").split():
                entries.append((uri, fields.get("suites", "").split()))
for want in ({suite}, debian):
    for uri, suites in entries:
        if want & set(suites):
            print(uri.rstrip("/"))
            sys.exit(0)
sys.exit(1)
PY
}

# --------------------------------------------------------------------------- 2. the root
if [ ! -e "$ROOT/.escepe-ready" ]; then
    if [ -z "$MIRROR" ]; then
        MIRROR="$(debian_mirror)" || {
            log "no Debian archive in this machine's apt sources: set ESCEPE_ARM64_MIRROR"
            exit 1
        }
    fi
    log "building an arm64 Debian $SUITE root in $ROOT (mirror from apt config: $MIRROR)"
    rm -rf "$ROOT"
    # --foreign: download and unpack only; the second stage would execute arm64 binaries.
    debootstrap --foreign --variant=minbase --arch=arm64 --include=python3 \
        "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 || {
        tail -20 "$CACHE/debootstrap.log" >&2
        exit 1
    }
    # The first stage leaves the non-essential packages (python3 among them) as .debs; their
    # files are all python3 needs (its maintainer scripts only byte-compile).
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do
        dpkg-deb -x "$deb" "$ROOT"
    done
    rm -f "$ROOT"/var/cache/apt/archives/*.deb
    touch "$ROOT/.escepe-ready"
fi
PY_ARM="$ROOT/usr/bin/python3"
PYVER="$(readlink "$PY_ARM" | sed -n 's/^python\([0-9]*\.[0-9]*\)$/\1/p')"
[ -n "$PYVER" ] || { log "cannot tell the python version of $PY_ARM"; exit 1; }

RUN_DIR="$CACHE/run"
rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR/tmp" "$RUN_DIR/home"

# The root's python3 under qemu, behind a wrapper script: binfmt_misc is not mounted, so the
# kernel cannot exec an arm64 binary; QEMU_ARGV0 makes the wrapper sys.executable, and a test
# that runs [sys.executable, ...] in a subprocess gets an arm64 python3 too.
PY_WRAPPER="$RUN_DIR/bin/python3"
mkdir -p "$RUN_DIR/bin"
cat >"$PY_WRAPPER" <<EOF
#!/bin/sh
export QEMU_CPU="$QEMU_CPU" QEMU_LD_PREFIX="$ROOT" QEMU_ARGV0="$PY_WRAPPER"
export PYTHONPATH="\${PYTHONPATH:-\$ESCEPE_ARM64_PATH}"
exec qemu-aarch64-static "$PY_ARM" "\$@"
EOF
chmod +x "$PY_WRAPPER"
# A clean environment: the host's PATH is left out so host tools (flatc) do not leak into
# the arm64 run; PYTHONSAFEPATH (-P): the source tree is never on sys.path, the wheel is.
arm64_python() {
    env -i PATH=/usr/bin:/bin HOME="$RUN_DIR/home" LANG=C.UTF-8 TMPDIR="$RUN_DIR/tmp" \
        ESCEPE_ARM64_PATH="$RUN_DIR/escepe:$DEPS" PYTHONPATH="$RUN_DIR/escepe:$DEPS" \
        PYTHONSAFEPATH=1 PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
        NUMBA_CACHE_DIR="$RUN_DIR/numba-cache" "$PY_WRAPPER" "$@"
}

# --------------------------------------------------------------------------- 3. wheels
# Built from a copy of the working tree's files (tracked and untracked, not ignored), so a
# stale build/ folder cannot leak deleted modules into the wheel.
SRC="$RUN_DIR/src"
mkdir -p "$SRC"
(cd "$REPO" && git ls-files --cached --others --exclude-standard -- \
    pyproject.toml README.md escepe_rt compiler | sort -u | while IFS= read -r f; do
    if [ -f "$f" ]; then cp --parents -t "$SRC" "$f"; fi  # a tracked file may be deleted
done)
python3 -m pip wheel --no-deps --disable-pip-version-check -q -w "$RUN_DIR/wheel" "$SRC" \
    >"$RUN_DIR/wheel.log" 2>&1 || { cat "$RUN_DIR/wheel.log" >&2; exit 1; }
WHEEL="$(ls "$RUN_DIR"/wheel/escepe-*.whl)"
WHEEL_BYTES="$(stat -c %s "$WHEEL")"
log "built $(basename "$WHEEL") ($WHEEL_BYTES bytes)"

# The runtime's dependencies as the wheel declares them; the cache is keyed by them.
REQUIRES="$(unzip -p "$WHEEL" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' |
    grep -v 'extra ==' | sort)"
TEST_REQS="pytest hypothesis"
KEY="$(printf '%s\n%s\n%s\n' "$PYVER" "$REQUIRES" "$TEST_REQS" | sha256sum | cut -c1-12)"
DEPS="$CACHE/deps-$KEY"
pip_arm64() {
    python3 -m pip install -q --disable-pip-version-check --no-warn-conflicts \
        --only-binary=:all: --implementation cp --python-version "$PYVER" \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 "$@"
}
if [ ! -e "$DEPS/.escepe-ready" ]; then
    log "fetching aarch64 wheels for python $PYVER: $(echo "$REQUIRES" | tr '\n' ' ')$TEST_REQS"
    rm -rf "$DEPS"
    # shellcheck disable=SC2086
    pip_arm64 --target "$DEPS" "$WHEEL" $TEST_REQS >"$CACHE/pip.log" 2>&1 || {
        tail -20 "$CACHE/pip.log" >&2
        exit 1
    }
    rm -rf "$DEPS"/escepe_rt "$DEPS"/compiler "$DEPS"/escepe-*.dist-info "$DEPS"/bin/escepe
    touch "$DEPS/.escepe-ready"
fi
pip_arm64 --no-deps --target "$RUN_DIR/escepe" "$WHEEL" >"$RUN_DIR/pip.log" 2>&1 ||
    { cat "$RUN_DIR/pip.log" >&2; exit 1; }
log "setup took $((SECONDS - START)) s"

arm64_python -c '
import platform, sys
import escepe_rt, flatbuffers, numba, numpy
assert platform.machine() == "aarch64", platform.machine()
assert escepe_rt.__file__.startswith(sys.argv[1]), escepe_rt.__file__
print(f"arm64-check: {platform.machine()} python {platform.python_version()} "
      f"numpy {numpy.__version__} numba {numba.__version__} escepe_rt {escepe_rt.__version__} "
      f"from the wheel", file=sys.stderr)
' "$RUN_DIR/escepe/"

# --------------------------------------------------------------------------- 4. tests
# The torch-free test modules, read (not imported) on the host: a new runtime test file is
# picked up without editing this script.
select_tests() {
    (cd "$REPO" && python3 - tests/test_*.py <<'PY'
import ast, sys

HEAVY = {"torch", "onnx", "onnxruntime", "compiler"}
for path in sys.argv[1:]:
    tree = ast.parse(open(path).read(), path)
    names = set()
    for node in tree.body:  # module level only: imports inside tests may be importorskip'd
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    heavy = sorted(names & HEAVY)
    if heavy:
        print(f"arm64-check: not run, imports {', '.join(heavy)}: {path}", file=sys.stderr)
    else:
        print(path)
PY
    )
}
if [ -z "$TESTS" ]; then
    TESTS="$(select_tests | tr '\n' ' ')"
fi
STATUS=0
T0=$SECONDS
ARGS=()
for t in $TESTS; do ARGS+=("$REPO/$t"); done
DESELECT=()
[ "$FULL" = 1 ] || DESELECT=("${DESELECT_QUICK[@]}")
for d in "${DESELECT[@]}"; do
    ARGS+=(--deselect "$d")  # node ids are relative to the rootdir
    log "deselected: $d"
done
log "pytest under qemu ($QEMU_CPU): $TESTS"
# cwd outside the repository: .hypothesis/ and .pytest_cache/ stay in the run folder.
(cd "$RUN_DIR" && arm64_python -m pytest -q -rs -p no:cacheprovider --rootdir "$REPO" \
    "${ARGS[@]}" "${PYTEST_ARGS[@]}") || STATUS=$?
log "pytest took $((SECONDS - T0)) s, exit status $STATUS"

# --------------------------------------------------------------------------- 5. cross-check
# The same model and images on the host (x86 numba) and on arm64: an architecture-specific
# kernel bug that the unit tests' tolerances let through shows here.
if [ "$CROSS_CHECK" = 1 ]; then
    T0=$SECONDS
    CROSS_PY='
import gzip, sys
from pathlib import Path
import numpy as np
import escepe_rt
model, images, out = sys.argv[1:4]
path = Path(images)
if path.exists():
    with gzip.open(path) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:256]
else:  # Fashion-MNIST not installed: fixed random images still compare the two machines
    x = np.random.default_rng(0).integers(0, 256, size=(256, 28, 28), dtype=np.uint8)
m = escepe_rt.load(model)
r = m.predict(m.preprocess(x))
np.savez(out, labels=r.labels, exit_index=r.exit_index, logits=r.logits,
         all_exits=np.stack(m.run_all_exits(m.preprocess(x[:32]))))
'
    MODEL="$REPO/examples/fashion_resnet18.escepe"
    IMAGES=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
    python3 -c "$CROSS_PY" "$MODEL" "$IMAGES" "$RUN_DIR/host.npz"
    if arm64_python -c "$CROSS_PY" "$MODEL" "$IMAGES" "$RUN_DIR/arm64.npz" &&
        python3 - "$RUN_DIR/host.npz" "$RUN_DIR/arm64.npz" <<'PY'
import sys
import numpy as np
host, arm = np.load(sys.argv[1]), np.load(sys.argv[2])
labels = (host["labels"] == arm["labels"]).mean()
exits = (host["exit_index"] == arm["exit_index"]).mean()
diff = max(np.abs(host[k] - arm[k]).max() for k in ("logits", "all_exits"))
print(f"arm64-check: example model, 256 images: labels agree {labels:.1%}, exits agree "
      f"{exits:.1%}, max |logit diff| host vs arm64 {diff:.2e}", file=sys.stderr)
sys.exit(0 if labels == 1 and exits == 1 and diff < 1e-4 else 1)
PY
    then
        log "cross-check passed ($((SECONDS - T0)) s)"
    else
        log "cross-check FAILED ($((SECONDS - T0)) s)"
        [ "$STATUS" != 0 ] || STATUS=1
    fi
fi

if [ "$STATUS" = 0 ]; then
    log "OK on aarch64 ($QEMU_CPU) in $((SECONDS - START)) s"
else
    log "FAILED on aarch64 ($QEMU_CPU) in $((SECONDS - START)) s"
fi
exit "$STATUS"
