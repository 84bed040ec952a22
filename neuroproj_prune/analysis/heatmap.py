"""Ordering pictures: a layer's correlation heatmap in original order, in projection order (argsort of a 1-D
fit) and in spectral (Fiedler) order, as one PNG per (layer, site) — the seed's before/after figures.

Each panel's title carries the band score: mean |ρ| over pairs within `band` positions of the diagonal
(excluding the diagonal), which is what a good ordering raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, opt
from ..errors import NeuroprojError
from ..io import atomic_dir, check_same_weights, prepare_out_dir
from ..stats import SITES, Stats, load_stats, parse_layers
from .projection import Projections, fit_exact, load_projections


def band_score(rho: torch.Tensor, order: torch.Tensor | None = None, band: int | None = None) -> float:
    """Mean |ρ_ij| over 0 < |pos(i) − pos(j)| ≤ band in the given order (default band N/32, at least 1)."""
    N = rho.shape[0]
    r = rho if order is None else rho[order][:, order]
    band = band or max(1, N // 32)
    total, count = 0.0, 0
    for k in range(1, min(band, N - 1) + 1):
        dg = r.diagonal(offset=k).abs()
        total += float(dg.sum())
        count += dg.numel()
    return total / max(1, count)


def fiedler_order(rho: torch.Tensor) -> torch.Tensor:
    """Spectral order: argsort of the Fiedler vector of the normalised Laplacian of the affinity |ρ|
    (diagonal 0; dead neurons have degree 0 and get a tiny degree so that they sort to the middle)."""
    W = rho.to(torch.float64).abs()
    W.fill_diagonal_(0)
    deg = W.sum(1).clamp(min=1e-12)
    dinv = deg.rsqrt()
    M = dinv[:, None] * W * dinv[None, :]
    _, vecs = torch.linalg.eigh(M)          # ascending: the last is the trivial √deg vector
    f = vecs[:, -2] * dinv
    return f.argsort()


def projection_order(rho: torch.Tensor, P: torch.Tensor | None = None, **fit_kw) -> torch.Tensor:
    """argsort of a 1-D projection: P when it is 1-D, else a dims=1 exact fit of ρ computed now."""
    if P is not None and P.shape[1] == 1:
        return P[:, 0].argsort()

    P1, _ = fit_exact(rho, 1, **fit_kw)
    return P1[:, 0].argsort()


@dataclass
class HeatmapConfig(Config):
    """Every setting of `heatmap` (CLI flags, the recipe's `heatmaps` section, keywords of `heatmaps()`)."""

    what = "heatmap"

    layers: str = opt("0,-1", "layer SPEC such as 0-3,7 (negative indices count from the end)")
    site: str = opt("mlp.neurons", "the site pictured", SITES)
    band: int | None = opt(None, "band width of the reported mean |rho| (default N/32)", kind=int, ge=1)
    max_pixels: int = opt(1024, "the picture's side at most (larger layers are block-averaged)", ge=16)


def heatmaps(stats_or_path, config: HeatmapConfig | None = None, *, projections=None, out="heatmaps",
             progress: bool = True, overwrite: bool = False, **settings) -> list[Path]:
    """Write `layer{i}-{site}.png` per chosen layer into the directory `out` (written whole, atomically; an
    existing non-empty one only with `overwrite`); returns the paths.  `projections`: a Projections or a path
    (its 1-D points give the projection order; otherwise a 1-D fit is computed). `config` (or the
    `HeatmapConfig` fields as keywords) says which. Cost per layer: the N×N correlation, a 1-D projection and a
    Fiedler vector (O(N³) eigensolve)."""
    cfg = config.replace(**settings) if config is not None else HeatmapConfig.make(**settings)
    layers, site, band, max_pixels = cfg.layers, cfg.site, cfg.band, cfg.max_pixels
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    prepare_out_dir(out, overwrite)  # refuse before any work
    stats = stats_or_path if isinstance(stats_or_path, Stats) else load_stats(stats_or_path)
    proj = None
    if projections is not None:
        proj = projections if isinstance(projections, Projections) else load_projections(projections)
    if proj is not None:   # the order of another model's neurons would scramble this one's picture
        check_same_weights(statistics=stats.meta.get("fingerprint"), projections=proj.meta.get("fingerprint"))
    if site not in stats.sites:
        raise NeuroprojError(f"the statistics have no site {site} (sites {stats.sites})")
    lay = parse_layers(layers, stats.meta.get("num_layers", max(stats.layers) + 1))
    absent = [i for i in lay if i not in stats.layers]
    if absent:
        raise NeuroprojError(f"the statistics have no layers {absent} (layers {stats.layers})")
    names = []
    with atomic_dir(out, overwrite) as outdir:
        for i in tqdm(lay, desc="heatmap", disable=not progress, dynamic_ncols=True):
            names.append(_heatmap(plt, stats, proj, i, site, band, max_pixels, outdir))
    return [Path(out) / n for n in names]


def _heatmap(plt, stats, proj, i, site, band, max_pixels, outdir) -> str:
    rho = stats.correlation(i, site)
    N = rho.shape[0]
    P = None
    if proj is not None and i in proj.layers and site in proj.sites:
        P = proj.get(i, site)
        if P.shape[0] != N:
            raise NeuroprojError(f"projections of layer {i} have {P.shape[0]} points, the statistics {N} neurons")
    orders = [("original order", torch.arange(N)),
              ("projection order (1-D" + (" from file)" if P is not None and P.shape[1] == 1 else " fit)"),
               projection_order(rho, P)),
              ("spectral (Fiedler) order", fiedler_order(rho))]
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.3))
    step = max(1, -(-N // max_pixels))
    for ax, (name, order) in zip(axes, orders):
        r = rho[order][:, order]
        shown = r[::step, ::step] if step > 1 else r
        im = ax.imshow(shown.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nband mean |ρ| = {band_score(rho, order, band):.3f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="correlation ρ")
    fig.suptitle(f"layer {i}, {site}: N = {N}" + (f" (every {step}th neuron shown)" if step > 1 else ""))
    name = f"layer{i}-{site}.png"
    fig.savefig(outdir / name, dpi=100)
    plt.close(fig)
    return name
