"""Clustering neurons into *poles*: DBSCAN and k-means, in the projected space or on the correlation distance.

Every neuron of a layer is a point: a row of the projection `P ∈ R^{N×n}` (`space="projection"`, Euclidean
distance ≈ 1 − ρ) or, for comparison, a row of the full correlation distance `D = 1 − |ρ|` (N×N,
`space="correlation"`, `metric="precomputed"`). `agreement` (adjusted Rand index) measures how much the
low-dimensional projection changes the clustering.

Definitions used throughout (and written to the JSON file):

- **labels** `(N,)`: cluster id per neuron, −1 for DBSCAN noise. Ids are pole ranks: 0 is the top pole.
- **spread** of a cluster: mean distance of its other members to its medoid (0 for a singleton).
- **density**: `size / max(spread, 1e-9)` — neurons per unit of distance; large for big, tight poles.
- **poles**: all clusters ranked by size (descending), then density (descending), then smallest member.
- **representative** of a cluster (the neuron kept when the pole is thinned):
  `medoid` — the member with the least summed distance to the other members (default);
  `centroid` — the member nearest the members' mean (coordinates only, not with `precomputed`);
  `energy` — the member with the largest activation energy `E[h²]·‖w_out‖²` (needs `energy`).
- **eps** (DBSCAN, when not given): from the k-distance curve with k = `min_samples`. For each point,
  d_k = distance to its k-th nearest neighbour counting the point itself (exactly the radius at which
  sklearn's DBSCAN makes it a core point). Sorted ascending and normalised to [0, 1] on both axes, the
  curve's knee is the point farthest below the chord from the first to the last point (Kneedle:
  argmax of x − y); eps is d_k there (floored at 1e-9·max(1, max d_k) so that exact duplicates cluster).
- **k-means** (`algo="kmeans"`, k = neurons to keep): sklearn KMeans (k-means++, `seed`); a cluster left
  empty (fewer distinct points than k) is refilled with the point farthest from its centroid, so there are
  always exactly k clusters. With `metric="precomputed"` k-means is not defined: k-medoids (k-medoids++
  initialisation, then alternating assignment / medoid update) is used instead, also with exactly k clusters.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..io import check_same_weights, write_text
from ..model import LoadedModel, load_model
from ..registry import Registry
from ..stats import SITES, Stats, energy, load_stats, parse_layers
from .projection import load_projections

FORMAT = "neuroproj-prune/clusters/1"
METRICS = ("euclidean", "precomputed")
SPACES = ("projection", "correlation")
_BLOCK = 1 << 22  # elements of one block of pairwise distances (32 MiB in float64)


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Pole:
    """One cluster: `id` (= its rank), sorted `members`, `size`, `spread`, `density`, `representative`."""

    id: int
    members: np.ndarray
    size: int
    spread: float
    density: float
    representative: int

    def to_json(self) -> dict:
        return {"id": self.id, "size": self.size, "density": self.density, "spread": self.spread,
                "representative": self.representative, "members": [int(x) for x in self.members]}

    @classmethod
    def from_json(cls, d: dict) -> "Pole":
        return cls(int(d["id"]), np.asarray(d["members"], dtype=np.int64), int(d["size"]), float(d["spread"]),
                   float(d["density"]), int(d["representative"]))


@dataclass
class LayerClusters:
    """The clustering of one layer's neurons. See the module docstring for the definitions."""

    labels: np.ndarray                 # (N,) int64, −1 = noise, ids are pole ranks
    poles: list[Pole]                  # ranked: size desc, density desc
    representatives: dict[int, int]    # cluster id → neuron index
    noise: np.ndarray                  # sorted indices of noise neurons (DBSCAN only)
    eps: float | None                  # the DBSCAN radius used (None for k-means)
    algo: str = "dbscan"
    metric: str = "euclidean"
    representative: str = "medoid"     # how representatives were chosen
    min_samples: int | None = None
    k: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_neurons(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_clusters(self) -> int:
        return len(self.poles)

    def keep(self) -> np.ndarray:
        """Neurons that survive thinning every pole to its representative: representatives ∪ noise (sorted)."""
        return np.union1d(np.fromiter(self.representatives.values(), dtype=np.int64,
                                      count=len(self.representatives)), self.noise).astype(np.int64)

    def representative_of(self) -> np.ndarray:
        """(N,) int64: each neuron's cluster representative; noise neurons map to themselves."""
        out = np.arange(self.n_neurons, dtype=np.int64)
        reps = np.array([self.representatives[c] for c in range(len(self.poles))], dtype=np.int64)
        m = self.labels >= 0
        out[m] = reps[self.labels[m]]
        return out

    def to_json(self) -> dict:
        return {
            "n_neurons": self.n_neurons, "n_clusters": self.n_clusters, "algo": self.algo, "metric": self.metric,
            "representative": self.representative, "eps": self.eps, "min_samples": self.min_samples, "k": self.k,
            "labels": [int(x) for x in self.labels], "noise": [int(x) for x in self.noise],
            "representatives": {str(c): int(r) for c, r in self.representatives.items()},
            "poles": [p.to_json() for p in self.poles], **self.extra,
        }

    def check(self, where: str) -> None:
        """Refuse a clustering that is not one: labels in [−1, n_clusters) for the N neurons (−1: noise, exactly the
        `noise` list), one representative per cluster, a neuron of that cluster, poles whose members carry their
        label. Cost: O(N)."""
        N, K = self.n_neurons, self.n_clusters
        lab = self.labels
        bad = f"{where}: the clustering is damaged or edited"
        if lab.ndim != 1 or N < 1 or (lab.size and (lab.min() < -1 or lab.max() >= K)):
            raise NeuroprojError(f"{bad} (labels must lie in [-1, {K}) for its {K} clusters): re-run cluster")
        if sorted(self.representatives) != list(range(K)) or any(
                not 0 <= r < N or lab[r] != c for c, r in self.representatives.items()):
            raise NeuroprojError(f"{bad} (each of its {K} clusters needs a representative among its own members, a "
                                 f"neuron in [0, {N})): re-run cluster")
        if sorted(int(x) for x in self.noise) != [int(j) for j in np.flatnonzero(lab < 0)]:
            raise NeuroprojError(f"{bad} (the noise list differs from the neurons labelled -1): re-run cluster")
        for p in self.poles:
            m = np.asarray(p.members, dtype=np.int64)
            if not 0 <= p.id < K or (m.size and (m.min() < 0 or m.max() >= N)) or (lab[m] != p.id).any() or \
                    m.size != int((lab == p.id).sum()):
                raise NeuroprojError(f"{bad} (pole {p.id}'s members do not carry its label): re-run cluster")

    @classmethod
    def from_json(cls, d: dict) -> "LayerClusters":
        known = {"n_neurons", "n_clusters", "algo", "metric", "representative", "eps", "min_samples", "k", "labels",
                 "noise", "representatives", "poles"}
        return cls(
            labels=np.asarray(d["labels"], dtype=np.int64),
            poles=[Pole.from_json(p) for p in d["poles"]],
            representatives={int(c): int(r) for c, r in d["representatives"].items()},
            noise=np.asarray(d["noise"], dtype=np.int64),
            eps=None if d.get("eps") is None else float(d["eps"]),
            algo=d.get("algo", "dbscan"), metric=d.get("metric", "euclidean"),
            representative=d.get("representative", "medoid"), min_samples=d.get("min_samples"), k=d.get("k"),
            extra={k: v for k, v in d.items() if k not in known},
        )


class Clusters(dict):
    """`{layer: LayerClusters}` plus `.meta` (algo, parameters, input files, site). What `cluster` returns
    and `load_clusters` reads back."""

    def __init__(self, layers: dict | None = None, meta: dict | None = None, path: str | None = None):
        super().__init__(layers or {})
        self.meta = dict(meta or {})
        self.path = path

    @property
    def layers(self) -> list[int]:
        return sorted(self)

    def to_json(self) -> dict:
        return {**self.meta, "layers": {str(i): self[i].to_json() for i in sorted(self)}}

    def save(self, path) -> Path:
        """Write one JSON file atomically (temporary file in the same directory, then rename)."""
        write_text(path, json.dumps(self.to_json(), allow_nan=False) + "\n")
        self.path = str(path)
        return Path(path)


def load_clusters(path) -> Clusters:
    """Read a clusters JSON written by `cluster(..., out=...)`; one-line errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise NeuroprojError(f"clusters file {path} not found")
    try:
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise NeuroprojError(f"{path} is not a neuroproj-prune clusters file (format "
                                 f"{d.get('format') if isinstance(d, dict) else None!r})")
        layers = {int(i): LayerClusters.from_json(v) for i, v in d["layers"].items()}
        for i, lc in layers.items():
            lc.check(f"{path}: layer {i}")
    except NeuroprojError:
        raise
    except Exception as e:
        raise NeuroprojError(f"{path} is not a readable clusters file ({type(e).__name__}): re-run cluster") from None
    meta = {k: v for k, v in d.items() if k != "layers"}
    return Clusters(layers, meta, str(path))


# --------------------------------------------------------------------------------------------- helpers
def _as_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.isfinite(a).all():
        raise NeuroprojError(f"{name} contains non-finite values")
    return a


def _summed_distances(X: np.ndarray | None, D: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """Σ_j d(i, j) over j ∈ idx, for every i ∈ idx. Blocks of rows keep memory at O(_BLOCK)."""
    s = idx.shape[0]
    if D is not None:
        if s * s <= _BLOCK:
            return D[np.ix_(idx, idx)].sum(1)
        out = np.empty(s)
        step = max(1, _BLOCK // s)
        for b in range(0, s, step):
            out[b:b + step] = D[np.ix_(idx[b:b + step], idx)].sum(1)
        return out
    P = torch.from_numpy(np.ascontiguousarray(X[idx]))
    out = torch.empty(s, dtype=torch.float64)
    step = max(1, _BLOCK // s)
    for b in range(0, s, step):
        out[b:b + step] = torch.cdist(P[b:b + step], P, compute_mode="donot_use_mm_for_euclid_dist").sum(1)
    return out.numpy()


def k_distances(X: np.ndarray | None, D: np.ndarray | None, k: int) -> np.ndarray:
    """Distance of every point to its k-th nearest neighbour, the point itself counting as the first."""
    if D is not None:
        return np.partition(D, k - 1, axis=1)[:, k - 1]
    from sklearn.neighbors import NearestNeighbors

    dist, _ = NearestNeighbors(n_neighbors=k).fit(X).kneighbors(X)
    return dist[:, k - 1]


def knee_eps(kdist: np.ndarray) -> float:
    """Knee of the sorted k-distance curve: the point farthest below the chord (Kneedle, argmax x − y on
    the curve normalised to [0, 1]²); floored at 1e-9·max(1, max) so that DBSCAN's eps is positive."""
    y = np.sort(np.asarray(kdist, dtype=np.float64))
    floor = 1e-9 * max(1.0, float(y[-1]))
    if y.shape[0] < 3 or y[-1] - y[0] <= 0:
        return max(float(y[-1]), floor)
    x = np.linspace(0.0, 1.0, y.shape[0])
    yn = (y - y[0]) / (y[-1] - y[0])
    return max(float(y[int(np.argmax(x - yn))]), floor)


def _kmedoids(D: np.ndarray, k: int, seed: int, max_iter: int = 100) -> np.ndarray:
    """Alternating k-medoids on a distance matrix with k-medoids++ seeding; exactly k non-empty clusters."""
    N = D.shape[0]
    rng = np.random.default_rng(seed)
    med = [int(rng.integers(N))]
    closest = D[med[0]].copy()
    for _ in range(1, k):
        w = closest.copy()
        w[med] = 0
        if w.sum() <= 0:  # fewer distinct points than k: any point that is not yet a medoid
            rest = np.setdiff1d(np.arange(N), med)
            c = int(rng.choice(rest))
        else:
            c = int(rng.choice(N, p=w / w.sum()))
        med.append(c)
        np.minimum(closest, D[c], out=closest)
    med = np.asarray(med, dtype=np.int64)
    labels = None
    for _ in range(max_iter):
        new = D[:, med].argmin(1)
        new[med] = np.arange(k)  # a medoid always belongs to its own cluster
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            idx = np.flatnonzero(labels == c)
            med[c] = idx[int(np.argmin(_summed_distances(None, D, idx)))]
    return labels


def _fill_empty(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Give every empty k-means cluster one point: the point farthest from its own cluster's mean, taken
    from a cluster of size > 1."""
    labels = labels.copy()
    for c in range(k):
        if (labels == c).any():
            continue
        counts = np.bincount(labels, minlength=k)
        cand = np.flatnonzero(counts[labels] > 1)
        cent = np.stack([X[labels == j].mean(0) if counts[j] else np.zeros(X.shape[1]) for j in range(k)])
        far = cand[int(np.argmax(np.linalg.norm(X[cand] - cent[labels[cand]], axis=1)))]
        labels[far] = c
    return labels


# --------------------------------------------------------------------------------------------- the core
ALGORITHMS = Registry("clustering algo", "algo(A, X, D, N, metric, *, eps, min_samples, k, seed, n_init) -> "
                                         "(labels (N,), eps used or None)")


@ALGORITHMS.register("dbscan")
def _dbscan(A, X, D, N, metric, *, eps, min_samples, k, seed, n_init):
    """DBSCAN (`min_samples` default 5; `eps` from the knee of the k-distance curve when None)."""
    if k is not None:
        raise NeuroprojError("k / keep_fraction apply to kmeans, not dbscan")
    min_samples = 5 if min_samples is None else int(min_samples)
    if min_samples < 1:
        raise NeuroprojError(f"min_samples must be >= 1, got {min_samples}")
    if min_samples > N:
        raise NeuroprojError(f"min_samples {min_samples} exceeds the {N} neurons of the layer")
    if eps is None:
        used_eps = knee_eps(k_distances(X, D, min_samples))
    else:
        used_eps = float(eps)
        if not used_eps > 0 or not np.isfinite(used_eps):
            raise NeuroprojError(f"eps must be a positive number, got {eps}")
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=used_eps, min_samples=min_samples, metric=metric).fit(A).labels_, used_eps


@ALGORITHMS.register("kmeans")
def _kmeans(A, X, D, N, metric, *, eps, min_samples, k, seed, n_init):
    """k-means with k clusters (k-medoids on a precomputed distance matrix); empty clusters refilled."""
    if eps is not None or min_samples is not None:
        raise NeuroprojError("eps / min_samples apply to dbscan, not kmeans")
    if k is None:
        raise NeuroprojError("kmeans needs k (or keep_fraction): the number of neurons to keep")
    if int(k) != k or not 1 <= int(k) <= N:
        raise NeuroprojError(f"k must be an integer in [1, {N}] (the layer's neurons), got {k}")
    k = int(k)
    if D is not None:
        return _kmedoids(D, k, seed), None
    import warnings

    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than k: refilled below
        raw = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X).labels_
    return _fill_empty(X, raw.astype(np.int64), k), None


REPRESENTATIVES = Registry("representative", "pick(idx, m, X, E) -> the kept neuron of a cluster (idx: its members, "
                                             "m: the position of its medoid in idx)")
REPRESENTATIVES.register("medoid", lambda idx, m, X, E: idx[m])
REPRESENTATIVES.register("energy", lambda idx, m, X, E: idx[int(np.argmax(E[idx]))])
REPRESENTATIVES.register("centroid", lambda idx, m, X, E: idx[int(np.argmin(np.linalg.norm(X[idx] - X[idx].mean(0),
                                                                                            axis=1)))])


def cluster_points(points, algo: str = "dbscan", *, eps: float | None = None, min_samples: int | None = None,
                   k: int | None = None, energy=None, representative: str | None = None,
                   metric: str = "euclidean", seed: int = 0, n_init="auto") -> LayerClusters:
    """Cluster the N points of one layer and rank the clusters into poles.

    `points`: (N, n) coordinates (`metric="euclidean"`) or an (N, N) distance matrix
    (`metric="precomputed"`, e.g. `1 − |ρ|`), tensor or array. `algo`: `dbscan` (`eps`, `min_samples`,
    default 5; eps from the k-distance knee when None) or `kmeans` (`k` clusters, 1 ≤ k ≤ N; k-medoids
    with `precomputed`). `energy`: (N,) activation energy `E[h²]·‖w_out‖²`; `representative`: `medoid`
    (default), `centroid` or `energy` (the default when `energy` is given).

    Cost, coordinates: DBSCAN and the k-distance curve O(N log N) with a KD-tree (worse for large eps);
    k-means O(N·k·n) per iteration; medoids O(Σ_c s_c²·n) for cluster sizes s_c (≤ O(N²·n), blocked so
    that memory stays O(N + 4M)). Precomputed: O(N²) time for everything but k-medoids, which is
    O(N·k + Σ_c s_c²) per iteration; memory is the N×N matrix plus DBSCAN's neighbourhoods.
    """
    ALGORITHMS.check(algo)
    if metric not in METRICS:
        raise NeuroprojError(f"unknown metric {metric!r}: choose euclidean or precomputed")
    A = _as_array(points, "points")
    if A.ndim != 2 or A.shape[0] == 0:
        raise NeuroprojError(f"points must be a non-empty (N, n) array, got shape {tuple(A.shape)}")
    N = A.shape[0]
    X, D = (A, None) if metric == "euclidean" else (None, A)
    if D is not None:
        if D.shape != (N, N):
            raise NeuroprojError(f"a precomputed distance matrix must be square, got shape {tuple(D.shape)}")
        if (D < 0).any():
            raise NeuroprojError("a precomputed distance matrix must be non-negative")
    E = None
    if energy is not None:
        E = _as_array(energy, "energy").reshape(-1)
        if E.shape[0] != N:
            raise NeuroprojError(f"energy has {E.shape[0]} entries for {N} neurons")
    if representative is None:
        representative = "energy" if E is not None else "medoid"
    REPRESENTATIVES.check(representative)
    if representative == "energy" and E is None:
        raise NeuroprojError("energy representatives need the activation energy (statistics and the model)")
    if representative == "centroid" and D is not None:
        raise NeuroprojError("centroid representatives need coordinates, not a precomputed distance matrix")

    raw, used_eps = ALGORITHMS[algo](A, X, D, N, metric, eps=eps, min_samples=min_samples, k=k, seed=seed,
                                     n_init=n_init)
    raw = np.asarray(raw, dtype=np.int64)

    # per cluster: medoid, spread, density, representative
    info = []
    for c in np.unique(raw[raw >= 0]):
        idx = np.flatnonzero(raw == c)
        s = idx.shape[0]
        summed = _summed_distances(X, D, idx)
        m = int(np.argmin(summed))
        spread = float(summed[m] / (s - 1)) if s > 1 else 0.0
        rep = REPRESENTATIVES[representative](idx, m, X, E)
        info.append((int(c), idx, s, spread, s / max(spread, 1e-9), int(rep)))
    info.sort(key=lambda t: (-t[2], -t[4], int(t[1][0])))

    labels = np.full(N, -1, dtype=np.int64)
    poles = []
    for rank, (_, idx, s, spread, dens, rep) in enumerate(info):
        labels[idx] = rank
        poles.append(Pole(rank, idx.astype(np.int64), int(s), spread, float(dens), rep))
    return LayerClusters(
        labels=labels, poles=poles, representatives={p.id: p.representative for p in poles},
        noise=np.flatnonzero(labels < 0).astype(np.int64), eps=used_eps, algo=algo, metric=metric,
        representative=representative, min_samples=(5 if min_samples is None else int(min_samples))
        if algo == "dbscan" else None,
        k=k if algo == "kmeans" else None)


def agreement(labels_a, labels_b, *, noise: str = "singletons") -> float:
    """Adjusted Rand index between two clusterings of the same neurons (1 = identical, ≈0 = chance).

    `noise`: how label −1 counts — `singletons` (each noise neuron its own cluster, the default),
    `cluster` (all noise one cluster) or `ignore` (only neurons that are non-noise in both).
    """
    from sklearn.metrics import adjusted_rand_score

    a = np.asarray(labels_a.labels if isinstance(labels_a, LayerClusters) else labels_a, dtype=np.int64).copy()
    b = np.asarray(labels_b.labels if isinstance(labels_b, LayerClusters) else labels_b, dtype=np.int64).copy()
    if a.shape != b.shape:
        raise NeuroprojError(f"cannot compare clusterings of {a.shape[0]} and {b.shape[0]} neurons")
    if noise == "ignore":
        m = (a >= 0) & (b >= 0)
        a, b = a[m], b[m]
    elif noise == "singletons":
        for x in (a, b):
            n = x < 0
            x[n] = x.max(initial=-1) + 1 + np.arange(int(n.sum()))
    elif noise != "cluster":
        raise NeuroprojError(f"unknown noise mode {noise!r}: choose singletons, cluster or ignore")
    if a.shape[0] == 0:
        return float("nan")
    return float(adjusted_rand_score(a, b))


# -------------------------------------------------------------------------------------------- per model
def _load_projections(p):
    if hasattr(p, "get") and hasattr(p, "layers") and hasattr(p, "sites"):
        return p, getattr(p, "path", None)
    path = Path(p)
    if not path.is_file():
        raise NeuroprojError(f"projections file {path} not found")

    try:
        return load_projections(path), str(path)
    except NeuroprojError:
        raise
    except Exception as e:
        raise NeuroprojError(f"{path} is not a readable projections file ({type(e).__name__})") from None


def _select_layers(spec, available: list[int], what: str, num_layers: int | None = None) -> list[int]:
    """A layer SPEC (`0-3,7`, a list, None = all) restricted to the layers `available` in the input."""
    if spec is None or spec == "all" or spec == "":
        return sorted(available)

    num = max(int(num_layers or 0), max(available, default=-1) + 1)
    try:
        want = parse_layers(spec, num)
    except NeuroprojError as e:
        if "out of range" not in str(e):
            raise
        want = None
    missing = [str(i) for i in want if i not in available] if want is not None else [str(spec)]
    if missing:
        raise NeuroprojError(f"layer(s) {','.join(missing)} not present in {what} (layers {_fmt_layers(available)})")
    return want


def _fmt_layers(layers) -> str:
    layers = sorted(layers)
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def _energy(st, lm, layer, site, N):
    if site != "mlp.neurons":
        raise NeuroprojError(f"energy representatives need site mlp.neurons (the output projection), not {site}")
    e2 = (st.variance(layer, site) + st.mean(layer, site) ** 2).double()
    W = lm.adapter.out_weight(lm.model, layer).detach().double().cpu()
    if W.shape[1] != N or e2.shape[0] != N:
        raise NeuroprojError(f"layer {layer}: the model has {W.shape[1]} neurons, the statistics {e2.shape[0]}, "
                             f"the clustering input {N}")
    return energy(e2, W).numpy()


@dataclass
class ClusterConfig(Config):
    """Every setting of `cluster` (CLI flags, the recipe's `clustering` section, keywords of `cluster()`)."""

    what = "cluster"

    algo: str = opt("kmeans", "clustering algorithm (kmeans: k clusters, one kept neuron each; dbscan: density "
                    "poles)", lambda: ALGORITHMS)
    k: int | None = opt(None, "kmeans: clusters (= neurons kept) per layer", kind=int, ge=1)
    keep_fraction: float | None = opt(None, "kmeans: k = round(F * neurons) per layer (default 0.7 when k is not "
                                      "given)", kind=float, gt=0.0, le=1.0)
    eps: float | None = opt(None, "dbscan: radius (default: the knee of the k-distance curve)", kind=float, gt=0.0)
    min_samples: int | None = opt(None, "dbscan: min_samples (default 5)", kind=int, ge=1)
    site: str = opt("mlp.neurons", "the site clustered", SITES)
    layers: str | None = opt(None, "layer SPEC such as 0-3,7 (default: every layer of the input)", kind=str)
    space: str = opt("projection", "projection (the points) or correlation (1-|rho| from --stats, for comparison)",
                     SPACES)
    representative: str = opt("auto", "the kept neuron of each cluster: medoid, centroid, energy (the member with "
                              "most E[h^2]*||w_out||^2) or auto (energy with --model and --stats, else medoid)",
                              lambda: ("auto", *REPRESENTATIVES))
    compare: bool = opt(False, "also cluster 1-|rho| from --stats and report the adjusted Rand index per layer")
    seed: int = opt(0, "k-means initialisation", ge=0)

    def check(self) -> None:
        self.refuse_together("k", "keep_fraction")
        if self.algo == "dbscan" and (self.k is not None or self.keep_fraction is not None):
            raise ConfigError("k", "k / keep_fraction apply to kmeans, not dbscan")
        if self.algo == "kmeans" and (self.eps is not None or self.min_samples is not None):
            raise ConfigError("eps", "eps / min_samples apply to dbscan, not kmeans")

    @property
    def fraction(self) -> float | None:
        """The kept fraction k-means uses when no k is given."""
        if self.algo != "kmeans" or self.k is not None:
            return None
        return 0.7 if self.keep_fraction is None else self.keep_fraction


def cluster(projections=None, config: ClusterConfig | None = None, *, stats=None, model=None, out=None,
            progress: bool = False, **settings) -> Clusters:
    """Cluster every selected layer; returns `Clusters` (`{layer: LayerClusters}` with `.meta`).

    `projections`: a projections file or an object with `.get(layer, site)`, `.layers`, `.sites`, `.meta`
    (may be None with `space="correlation"`). `config` (or the `ClusterConfig` fields as keywords) says how:
    `space` `projection` (Euclidean on the points) or `correlation` (DBSCAN / k-medoids on `1 − |ρ|` from
    `stats`); `k` or `keep_fraction` (k = round(f·N), at least 1) for kmeans. `stats` (path or Stats) gives E[h²]
    and ρ; `model` (spec or LoadedModel) gives ‖w_out‖ — with both, representatives default to the most energetic
    member (`representative="auto"`), else the medoid. `compare=True` (needs `stats`, projection space) also
    clusters `1 − |ρ|` with the same parameters and stores the adjusted Rand index per layer as `agreement`.
    `out`: write one JSON file. Cost: see `cluster_points`, per layer.
    """
    cfg = config.replace(**settings) if config is not None else ClusterConfig.make(**settings)
    algo, eps, min_samples, k, keep_fraction = cfg.algo, cfg.eps, cfg.min_samples, cfg.k, cfg.fraction
    site, layers, space, representative, seed, compare = (cfg.site, cfg.layers, cfg.space, cfg.representative,
                                                          cfg.seed, cfg.compare)

    proj, proj_path = (None, None)
    if projections is not None:
        proj, proj_path = _load_projections(projections)
    elif space == "projection":
        raise NeuroprojError("clustering in the projection space needs a projections file")
    st = None
    if stats is not None:
        st = stats if isinstance(stats, Stats) else load_stats(stats)
    if space == "correlation" and st is None:
        raise NeuroprojError("clustering on the correlation distance needs the statistics (--stats)")
    if compare and (st is None or space != "projection"):
        raise NeuroprojError("compare needs the statistics (--stats) and the projection space")
    lm = None
    if model is not None:
        if st is None and representative in ("auto", "energy"):
            raise NeuroprojError("energy representatives need the statistics (--stats) as well as the model")
        lm = model if isinstance(model, LoadedModel) else load_model(model, dtype="float32", device="cpu")
    if representative == "energy" and (st is None or lm is None):
        raise NeuroprojError("energy representatives need the statistics (--stats) and the model (--model)")
    rep = representative if representative != "auto" else ("energy" if lm is not None else "medoid")

    # the inputs must describe the same weights
    prints = {"projections": (proj.meta or {}).get("fingerprint") if proj is not None else None,
              "statistics": st.meta.get("fingerprint") if st is not None else None,
              "model": lm.fingerprint if lm is not None else None}
    check_same_weights(**prints)
    prints = {k: v for k, v in prints.items() if v}

    if proj is not None:
        if site not in proj.sites:
            raise NeuroprojError(f"the projections have no site {site} (sites {', '.join(proj.sites)})")
        available, what = list(proj.layers), "the projections"
    else:
        if site not in st.sites:
            raise NeuroprojError(f"the statistics have no site {site} (sites {', '.join(st.sites)})")
        available, what = list(st.layers), "the statistics"
    num = (proj.meta or {}).get("num_layers") if proj is not None else st.meta.get("num_layers")
    chosen = _select_layers(layers, available, what, num)
    if st is not None and (space == "correlation" or compare or rep == "energy"):
        if site not in st.sites:
            raise NeuroprojError(f"the statistics have no site {site} (sites {', '.join(st.sites)})")
        missing = [i for i in chosen if i not in set(st.layers)]
        if missing:
            raise NeuroprojError(f"layer(s) {','.join(map(str, missing))} not present in the statistics "
                                 f"(layers {_fmt_layers(st.layers)})")

    def corr_distance(i):
        D = 1.0 - st.correlation(i, site).abs().numpy()
        np.clip(D, 0.0, 1.0, out=D)
        np.fill_diagonal(D, 0.0)  # dead neurons have ρ_ii = 0; they are still at distance 0 from themselves
        return D

    result = {}
    for i in chosen:
        if space == "projection":
            pts, metric = proj.get(i, site), "euclidean"
        else:
            pts, metric = corr_distance(i), "precomputed"
        N = int(pts.shape[0])
        kk = k if keep_fraction is None else max(1, int(round(float(keep_fraction) * N)))
        energy = _energy(st, lm, i, site, N) if rep == "energy" else None
        if st is not None and i in st.layers and site in st.sites and st.width(i, site) != N:
            raise NeuroprojError(f"layer {i}: the statistics have {st.width(i, site)} neurons, the projections {N}")
        lc = cluster_points(pts, algo, eps=eps, min_samples=min_samples, k=kk, energy=energy,
                            representative=rep, metric=metric, seed=seed)
        if compare:
            ref = cluster_points(corr_distance(i), algo, eps=eps, min_samples=min_samples, k=kk, energy=energy,
                                 representative=rep, metric="precomputed", seed=seed)
            lc.extra["agreement"] = agreement(lc, ref)
            lc.extra["correlation_clusters"] = ref.n_clusters
            lc.extra["correlation_noise"] = int(ref.noise.shape[0])
            lc.extra["correlation_eps"] = ref.eps
        result[i] = lc
        if progress:
            print(summary_line(i, lc), flush=True)

    meta = {
        "format": FORMAT, "algo": algo, "space": space, "site": site,
        "params": {"eps": eps, "min_samples": (5 if min_samples is None else int(min_samples)) if algo == "dbscan"
                   else None, "k": k, "keep_fraction": keep_fraction, "representative": rep, "seed": seed,
                   "metric": "euclidean" if space == "projection" else "precomputed"},
        "projections": proj_path, "stats": getattr(st, "path", None) if st is not None else None,
        "model": (lm.spec if lm is not None else
                  ((proj.meta or {}).get("model") if proj is not None else st.meta.get("model"))),
        "fingerprint": next(iter(prints.values()), None),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    res = Clusters(result, meta)
    if out is not None:
        res.save(out)
    return res


def summary_line(layer: int, lc: LayerClusters, top: int = 5) -> str:
    sizes = ", ".join(str(p.size) for p in lc.poles[:top]) or "-"
    eps = f", eps {lc.eps:.4g}" if lc.eps is not None else ""
    s = (f"layer {layer}: {lc.n_neurons} neurons, {lc.n_clusters} clusters, {lc.noise.shape[0]} noise{eps}; "
         f"largest poles {sizes}")
    if "agreement" in lc.extra:
        s += f"; ARI vs correlation {lc.extra['agreement']:.3f}"
    return s
