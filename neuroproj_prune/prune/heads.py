"""Attention heads: the second site of a layer, pruned by the same measure → select → fold path as MLP neurons.

The input of the attention output projection o_proj is the heads' outputs concatenated, z = [z_1 … z_H] (head h:
channels [h·hd, (h+1)·hd)), exactly as the input of the MLP's down projection is its neurons. So the statistics
are the Gram G = E[z zᵀ] of those channels (token-weighted as the neurons'), a head is a group of hd channels, and
removing a set of heads refits o_proj on the kept channels K by least squares, W'_K = (W G)_{:,K} G_KK⁻¹ (the
`lstsq` fold), before q/k/v/o are sliced.

Grouped-query attention: query head h reads key/value head h // g (g = H/KV query heads per group). A model stays
consistent two ways (`head_groups`): `query` — every group loses the same number of query heads (KV unchanged,
g' = g − r); `kv` — whole groups go, their query heads and their k/v rows (g unchanged). Uniform counts in every
layer keep a standard checkpoint (`num_attention_heads`, `num_key_value_heads`).

Selection (`HEAD_SELECTORS`, one signature `select(m: LayerMoments, units: list[list[int]], drop: int, per_group:
bool) -> list[int]`, the units being heads or groups as lists of head indices):
    obs       greedy: drop the unit whose removal, with the least-squares refit of the rest, adds the least output
              error e(K) = tr(W G Wᵀ) − tr(C_K G_KK⁻¹ C_Kᵀ), C = W G; exact, one Cholesky of ≤ H·hd per candidate
    wanda-sp  the units with the smallest Σ_c ‖W_:,c‖·√E[z_c²] over their channels
Cost per layer: obs O(units² · (H·hd)³) (SmolLM2: 9 heads of 64 — milliseconds); wanda-sp O(H·hd).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NeuroprojError
from ..registry import Registry
from ..stats import cholesky, ridged
from .fold import fold_layer
from .select import LayerMoments

HEAD_GROUPS = ("query", "kv")
HEAD_SELECTORS = Registry("head select", "select(m: LayerMoments, units, drop, hd, per_group) -> the dropped units")


def channels(heads, hd: int) -> torch.Tensor:
    return torch.tensor([c for h in heads for c in range(h * hd, (h + 1) * hd)], dtype=torch.long)


def refit_error(m: LayerMoments, keep: torch.Tensor) -> float:
    """The output error E‖W z − W'_K z_K‖² of the least-squares refit on the channels `keep`, A = G + λI with λ of
    the whole G: e(K) = tr(W G Wᵀ) − tr(C_K A_KK⁻¹ C_Kᵀ), C = W G. O(|K|³); the reference `select_obs` is checked
    against (its steps are downdates of this)."""
    A = ridged(m.G, m.ridge)
    C = m.W @ m.G
    total = float((C * m.W).sum())
    if keep.numel() == 0:
        return total
    L = cholesky(A[keep][:, keep])
    Y = torch.linalg.solve_triangular(L, C[:, keep].T, upper=False)
    return total - float((Y * Y).sum())


@HEAD_SELECTORS.register("obs")
def select_obs(m: LayerMoments, units, drop: int, hd: int, per_group=None) -> list[int]:
    """Greedy structured OBS: each step drops the unit (of those `per_group` still allows) whose removal, with the
    least-squares refit of the rest, adds the least output error. With M = A_KK⁻¹ and W' = C_K M the refit on the
    kept channels K, removing the channels U of one unit adds exactly ΔE_U = tr(W'_U (M_UU)⁻¹ W'_Uᵀ); M is then
    downdated, M ← M_K'K' − M_K'U M_UU⁻¹ M_UK'. Cost: one inverse of H·hd channels, then per step one downdate
    O((H·hd)²·|U|) and per candidate O(d·|U|² + |U|³)."""
    A = ridged(m.G, m.ridge)
    C = m.W @ m.G
    kept = list(range(m.G.shape[0]))              # channel positions still kept, in order
    M = torch.linalg.inv(A)
    alive, dropped = list(range(len(units))), []
    for _ in range(drop):
        pos = {c: p for p, c in enumerate(kept)}
        Wp = C[:, kept] @ M                            # the refit on the kept channels
        best, cost = None, None
        for u in alive:
            if per_group is not None and not per_group(dropped + [u]):
                continue
            U = torch.tensor([pos[c] for c in channels(units[u], hd).tolist()])
            Wu = Wp[:, U]
            e = float((Wu @ torch.linalg.inv(M[U][:, U]) * Wu).sum())
            if cost is None or e < cost:
                best, cost = u, e
        U = torch.tensor([pos[c] for c in channels(units[best], hd).tolist()])
        rest = torch.tensor([p for p in range(len(kept)) if p not in set(U.tolist())], dtype=torch.long)
        M = M[rest][:, rest] - M[rest][:, U] @ torch.linalg.solve(M[U][:, U], M[U][:, rest])
        kept = [kept[p] for p in rest.tolist()]
        alive.remove(best)
        dropped.append(best)
    return sorted(dropped)


@HEAD_SELECTORS.register("wanda-sp")
def select_wanda_sp(m: LayerMoments, units, drop: int, hd: int, per_group=None) -> list[int]:
    """The units with the smallest summed channel scores ‖W_:,c‖·√E[z_c²] (within each group's quota)."""
    score = m.W.norm(dim=0) * m.G.diagonal().clamp(min=0).sqrt()
    unit_score = [float(score[channels(u, hd)].sum()) for u in units]
    dropped = []
    for u in sorted(range(len(units)), key=lambda v: unit_score[v]):
        if len(dropped) == drop:
            break
        if per_group is None or per_group(dropped + [u]):
            dropped.append(u)
    return sorted(dropped)


def head_counts(H: int, KV: int, sparsity: float, mode: str) -> tuple[int, int]:
    """(query heads, key/value heads) a layer of H heads in KV groups keeps at `sparsity`, as `mode` allows."""
    g = H // KV
    if mode == "query":
        r = round(g * sparsity)
        return KV * (g - r), KV
    q = round(KV * sparsity)
    return (KV - q) * g, KV - q


def check_head_sparsity(H: int, KV: int, sparsity: float, mode: str) -> None:
    """Refuse a head sparsity that removes no head or every head of a layer, saying what is possible."""
    heads, kv = head_counts(H, KV, sparsity, mode)
    g = H // KV
    steps = [f"{k / (g if mode == 'query' else KV):.2f}" for k in range(1, (g if mode == "query" else KV))]
    if heads == H or heads < 1 or kv < 1:
        raise NeuroprojError(f"head sparsity {sparsity:g} with head groups {mode!r} removes "
                             f"{'no' if heads == H else 'every'} head of a layer of {H} query heads in {KV} key/value "
                             f"groups: choose one of {', '.join(steps) or 'none (too few heads)'}"
                             + ("" if mode == "query" else " or --head-groups query"))


def check_heads(model, adapter, cfg) -> None:
    """Refuse, before any work, a family whose heads cannot be pruned or a head sparsity some layer cannot take."""
    refusal = adapter.heads_refusal(model)
    if refusal:
        raise NeuroprojError(refusal)
    for i in range(adapter.num_layers(model)):
        check_head_sparsity(adapter.num_heads(model, i), adapter.num_kv_heads(model, i), cfg.head_sparsity,
                            cfg.head_groups)


def head_levels(H: int, KV: int, mode: str) -> list[float]:
    """The head sparsities that keep a layer of H heads in KV groups consistent under `mode`, 0 first: r/g for r
    query heads per group (query), q/KV for q whole groups (kv)."""
    g = H // KV
    n = g if mode == "query" else KV
    return [k / n for k in range(n)]


def keep_heads(m: LayerMoments, H: int, KV: int, hd: int, sparsity: float, mode: str, select: str) -> dict:
    """The plan entry of one layer's heads at `sparsity`: {"heads": H, "kv_heads": KV, "keep": [...], "keep_kv":
    [...]}, the dropped units chosen by `select` (query: single query heads, the same number from every group;
    kv: whole groups)."""
    g = H // KV
    heads, kv = head_counts(H, KV, sparsity, mode)
    chooser = HEAD_SELECTORS[select]
    if mode == "query":
        units = [[h] for h in range(H)]
        quota = g - heads // KV

        def per_group(dropped):
            return all(sum(1 for u in dropped if u // g == k) <= quota for k in range(KV))
        gone = chooser(m, units, H - heads, hd, per_group)
        keep = [h for h in range(H) if h not in gone]
        keep_kv = list(range(KV))
    else:
        units = [list(range(k * g, (k + 1) * g)) for k in range(KV)]
        gone = chooser(m, units, KV - kv, hd, None)
        keep_kv = [k for k in range(KV) if k not in gone]
        keep = [h for k in keep_kv for h in units[k]]
    return {"heads": H, "kv_heads": KV, "keep": keep, "keep_kv": keep_kv}


def choose_heads(model, adapter, m: LayerMoments, cfg) -> dict:
    """The plan entry of layer `m.layer`'s heads at `cfg.head_sparsity` (`keep_heads`)."""
    i = m.layer
    return keep_heads(m, adapter.num_heads(model, i), adapter.num_kv_heads(model, i), adapter.head_dim(model),
                      cfg.head_sparsity, cfg.head_groups, cfg.head_select)


def fold_heads(model, adapter, work, entry: dict, cfg) -> None:
    """Refit o_proj on the kept heads' channels (least squares; `--fold none`: the columns kept as they are), then
    slice q/k/v/o to the kept heads; records the kept channels and the new weights in `work` (the pass's carry)."""
    i, hd = work.layer, adapter.head_dim(model)
    o = adapter.attn_out_proj(model, i)
    keep = channels(entry["keep"], hd)
    W = o.weight.detach().double().cpu()                     # nn.Linear: y = W z, W (d, H·hd)
    bias = None if o.bias is None else o.bias.detach().double().cpu()
    f = work.fold
    if f is None and cfg.fold != "none":
        raise NeuroprojError(f"refitting o_proj (fold {cfg.fold}) needs the attention's activations, which only the "
                             f"sequential pass measures: prune with --calibration sequential and --data, or --fold none")
    if f is None or cfg.fold == "none":
        Wn, bn = W[:, keep].clone(), bias
    else:
        # the least-squares refit whatever the MLP's fold (a head has no representative); the mean of the removed
        # channels goes into o_proj's bias where the architecture has one
        Wn, bn = fold_layer("lstsq", W, keep, G=f.G, mean=f.mean, bias=bias, C=f.C, c=f.c,
                            use_bias=bias is not None, ridge=f.ridge)
    adapter.select_heads(model, i, entry["keep"], entry["keep_kv"])
    o.weight = nn.Parameter(Wn.to(o.weight.dtype).to(o.weight.device).contiguous(), requires_grad=False)
    if bn is not None:
        o.bias = nn.Parameter(bn.to(o.weight.dtype).to(o.weight.device).contiguous(), requires_grad=False)
    work.keep, work.W_new, work.b_new = keep, Wn, bn
