"""Section-wise weight clustering: one k-means codebook per section.

ESCEPE (seed 000) clusters the weights of each early-exit section with its own
cluster count: shallow sections keep more clusters so the early exits keep
their accuracy. Here: every conv/linear weight of a section (its exit head
included) shares that section's codebook; biases and batch-norm stay float32.

Centroids are rounded to the nearest float16 (stored as float32): a change of at
most 2^-11 of a centroid, far below the clustering's own error, which lets the
runtime keep those weights as float16 (escepe_rt.kernels.runs_f16: half the
memory and half the bytes streamed per forward pass, the same products).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from compiler.graph import Graph, capture


@dataclass
class SectionCodebook:
    section: int
    centroids: np.ndarray  # (k,) float32, ascending
    indices: dict[str, np.ndarray]  # weight parameter name -> uint8 indices, weight's shape
    exact: bool  # True if the section had <= k distinct values (nothing was approximated)


def float16_grid(values) -> np.ndarray:
    """float32 values rounded to the nearest float16, except where float16 cannot hold them
    (beyond +-65504, NaN): those stay as they are (the runtime then keeps float32 weights)."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(np.float16).astype(np.float32)
    return np.where(np.isfinite(h), h, v)


def kmeans_1d(
    values: np.ndarray, k: int, seed: int = 0, iters: int = 100, sample: int = 200_000
) -> np.ndarray:
    """1-D k-means (k-means++ init, Lloyd iterations on sorted data): (k,) ascending centroids.

    In one dimension the clusters are intervals of the sorted values, so each
    Lloyd step is a searchsorted over k-1 boundaries plus prefix sums: O(k log n).
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    distinct = np.unique(x)
    if len(distinct) <= k:
        return distinct.astype(np.float32)
    rng = np.random.default_rng(seed)
    pool = x if len(x) <= sample else x[rng.choice(len(x), sample, replace=False)]
    centroids = [pool[rng.integers(len(pool))]]
    dist = (pool - centroids[0]) ** 2
    for _ in range(k - 1):  # k-means++: next seed with probability ~ squared distance
        total = dist.sum()
        nxt = (
            pool[rng.integers(len(pool))]
            if total <= 0
            else pool[rng.choice(len(pool), p=dist / total)]
        )
        centroids.append(nxt)
        dist = np.minimum(dist, (pool - nxt) ** 2)
    c = np.unique(np.asarray(centroids))
    csum = np.concatenate([[0.0], np.cumsum(x)])
    for _ in range(iters):
        bounds = np.searchsorted(x, (c[1:] + c[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [len(x)]])
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = np.unique(new)
    return c.astype(np.float32)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ascending centroids) for each value, uint8."""
    c = np.asarray(centroids, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, v)
    return idx.astype(np.uint8)


def section_parameters(graph: Graph, model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Per section, the (name, parameter) of every conv/linear weight in it (first use wins)."""
    modules = dict(model.named_modules())
    seen: set[int] = set()
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(graph.num_sections)]
    for node in graph.weighted_nodes():
        p = modules[node.module].weight
        if id(p) not in seen:
            seen.add(id(p))
            out[node.section].append((f"{node.module}.weight", p))
    return out


def per_section(clusters: int | list[int] | tuple[int, ...], num_sections: int) -> list[int]:
    """Expand an int to one cluster count per section, checking the range 1..256."""
    ks = [int(clusters)] * num_sections if np.isscalar(clusters) else [int(k) for k in clusters]
    if len(ks) != num_sections:
        raise ValueError(f"clusters needs {num_sections} values (one per section), got {len(ks)}")
    if any(not 1 <= k <= 256 for k in ks):
        raise ValueError(f"cluster counts must be in 1..256 (8-bit indices), got {ks}")
    return ks


def codebook_for(
    section: int,
    params: list[tuple[str, nn.Parameter]],
    k: int,
    seed: int = 0,
    zero_fraction: float = 0.0,
) -> SectionCodebook:
    """Codebook and indices of one section's weights (exact if they have <= k distinct values).

    zero_fraction > 0 prunes: that share of the section's weights, smallest in
    magnitude, go to a centroid fixed at exactly 0, and the rest are clustered
    into k - 1 centroids. A dominant zero cluster is what lets entropy-coded
    indices go below 1 bit per weight.
    """
    if not 0.0 <= zero_fraction < 1.0:
        raise ValueError(f"zero_fraction must be in [0, 1), got {zero_fraction}")
    flat = [p.detach().cpu().numpy().astype(np.float32).ravel() for _, p in params]
    everything = np.concatenate(flat) if flat else np.zeros(0, np.float32)
    distinct = np.unique(everything)
    exact = len(distinct) <= k
    if exact or zero_fraction == 0.0 or k < 2:
        # an exact codebook is the weights themselves (the file must equal the model)
        centroids = distinct if exact else _rounded(kmeans_1d(everything, k, seed=seed + section))
        if len(centroids) == 0:
            centroids = np.zeros(1, np.float32)
        indices = {
            name: assign(p.detach().cpu().numpy().ravel(), centroids).reshape(tuple(p.shape))
            for name, p in params
        }
        return SectionCodebook(section, centroids.astype(np.float32), indices, exact)

    cut = np.quantile(np.abs(everything), zero_fraction)
    kept = everything[np.abs(everything) > cut]
    others = kmeans_1d(kept, k - 1, seed=seed + section) if kept.size else np.zeros(0, np.float32)
    others = _rounded(others)
    others = others[others != 0]
    centroids = np.sort(np.concatenate([[0.0], others])).astype(np.float32)
    zero = int(np.searchsorted(centroids, 0.0))
    rest = np.delete(centroids, zero)
    indices = {}
    for name, p in params:
        w = p.detach().cpu().numpy().ravel()
        near = assign(w, rest) if rest.size else np.zeros(w.shape, np.uint8)
        near = near + (near >= zero)  # index into `centroids`, skipping the zero slot
        idx = np.where(np.abs(w) <= cut, zero, near).astype(np.uint8)
        indices[name] = idx.reshape(tuple(p.shape))
    return SectionCodebook(section, centroids, indices, exact=False)


def _rounded(centroids: np.ndarray) -> np.ndarray:
    """Centroids on the float16 grid, ascending and distinct (rounding may merge two)."""
    return np.unique(float16_grid(centroids))


def cluster_sections(
    model: nn.Module, example_input: torch.Tensor, clusters: int | list[int], seed: int = 0
) -> list[SectionCodebook]:
    """Replace every conv/linear weight in place by its section's nearest centroid.

    clusters: one int for all sections, or one per section (shallowest first).
    Returns the per-section codebooks and indices.
    """
    graph = capture(model, example_input)
    ks = per_section(clusters, graph.num_sections)
    books = []
    for s, params in enumerate(section_parameters(graph, model)):
        book = codebook_for(s, params, ks[s], seed=seed)
        with torch.no_grad():
            for name, p in params:
                values = torch.from_numpy(book.centroids[book.indices[name].astype(np.int64)])
                p.copy_(values.to(p.dtype))
        books.append(book)
    return books


# ---------------------------------------------------------------------------- KD retraining


class ClusteredWeight(nn.Module):
    """Parametrisation weight = centroids[indices]: indices fixed, centroids trainable.

    The centroids Parameter is shared by every layer of the section, so its
    gradient is the sum over all weights assigned to each centroid.
    """

    def __init__(self, indices: torch.Tensor, centroids: nn.Parameter):
        super().__init__()
        self.register_buffer("indices", indices.long())
        self.centroids = centroids

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return self.centroids[self.indices]


def attach_codebook(
    model: nn.Module,
    graph: Graph,
    section: int,
    k: int,
    seed: int = 0,
    zero_fraction: float = 0.0,
) -> nn.Parameter:
    """Cluster one section's weights and make its centroids the trainable parameters.

    With pruning (zero_fraction > 0) the zero centroid gets no gradient, so
    pruned weights stay exactly zero while the other centroids move.
    """
    from torch.nn.utils import parametrize

    params = section_parameters(graph, model)[section]
    book = codebook_for(section, params, k, seed=seed, zero_fraction=zero_fraction)
    centroids = nn.Parameter(torch.from_numpy(book.centroids.copy()))
    # d loss / d centroid is the SUM of its weights' gradients, which grows with
    # the cluster's population (thousands of weights): at a normal learning rate
    # that diverges. Divide by the population so a centroid moves like the mean
    # of its weights would.
    counts = np.zeros(len(book.centroids), np.float64)
    for idx in book.indices.values():
        counts += np.bincount(idx.ravel(), minlength=len(book.centroids))
    scale = torch.from_numpy((1.0 / np.maximum(counts, 1.0)).astype(np.float32))
    if zero_fraction > 0:
        scale[torch.from_numpy(book.centroids == 0)] = 0.0  # pruned weights stay exactly 0
    centroids.register_hook(lambda g: g * scale)
    modules = dict(model.named_modules())
    for name, _ in params:
        mod = modules[name.rsplit(".", 1)[0]]
        idx = torch.from_numpy(book.indices[name].astype(np.int64))
        parametrize.register_parametrization(
            mod, "weight", ClusteredWeight(idx, centroids), unsafe=True
        )
        mod.parametrizations.weight.original.requires_grad_(False)
    return centroids


def bake_codebooks(model: nn.Module) -> None:
    """Replace every ClusteredWeight parametrisation by its current centroid values, rounded
    to the float16 grid (see the module docstring; a shared centroid is rounded once)."""
    from torch.nn.utils import parametrize

    shared = {}  # one centroids Parameter per section, shared by its layers
    for mod in model.modules():
        if parametrize.is_parametrized(mod, "weight"):
            for p in mod.parametrizations["weight"]:
                if isinstance(p, ClusteredWeight):
                    shared[id(p.centroids)] = p.centroids
    with torch.no_grad():
        for c in shared.values():
            c.copy_(torch.from_numpy(float16_grid(c.detach().cpu().numpy())))
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
            mod.weight.requires_grad_(True)


def trainable_after_clustering(model: nn.Module, centroids: list[nn.Parameter]) -> list:
    """Centroids of clustered sections + every parameter that is not a clustered weight."""
    frozen = {
        id(m.parametrizations.weight.original)
        for m in model.modules()
        if hasattr(m, "parametrizations") and "weight" in m.parametrizations
    }
    seen, out = set(), []
    for p in list(centroids) + list(model.parameters()):
        if id(p) not in frozen and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
