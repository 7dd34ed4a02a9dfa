"""Section-wise clustering, pruning, centroid retraining, calibration and training resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compiler import calibrate, cluster, train
from compiler.graph import capture


def _brute_kmeans_cost(x: np.ndarray, c: np.ndarray) -> float:
    return float(((x[:, None] - c[None, :]) ** 2).min(1).sum())


def test_kmeans_1d_is_a_lloyd_fixed_point_and_beats_random_centroids():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(-2, 0.3, 3000), rng.normal(0, 0.1, 5000), rng.normal(3, 0.5, 2000)]
    )
    c = cluster.kmeans_1d(x, 3)
    assert np.all(np.diff(c) > 0)
    idx = cluster.assign(x, c)
    # a Lloyd fixed point: each centroid is the mean of the values assigned to it
    means = np.array([x[idx == i].mean() for i in range(3)])
    np.testing.assert_allclose(c, means, atol=1e-4)
    for _ in range(20):
        random_c = np.sort(rng.choice(x, 3, replace=False))
        assert _brute_kmeans_cost(x, c) <= _brute_kmeans_cost(x, random_c) + 1e-6
    # nearest-centroid assignment matches brute force
    np.testing.assert_array_equal(idx, np.abs(x[:, None] - c[None, :]).argmin(1))


def test_codebook_is_exact_when_there_are_few_distinct_values():
    p = nn.Parameter(torch.tensor([0.5, -0.25, 0.5, 0.0]))
    book = cluster.codebook_for(0, [("w", p)], 4)
    assert book.exact
    np.testing.assert_array_equal(book.centroids[book.indices["w"]], p.detach().numpy())


def _on_float16_grid(values) -> bool:
    v = np.asarray(values, dtype=np.float32)
    return bool(np.array_equal(v.astype(np.float16).astype(np.float32), v))


def test_float16_grid_rounds_to_the_nearest_float16_where_it_can():
    v = np.array([0.1, -1 / 3, 1e-6, 7.0, 7.001, 1e5, -np.inf, np.nan], np.float32)
    g = cluster.float16_grid(v)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g[:5], v[:5].astype(np.float16).astype(np.float32))
    assert _on_float16_grid(g[:5]) and not _on_float16_grid(v[:2])
    assert g[4] == 7.0  # 7.001 is nearest to 7 in float16
    np.testing.assert_array_equal(g[5:7], v[5:7])  # past float16's range: kept
    assert np.isnan(g[7])


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_clustered_codebooks_are_on_the_float16_grid(fraction):
    """k-means centroids are rounded to float16 (the runtime's float16 panels: kernels.runs_f16)
    by at most half a float16 step; an exact codebook keeps the weights' own values."""
    torch.manual_seed(0)
    params = [("a", nn.Parameter(torch.randn(3000) * 0.05))]
    book = cluster.codebook_for(0, params, 8, zero_fraction=fraction)
    assert not book.exact and _on_float16_grid(book.centroids)
    assert np.all(np.diff(book.centroids) > 0)
    w = params[0][1].detach().numpy()
    raw = cluster.kmeans_1d(w if fraction == 0 else w[np.abs(w) > np.quantile(np.abs(w), fraction)],
                            8 if fraction == 0 else 7)  # fmt: skip
    kept = book.centroids[book.centroids != 0] if fraction else book.centroids
    np.testing.assert_allclose(kept, raw, rtol=2.0**-11, atol=0)
    exact = [("b", nn.Parameter(torch.tensor([0.1, -0.3, 0.1])))]
    np.testing.assert_array_equal(
        cluster.codebook_for(0, exact, 4).centroids, np.float32([-0.3, 0.1])
    )


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_pruning_sends_the_smallest_weights_to_an_exact_zero_centroid(fraction):
    torch.manual_seed(0)
    params = [("a", nn.Parameter(torch.randn(2000))), ("b", nn.Parameter(torch.randn(3, 500)))]
    book = cluster.codebook_for(0, params, 4, zero_fraction=fraction)
    assert len(book.centroids) == 4 and 0.0 in book.centroids
    zero = int(np.flatnonzero(book.centroids == 0)[0])
    all_w = np.concatenate([p.detach().numpy().ravel() for _, p in params])
    all_i = np.concatenate([book.indices[n].ravel() for n, _ in params])
    assert abs((all_i == zero).mean() - fraction) < 0.01
    # the pruned ones are exactly the smallest magnitudes
    assert np.abs(all_w[all_i == zero]).max() <= np.abs(all_w[all_i != zero]).min()


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.f1 = nn.Linear(4 * 36, 3)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.f2 = nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return [self.f1(torch.flatten(h, 1)), self.f2(torch.flatten(torch.relu(self.c2(h)), 1))]


def test_attached_codebooks_train_only_centroids_and_bake_to_k_values():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(8, 1, 6, 6)
    graph = capture(model, x[:1])
    original_c2 = model.c2.weight.detach().clone()
    cents = [cluster.attach_codebook(model, graph, 0, 4, zero_fraction=0.5)]
    params = cluster.trainable_after_clustering(model, cents)
    assert any(p is cents[0] for p in params)
    assert all(p is not model.c1.parametrizations.weight.original for p in params)
    zero = cents[0].detach() == 0
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(3):
        loss = sum(o.pow(2).sum() for o in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.all(cents[0].detach()[zero] == 0)  # the pruned centroid stays at zero
    assert not torch.equal(model.c2.weight.detach(), original_c2)  # unclustered ones train
    trained = cents[0].detach().numpy().copy()
    assert not _on_float16_grid(trained)  # SGD moved the centroids off the grid
    cluster.bake_codebooks(model)
    section0 = torch.cat([model.c1.weight.flatten(), model.f1.weight.flatten()])
    assert len(torch.unique(section0)) <= 4
    baked = np.unique(section0.detach().numpy())
    assert _on_float16_grid(baked)
    np.testing.assert_array_equal(baked, np.unique(cluster.float16_grid(trained)))


def _brute_simulate(conf, correct, macs, thresholds):
    acc, cost, hist = 0, 0.0, np.zeros(conf.shape[1])
    for i in range(conf.shape[0]):
        e = next(
            (j for j in range(conf.shape[1] - 1) if conf[i, j] >= thresholds[j]), conf.shape[1] - 1
        )
        acc += correct[i, e]
        cost += macs[e]
        hist[e] += 1
    n = conf.shape[0]
    return 100 * acc / n, cost / n, hist / n


def test_simulate_matches_a_per_sample_loop():
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=(300, 3))
    correct = rng.uniform(size=(300, 3)) < 0.7
    macs = np.array([1.0, 2.5, 4.0])
    for thr in ([0.5, 0.5, 0.0], [0.9, 0.2, 0.0], [0.0, 1.0, 0.0], [2.0, 2.0, 0.0]):
        o = calibrate.simulate(conf, correct, macs, thr)
        acc, cost, hist = _brute_simulate(conf, correct, macs, thr)
        assert o.accuracy == pytest.approx(acc)
        assert o.avg_macs == pytest.approx(cost)
        np.testing.assert_allclose(o.exit_fraction, hist)


def _fake_logits(n=400, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    logits = []
    for quality in (1.0, 2.0, 4.0):  # deeper exits are more confident and more right
        lg = rng.normal(size=(n, 5)).astype(np.float32)
        lg[np.arange(n), labels] += quality * rng.uniform(0, 2, n).astype(np.float32)
        logits.append(lg)
    return logits, labels


def test_calibration_meets_the_accuracy_target_at_lower_cost():
    logits, labels = _fake_logits()
    macs = [10, 20, 40]
    final = 100 * np.mean(np.argmax(logits[-1], 1) == labels)
    o = calibrate.calibrate(logits, labels, macs, max_acc_drop=2.0)
    assert o.accuracy >= final - 2.0
    assert o.avg_macs < 40
    assert o.thresholds[-1] == 0.0


def test_calibration_meets_the_compute_budget():
    logits, labels = _fake_logits(seed=3)
    o = calibrate.calibrate(logits, labels, [10, 20, 40], max_macs=0.5)
    assert o.avg_macs <= 20 + 1e-9
    with pytest.raises(ValueError):
        calibrate.calibrate(logits, labels, [10, 20, 40])


def _loader(epoch: int):
    g = torch.Generator().manual_seed(epoch)
    x = torch.randn(64, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.DataLoader(list(zip(x, y)), batch_size=16)


class _Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    cfg = train.TrainConfig(epochs=3, lr=0.05, seed=0)
    torch.manual_seed(0)
    straight = _Net()
    start = {k: v.clone() for k, v in straight.state_dict().items()}
    train.fit(straight, _loader, None, cfg)

    def dies_in_epoch_two(epoch):
        if epoch == 1:
            raise _Interrupt
        return _loader(epoch)

    ckpt = str(tmp_path / "ckpt.pt")
    first = _Net()
    first.load_state_dict(start)
    with pytest.raises(_Interrupt):
        train.fit(first, dies_in_epoch_two, None, cfg, ckpt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 1

    resumed = _Net()  # a new process: fresh weights, everything comes from the checkpoint
    hist = train.fit(resumed, _loader, None, cfg, ckpt, resume=True)
    assert [h["epoch"] for h in hist.epochs] == [1, 2, 3]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_ddp_two_gloo_processes_end_with_identical_weights(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(root, "tests", "ddp_worker.py"),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = _NetForDDPStart()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and training did move them
    assert not torch.equal(a["conv.weight"], start["conv.weight"])


def _NetForDDPStart():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "ddp_worker", os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    return mod.Net().state_dict()
