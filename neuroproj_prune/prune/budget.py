"""What a run removes: MLP neurons, attention heads, attention sub-layers, whole layers — set per axis, or split
from one budget.

Per axis (`sparsity`/`keep`, `head_sparsity`, `drop_attn`, `drop_layers`) a user says how much of each goes;
`resolve` then only picks the layers (layers.py). With one budget, `target_params` P and/or `target_speedup` S,
P·T parameters of the T in the decoder layers go and/or the predicted time per decoded token falls to 1/S of the
dense model's, split across the axes in `axes` by measured loss. Time is priced by the latency model (speed.py): a
removed layer saves attn + mlp + per_param·(its weights), a removed attention sub-layer attn + per_param·(its
weights), heads and MLP neurons per_param·(their weights); without a latency file by the bytes proxy (the weights
read per token, T + E with E the LM head's: S asks for (T + E)(1 − 1/S) parameters). Each candidate's MLPs remove
what the structure left of both targets:

    pieces     one pass of the dense model (allocate.measure_curves) prices every axis in one unit (per-token output
               errors under the loss-gradient weights, ≈ loss): e_i(k) the MLP refit error of layer i keeping k
               neurons, a_i(r) the o_proj refit error of layer i at head level r (the same level in every layer: a
               standard checkpoint; heads.head_levels), D_i the cost of removing layer i, A_i that of removing its
               attention sub-layer; the layers and the attention sub-layers are ranked by `layer_select` on the
               held-back windows
    candidates every head level r × the d first-ranked layers × the e first-ranked attention sub-layers of the
               others (d, e = 0, 1, … while they fit the budget), the rest of the budget from the MLP widths
               (allocation uniform or global); predicted cost Σ a_i(r) + Σ D_i + Σ A_i + Σ e_i(k_i)
    decision   the pieces are a local, additive model of the loss — it ranks, it does not decide: per head level
               the best-predicted shape and d = e = 0 (MLP only is always among them) are the finalists, with the
               best predicted that removes attention sub-layers and the first 1, 2 and 4 of them; the lowest loss
               on the held-back windows wins. `budget_judge` sequential (the default): each finalist is pruned by the
               sequential pass itself on `judge_samples` windows, on a copy of the model (api.py's trial); oneshot:
               each is applied at once to the dense model (the MLPs' and o_proj's least-squares refits from the
               pass's moments, the layers left out). The one-shot judge is cheaper but misleads: the sequential pass
               repairs the MLP-only finalist's errors layer by layer and not a removed layer's, so on SmolLM2 at
               35 % it chose layer 14 + MLP (71.9 perplexity after the pass) over MLP only (59.9)

Cost: the pass (allocation global's, plus an (H·hd)² Gram per layer and token), the layer scores (layers.py: ≈ L/2
forwards of the held-back windows for `loss`), per head level and layer one greedy OBS (heads.py), and per
finalist (≤ 2 per head level, ≤ 4 more with attention sub-layers) one forward of the held-back windows —
sequential: plus a sequential pass over `judge_samples` windows (judge_samples / samples of the prune's own pass;
memory: one copy of the model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import NeuroprojError
from .allocate import alloc_windows, allocate_by_error, layer_width, make_supernet, measure_curves
from .fold import chol_solve
from .heads import channels, check_heads, head_counts, head_levels, keep_heads, refit_error
from .layers import choose_layers, mean_loss
from .speed import Latency, read_latency, trunk_params

AXES = ("mlp", "heads", "attn", "layers")
LAYER_CANDIDATES = 8   # layers whose removal the budget measures (those of lowest influence); the rest rank after
ATTN_CANDIDATES = 12   # attention sub-layers whose removal it measures
ATTN_TRIALS = (1, 2, 4)   # counts of attention sub-layers (the cheapest alone first) always judged


@dataclass
class Shape:
    """What the loop removes: the per-axis settings (`cfg`, its budget resolved), the layers removed whole, and the
    MLP widths when the budget chose them (None: the allocation makes them from `cfg.sparsity`)."""

    cfg: object
    drop: list
    widths: dict | None = None
    no_attn: list = field(default_factory=list)   # attention sub-layers removed (their MLP stays)


# ------------------------------------------------------------------------------------------- parameters
def neuron_params(model, a, i) -> float:
    """Parameters one MLP neuron of layer i holds: its input rows (and their biases) and its output column."""
    inputs = sum(p.numel() for proj in a.in_projs(model, i) for p in proj.parameters())
    return (inputs + a.out_weight(model, i).numel()) / a.width(model, i)


def head_params_removed(model, a, i, level: float, mode: str) -> float:
    if level == 0:
        return 0.0
    H, KV = a.num_heads(model, i), a.num_kv_heads(model, i)
    heads, kv = head_counts(H, KV, level, mode)
    q, k = a.head_params(model, i)
    return (H - heads) * q + (KV - kv) * k


def speed_model(model, a, cfg) -> Latency:
    """What `target_speedup` is priced by: the latency file `cfg.latency` (checked against the model), else the
    bytes proxy (the weights read per token: decoder layers + LM head)."""
    if cfg.latency is not None:
        return read_latency(cfg.latency, model, a)
    return Latency.bytes_proxy(model.get_output_embeddings().weight.numel())


# ---------------------------------------------------------------------------------------------- resolve
def resolve(calib, cfg, trial=None) -> Shape:
    """The per-axis settings of a run: as given (the layers to drop chosen by `layer_select`), or split from the
    budget (see the module docstring). `trial(shape)`: the held-back loss after the sequential pass prunes a copy of
    the model to `shape` (the sequential judge; None: one-shot). What was measured goes into `calib.meta` ("layers",
    "budget")."""
    lm = calib.lm
    if not cfg.budgeted:
        drop, no_attn = [], []
        if cfg.drop_layers:
            drop, cost = choose_layers(lm, _judge(calib, cfg), cfg, cfg.drop_layers, calib.compute, calib.progress)
            calib.meta["layers"] = {"select": cfg.layer_select, "cost": _finite(cost), "drop": drop}
        if cfg.drop_attn:
            no_attn, cost = choose_layers(lm, _judge(calib, cfg), cfg, cfg.drop_attn, calib.compute, calib.progress,
                                          part="attn", exclude=drop)
            calib.meta["attention"] = {"select": cfg.layer_select, "cost": _finite(cost), "drop": no_attn}
        if cfg.head_sparsity:
            check_heads(lm.model, lm.adapter, cfg)
        return Shape(cfg, drop, no_attn=no_attn)
    return _split(calib, cfg, trial)


def _finite(cost: dict) -> dict:
    """Layer costs for JSON: the layers not measured (+inf) as null."""
    return {i: (v if math.isfinite(v) else None) for i, v in cost.items()}


def held_batch(calib, cfg) -> int:
    """Held-back windows per forward when a finalist is scored (`batch_size`, default ~4096 tokens)."""
    return cfg.batch_size or max(1, 4096 // calib.held.shape[1])


def _judge(calib, cfg):
    """The windows that judge: the held-back ones, else (influence needs no loss) the first calibration windows."""
    return calib.held if calib.held is not None else calib.ids[:cfg.search_samples]


@dataclass
class _Candidate:
    level: float
    drop: list
    attn: list
    widths: dict
    removed: float
    predicted: float
    speedup: float | None = None   # predicted by the speed model (with target_speedup)
    measured: float | None = None

    def describe(self, T) -> dict:
        return {"head_sparsity": self.level, "drop_layers": self.drop, "drop_attn": self.attn,
                "mlp_neurons": sum(self.widths.values()),
                "removed_fraction": round(self.removed / T, 4), "predicted": self.predicted,
                "predicted_speedup": None if self.speedup is None else round(self.speedup, 4),
                "held_out_loss": self.measured}


def _split(calib, cfg, trial) -> Shape:
    lm, axes = calib.lm, set(cfg.axes)
    model, a = lm.model, lm.adapter
    if calib.ids is None:
        raise NeuroprojError("a parameter budget is split by measured loss: it needs the sequential calibration's text")
    L, T = a.num_layers(model), trunk_params(model, a)
    P = cfg.target_params
    goal = P * T if P is not None else 0.0   # parameters to remove
    lat, time_goal = None, 0.0               # ms per token to save
    if cfg.target_speedup is not None:
        lat = speed_model(model, a, cfg)
        dense_ms = lat.ms(sum(a.has_attention(model, i) for i in range(L)), L, T)
        time_goal = dense_ms * (1 - 1 / cfg.target_speedup)
        if dense_ms / cfg.target_speedup <= lat.fixed * 1.05:   # refused before the pass measures anything
            raise NeuroprojError(f"a {cfg.target_speedup:g}x decode speed-up leaves {dense_ms / cfg.target_speedup:.4g} "
                                 f"of {dense_ms:.4g} per token, about what the LM head and sampling take alone "
                                 f"({lat.fixed:.4g}, {lat.source}): ask for at most {0.9 * dense_ms / lat.fixed:.2f}x")
    heads = "heads" in axes and a.heads_refusal(model) is None
    if axes == {"heads"} and not heads:
        raise NeuroprojError(a.heads_refusal(model))
    levels = head_levels(a.num_heads(model, 0), a.num_kv_heads(model, 0), cfg.head_groups) if heads else [0.0]
    subs = "attn" in axes and a.attn_refusal(model) is None
    n = alloc_windows(calib, cfg)
    c = measure_curves(lm, calib.ids[:n], select=cfg.select, weights=cfg.alloc_weights, seed=cfg.seed,
                       ridge=cfg.ridge, batch_size=max(1, 2048 // calib.ids.shape[1]), compute=calib.compute,
                       progress=calib.progress, attn=heads, blocks="layers" in axes, sublayers=subs, fold=True)
    order, layer_cost, attn_order, attn_cost = [], {}, [], {}
    if "layers" in axes:
        order, layer_cost = choose_layers(lm, _judge(calib, cfg), cfg, L - 1, calib.compute, calib.progress,
                                          candidates=min(L - 1, LAYER_CANDIDATES))
        order = sorted(order, key=layer_cost.get)
    if subs:   # the measured ones, cheapest first (a removed attention is never its layer's last part)
        attn_order, attn_cost = choose_layers(lm, _judge(calib, cfg), cfg, min(L, ATTN_CANDIDATES), calib.compute,
                                              calib.progress, candidates=min(L, ATTN_CANDIDATES), part="attn")
        attn_order = sorted(attn_order, key=attn_cost.get)

    # the heads each layer keeps at each level, and their cost
    hd, entries, head_cost = (a.head_dim(model) if heads else 0), {}, {}
    for r in levels[1:]:
        for i in range(L):
            m = c.attn[i]
            e = keep_heads(m, a.num_heads(model, i), a.num_kv_heads(model, i), hd, r, cfg.head_groups,
                           cfg.head_select)
            entries[r, i], head_cost[r, i] = e, refit_error(m, channels(e["keep"], hd))

    N = {i: a.width(model, i) for i in range(L)}
    nu = {i: neuron_params(model, a, i) for i in range(L)}
    layer_p = {i: sum(p.numel() for p in a.layers(model)[i].parameters()) for i in range(L)}
    attn_p = {i: a.attention_params(model, i) for i in attn_order}
    cands = []
    for r in levels:
        for d in range(len(order) + 1 if "layers" in axes else 1):
            drop = sorted(order[:d])
            ranked = [i for i in attn_order if i not in drop]
            for e in range(len(ranked) + 1):
                gone = sorted(ranked[:e])
                kept = [i for i in range(L) if i not in drop]
                removed = (sum(layer_p[i] for i in drop) + sum(attn_p[i] for i in gone)
                           + sum(head_params_removed(model, a, i, r, cfg.head_groups) for i in kept if i not in gone))
                rest = goal - removed   # parameters still to remove, from the MLPs (whose neurons cost only bytes)
                if lat is not None:
                    rest = max(rest if P is not None else -math.inf,
                               (time_goal - lat.saved(len(drop), len(gone), removed)) / lat.per_param * 1e6)
                if "mlp" in axes:
                    if rest < 0:
                        break
                    widths = _mlp_widths(c, cfg, {i: N[i] for i in kept}, nu, rest)
                    if widths is None:
                        continue
                elif rest > 0:
                    continue
                else:
                    widths = {i: N[i] for i in kept}
                removed += sum((N[i] - k) * nu[i] for i, k in widths.items())
                speedup = dense_ms / (dense_ms - lat.saved(len(drop), len(gone), removed)) if lat is not None else None
                pred = (sum(head_cost.get((r, i), 0.0) for i in kept if i not in gone) + sum(c.block[i] for i in drop)
                        + sum(c.sub[i] for i in gone) + sum(float(c.mlp[i][k]) for i, k in widths.items()))
                cands.append(_Candidate(r, drop, gone, widths, removed, pred, speedup))
                if "mlp" not in axes:
                    break   # the first e that reaches the budget
    if not cands:
        what = " and ".join(([f"remove {P:.0%} of the decoder layers' parameters"] if P is not None else []) +
                            ([f"reach a {cfg.target_speedup:g}x decode speed-up by the {lat.source} speed model"]
                             if lat is not None else []))
        raise NeuroprojError(f"no way to {what} with {', '.join(cfg.axes)} (the MLPs keep at least 10 percent of "
                             f"their neurons): add an axis (--axes {','.join(AXES)}) or lower the target")
    finalists = []
    for r in levels:   # per head level: the best predicted and MLP only (the pieces rank, the judge decides)
        mine = [x for x in cands if x.level == r]
        for x in ([min(mine, key=lambda x: x.predicted)] if mine else []) + \
                [x for x in mine if not x.drop and not x.attn][:1]:
            if x not in finalists:
                finalists.append(x)
    # and attention sub-layers: the best predicted, and the first 1, 2, 4 (beside the MLP) — their additive price
    # misses how fast removals compound (SmolLM2 at 35 %: eleven predicted best, measured far worse than MLP only)
    with_attn = [x for x in cands if x.attn]
    few = [x for x in with_attn if x.level == 0 and not x.drop and len(x.attn) in ATTN_TRIALS]
    for x in ([min(with_attn, key=lambda x: x.predicted)] if with_attn else []) + few:
        if x not in finalists:
            finalists.append(x)
    judge = cfg.budget_judge if trial is not None else "oneshot"
    if len(finalists) > 1 and judge == "sequential":
        for x in tqdm(finalists, desc="judge", unit="finalist", disable=not calib.progress, dynamic_ncols=True):
            x.measured = trial(_shape(cfg, x, N))
    elif len(finalists) > 1:
        _measure(calib, cfg, c, finalists, entries, hd)
    best = min(finalists, key=lambda x: x.measured) if len(finalists) > 1 else finalists[0]
    calib.meta["budget"] = {"target_params": P, "target_speedup": cfg.target_speedup,
                            "speed_model": None if lat is None else {"source": lat.source, **lat.to_json()},
                            "axes": list(cfg.axes), "trunk_params": T, "judge": judge,
                            "chosen": best.describe(T), "finalists": [x.describe(T) for x in finalists],
                            "candidates": len(cands), "layer_cost": _finite(layer_cost),
                            "attn_cost": _finite(attn_cost)}
    return _shape(cfg, best, N)


def _shape(cfg, x: _Candidate, N: dict) -> Shape:
    """The per-axis settings of candidate x (its MLP sparsity: the share of the kept layers' neurons it removes)."""
    kept_N = sum(N[i] for i in x.widths)
    resolved = cfg.replace(target_params=None, target_speedup=None, latency=None, keep=None, head_sparsity=x.level,
                           drop_layers=len(x.drop), drop_attn=len(x.attn), sparsity=1 - sum(x.widths.values()) / kept_N)
    return Shape(resolved, x.drop, x.widths, no_attn=x.attn)


def _mlp_widths(c, cfg, N: dict, nu: dict, rest: float) -> dict | None:
    """The MLP widths of the kept layers that remove `rest` parameters (None: more than 90 % of their neurons)."""
    mean_nu = sum(nu[i] for i in N) / len(N)
    total_keep = round(sum(N.values()) - rest / mean_nu)
    if total_keep < 0.1 * sum(N.values()):
        return None
    if cfg.allocation == "uniform":
        s = 1 - total_keep / sum(N.values())
        return {i: layer_width(n, s, None, cfg.multiple) for i, n in N.items()}
    return allocate_by_error({i: c.mlp[i] for i in N}, total_keep, cfg.multiple, cfg.max_shift)


def _measure(calib, cfg, c, finalists, entries, hd) -> None:
    """Each finalist's loss on the held-back windows, applied one-shot to the dense model (then restored)."""
    lm = calib.lm
    model, a = lm.model, lm.adapter
    net = make_supernet(calib, cfg, {i: v for (site, i), v in c.fold.items() if site == "mlp"})
    dense_o = {i: a.attn_out_proj(model, i).weight.detach().clone() for (site, i) in c.fold if site == "attn"}
    bs = held_batch(calib, cfg)
    try:
        for x in finalists:
            net.restore()
            net.apply(x.widths)
            for i, W in dense_o.items():
                o = a.attn_out_proj(model, i)
                o.weight.data.copy_(W if x.level == 0 or i in x.drop or i in x.attn else
                                    _refit_o(W, c.fold["attn", i], channels(entries[x.level, i]["keep"], hd), cfg.ridge))
            x.measured = mean_loss(lm, calib.held, calib.compute, bs, skip=set(x.drop), no_attn=set(x.attn))
    finally:
        net.restore()
        for i, W in dense_o.items():
            a.attn_out_proj(model, i).weight.data.copy_(W)


def _refit_o(W: torch.Tensor, moments, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """o_proj's least-squares refit on the kept channels, the removed ones zero (full width, W's dtype)."""
    G, _ = moments
    Wd = W.double().cpu()
    full = torch.zeros_like(Wd)
    full[:, keep] = chol_solve(G[keep][:, keep], (Wd @ G)[:, keep], ridge)
    return full.to(W.dtype).to(W.device)
