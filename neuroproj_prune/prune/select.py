"""Selection: which MLP neurons a layer keeps, and into which kept neuron each removed one folds.

A selection method is a function `select(m: LayerMoments, keep: int, seed: int) -> Selection`, an entry of
`SELECTORS`, so the project's methods and the baselines are interchangeable (one flag apart):

    magnitude   score_j = ‖w_in,j‖·‖w_out,j‖                (weights only)
    random      a uniformly random subset                     (seeded)
    wanda-sp    score_j = ‖w_out,j‖ · sqrt(E[h_j²])
    flap        score_j = Var(h_j) · ‖w_out,j‖²               (FLAP's fluctuation metric)
    obs         greedy removal of the neurons whose loss, after the optimal least-squares refit of the kept
                ones, grows least: Δ_j = ‖W_:,j‖² / [G⁻¹]_jj, then the exact downdate of W and G⁻¹
                (structured OBS, ZipLM/SlimGPT style), in ≤ 64 blocks per layer. O(64·N²·b).
    cluster     k-means (k = keep) of the neurons' projection (distance ≈ 1 − ρ; the exact projection of
                the layer's ρ unless `m.points` holds one): in each cluster the member with most energy
                E[h²]·‖w_out‖² is kept; the others fold into it (the seed's poles).
    corr-cluster the same, clustering the full correlation distance 1 − |ρ| (agglomerative, average link).

To add a method: write such a function and decorate it with `@SELECTORS.register("name")`.
`select_layer` turns a selection into the layer's plan entry {"width", "keep", "representative"}.
Cost: O(N log N) for the score-based methods, O(64·N²·b) for obs, a projection and k-means for cluster.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..analysis.projection import fit_exact
from ..model import adapter_for
from ..registry import Registry
from ..stats import cholesky, correlation, energy, ridged


# ------------------------------------------------------------------------------------------ per layer
@dataclass
class LayerMoments:
    """What a selection method may look at for one layer (float64, CPU).

    G: E[h hᵀ] (N×N, uncentred); mean: E[h]; W: the output map to preserve (d×N; the output projection,
    or, in sequential calibration, the least-squares map onto the target); w_in: input row norms (N,).
    """

    layer: int
    G: torch.Tensor
    mean: torch.Tensor
    W: torch.Tensor
    w_in: torch.Tensor
    points: torch.Tensor | None = None  # projection (N, n), when a method needs it
    ridge: float = 1e-4

    @property
    def N(self) -> int:
        return self.G.shape[0]

    @property
    def var(self) -> torch.Tensor:
        return (self.G.diagonal() - self.mean**2).clamp(min=0)

    @property
    def w_out(self) -> torch.Tensor:
        return self.W.norm(dim=0)

    def correlation(self) -> torch.Tensor:
        return correlation(self.G - torch.outer(self.mean, self.mean))

    @property
    def energy(self) -> torch.Tensor:
        return energy(self.G, self.W)


@dataclass
class Selection:
    keep: torch.Tensor                       # sorted kept indices
    scores: torch.Tensor | None = None       # per-neuron importance (for global allocation)
    representative: dict[int, int] | None = None  # removed neuron → kept neuron it folds into


SELECTORS = Registry("select", "select(m: LayerMoments, keep: int, seed: int) -> Selection")


def _top(scores: torch.Tensor, keep: int) -> Selection:
    idx = torch.topk(scores, keep).indices.sort().values
    return Selection(idx, scores)


@SELECTORS.register("magnitude")
def select_magnitude(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.w_in * m.w_out, keep)


@SELECTORS.register("random")
def select_random(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    g = torch.Generator().manual_seed(seed * 100003 + m.layer)
    return _top(torch.rand(m.N, generator=g, dtype=torch.float64), keep)


@SELECTORS.register("wanda-sp")
def select_wanda_sp(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.w_out * m.G.diagonal().clamp(min=0).sqrt(), keep)


@SELECTORS.register("flap")
def select_flap(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.var * m.w_out**2, keep)


@SELECTORS.register("obs")
def select_obs(m: LayerMoments, keep: int, seed: int = 0, steps: int = 64) -> Selection:
    """Greedy structured OBS on H = G + λ·mean(diag G)·I, removing the b cheapest neurons per step
    (b = ⌈removals/steps⌉; b = 1 is the exact greedy) with the exact block downdate
    W ← W − W_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,:  and  H⁻¹ ← H⁻¹ − H⁻¹_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,: .
    Cost O(steps·N²·b) per layer. Scores: removal step (later = more important), kept = N + 1."""
    N = m.N
    Hinv = torch.cholesky_inverse(cholesky(ridged(m.G, m.ridge)))
    W = m.W.clone()
    alive = torch.ones(N, dtype=torch.bool)
    order = torch.zeros(N, dtype=torch.float64)
    todo, step = N - keep, 0
    b = max(1, -(-todo // steps))
    while todo > 0:
        cost = (W * W).sum(0) / Hinv.diagonal().clamp(min=1e-30)
        cost[~alive] = float("inf")
        B = torch.topk(cost, min(b, todo), largest=False).indices
        S = torch.linalg.inv(Hinv[B][:, B])          # (b×b)
        R = S @ Hinv[B, :]                            # (b×N)
        W -= W[:, B] @ R
        Hinv -= Hinv[:, B] @ R
        alive[B] = False
        step += 1
        order[B] = step
        Hinv[B, :] = 0
        Hinv[:, B] = 0
        Hinv[B, B] = 1.0  # removed indices: inert, with a positive diagonal (their cost is masked anyway)
        todo -= B.numel()
    order[alive] = step + 1  # kept neurons rank above every removed one
    return Selection(alive.nonzero().flatten(), order)


def _clusters_to_selection(m: LayerMoments, labels: torch.Tensor, keep: int) -> Selection:
    """Keep the highest-energy member of each of the `keep` clusters; the others fold into it."""
    energy = m.energy
    reps, rep_of = [], {}
    for c in torch.unique(labels):
        members = (labels == c).nonzero().flatten()
        r = int(members[torch.argmax(energy[members])])
        reps.append(r)
        for j in members.tolist():
            if j != r:
                rep_of[j] = r
    keep_idx = torch.tensor(sorted(reps), dtype=torch.long)
    if keep_idx.numel() != keep:  # clustering can return fewer distinct clusters: top up by energy
        extra = torch.ones(m.N, dtype=torch.bool)
        extra[keep_idx] = False
        cand = extra.nonzero().flatten()
        add = cand[torch.topk(energy[cand], keep - keep_idx.numel()).indices]
        keep_idx = torch.cat([keep_idx, add]).sort().values
        for j in add.tolist():
            rep_of.pop(j, None)
    return Selection(keep_idx, energy, rep_of)


@SELECTORS.register("cluster")
def select_cluster(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    from sklearn.cluster import KMeans

    if m.points is None:  # the exact 3-D projection of this layer's correlation
        m.points = fit_exact(m.correlation(), dims=3)[0].double().cpu()
    km = KMeans(n_clusters=keep, n_init=1, random_state=seed).fit(m.points.double().numpy())
    return _clusters_to_selection(m, torch.as_tensor(km.labels_), keep)


@SELECTORS.register("corr-cluster")
def select_corr_cluster(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    from sklearn.cluster import AgglomerativeClustering

    dist = (1 - m.correlation().abs()).clamp(min=0).numpy()
    ag = AgglomerativeClustering(n_clusters=keep, metric="precomputed", linkage="average").fit(dist)
    return _clusters_to_selection(m, torch.as_tensor(ag.labels_), keep)


def nearest_kept(corr: torch.Tensor, keep: torch.Tensor) -> dict[int, int]:
    """For each removed neuron, the kept neuron with the largest |ρ| (its representative)."""
    N = corr.shape[0]
    removed = torch.ones(N, dtype=torch.bool)
    removed[keep] = False
    rem = removed.nonzero().flatten()
    if rem.numel() == 0:
        return {}
    best = corr[rem][:, keep].abs().argmax(1)
    return {int(j): int(keep[b]) for j, b in zip(rem, best)}


# ------------------------------------------------------------------------------------------ the layer plan
def layer_plan(m: LayerMoments, sel: Selection) -> dict:
    """The plan entry of a selection: kept indices (sorted) and, for every removed neuron, the kept one it folds
    into (the selection's choice, else the kept neuron with the largest |ρ|)."""
    rep = sel.representative
    keep = sel.keep.sort().values
    full = nearest_kept(m.correlation(), keep)
    if rep:
        full.update({j: r for j, r in rep.items() if j in full})
    return {"width": m.N, "keep": keep.tolist(), "representative": full}


def select_layer(model, m: LayerMoments, width: int, cfg) -> dict:
    """The layer plan {"width", "keep", "representative"} that `cfg.select` makes for `width` kept neurons.
    With `output_weighting=norms` the selection sees output errors as the downstream norms do (the fold's
    optimum does not depend on it)."""
    D = adapter_for(model).downstream_gain(model, m.layer) if cfg.output_weighting == "norms" else None
    if D is not None:
        m = dataclasses.replace(m, W=D[:, None] * m.W)
    return layer_plan(m, SELECTORS[cfg.select](m, width, cfg.seed))
