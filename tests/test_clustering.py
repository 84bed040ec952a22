"""Clustering: planted poles, k-means/k-medoids with exactly k clusters, correlation blocks, energy
representatives, the JSON round trip and the `cluster` command."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.analysis.clustering import LayerClusters, knee_eps
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.stats import Stats

SITE = "mlp.neurons"
FP = "test-fingerprint"


# ------------------------------------------------------------------------------------------- fixtures
def planted(seed=0, per=60, noise=40, sigma=0.03):
    """Four well-separated centres in R^3 with `per` points each, plus uniform noise; truth −1 = noise."""
    rng = np.random.default_rng(seed)
    centres = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, 0, 1]])
    X = np.concatenate([c + sigma * rng.standard_normal((per, 3)) for c in centres]
                       + [rng.uniform(-1.5, 1.5, (noise, 3))])
    truth = np.r_[np.repeat(np.arange(4), per), -np.ones(noise, dtype=int)]
    perm = rng.permutation(len(X))
    return X[perm], truth[perm]


def block_activations(blocks=(8, 6, 5, 4), singles=3, tokens=2000, seed=0):
    """Activations (tokens, N) whose neurons come in blocks of near-duplicates (some sign-flipped and
    scaled: |ρ| ≈ 1 within a block, ≈ 0 across), plus a few independent neurons. Returns (H, block id)."""
    rng = np.random.default_rng(seed)
    cols, ids = [], []
    for b, size in enumerate(blocks):
        z = rng.standard_normal(tokens)
        for j in range(size):
            sign = -1.0 if j % 3 == 2 else 1.0
            cols.append(sign * (1 + j) * (z + 0.02 * rng.standard_normal(tokens)) + 0.5)
            ids.append(b)
    for s in range(singles):
        cols.append(rng.standard_normal(tokens))
        ids.append(len(blocks) + s)
    perm = rng.permutation(len(cols))
    return np.stack(cols, 1)[:, perm], np.asarray(ids)[perm]


def brute_medoid(X, members):
    P = X[members]
    d = np.linalg.norm(P[:, None, :] - P[None, :, :], axis=-1).sum(1)
    return members[int(np.argmin(d))]


def write_projections(path, layers: dict[int, np.ndarray], fingerprint=FP):
    meta = {"format": "neuroproj-prune/projection/1", "layers": sorted(layers), "sites": [SITE],
            "stress": {str(i): {SITE: 0.1} for i in layers}, "stats_file": None, "model": "tiny",
            "fingerprint": fingerprint, "dims": 3, "mode": "exact"}
    save_file({f"layer.{i}.{SITE}": torch.as_tensor(P, dtype=torch.float32).contiguous() for i, P in layers.items()},
              str(path), metadata={"neuroproj_prune": json.dumps(meta)})
    return path


def make_stats(layers: dict[int, np.ndarray], fingerprint=FP) -> Stats:
    """A Stats object from activation matrices (tokens, N) per layer (shift 0: exact totals)."""
    t = {}
    for i, H in layers.items():
        H = torch.as_tensor(H, dtype=torch.float64)
        t[f"layer.{i}.{SITE}.count"] = torch.tensor([H.shape[0]], dtype=torch.int64)
        t[f"layer.{i}.{SITE}.shift"] = torch.zeros(H.shape[1], dtype=torch.float64)
        t[f"layer.{i}.{SITE}.sum"] = H.sum(0)
        t[f"layer.{i}.{SITE}.gram"] = H.T @ H
    meta = {"format": "neuroproj-prune/stats/1", "model": "tiny", "fingerprint": fingerprint,
            "layers": sorted(layers), "sites": [SITE], "num_layers": max(layers) + 1}
    return Stats(t, meta)


def ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


# -------------------------------------------------------------------------------------------- the core
def test_dbscan_auto_eps_recovers_planted_poles():
    X, truth = planted()
    lc = npp.cluster_points(torch.as_tensor(X, dtype=torch.float32))
    assert lc.eps is not None and 0 < lc.eps < 0.5
    real = truth >= 0
    assert ari(truth[real], lc.labels[real]) > 0.9
    assert lc.n_clusters == 4
    assert set(np.flatnonzero(lc.labels < 0)) == set(lc.noise)
    assert (truth[lc.noise] == -1).mean() > 0.8           # what DBSCAN calls noise is mostly planted noise
    sizes = [p.size for p in lc.poles]
    assert sizes == sorted(sizes, reverse=True)
    for p in lc.poles:                                      # ids are ranks, members/labels/reps agree
        assert np.array_equal(p.members, np.flatnonzero(lc.labels == p.id))
        assert lc.representatives[p.id] == p.representative
        assert p.representative in p.members
        assert p.representative == brute_medoid(X, p.members)
        assert p.density == pytest.approx(p.size / p.spread)
    # thinning every pole to its representative keeps representatives ∪ noise
    assert np.array_equal(lc.keep(), np.union1d(list(lc.representatives.values()), lc.noise))
    rep_of = lc.representative_of()
    assert all(rep_of[j] == lc.representatives[lc.labels[j]] for j in range(len(X)) if lc.labels[j] >= 0)
    assert np.array_equal(rep_of[lc.noise], lc.noise)


def test_knee_of_the_k_distance_curve():
    flat_then_steep = np.r_[np.linspace(0.01, 0.02, 90), np.linspace(0.5, 1.0, 10)]
    assert knee_eps(flat_then_steep) == pytest.approx(0.02)
    assert knee_eps(np.zeros(10)) > 0                       # exact duplicates: still a positive radius


def test_dbscan_explicit_eps_and_centroid():
    X, truth = planted(seed=1)
    lc = npp.cluster_points(X, "dbscan", eps=0.1, min_samples=4, representative="centroid")
    assert lc.eps == 0.1 and lc.min_samples == 4 and lc.n_clusters == 4
    for p in lc.poles:
        d = np.linalg.norm(X[p.members] - X[p.members].mean(0), axis=1)
        assert p.representative == p.members[int(np.argmin(d))]


@pytest.mark.parametrize("k", [1, 4, 7, 50])
def test_kmeans_returns_exactly_k_clusters(k):
    X, truth = planted()
    lc = npp.cluster_points(X, "kmeans", k=k, seed=0)
    assert lc.n_clusters == k and len(lc.noise) == 0 and lc.eps is None
    assert sorted(np.unique(lc.labels)) == list(range(k))
    for p in lc.poles:
        assert p.representative in p.members
        assert p.representative == brute_medoid(X, p.members)
    if k == 4:                                              # the planted poles (noise joins some cluster)
        real = truth >= 0
        assert ari(truth[real], lc.labels[real]) > 0.9


def test_kmeans_k_clusters_even_with_duplicate_points():
    X = np.repeat(np.eye(3), 5, axis=0)                     # 3 distinct points, 15 neurons
    lc = npp.cluster_points(X, "kmeans", k=6)
    assert lc.n_clusters == 6 and (np.bincount(lc.labels) > 0).all()


def test_bad_arguments_raise_one_line_errors():
    X, _ = planted()
    cases = [dict(algo="hdbscan"), dict(algo="kmeans", k=0), dict(algo="kmeans", k=len(X) + 1),
             dict(algo="kmeans"), dict(algo="dbscan", k=3), dict(algo="dbscan", eps=-1.0),
             dict(algo="dbscan", min_samples=len(X) + 1), dict(algo="kmeans", k=3, eps=0.1),
             dict(algo="dbscan", representative="energy"), dict(algo="dbscan", metric="cosine")]
    for kw in cases:
        with pytest.raises(NeuroprojError) as e:
            npp.cluster_points(X, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(NeuroprojError):
        npp.cluster_points(np.zeros((4, 4)), "dbscan", metric="precomputed", representative="centroid")
    with pytest.raises(NeuroprojError):
        npp.cluster_points(np.full((5, 3), np.nan))


def test_precomputed_correlation_blocks():
    H, block = block_activations()
    D = 1 - np.abs(np.corrcoef(H.T))
    np.fill_diagonal(D, 0)
    in_block = np.bincount(block)[block] > 1
    lc = npp.cluster_points(D, "dbscan", min_samples=3, metric="precomputed")
    assert lc.metric == "precomputed" and lc.n_clusters == 4
    assert ari(block[in_block], lc.labels[in_block]) == 1.0
    assert set(lc.noise) == set(np.flatnonzero(~in_block))  # the independent neurons are noise
    for p in lc.poles:
        sub = D[np.ix_(p.members, p.members)].sum(1)
        assert p.representative == p.members[int(np.argmin(sub))]
    # k-means is undefined on a distance matrix: k-medoids, exactly k clusters = the blocks (+ singles)
    km = npp.cluster_points(D, "kmeans", k=len(np.unique(block)), metric="precomputed", seed=1)
    assert km.n_clusters == len(np.unique(block))
    assert ari(block, km.labels) == 1.0
    assert npp.agreement(lc, npp.cluster_points(D, "dbscan", min_samples=3, metric="precomputed")) == 1.0


def test_energy_representative_is_the_most_energetic_member():
    X, _ = planted()
    energy = np.random.default_rng(3).uniform(0, 1, len(X))
    lc = npp.cluster_points(X, energy=energy)
    assert lc.representative == "energy"
    for p in lc.poles:
        assert p.representative == p.members[int(np.argmax(energy[p.members]))]
    with pytest.raises(NeuroprojError):
        npp.cluster_points(X, energy=energy[:-1])


def test_agreement():
    a = np.array([0, 0, 1, 1, -1, -1])
    assert npp.agreement(a, np.array([5, 5, 3, 3, -1, -1])) == 1.0
    assert npp.agreement(a, np.array([0, 0, 1, 1, 2, 2]), noise="ignore") == 1.0
    assert npp.agreement(a, np.array([0, 1, 0, 1, 2, 3])) < 0.5
    with pytest.raises(NeuroprojError):
        npp.agreement(a, a[:3])


# --------------------------------------------------------------------------------------- files and CLI
def test_cluster_json_round_trip(tmp_path):
    X0, _ = planted(seed=0)
    X1, _ = planted(seed=1)
    proj = write_projections(tmp_path / "proj.safetensors", {0: X0, 2: X1})
    out = tmp_path / "clusters.json"
    res = npp.cluster(proj, algo="dbscan", out=out)
    assert sorted(res) == [0, 2] and out.is_file()
    back = npp.load_clusters(out)
    assert back.meta["algo"] == "dbscan" and back.meta["site"] == SITE
    assert back.meta["projections"] == str(proj) and back.meta["fingerprint"] == FP
    for i in (0, 2):
        a, b = res[i], back[i]
        assert isinstance(b, LayerClusters)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.noise, b.noise)
        assert a.representatives == b.representatives and a.eps == b.eps
        assert [p.to_json() for p in a.poles] == [p.to_json() for p in b.poles]
    assert not list(tmp_path.glob(".*tmp*"))                # atomic write left nothing behind
    one = npp.cluster(proj, algo="kmeans", keep_fraction=0.25, layers="2")
    assert list(one) == [2] and one[2].n_clusters == round(0.25 * len(X1))
    with pytest.raises(NeuroprojError, match="not present"):
        npp.cluster(proj, layers="1")


def test_cluster_correlation_space_compare_and_energy(tmp_path):
    from conftest import tiny_model

    from neuroproj_prune.model import LoadedModel

    H, block = block_activations(blocks=(20, 16, 12, 8), singles=8)   # N = 64 = the tiny llama's MLP width
    st = make_stats({0: H})
    res = npp.cluster(None, algo="dbscan", min_samples=3, space="correlation", stats=st)
    assert res.meta["space"] == "correlation" and res[0].metric == "precomputed"
    in_block = np.bincount(block)[block] > 1
    assert ari(block[in_block], res[0].labels[in_block]) == 1.0

    # a projection that keeps the blocks: ARI against the correlation clustering is high
    rng = np.random.default_rng(0)
    centres = rng.uniform(-1, 1, (block.max() + 1, 3)) * 3
    P = centres[block] + 0.01 * rng.standard_normal((len(block), 3))
    proj = write_projections(tmp_path / "p.safetensors", {0: P})
    cmp = npp.cluster(proj, algo="dbscan", min_samples=3, stats=st, compare=True)
    assert cmp[0].extra["agreement"] > 0.9

    # energy representatives E[h²]·‖w_out‖² with a model
    lm = LoadedModel(tiny_model("llama", layers=1), None, "tiny", FP)
    res = npp.cluster(proj, algo="kmeans", k=10, stats=st, model=lm)
    W = lm.adapter.out_weight(lm.model, 0).double()
    energy = (torch.as_tensor(H) ** 2).mean(0) * (W ** 2).sum(0)
    assert res.meta["params"]["representative"] == "energy"
    for p in res[0].poles:
        assert p.representative == p.members[int(torch.argmax(energy[p.members]))]
    with pytest.raises(NeuroprojError, match="different models"):
        npp.cluster(proj, algo="kmeans", k=10, stats=make_stats({0: H}, fingerprint="other"), model=lm)


def test_cli_cluster(tmp_path, capsys):
    X, _ = planted()
    proj = write_projections(tmp_path / "proj.safetensors", {0: X, 1: X[::-1].copy()})
    out = tmp_path / "c.json"
    assert main(["cluster", str(proj), "--algo", "dbscan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer 0:" in text and "layer 1:" in text and "4 clusters" in text and "largest poles" in text
    assert sorted(npp.load_clusters(out)) == [0, 1]
    out2 = tmp_path / "k.json"
    assert main(["cluster", str(proj), "--algo", "kmeans", "--k", "9", "--layers", "1", "--out", str(out2)]) == 0
    assert npp.load_clusters(out2)[1].n_clusters == 9

    bad_file = tmp_path / "corrupt.safetensors"
    bad_file.write_bytes(b"not a safetensors file")
    bad = [[str(proj), "--algo", "optics"],
           [str(proj), "--algo", "kmeans", "--k", "0"],
           [str(proj), "--algo", "kmeans", "--k", str(len(X) + 1)],
           [str(tmp_path / "missing.safetensors"), "--algo", "dbscan"],
           [str(bad_file), "--algo", "dbscan"],
           [str(proj), "--algo", "dbscan", "--layers", "5"],
           [str(proj), "--algo", "dbscan", "--space", "correlation"]]
    for args in bad:
        target = tmp_path / "bad.json"
        capsys.readouterr()
        assert main(["cluster", *args, "--out", str(target)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("neuroproj-prune: error:") and "\n" not in err, (args, err)
        assert not target.exists()
