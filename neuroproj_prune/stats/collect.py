"""Exact streaming activation statistics: one pass, any number of processes.

For each layer l and site s, over all non-padding calibration tokens h (a row of width N):

    n,   c = mean of the first batch (a fixed shift),   S = Σ (h − c),   G = Σ (h − c)(h − c)ᵀ
    μ = c + S/n,   Σ = G/n − (S/n)(S/n)ᵀ,   ρ_ij = Σ_ij / sqrt(Σ_ii Σ_jj)

Per-batch products run on the model's device in the forward's precision: bfloat16 where the forwards run under
bfloat16 autocast (the activations are bfloat16 products already; `moments.gram_` says how a CPU rounds them),
else float32 (float64 for a float64 model); the centring is float32 and the running totals float64. The shift
removes the mean before squaring, so that `G/n − μμᵀ` does not cancel.
Cross-layer blocks (site `mlp.neurons`, layers l < m ≤ l + K): X_lm = Σ (h_l − c_l)(h_m − c_m)ᵀ.

Cost per token: Σ_sites N² multiply-adds per layer (plus K·N² with cross-layer blocks), on top of the
forward pass; the final norm and LM head are skipped. Memory: 8·N² bytes per (layer, site) for the totals,
8·N² per cross block, and one batch of activations. Under several processes each process takes every
W-th batch; the totals are re-centred to one shift and all-reduced, so the result equals one process.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..model import LoadedModel, adapter_for, load_model
from .capture import (COMPUTE_DTYPES, HEAD_SITE, SITES, ActivationCapture, batches, check_sites, compute_dtype_for,
                      nonfinite_hint, parse_layers, parse_sites, site_width)
from .data import calibration_samples
from .moments import Moments, no_autocast, products_for
from .processes import available_memory, distributed
from .stats_file import FORMAT, Stats, head_meta


# ------------------------------------------------------------------------------------------ accumulate
def memory_needed(widths: dict[int, dict[str, int]], cross_pairs: list[tuple[int, int]], tokens_per_batch: int) -> int:
    """Bytes: float64 totals (8·N² + 16·N per layer and site, 8·N_l·N_m per cross block) plus one
    float32 product (4·N²) and the batch's centred activations (4·tokens·N per held layer)."""
    total = 0
    biggest = 0
    for sites in widths.values():
        for w in sites.values():
            total += 8 * w * w + 16 * w
            biggest = max(biggest, w)
    for l, m in cross_pairs:
        total += 8 * widths[l]["mlp.neurons"] * widths[m]["mlp.neurons"]
    held = 1 + (max((m - l for l, m in cross_pairs), default=0))
    return total + 4 * biggest * biggest + 4 * tokens_per_batch * biggest * held


def accumulate(model, batches, *, layers=None, sites=("mlp.neurons",), cross_layer_window: int = 0,
               num_batches: int | None = None, progress: bool = True, max_memory: int | None = None,
               compute: torch.dtype | None = None):
    """Stream `batches` of (input_ids, attention_mask) through `model` and return the float64 totals
    `{(layer, site): Moments}` (centred on the first batch's mean, complete Grams) and `{(l, m): X_lm}` — all-reduced when torch.distributed is initialised
    (each process must pass its own share of batches)."""
    adapter = adapter_for(model)
    L = adapter.num_layers(model)
    layers = parse_layers(layers, L)
    sites = parse_sites(sites)
    check_sites(model, sites)
    dev = next(model.parameters()).device
    cdt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    K = int(cross_layer_window)
    if K < 0:
        raise NeuroprojError("--cross-layer-window must be >= 0")
    if K and "mlp.neurons" not in sites:
        raise NeuroprojError("cross-layer blocks need the site mlp.neurons in --sites")
    lset = set(layers)
    pairs = [(l, m) for m in layers for l in range(m - K, m) if l in lset] if K else []

    width = {i: {} for i in layers}
    for i in layers:
        for s in sites:
            width[i][s] = site_width(model, i, s)
    need = memory_needed(width, pairs, 4096)
    avail = max_memory if max_memory is not None else available_memory(dev)
    if need > avail:
        raise NeuroprojError(
            f"statistics need {need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB is free on {dev}: "
            f"collect fewer --layers, fewer --sites or a smaller --cross-layer-window"
        )

    totals = {(i, s): Moments(product_dtype=products_for(s, compute)) for i in layers for s in sites}
    cross = {p: None for p in pairs}
    recent: dict[int, torch.Tensor] = {}   # centred mlp.neurons activations of the last K layers

    def on_activation(i, site, h):
        t = totals[(i, site)]
        x = t.centre(h.to(cdt))
        t.add(x)
        if not torch.isfinite(t.s).all():
            raise NeuroprojError(f"non-finite activations at layer {i}, site {site}: {nonfinite_hint(model, compute)}")
        if site == "mlp.neurons" and K:
            for l in range(i - K, i):
                if (l, i) in cross:
                    xl = recent[l]
                    with no_autocast(x.device):   # the forward's autocast would make this a bfloat16 product
                        blk = (xl.T @ x).double()
                    cross[(l, i)] = blk if cross[(l, i)] is None else cross[(l, i)].add_(blk)
            recent[i] = x
            for l in [l for l in recent if l <= i - K]:
                del recent[l]

    dist, rank, world = distributed()
    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="collect", disable=not progress or rank != 0,
               dynamic_ncols=True)
    try:
        with ActivationCapture(model, layers, sites, on_activation, compute=compute) as cap:
            for input_ids, mask in batches:
                cap.run(input_ids, mask)
                recent.clear()
                bar.update(int(mask.sum()) * world)
    finally:
        bar.close()  # also on an error: its message then starts on a line of its own

    with torch.inference_mode():  # the totals were made inside the capture's inference mode
        for t in totals.values():
            if t.G is not None:
                t.complete()
    if dist is not None:
        _all_reduce(dist, rank, totals, cross, dev)
    if any(t.tokens == 0 for t in totals.values()):
        raise NeuroprojError("no tokens were seen: the calibration data is empty after padding is removed")
    return totals, cross


@torch.inference_mode()
def _all_reduce(dist, rank, totals, cross, dev):
    """Re-centre every process's totals on rank 0's shift, then sum them: equal to a single process.
    (Under inference mode: the totals were made inside the capture's inference mode, and in-place updates
    of inference tensors are refused outside it.)"""
    for key, t in sorted(totals.items()):
        # a process that saw no batch holds zero totals, valid at any shift; learn the width from the others
        width = torch.tensor([0 if t.shift is None else t.shift.numel()], device=dev)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if t.shift is None:
            w = int(width)
            t._alloc(w, dev)
            t.shift = torch.zeros(w, dtype=torch.float64, device=dev)
        common = t.shift.clone()
        dist.broadcast(common, src=0)
        t._old_sum = t.s.clone()  # S before re-centring, for the cross blocks
        t._d = t.recentre(common)
    for (l, m), blk in cross.items():
        tl, tm = totals[(l, "mlp.neurons")], totals[(m, "mlp.neurons")]
        if blk is None:
            blk = torch.zeros(tl.shift.numel(), tm.shift.numel(), dtype=torch.float64, device=dev)
        # X' = X + S_l d_mᵀ + d_l S_mᵀ + n d_l d_mᵀ  (S at the old shifts)
        blk += torch.outer(tl._old_sum, tm._d) + torch.outer(tl._d, tm._old_sum) + tl.tokens * torch.outer(tl._d, tm._d)
        dist.all_reduce(blk)
        cross[(l, m)] = blk
    for t in totals.values():
        n = torch.tensor([t.tokens], dtype=torch.float64, device=dev)
        dist.all_reduce(n)
        dist.all_reduce(t.s)
        dist.all_reduce(t.G)
        t.tokens = int(n.item())
        t.n = float(t.tokens)
        del t._d, t._old_sum


# --------------------------------------------------------------------------------------------- the API
@dataclass
class CollectConfig(Config):
    """Every setting of `collect` (CLI flags, the recipe's `stats` section, keywords of `collect()`)."""

    what = "collect"

    samples: int = opt(128, "calibration windows", ge=1)
    seqlen: int = opt(512, "tokens per window", ge=2)
    seed: int = opt(0, "which windows are drawn", ge=0)
    sites: tuple = opt(("mlp.neurons",), "comma list of activation sites: mlp.neurons (the MLP's neurons), mlp.out "
                       "(the MLP block's output), attn.out (the attention block's output), attn.heads (the attention "
                       "heads' outputs: the input of the attention output projection, head_dim channels a head)",
                       SITES, item=str)
    layers: str | None = opt(None, "layer SPEC such as 0-3,7 (negative indices count from the end; default all)",
                             kind=str)
    cross_layer_window: int = opt(0, "also collect Σ h_l h_mᵀ of mlp.neurons for layer pairs l < m <= l+K (the "
                                  "skip analysis)", ge=0)
    batch_size: int | None = opt(None, "windows per forward pass (default: ~4096 tokens)", kind=int, ge=1)
    max_memory_gb: float | None = opt(None, "memory the totals may use (default: what is free)", kind=float, gt=0.0)
    compute_dtype: str = opt("auto", "matmul precision of the forwards of a float32 model: auto (bfloat16 where fast: "
                             "CPUs with AVX512-BF16/AMX, CUDA), float32 or bfloat16; under bfloat16 the Gram products too, their "
                             "totals float64",
                             COMPUTE_DTYPES)

    def check(self) -> None:
        if self.cross_layer_window and "mlp.neurons" not in self.sites:
            raise ConfigError("cross_layer_window", "cross-layer blocks need the site mlp.neurons in --sites")


def collect(model, data, config: CollectConfig | None = None, *, out=None, dtype="auto", device="auto",
            progress: bool = True, padding_side: str = "right", **settings) -> Stats:
    """Collect activation statistics and (with `out`) save them as one safetensors file.

    `model`: a LoadedModel or anything `load_model` accepts. `data`: a data spec (file or dataset name:
    `samples`×`seqlen` tokens are drawn with `seed`), a (B, T) tensor of token ids, or a list of token-id
    sequences of unequal length (padded per batch on `padding_side`; padding is excluded). `config` (or the
    `CollectConfig` fields as keywords: samples, seqlen, seed, sites, layers, cross_layer_window, batch_size,
    max_memory_gb) says what to collect. Under `accelerate launch` / torch.distributed each process takes every
    W-th batch and rank 0 writes. Cost: one forward pass over the tokens, stopped after the last collected
    layer, plus N² multiply-adds per token, layer and site.
    """
    cfg = config.replace(**settings) if config is not None else CollectConfig.make(**settings)
    samples, seqlen, seed, sites, layers = cfg.samples, cfg.seqlen, cfg.seed, cfg.sites, cfg.layers
    cross_layer_window, batch_size = cfg.cross_layer_window, cfg.batch_size
    max_memory = None if cfg.max_memory_gb is None else int(cfg.max_memory_gb * 2**30)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    m = lm.model
    check_sites(m, parse_sites(sites))   # before the data is read
    if isinstance(data, (str, os.PathLike)):
        ids, desc = calibration_ids(lm, data, samples, seqlen, seed)
    else:
        ids = data
        desc = f"in-memory token ids ({len(ids)} sequences)"
        samples = len(ids)
    if batch_size is None:
        longest = ids.shape[1] if isinstance(ids, torch.Tensor) else max(len(s) for s in ids)
        batch_size = max(1, 4096 // max(1, longest))
    dist, rank, world = distributed()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None and lm.tokenizer.pad_token_id is not None else 0
    all_batches = list(batches(ids, batch_size, pad, padding_side))
    mine = all_batches[rank::world]
    compute = compute_dtype_for(cfg.compute_dtype, m)
    totals, cross = accumulate(m, mine, layers=layers, sites=sites, cross_layer_window=cross_layer_window,
                               num_batches=len(mine), progress=progress, max_memory=max_memory, compute=compute)
    adapter = adapter_for(m)
    meta_sites = list(parse_sites(sites))
    meta = {
        "format": FORMAT,
        "model": lm.spec,
        "model_type": m.config.model_type,
        "fingerprint": lm.fingerprint,
        "num_layers": adapter.num_layers(m),
        "hidden_size": adapter.hidden_size(m),
        "mlp_in_blocks": adapter.in_blocks(),
        "widths": [adapter.width(m, i) for i in range(adapter.num_layers(m))],
        "layers": sorted({i for i, _ in totals}),
        "sites": meta_sites,
        "cross_layer_window": int(cross_layer_window),
        "tokens": next(iter(totals.values())).tokens,
        "data": desc,
        "samples": samples,
        "seqlen": seqlen if isinstance(data, (str, os.PathLike)) else None,
        "seed": seed,
        "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
        "compute_dtype": None if compute is None else str(compute).replace("torch.", ""),
        # the products of the mlp.neurons Grams (every other site's are float32, or float64 for a float64 model)
        "gram_products": "bfloat16" if compute is not None else ("float64" if next(m.parameters()).dtype
                                                                  == torch.float64 else "float32"),
        "processes": world,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(head_meta(m) if HEAD_SITE in meta_sites else {}),
    }
    stats = Stats._from_totals(totals, cross, meta)
    if out is not None and rank == 0:
        stats.save(out)
    if dist is not None:
        dist.barrier()
    return stats


def calibration_ids(lm: LoadedModel, data, samples: int, seqlen: int, seed: int,
                    holdout: int = 0) -> tuple[torch.Tensor, str]:
    """`samples` windows of `seqlen` tokens of `data` drawn with `seed`, refused beyond the model's context
    (and `holdout` further windows of the same draw after them, see `data.calibration_samples`)."""
    return calibration_samples(lm.tokenizer, str(data), samples, seqlen, seed,
                               max_seqlen=lm.adapter.context_length(lm.model.config), holdout=holdout)
