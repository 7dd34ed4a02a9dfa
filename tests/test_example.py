"""The shipped example model loads, verifies, and classifies real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import escepe_rt

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_resnet18.escepe"


def test_example_model_on_real_fashion_mnist():
    data = pytest.importorskip("compiler.data")
    try:
        test = data.load_fashion_mnist(split="test")
    except (FileNotFoundError, data.DatasetError) as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    m = escepe_rt.load(EXAMPLE)
    assert m.labels[0] == "T-shirt/top" and m.input_shape == (1, 28, 28)
    images, labels = test.images[:1000, 0], test.labels[:1000]
    r = m.predict(m.preprocess(images))
    # 89.98% on the full test split when shipped; a broken file or runtime is far below
    assert (r.labels == labels).mean() > 0.85
    assert (r.exit_index == 0).mean() > 0.5  # early exit does answer most samples early
    dense = escepe_rt.load(EXAMPLE, threshold=2.0).predict(m.preprocess(images))
    np.testing.assert_array_equal(dense.exit_index, 3)
