"""Removal plans: which MLP neurons each layer keeps, and into which kept neuron each removed one folds.

A selection method is a function `select(m: LayerMoments, keep: int, seed: int) -> Selection`, registered
in `SELECTORS`, so the project's methods and the baselines are interchangeable (one flag apart):

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

To add a method: write such a function and decorate it with `@register("name")`. A clustering written by
`neuroproj-prune cluster` becomes a plan as it is written with `Plan.from_clusters`.

Allocation across layers: `uniform` (the same width everywhere, rounded to a multiple) or `global`:
per-layer widths that minimise the summed refit error curves (`error_curve`, `allocate_by_error`; sequential
calibration), or, one-shot, from scores standardised within each layer, as FLAP does (`global_widths`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import adapter_for
from .errors import NeuroprojError
from .io import write_text
from .moments import correlation, energy, ridged
from .projection import fit_exact

FORMAT = "neuroproj-prune/plan/1"


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


SELECTORS: dict = {}


def register(name):
    def deco(fn):
        SELECTORS[name] = fn
        return fn
    return deco


def _top(scores: torch.Tensor, keep: int) -> Selection:
    idx = torch.topk(scores, keep).indices.sort().values
    return Selection(idx, scores)


@register("magnitude")
def select_magnitude(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.w_in * m.w_out, keep)


@register("random")
def select_random(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    g = torch.Generator().manual_seed(seed * 100003 + m.layer)
    return _top(torch.rand(m.N, generator=g, dtype=torch.float64), keep)


@register("wanda-sp")
def select_wanda_sp(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.w_out * m.G.diagonal().clamp(min=0).sqrt(), keep)


@register("flap")
def select_flap(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    return _top(m.var * m.w_out**2, keep)


@register("obs")
def select_obs(m: LayerMoments, keep: int, seed: int = 0, steps: int = 64) -> Selection:
    """Greedy structured OBS on H = G + λ·mean(diag G)·I, removing the b cheapest neurons per step
    (b = ⌈removals/steps⌉; b = 1 is the exact greedy) with the exact block downdate
    W ← W − W_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,:  and  H⁻¹ ← H⁻¹ − H⁻¹_:,B (H⁻¹_BB)⁻¹ H⁻¹_B,: .
    Cost O(steps·N²·b) per layer. Scores: removal step (later = more important), kept = N + 1."""
    N = m.N
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(ridged(m.G, m.ridge)))
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


@register("cluster")
def select_cluster(m: LayerMoments, keep: int, seed: int = 0) -> Selection:
    from sklearn.cluster import KMeans

    if m.points is None:  # the exact 3-D projection of this layer's correlation
        m.points = fit_exact(m.correlation(), dims=3)[0].double().cpu()
    km = KMeans(n_clusters=keep, n_init=1, random_state=seed).fit(m.points.double().numpy())
    return _clusters_to_selection(m, torch.as_tensor(km.labels_), keep)


@register("corr-cluster")
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


# ------------------------------------------------------------------------------------------ allocation
def layer_width(N: int, sparsity: float | None = None, keep: int | None = None, multiple: int = 64) -> int:
    """Kept width of a layer of N neurons: N·(1−s) (or `keep`), rounded to the nearest multiple of
    `multiple` when at least `multiple` neurons remain; never 0, never more than N."""
    if keep is not None and keep > N:
        raise NeuroprojError(f"keep {keep} exceeds the layer's {N} neurons: keep at most {N} (or give a sparsity)")
    k = keep if keep is not None else N * (1.0 - sparsity)
    if multiple > 1 and k >= multiple:
        k = multiple * round(k / multiple)
    k = int(round(k))
    if k < 1:
        raise NeuroprojError(f"a layer of {N} neurons would be pruned to zero width: lower the sparsity")
    return min(k, N)


def error_curve(m: LayerMoments, scores: torch.Tensor) -> torch.Tensor:
    """e(k), k = 0..N: the layer's output error E‖W h − W' h_K‖² after the least-squares refit, when K is the
    top-k of `scores`. With π the descending order and L = chol(G_ππ) (ridge as in the fold), the refit's
    error is the Schur complement of the kept block, so e(k) = Σ_{j≥k} ‖(W_:,π L)_:,j‖²: one Cholesky and
    one d×N×N product give the whole curve. O(N³)."""
    order = torch.argsort(scores, descending=True)
    c = (m.W[:, order] @ torch.linalg.cholesky(ridged(m.G[order][:, order], m.ridge))).pow(2).sum(0)
    return torch.cat([c.flip(0).cumsum(0).flip(0), c.new_zeros(1)])


def width_grids(Ns: dict[int, int], total_keep: int, multiple: int = 1, max_shift: float = 1.0) -> dict:
    """Each layer's allowed widths (ascending): multiples of `multiple` (and the full width N), with the layer's
    sparsity within ±max_shift of the mean sparsity 1 − total_keep/ΣN (at least 1 neuron)."""
    s = 1 - total_keep / sum(Ns.values())
    grids = {}
    for i, N in Ns.items():
        lo = max(1, int(N * (1 - min(1.0, s + max_shift))))
        hi = min(N, int(round(N * (1 - max(0.0, s - max_shift)))))
        k = torch.arange(lo, hi + 1)
        if multiple > 1:
            k = k[(k % multiple == 0) | (k == N)] if (k % multiple == 0).any() else k
        grids[i] = k
    return grids


def allocate_by_error(curves: dict[int, torch.Tensor], total_keep: int, multiple: int = 1,
                      max_shift: float = 1.0) -> dict[int, int]:
    """Per-layer widths k_i minimising Σ_i e_i(k_i) subject to Σ_i k_i ≈ total_keep (exact when
    multiple = 1), each layer's sparsity within ±max_shift of the mean one and k_i a multiple of `multiple`.

    Lagrangian: k_i(λ) = argmin_k e_i(k) + λ·k, λ bisected (log scale) until Σ k_i(λ) reaches the budget,
    then the remainder is taken greedily at the smallest marginal error. O(60·Σ N_i)."""
    Ns = {i: c.numel() - 1 for i, c in curves.items()}
    grids = width_grids(Ns, total_keep, multiple, max_shift)

    def widths(lam):
        return {i: int(grids[i][torch.argmin(curves[i][grids[i]] + lam * grids[i])]) for i in curves}

    lo_l, hi_l = -60.0, 20.0  # log10 λ: tiny λ keeps (almost) everything, huge λ keeps the minimum
    scale = max(float(c[0]) for c in curves.values()) / max(1, max(Ns.values()))
    for _ in range(60):
        mid = (lo_l + hi_l) / 2
        if sum(widths(scale * 10**mid).values()) > total_keep:
            lo_l = mid
        else:
            hi_l = mid
    k = widths(scale * 10**lo_l)  # the widest allocation still at or above the budget
    pos = {i: int((grids[i] == k[i]).nonzero()[0]) for i in k}
    excess = sum(k.values()) - total_keep
    while excess > 0:  # trim one grid step at a time, the cheapest per neuron first
        steps = {i: k[i] - int(grids[i][pos[i] - 1]) for i in k if pos[i] > 0}
        if not steps:
            break
        i = min(steps, key=lambda j: float(curves[j][grids[j][pos[j] - 1]] - curves[j][k[j]]) / steps[j])
        if steps[i] >= 2 * excess:  # the step would overshoot more than it closes (multiple > 1)
            break
        pos[i] -= 1
        k[i] = int(grids[i][pos[i]])
        excess -= steps[i]
    return k


def global_widths(scores: dict[int, torch.Tensor], total_keep: int, min_width: int = 1) -> dict[int, int]:
    """Per-layer widths: scores standardised within each layer, the top `total_keep` kept overall."""
    z = []
    for i, s in scores.items():
        s = torch.log(s.clamp(min=1e-30)) if (s > 0).all() else s
        z.append(((s - s.mean()) / s.std().clamp(min=1e-30), i))
    allz = torch.cat([a for a, _ in z])
    thr = torch.topk(allz, total_keep).values[-1]
    return {i: max(min_width, int((a >= thr).sum())) for a, i in z}


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class Plan:
    """Per layer: kept neurons (sorted), removed neurons and each one's representative; JSON on disk."""

    layers: dict[int, dict] = field(default_factory=dict)  # i -> {"keep": [...], "representative": {j: r}, "width": N}
    meta: dict = field(default_factory=dict)

    def keep(self, i) -> torch.Tensor:
        return torch.tensor(self.layers[i]["keep"], dtype=torch.long)

    def to_json(self) -> str:
        doc = {"format": FORMAT, "meta": self.meta,
               "layers": {str(i): {"width": d["width"], "keep": d["keep"],
                                   "representative": {str(k): v for k, v in d["representative"].items()}}
                          for i, d in sorted(self.layers.items())}}
        return json.dumps(doc, indent=1)

    def save(self, path) -> Path:
        """Write atomically (temporary file, then rename)."""
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan file; every layer index, width, kept index and representative must be a whole number
        (an edited plan with `1.5` or `"3"` is refused, not truncated)."""
        try:
            doc = json.loads(Path(path).read_text())
            assert isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc["layers"], dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError, KeyError, TypeError):
            raise NeuroprojError(f"{path} is not a readable neuroproj-prune plan file") from None
        layers = {}
        for i, d in doc["layers"].items():
            where = f"{path}: layer {i!r}"
            if not (isinstance(i, str) and i.isdigit()) or not isinstance(d, dict):
                raise NeuroprojError(f"{where}: layers must be keyed by layer numbers and hold objects")
            keep, rep = d.get("keep"), d.get("representative", {})
            if not isinstance(keep, list) or not all(_whole(j) for j in keep) or not _whole(d.get("width")):
                raise NeuroprojError(f"{where}: 'width' and every 'keep' entry must be whole numbers")
            if not isinstance(rep, dict) or not all(str(k).isdigit() and _whole(v) for k, v in rep.items()):
                raise NeuroprojError(f"{where}: 'representative' must map removed to kept neuron numbers")
            layers[int(i)] = {"width": d["width"], "keep": list(keep),
                              "representative": {int(k): v for k, v in rep.items()}}
        return cls(layers, doc.get("meta", {}) if isinstance(doc.get("meta"), dict) else {})

    @classmethod
    def from_clusters(cls, clusters, model) -> "Plan":
        """The plan a clustering describes, as written: each layer keeps its poles' representatives and its
        unclustered neurons; every other member folds into its pole's representative. Layers the clustering
        does not cover keep all their neurons."""
        a = adapter_for(model)
        p = cls(meta={"select": "clusters", "clusters": getattr(clusters, "path", None)})
        for i in clusters.layers:
            lc = clusters[i]
            N = a.width(model, i) if 0 <= i < a.num_layers(model) else lc.n_neurons
            if lc.n_neurons != N:
                raise NeuroprojError(f"the clustering of layer {i} has {lc.n_neurons} neurons, the model {N}: "
                                     f"it is for another model")
            keep = [int(j) for j in lc.keep()]
            kept, rep_of = set(keep), lc.representative_of()
            p.layers[i] = {"width": N, "keep": keep,
                           "representative": {j: int(rep_of[j]) for j in range(N) if j not in kept}}
        return p

    def check(self, model, fingerprint: str | None = None) -> None:
        """Refuse a plan that does not fit the model (layer count, widths, indices) or, given the model's
        `fingerprint`, one made for other weights."""
        a = adapter_for(model)
        L = a.num_layers(model)
        fp = self.meta.get("fingerprint")
        for i, d in self.layers.items():
            if not 0 <= i < L:
                raise NeuroprojError(f"the plan prunes layer {i} but the model has {L} layers: it is for another model")
            N = a.width(model, i)
            if d["width"] != N:
                raise NeuroprojError(f"the plan expects layer {i} to have {d['width']} neurons, the model has {N}: "
                                     f"it is for another model")
            k = d["keep"]
            if not k:
                raise NeuroprojError(f"the plan prunes layer {i} to zero width")
            if min(k) < 0 or max(k) >= N or len(set(k)) != len(k):
                raise NeuroprojError(f"the plan's kept indices for layer {i} are invalid (each in [0, {N}), "
                                     f"no repeats)")
            kept = set(k)
            bad = [(j, r) for j, r in d["representative"].items() if not (0 <= j < N and j not in kept and r in kept)]
            if bad:
                raise NeuroprojError(f"the plan's representatives for layer {i} are invalid ({bad[0][0]} -> "
                                     f"{bad[0][1]}): each removed neuron must fold into a kept one")
        if fp and fingerprint and fingerprint != fp:
            raise NeuroprojError("the plan was made for another model (its fingerprint differs from this model's): "
                                 "make the plan on this model")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_layer_plan(m: LayerMoments, sel: Selection) -> dict:
    rep = sel.representative
    keep = sel.keep.sort().values
    full = nearest_kept(m.correlation(), keep)
    if rep:
        full.update({j: r for j, r in rep.items() if j in full})
    return {"width": m.N, "keep": keep.tolist(), "representative": full}
