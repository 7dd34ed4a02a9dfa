"""Build the golden .escepe file that tests/test_format.py compares the writer against.

    python3 tests/make_golden.py          # rewrite tests/golden/*
    python3 tests/make_golden.py --check  # exit 1 if the writer's output changed

Everything is deterministic and independent of torch's RNG: weights, BN statistics
and the example input come from numpy's default_rng(0). Every section's weights
take fewer distinct values than its cluster count, so the codebooks are exact (no
k-means) and the file holds exactly the model's weights. The expected logits come
from the torch model evaluated in float64, not from the runtime, so the golden test
checks the runtime against an independent reference.

Only bump the golden file together with the schema version (escepe_rt/format.py and
schema/escepe.fbs). Since 1.1 the two sections use the two index encodings
(section 0 rANS, section 1 bit-packed), so both are pinned. Since 1.2 each section's
tensors share one data buffer through buffer views; tests/test_repack.py checks that
repacking the 1.1 golden file gives the 1.2 one byte for byte. Since 1.3 section 0 uses
the interleaved rANS coder (RANS_INTERLEAVED); repacking the 1.2 file with
index_encoding=INDEX_ENCODING gives the 1.3 one, and tests/test_rans_interleaved.py
checks that the 1.2 file's RANS_INDICES bytes are still what rans.encode writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOLDEN = HERE / "golden"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from escepe_rt.format import SCHEMA_MAJOR, SCHEMA_MINOR  # noqa: E402

# One golden file per schema version: files of older minors stay as compatibility fixtures.
VERSION = f"v{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
GOLDEN_FILE = GOLDEN / f"tiny_{VERSION}.escepe"
INPUT_FILE = GOLDEN / f"tiny_{VERSION}_input.npy"  # (4, 1, 8, 8) float32
LOGITS_FILE = GOLDEN / f"tiny_{VERSION}_logits.npy"  # (exits, 4, 3) float32, torch float64

INPUT_SHAPE = (1, 8, 8)
CLUSTERS = [4, 8]  # section 0: 4 distinct values -> 2 bits; section 1: 5 values -> 3 bits
THRESHOLDS = [0.75, 0.0]
LABELS = ["circle", "square", "triangle"]
INPUT_MEAN = [0.5]
INPUT_STD = [0.25]
INDEX_ENCODING = ["rans_interleaved", "packed"]
METADATA = {"dataset": "synthetic", "recipe": "tests/make_golden.py", "accuracy": "0.5"}
SECTION0_VALUES = np.array([-0.5, -0.25, 0.25, 0.5], dtype=np.float32)
SECTION1_VALUES = np.array([-0.375, -0.125, 0.0, 0.125, 0.375], dtype=np.float32)


def tiny_model():
    """conv3x3-BN-ReLU -> exit1 (maxpool, flatten, linear); conv3x3(bias)-ReLU -> exit2."""
    import torch
    from torch import nn

    class Tiny(nn.Module):
        exit_names = ["early", "final"]

        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
            self.relu1 = nn.ReLU()
            self.pool1 = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(4 * 4 * 4, 3)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.relu2 = nn.ReLU()
            self.gap = nn.AdaptiveAvgPool2d(1)
            self.fc2 = nn.Linear(4, 3, bias=False)

        def forward(self, x):
            h = self.relu1(self.bn1(self.conv1(x)))
            e1 = self.fc1(torch.flatten(self.pool1(h), 1))
            g = self.relu2(self.conv2(h))
            e2 = self.fc2(torch.flatten(self.gap(g), 1))
            return [e1, e2]

    rng = np.random.default_rng(0)
    model = Tiny()

    def put(param, array) -> None:
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))

    for name, values in (
        ("conv1", SECTION0_VALUES),
        ("fc1", SECTION0_VALUES),
        ("conv2", SECTION1_VALUES),
        ("fc2", SECTION1_VALUES),
    ):
        weight = getattr(model, name).weight
        put(weight, rng.choice(values, size=tuple(weight.shape)))
    put(model.fc1.bias, rng.uniform(-0.5, 0.5, 3))
    put(model.conv2.bias, rng.uniform(-0.25, 0.25, 4))
    put(model.bn1.weight, rng.uniform(0.5, 1.5, 4))
    put(model.bn1.bias, rng.uniform(-0.5, 0.5, 4))
    put(model.bn1.running_mean, rng.uniform(-0.25, 0.25, 4))
    put(model.bn1.running_var, rng.uniform(0.5, 2.0, 4))
    return model.eval()


def tiny_input() -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.0, (4, *INPUT_SHAPE)).astype(np.float32)


def golden_bytes() -> bytes:
    """The golden file's bytes, built in memory with compiler.export.build."""
    import torch

    from compiler.export import build
    from compiler.graph import capture

    model = tiny_model()
    graph = capture(model, torch.zeros(1, *INPUT_SHAPE))
    blob, _, _ = build(
        graph,
        model,
        clusters=CLUSTERS,
        thresholds=THRESHOLDS,
        labels=LABELS,
        input_mean=INPUT_MEAN,
        input_std=INPUT_STD,
        metadata=METADATA,
        index_encoding=INDEX_ENCODING,
    )
    return blob


def reference_logits(x: np.ndarray) -> np.ndarray:
    """(exits, N, K) float32 logits of the torch model evaluated in float64."""
    import torch

    model = tiny_model().double()
    with torch.no_grad():
        outs = model(torch.from_numpy(x).double())
    return np.stack([o.numpy() for o in outs]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the golden files changed")
    args = parser.parse_args()
    blob = golden_bytes()
    x = tiny_input()
    logits = reference_logits(x)
    if args.check:
        same = (
            GOLDEN_FILE.read_bytes() == blob
            and np.array_equal(np.load(INPUT_FILE), x)
            and np.array_equal(np.load(LOGITS_FILE), logits)
        )
        sys.exit(0 if same else "tests/golden/ is stale: the writer's output changed")
    GOLDEN.mkdir(exist_ok=True)
    GOLDEN_FILE.write_bytes(blob)
    np.save(INPUT_FILE, x)
    np.save(LOGITS_FILE, logits)
    print(f"wrote {GOLDEN_FILE.relative_to(ROOT)} ({len(blob)} bytes), input and logits")


if __name__ == "__main__":
    main()
