"""Exit thresholds from a validation split, for a user's accuracy or compute target.

Works on the per-exit logits that the runtime gives for the validation images
(so calibration sees exactly the compressed model that ships). Thresholds are
found by a grid search over one shared threshold, then refined exit by exit
(coordinate descent), under one of two targets:
  * max_acc_drop X: accuracy with early exit >= last-exit accuracy - X points,
    spending as few MACs as possible;
  * max_macs Y: average MACs <= Y x the full model's, at the best accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from escepe_rt.executor import confidence

GRID = np.unique(np.concatenate([np.linspace(0, 1, 101), 1 - np.logspace(-5, -1, 30)]))


@dataclass
class Outcome:
    thresholds: list[float]
    accuracy: float  # % with early exit
    avg_macs: float  # per sample
    exit_fraction: list[float]  # share of samples answered by each exit


def simulate(conf: np.ndarray, correct: np.ndarray, macs: np.ndarray, thresholds) -> Outcome:
    """conf, correct: (N, E); macs: (E,) cumulative MACs to reach each exit."""
    n, e = conf.shape
    passes = conf >= np.asarray(thresholds, dtype=np.float64)[None, :]
    passes[:, -1] = True
    first = passes.argmax(axis=1)  # (N,) first exit that is confident enough
    rows = np.arange(n)
    return Outcome(
        thresholds=[float(t) for t in thresholds],
        accuracy=100.0 * float(correct[rows, first].mean()),
        avg_macs=float(macs[first].mean()),
        exit_fraction=[float((first == i).mean()) for i in range(e)],
    )


def calibrate(
    logits: list[np.ndarray],
    labels: np.ndarray,
    exit_macs: list[int],
    policy: int = 0,
    max_acc_drop: float | None = None,
    max_macs: float | None = None,
) -> Outcome:
    """Per-exit thresholds meeting exactly one target (see module docstring)."""
    if (max_acc_drop is None) == (max_macs is None):
        raise ValueError("give exactly one target: max_acc_drop (points) or max_macs (fraction)")
    conf = np.stack([confidence(np.asarray(lg, np.float32), policy) for lg in logits], 1)
    correct = np.stack([np.argmax(lg, 1) == labels for lg in logits], 1)
    macs = np.asarray(exit_macs, dtype=np.float64)
    final_acc = 100.0 * correct[:, -1].mean()
    e = conf.shape[1]

    if max_acc_drop is not None:
        floor = final_acc - max_acc_drop

        def score(o: Outcome) -> tuple:  # feasible first, then cheapest, then most accurate
            return (o.accuracy >= floor - 1e-9, -o.avg_macs, o.accuracy)
    else:
        budget = max_macs * macs[-1]

        def score(o: Outcome) -> tuple:
            return (o.avg_macs <= budget + 1e-9, o.accuracy, -o.avg_macs)

    best = max((simulate(conf, correct, macs, [t] * e) for t in GRID), key=score)
    for _ in range(3):  # coordinate descent, exit by exit
        for i in range(e - 1):
            for t in GRID:
                trial = list(best.thresholds)
                trial[i] = float(t)
                o = simulate(conf, correct, macs, trial)
                if score(o) > score(best):
                    best = o
    best.thresholds[-1] = 0.0  # the last exit always answers
    return best
