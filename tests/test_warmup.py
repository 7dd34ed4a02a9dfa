"""escepe_rt.load(..., warmup=True): same results, lazy decoding kept, and no kernel left to JIT.

The "no JIT left" check counts the compiled signatures of every numba dispatcher in escepe_rt
in a fresh process: after the warm-up, predictions of other batch sizes, with samples leaving
at different exits, must not add any. (No timing: that lives in benchmarks/.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import escepe_rt

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "fashion_resnet18.escepe"


def _inputs(m, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *m.input_shape)) * rng.uniform(0.2, 3.0, (n, 1, 1, 1))
    return x.astype(np.float32)


@pytest.mark.parametrize("decode", ["lazy", "eager"])
def test_warm_model_predicts_like_a_plain_one(decode):
    plain = escepe_rt.load(EXAMPLE, decode=decode)
    warm = escepe_rt.load(EXAMPLE, decode=decode, warmup=True)
    x = _inputs(plain, 40, seed=0)
    a, b = plain.predict(x), warm.predict(x)
    assert len(np.unique(a.exit_index)) > 1  # the batch really splits over the exits
    for field in ("labels", "exit_index", "confidence", "logits"):
        np.testing.assert_array_equal(getattr(b, field), getattr(a, field))
    for la, lb in zip(plain.run_all_exits(x[:3]), warm.run_all_exits(x[:3])):
        np.testing.assert_array_equal(lb, la)


def test_warmup_keeps_lazy_decoding_lazy():
    m = escepe_rt.load(EXAMPLE, threshold=0.0, warmup=True)
    assert m.decoded_sections == []  # the warm-up's decoded weights were thrown away
    m.predict(_inputs(m, 5, seed=1))
    assert m.decoded_sections == [0]  # threshold 0: only section 0 is ever needed
    assert escepe_rt.load(EXAMPLE, decode="eager", warmup=True).decoded_sections == [0, 1, 2, 3]


def test_warmup_returns_its_duration():
    assert escepe_rt.load(EXAMPLE).warmup() > 0


CHILD = r"""
import json, sys
import numpy as np
import numba.core.registry
import escepe_rt

def signatures():
    out = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("escepe_rt"):
            for attr, obj in vars(mod).items():
                if isinstance(obj, numba.core.registry.CPUDispatcher):
                    out[f"{name}.{attr}"] = len(obj.signatures)
    return out

path = sys.argv[1]
escepe_rt.load(path)  # verification kernels only
before = signatures()
m = escepe_rt.load(path, warmup=True)
warm = signatures()
rng = np.random.default_rng(0)
for n, t in ((1, None), (7, None), (40, 0.6), (9, 0.0), (3, 2.0)):
    x = (rng.standard_normal((n, *m.input_shape)) * rng.uniform(0.2, 3, (n, 1, 1, 1)))
    x = x.astype(np.float32)
    escepe_rt.load(path, threshold=t).predict(x)
    m.predict(x)
m.run_all_exits(x)
after = signatures()
print(json.dumps({"before": before, "warm": warm, "after": after}))
"""


def test_after_warmup_nothing_is_compiled_again():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = {k for k in r["warm"] if r["warm"][k] > r["before"].get(k, 0)}
    assert len(grew) >= 3, f"the warm-up compiled almost nothing: {grew}"
    new = {k: (r["warm"].get(k, 0), v) for k, v in r["after"].items() if v != r["warm"].get(k, 0)}
    assert not new, f"kernels compiled after the warm-up (signatures warm -> after): {new}"
