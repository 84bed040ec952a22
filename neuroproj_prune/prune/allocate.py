"""Allocation: how many neurons each layer keeps. One registry, `ALLOCATIONS`, of functions
`allocate(calib: Calibration, cfg: PruneConfig) -> {layer: width}`:

    uniform   every layer keeps N·(1 − sparsity) (or `keep`), rounded to the width multiple: a standard checkpoint
    global    per-layer widths at the same total. With calibration text (sequential): the widths minimising the
              summed refit-error curves e_i(k) of the dense layers, measured in units of loss (`error_curves`,
              `allocate_by_error`); from dense statistics alone (one-shot): FLAP's scores standardised within
              each layer, the top ones kept overall (`flap_widths`)
    search    global's widths, refined by the pruned model's measured loss on held-back windows (search.py)

A new allocation is one function registered here; it reads what the calibration offers (`calib.ids`, the
calibration windows, `calib.held`, the held-back ones, `calib.moments(i)` for one-shot statistics).
Cost: uniform nothing; global one forward of the dense model over `alloc_samples` windows (+ one backward over a
quarter of them with `alloc_weights=layer-grad`, over all with `grad`), one N² Gram per token and layer, one O(N³)
Cholesky per layer (the layers' float32 Grams held at once only up to half the free memory: beyond it, one more
inference forward per further group of layers, `measure_curves`); search adds `search_rounds` forward + backward
passes over the held-back windows and O(L·N³) for the supernet.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import NeuroprojError
from ..model import LoadedModel
from ..registry import Registry
from ..stats import Moments, available_memory, cholesky, compute_autocast, hooked, ridged
from .fold import effective_ridge
from .measure import rms_token_weights
from .search import Supernet, activations_only, loss_and_grads, loss_backward, search_widths
from .select import SELECTORS, LayerMoments

ALLOCATIONS = Registry("allocation", "allocate(calib: Calibration, cfg: PruneConfig) -> {layer: width}")


# ------------------------------------------------------------------------------------------ the entries
@ALLOCATIONS.register("uniform")
def allocate_uniform(calib, cfg) -> dict[int, int]:
    """Every layer keeps N·(1 − sparsity) (or `keep`) neurons, rounded to the multiple."""
    return {i: layer_width(N, cfg.sparsity, cfg.keep, cfg.multiple) for i, N in calib.widths().items()}


def budget(calib, cfg) -> int:
    """The budget of the per-layer allocations: Σ_i N_i·(1 − sparsity) (or `keep` per layer), unrounded."""
    return sum(layer_width(N, cfg.sparsity, cfg.keep, 1) for N in calib.widths().values())


@ALLOCATIONS.register("global")
def allocate_global(calib, cfg) -> dict[int, int]:
    """Per-layer widths at the same total, by the dense layers' error curves (calibration text) or FLAP's
    standardised scores (dense statistics only)."""
    if calib.ids is None:
        return flap_widths({i: _scores(calib, cfg, i) for i in calib.widths()}, budget(calib, cfg))
    return allocate_by_error(_curves(calib, cfg), budget(calib, cfg), cfg.multiple, cfg.max_shift)


ALLOC_SAMPLES = 32   # the default of --alloc-samples, where the calibration has that many windows


def alloc_windows(calib, cfg) -> int:
    """How many calibration windows measure the error curves: `alloc_samples`, refused above the windows the
    calibration has (checked before the curves' passes); by default min(32, those windows)."""
    have = int(calib.ids.shape[0])
    if cfg.alloc_samples is None:
        return min(have, ALLOC_SAMPLES)
    if cfg.alloc_samples > have:
        raise NeuroprojError(f"--alloc-samples {cfg.alloc_samples}: the calibration has {have} windows to measure "
                             f"the error curves on: give at most {have}, or more --samples")
    return cfg.alloc_samples


def _curves(calib, cfg, fold_moments: dict | None = None) -> dict[int, torch.Tensor]:
    """The error curves of the dense layers on the first `alloc_windows` calibration windows (the layers the
    calibration prunes: none of those a plan removes whole)."""
    n = alloc_windows(calib, cfg)
    curves = error_curves(calib.lm, calib.ids[:n], select=cfg.select, weights=cfg.alloc_weights, seed=cfg.seed,
                          ridge=cfg.ridge, batch_size=max(1, 2048 // calib.ids.shape[1]), compute=calib.compute,
                          progress=calib.progress, fold_moments=fold_moments)
    kept = calib.widths()
    return {i: c for i, c in curves.items() if i in kept}


@ALLOCATIONS.register("search")
def allocate_search(calib, cfg) -> dict[int, int]:
    """`global`'s widths, refined by the measured loss of candidate allocations on the held-back windows
    (search.py); what it did goes into `calib.meta["search"]`."""
    if calib.ids is None or calib.held is None:
        raise NeuroprojError("allocation search needs the sequential calibration's text: use --calibration "
                             "sequential or --allocation global")
    fold = {}
    curves = _curves(calib, cfg, fold_moments=fold)
    widths = allocate_by_error(curves, budget(calib, cfg), cfg.multiple, cfg.max_shift)
    model, a = calib.lm.model, calib.lm.adapter
    net, fold = make_supernet(calib, cfg, fold), None   # the supernet holds what it needs
    grids = width_grids({i: c.numel() - 1 for i, c in curves.items()}, budget(calib, cfg), cfg.multiple,
                        cfg.max_shift)
    bs = max(1, 2048 // calib.held.shape[1])

    def measure(w):
        net.apply(w)
        return loss_and_grads(model, a, calib.held, list(w), batch_size=bs, compute=calib.compute)
    try:
        r = search_widths(net, widths, grids, measure, rounds=cfg.search_rounds, pairs=cfg.search_pairs,
                          stride=-(-cfg.search_step // cfg.multiple), progress=calib.progress)
    finally:
        net.restore()
    calib.meta["search"] = {"held_out_windows": int(calib.held.shape[0]), "rounds": r.rounds,
                            "loss_start": r.loss_start, "loss_end": r.loss_end, "moves": r.moves}
    return r.widths


def make_supernet(calib, cfg, fold: dict) -> Supernet:
    """The supernet (search.py) of the dense MLPs from the allocation pass's fold moments {layer: (G, mean)}: each
    layer's neurons in the selection's order, the ridge of `alloc_samples` windows."""
    model, a, n = calib.lm.model, calib.lm.adapter, alloc_windows(calib, cfg)
    orders = {}
    for i, (G, mean) in fold.items():
        W = a.out_weight(model, i).detach().double().cpu()
        m = LayerMoments(i, G, mean, W, a.in_norms(model, i), ridge=cfg.ridge)
        orders[i] = torch.argsort(SELECTORS[cfg.select](m, m.N, cfg.seed).scores, descending=True)
    ridge = effective_ridge(cfg.ridge, n * calib.ids.shape[1], max(calib.widths().values()), warn=False)
    return Supernet(model, a, fold, orders, ridge)


def _scores(calib, cfg, i: int) -> torch.Tensor:
    """FLAP's allocation scores of layer i from dense statistics; order-based selections (obs, clusters) allocate
    by FLAP's metric."""
    m = calib.moments(i)
    score_fn = SELECTORS[cfg.select] if cfg.select in ("magnitude", "wanda-sp", "flap") else SELECTORS["flap"]
    return score_fn(m, m.N, cfg.seed).scores


# ------------------------------------------------------------------------------------------ the maths
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
    c = (m.W[:, order] @ cholesky(ridged(m.G[order][:, order], m.ridge))).pow(2).sum(0)
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


def flap_widths(scores: dict[int, torch.Tensor], total_keep: int, min_width: int = 1) -> dict[int, int]:
    """Per-layer widths: scores standardised within each layer, the top `total_keep` kept overall."""
    z = []
    for i, s in scores.items():
        s = torch.log(s.clamp(min=1e-30)) if (s > 0).all() else s
        z.append(((s - s.mean()) / s.std().clamp(min=1e-30), i))
    allz = torch.cat([a for a, _ in z])
    thr = torch.topk(allz, total_keep).values[-1]
    return {i: max(min_width, int((a >= thr).sum())) for a, i in z}


def _trunk_forward(model, adapter, x, compute, upto: int | None = None) -> None:
    """The decoder layers on token ids x (no final norm or LM head), under autocast with `compute`; with `upto`, only
    the layers up to that one (the later ones are not run)."""
    def stop(key, out):
        raise _StopAfterTrunk

    last = adapter.layers(model)[-1 if upto is None else upto]
    with torch.inference_mode(), compute_autocast(x.device, compute), \
            hooked([(0, last, "out")], stop):
        try:
            model(input_ids=x, use_cache=False)
        except _StopAfterTrunk:
            pass


class _StopAfterTrunk(Exception):
    pass


@dataclass
class Curves:
    """What one pass of the dense model over the allocation windows measures, every error in one unit (per token,
    under the pass's token weights): `mlp` {layer: e_i(k), k = 0..N}; `attn` {layer: LayerMoments of the attention
    output projection's input, its G weighted like the MLP's} (the head costs are read from them, budget.py);
    `block` {layer: D_i = E_t[w_t‖x_i+1,t − x_i,t‖²], the cost of removing the whole layer}; `sub` {layer:
    A_i = E_t[w'_t‖a_i,t‖²], the cost of removing its attention sub-layer alone, a_i its output and w' the weight
    at that point of the stream (the gradient there under `grad`)}; `fold` {(site, layer):
    (E[h hᵀ], E[h])} under the fold's rms weights (what one-shot refits use)."""

    mlp: dict
    attn: dict = field(default_factory=dict)
    block: dict = field(default_factory=dict)
    sub: dict = field(default_factory=dict)
    fold: dict = field(default_factory=dict)


def error_curves(lm: LoadedModel, ids: torch.Tensor, *, select: str, weights: str = "grad", batch_size: int = 4,
                 seed: int = 0, ridge: float = 1e-7, compute=None, progress: bool = True,
                 fold_moments: dict | None = None) -> dict[int, torch.Tensor]:
    """The MLP error curves of `measure_curves` (its `fold` moments of the MLP into `fold_moments` when given)."""
    c = measure_curves(lm, ids, select=select, weights=weights, batch_size=batch_size, seed=seed, ridge=ridge,
                       compute=compute, progress=progress, fold=fold_moments is not None)
    if fold_moments is not None:
        fold_moments.update({i: v for (site, i), v in c.fold.items() if site == "mlp"})
    return c.mlp


def measure_curves(lm: LoadedModel, ids: torch.Tensor, *, select: str, weights: str = "grad", batch_size: int = 4,
                   seed: int = 0, ridge: float = 1e-7, compute=None, progress: bool = True, attn: bool = False,
                   blocks: bool = False, sublayers: bool = False, fold: bool = False,
                   gram_bytes: int | None = None) -> Curves:
    """Per layer i, e_i(k): the dense layer's output error after the least-squares refit when it keeps the
    top-k neurons of `select` (see `error_curve`), with token t weighted so that all layers share one
    unit. `grad`: w_t = ‖∂loss/∂x_i,t‖², the squared gradient of the summed next-token loss with respect to
    the residual stream after layer i; under an isotropic Fisher approximation an error δ_t there costs
    ΔL ≈ ½·w_t·‖δ_t‖²/d, so e_i(k) is in units of loss. `layer-grad`: w_t = s_i/mean(x_i,t²), each token as the
    next norm sees it and each layer in units of loss, s_i = Σ_t ‖∂loss/∂x_i,t‖² / Σ_t 1/mean(x_i,t²) over the
    first quarter of the windows (the only ones that take a backward pass): most of what `grad` buys is the layers'
    scale, not the per-token weights (SmolLM2 at 20 / 30 / 50 %: perplexity +0.6 / +0.4 / −1.0 % on WikiText-2,
    +1.3 / +0.4 / +2.3 % on TinyShakespeare against `grad`; eval/results/prune_speed.md).
    `head`: w_t = ‖∂loss/∂x_L,t‖², the gradient at the
    last layer's output, for every layer (no backward through the trunk: the later layers' own gain is ignored).
    `rms`: w_t = 1/mean(x_i,t²), the error as the next norm sees it (no backward pass, blind to how much later
    layers and the head amplify it). With `attn`, the same for the attention output projection's input (its
    weight under `grad`: the gradient at the attention's output, which is added to the residual stream), with
    `blocks` the cost of each whole layer and with `sublayers` that of each attention sub-layer (see `Curves`).

    Memory is bounded by design: the layers' float32 Grams (4·N² bytes per layer and site, twice with `fold`) are
    held for at most `gram_bytes` at once (default: half of the device's free memory, `layer_groups`). When all
    of them fit, one pass does everything; otherwise the first pass measures every token weight (and the block
    costs) and the Grams of the first group of layers, and each further group takes one forward of the trunk up
    to its last layer, its tokens weighted by what the first pass stored (tokens·layers floats).
    Cost: one forward (with grad one backward; with layer-grad one backward of the first quarter) of the dense
    model over `ids`, the LM head in chunks (grad, layer-grad's quarter, head),
    one N² Gram per token and layer in float32 products (`Moments`; and one (H·hd)² with `attn`), one O(N³)
    Cholesky per layer, plus one inference forward per further group; memory: one batch's activations, the
    group's Grams, and the finished `fold` moments (float64, host memory)."""
    model, a = lm.model, lm.adapter
    dev = next(model.parameters()).device
    L = a.num_layers(model)
    sites = ["mlp", "attn"] if attn else ["mlp"]
    proj = {"mlp": a.out_proj, "attn": a.attn_out_proj}
    width = {("mlp", i): a.width(model, i) for i in range(L)}   # attn: heads' channels (llama-family o_proj only)
    width.update({("attn", i): a.attn_out_proj(model, i).weight.shape[1] for i in range(L) if attn})
    per_layer = [4 * (2 if fold else 1) * sum(width[site, i] ** 2 for site in sites) for i in range(L)]
    if gram_bytes is None:
        gram_bytes = available_memory(dev) // 2
    groups = layer_groups(per_layer, gram_bytes)
    grabbed = {}
    mom, fmom = {}, {}
    block = {i: 0.0 for i in range(L)} if blocks else {}
    sub = {i: 0.0 for i in range(L)} if sublayers else {}
    stored = []   # per batch, {(site, i): w, ("rms", i): rms} of the first pass, when there are further groups
    out = Curves({})
    n = 0
    # layer-grad: the batches of the first quarter of the windows take the backward pass that measures the scales
    quarter = -(-ids.shape[0] // 4)
    grad_batches = -(-quarter // batch_size) if weights == "layer-grad" else 0
    sums = {}   # layer-grad: {(site, i): Σ‖∂loss/∂·‖², ("rms", i): Σ rms} over those batches

    def grab(key, t):
        if key[0] in ("out", "attn_out") and t.requires_grad:
            t.retain_grad()
        grabbed[key] = t if key[0] in ("out", "attn_out", "in") else t.detach()

    for gi, group in enumerate(groups):
        first = gi == 0
        points = [((site, i), proj[site](model, i), "in") for site in sites for i in group]
        if first:
            points += [(("out", i), layer, "out") for i, layer in enumerate(a.layers(model))]
            if (attn and weights in ("grad", "layer-grad")) or sublayers:
                points += [(("attn_out", i), a.attn_out_proj(model, i), "out") for i in range(L)]
            if blocks:
                points += [(("in", 0), a.layers(model)[0], "call")]
        desc = "allocate" if len(groups) == 1 else f"allocate (layers {group[0]}-{group[-1]})"
        with hooked(points, grab):
            for bi, b in enumerate(tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch",
                                        disable=not progress, dynamic_ncols=True)):
                x, g = ids[b:b + batch_size].to(dev), None
                if not first:        # the weights are the first pass's: only the group's activations are made
                    _trunk_forward(model, a, x, compute, upto=group[-1])
                    wb = stored[bi]
                elif weights == "grad" or bi < grad_batches:   # ‖∂loss/∂x_i,t‖²: one backward through the trunk
                    with activations_only(model):
                        loss_backward(model, a, x, compute)
                elif weights == "head":    # ‖∂loss/∂x_L,t‖², the last layer's, for every layer: no trunk backward
                    g = loss_backward(model, a, x, compute, trunk=False)[1].unsqueeze(1)
                else:
                    _trunk_forward(model, a, x, compute)
                with torch.no_grad():
                    if first:
                        wb = _token_weights(grabbed, L, sites, weights, g, fold, sub, block,
                                            sums if bi < grad_batches else None)
                        if len(groups) > 1:
                            stored.append(wb)
                        n += x.numel()
                    for i in group:   # every layer's Gram of the group at once: float32 totals (half of float64's
                        for site in sites:   # memory); float32 products, as the widths are a discrete choice that
                            w = wb[site, i]  # bfloat16 rounding moved (moments.py)
                            h = grabbed[(site, i)].reshape(w.shape[0], -1)
                            if (site, i) not in mom:
                                mom[site, i] = Moments(h.shape[1], dev, None, gram_dtype=torch.float32)
                                if fold:
                                    fmom[site, i] = Moments(h.shape[1], dev, None, gram_dtype=torch.float32)
                            mom[site, i].add(h, w)
                            if fold:
                                fmom[site, i].add(h, wb["rms", i])
                grabbed.clear()
        scale = {(site, i): g / sums["rms", i] for (site, i), g in sums.items() if site != "rms"}   # layer-grad
        for i in group:
            _finish_layer(out, lm, i, mom, fmom, sites, select, seed, ridge, n, attn, fold, scale)
    out.block = {i: v / n * scale.get(("mlp", i), 1.0) for i, v in block.items()}
    out.sub = {i: v / n * scale.get(("attn", i), 1.0) for i, v in sub.items()}
    return out


def layer_groups(per_layer: list[int], limit: int) -> list[list[int]]:
    """Consecutive layers packed so that each group's bytes (`per_layer`) stay within `limit`; one layer at least."""
    groups, used = [[]], 0
    for i, b in enumerate(per_layer):
        if groups[-1] and used + b > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += b
    return groups


def _token_weights(grabbed, L, sites, weights, g, fold, sub, block, sums=None) -> dict:
    """One batch of the first pass: each layer's and site's token weights {(site, i): w (tokens, 1)} (and the rms
    weights ("rms", i) the fold uses); the attention sub-layers' and whole layers' costs are added to `sub` and
    `block` on the way; with `sums` (layer-grad, a batch that took the backward pass) each site's summed squared
    gradient and summed rms weight are added to it."""
    wb = {}
    for i in range(L):
        o = grabbed[("out", i)]
        d = o.shape[-1]
        rms = rms_token_weights(o.detach().reshape(-1, d).float()).unsqueeze(1) \
            if weights in ("rms", "layer-grad") or fold else None
        wb["rms", i] = rms
        if sums is not None:
            sums["rms", i] = sums.get(("rms", i), 0.0) + float(rms.sum())
            for site in sites:
                src = o if site == "mlp" else grabbed[("attn_out", i)]
                sums[site, i] = sums.get((site, i), 0.0) + float(src.grad.float().pow(2).sum())
        if sub:   # the attention's output, under the weight at the point it is added
            at = grabbed[("attn_out", i)]
            wa = at.grad.reshape(-1, d).float().pow(2).sum(-1) if weights == "grad" else \
                (g if weights == "head" else rms).reshape(-1)
            sub[i] += float((wa * at.detach().float().reshape(-1, d).pow(2).sum(-1)).sum())
        for site in sites:
            if weights == "grad":
                src = o if site == "mlp" else grabbed[("attn_out", i)]
                wb[site, i] = src.grad.reshape(-1, d).float().pow(2).sum(-1, keepdim=True)
            else:
                wb[site, i] = g if weights == "head" else rms
        if block:
            args, kw = grabbed[("in", 0)] if i == 0 else ((grabbed[("out", i - 1)],), {})
            prev = args[0] if args else kw["hidden_states"]
            delta = (o.detach().float() - prev.detach().float()).reshape(-1, d)
            block[i] += float((wb["mlp", i].reshape(-1) * delta.pow(2).sum(-1)).sum())
    return wb


def _finish_layer(out: Curves, lm, i, mom, fmom, sites, select, seed, ridge, n, attn, fold, scale) -> None:
    """Layer i's curve (and head moments, fold moments) from its Grams, which are then freed; `scale` {(site, i): s}
    multiplies a site's errors (layer-grad: the Grams were weighted by rms alone)."""
    model, a = lm.model, lm.adapter
    W = a.out_weight(model, i).detach().double().cpu()
    N = W.shape[1]
    Gi, mean = mom["mlp", i].finish()
    # the fold's ridge rule keeps the Cholesky stable on few tokens (its warning belongs to the fold)
    m = LayerMoments(i, Gi, mean, W, a.in_norms(model, i), ridge=effective_ridge(ridge, n, N, warn=False))
    out.mlp[i] = error_curve(m, SELECTORS[select](m, N // 2, seed).scores) * (mom["mlp", i].weight / n) \
        * scale.get(("mlp", i), 1.0)
    if attn:   # the head costs are read from these moments: scaled so that refit errors share the MLP's unit
        Ga, mean_a = mom["attn", i].finish()
        Wo = a.attn_out_proj(model, i).weight.detach().double().cpu()
        unit = mom["attn", i].weight / n * scale.get(("attn", i), 1.0)
        out.attn[i] = LayerMoments(i, Ga * unit, mean_a, Wo, torch.ones(Wo.shape[1]),
                                   ridge=effective_ridge(ridge, n, Wo.shape[1], warn=False))
    for site in sites:
        del mom[site, i]
        if fold:
            out.fold[site, i] = fmom.pop((site, i)).finish()
