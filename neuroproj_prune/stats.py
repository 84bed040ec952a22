"""Exact streaming activation statistics: one pass, any number of processes.

For each layer l and site s, over all non-padding calibration tokens h (a row of width N):

    n,   c = mean of the first batch (a fixed shift),   S = Σ (h − c),   G = Σ (h − c)(h − c)ᵀ
    μ = c + S/n,   Σ = G/n − (S/n)(S/n)ᵀ,   ρ_ij = Σ_ij / sqrt(Σ_ii Σ_jj)

Per-batch products run on the model's device in float32 (float64 for a float64 model); the running totals
are float64. The shift removes the mean before squaring, so that `G/n − μμᵀ` does not cancel.
Cross-layer blocks (site `mlp.neurons`, layers l < m ≤ l + K): X_lm = Σ (h_l − c_l)(h_m − c_m)ᵀ.

Cost per token: Σ_sites N² multiply-adds per layer (plus K·N² with cross-layer blocks), on top of the
forward pass; the final norm and LM head are skipped. Memory: 8·N² bytes per (layer, site) for the totals,
8·N² per cross block, and one batch of activations. Under several processes each process takes every
W-th batch; the totals are re-centred to one shift and all-reduced, so the result equals one process.
"""
from __future__ import annotations

import inspect
import os
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import NeuroprojError
from .data import calibration_samples
from .io import TensorFile, file_sha256, load_tensors
from .models import Adapter, LoadedModel, adapter_for, load_model
from .moments import GRAM_BLOCK, correlation, dead_neurons, gram_lower_, mirror_lower_  # noqa: F401

SITES = ("mlp.neurons", "mlp.out", "attn.out")
FORMAT = "neuroproj-prune/stats/1"


# ----------------------------------------------------------------------------------------------- specs
def parse_layers(spec, num_layers: int) -> list[int]:
    """`"0-3,7"` → [0, 1, 2, 3, 7]; None/"all" → every layer. Negative indices count from the end."""
    if spec is None or spec == "all" or spec == "":
        return list(range(num_layers))
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str):
        out = sorted({int(i) % num_layers for i in spec})
    else:
        out = set()
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
            if not m:
                raise NeuroprojError(f"bad layer spec {spec!r}: use e.g. '0-3,7'")
            a = int(m.group(1))
            b = int(m.group(2)) if m.group(2) is not None else a
            if b < a:
                raise NeuroprojError(f"bad layer range {part!r} in {spec!r}: write it low-high, e.g. '{b}-{a}'")
            out.update(range(a, b + 1))
        out = sorted(out)
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise NeuroprojError(f"layers {bad} out of range: the model has {num_layers} layers (0-{num_layers - 1})")
    return list(out)


def parse_sites(spec) -> list[str]:
    sites = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise NeuroprojError(f"unknown site(s) {bad}: choose from {', '.join(SITES)}")
    return sites


# ------------------------------------------------------------------------------------------- capturing
class _Stop(Exception):
    """Raised after the last captured layer: the rest of the network is not needed."""


class ActivationCapture:
    """Hooks that hand `fn(layer, site, h)` the activations of every non-padding token, h of shape
    (tokens, width), in the order the layers run. Used by statistics, minibatch projection and traces.

    Sites: `mlp.neurons` = input of the MLP output projection (forward pre-hook), `mlp.out` = output of
    the MLP block, `attn.out` = output of the attention block.
    """

    def __init__(self, model, layers, sites, fn, stop_after_last: bool = True):
        self.model, self.fn = model, fn
        self.adapter: Adapter = adapter_for(model)
        self.layers, self.sites = list(layers), list(sites)
        self.stop_after_last = stop_after_last
        self._mask: torch.Tensor | None = None
        self._handles: list = []
        sig = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in sig

    def _rows(self, h: torch.Tensor) -> torch.Tensor:
        h = h.reshape(-1, h.shape[-1])  # (B, T, W) or OPT's flattened (B·T, W)
        return h if self._mask is None else h[self._mask]

    def __enter__(self):
        a, m = self.adapter, self.model
        for i in self.layers:
            if "mlp.neurons" in self.sites:
                self._handles.append(a.out_proj(m, i).register_forward_pre_hook(
                    lambda mod, args, i=i: self.fn(i, "mlp.neurons", self._rows(args[0]))))
            if "attn.out" in self.sites:
                self._handles.append(a.attn(m, i).register_forward_hook(
                    lambda mod, args, out, i=i: self.fn(i, "attn.out", self._rows(out[0] if isinstance(out, tuple) else out))))
            if "mlp.out" in self.sites:
                self._handles.append(a.mlp(m, i).register_forward_hook(
                    lambda mod, args, out, i=i: self.fn(i, "mlp.out", self._rows(out[0] if isinstance(out, tuple) else out))))
        if self.stop_after_last and self.layers:
            def stop(mod, args, out):
                raise _Stop
            self._handles.append(a.layers(m)[max(self.layers)].register_forward_hook(stop))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Forward one batch. Positions follow the mask (left padding keeps real tokens at 0, 1, …)."""
        dev = next(self.model.parameters()).device
        input_ids = input_ids.to(dev)
        kwargs = {}
        if attention_mask is not None and not bool(attention_mask.all()):
            attention_mask = attention_mask.to(dev)
            self._mask = attention_mask.reshape(-1).bool()
            kwargs["attention_mask"] = attention_mask
            if self._takes_positions:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            self._mask = None
        try:
            return self.model(input_ids=input_ids, use_cache=False, **kwargs)
        except _Stop:
            return None
        finally:
            self._mask = None


# ------------------------------------------------------------------------------------------ accumulate
@dataclass
class _Totals:
    """Running float64 totals for one (layer, site), shifted by the first batch's mean."""

    n: int = 0
    shift: torch.Tensor | None = None
    sum: torch.Tensor | None = None
    gram: torch.Tensor | None = None

    def centred(self, h: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
        if self.shift is None:
            self.shift = h.double().mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.gram = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
        return h.to(cdt) - self.shift.to(cdt)

    def add(self, x: torch.Tensor) -> torch.Tensor:
        s = x.sum(0, dtype=torch.float64)
        self.sum += s
        gram_lower_(self.gram, x)  # mirrored once, after the last batch
        self.n += x.shape[0]
        return s


def _recentre(t: _Totals, new_shift: torch.Tensor) -> torch.Tensor:
    """Move totals to another shift c' exactly: with d = c − c', S' = S + n d, G' = G + S dᵀ + d Sᵀ + n d dᵀ.
    Returns d (needed to re-centre cross blocks with the old S)."""
    d = t.shift - new_shift
    t.gram += torch.outer(t.sum, d) + torch.outer(d, t.sum) + t.n * torch.outer(d, d)
    t.sum += t.n * d
    t.shift = new_shift.clone()
    return d


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


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations: CUDA's free memory on a GPU, MemAvailable of /proc/meminfo on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def distributed():
    """(torch.distributed, rank, world size) under `accelerate launch` / torchrun once the process group is up,
    else (None, 0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def _batches(ids: torch.Tensor | list, batch_size: int, pad_id: int, padding_side: str = "right"):
    """Yield (input_ids, attention_mask) batches; a list of unequal sequences is padded on padding_side."""
    if isinstance(ids, torch.Tensor):
        for b in range(0, ids.shape[0], batch_size):
            chunk = ids[b:b + batch_size]
            yield chunk, torch.ones_like(chunk)
        return
    for b in range(0, len(ids), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in ids[b:b + batch_size]]
        T = max(len(s) for s in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            x[r, sl], mask[r, sl] = s, 1
        yield x, mask


def accumulate(model, batches, *, layers=None, sites=("mlp.neurons",), cross_layer_window: int = 0,
               num_batches: int | None = None, progress: bool = True, max_memory: int | None = None):
    """Stream `batches` of (input_ids, attention_mask) through `model` and return the float64 totals
    `{(layer, site): _Totals}` and `{(l, m): X_lm}` — all-reduced when torch.distributed is initialised
    (each process must pass its own share of batches)."""
    adapter = adapter_for(model)
    L = adapter.num_layers(model)
    layers = parse_layers(layers, L)
    sites = parse_sites(sites)
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
            width[i][s] = adapter.width(model, i) if s == "mlp.neurons" else adapter.hidden_size(model)
    need = memory_needed(width, pairs, 4096)
    avail = max_memory if max_memory is not None else available_memory(dev)
    if need > avail:
        raise NeuroprojError(
            f"statistics need {need / 2**30:.1f} GiB but {avail / 2**30:.1f} GiB is free on {dev}: "
            f"collect fewer --layers, fewer --sites or a smaller --cross-layer-window"
        )

    totals = {(i, s): _Totals() for i in layers for s in sites}
    cross = {p: None for p in pairs}
    recent: dict[int, torch.Tensor] = {}   # centred mlp.neurons activations of the last K layers

    def on_activation(i, site, h):
        t = totals[(i, site)]
        x = t.centred(h, cdt)
        s = t.add(x)
        if not torch.isfinite(s).all():
            dt = str(h.dtype).replace("torch.", "")
            if h.dtype in (torch.float16, torch.bfloat16):
                hint = f"the model overflows in {dt}; load it with --dtype float32"
            else:
                hint = f"the model computes NaN/inf in {dt}; check its weights (NaN or huge values)"
            raise NeuroprojError(f"non-finite activations at layer {i}, site {site}: {hint}")
        if site == "mlp.neurons" and K:
            for l in range(i - K, i):
                if (l, i) in cross:
                    xl = recent[l]
                    blk = (xl.T @ x).double()
                    cross[(l, i)] = blk if cross[(l, i)] is None else cross[(l, i)].add_(blk)
            recent[i] = x
            for l in [l for l in recent if l <= i - K]:
                del recent[l]

    dist, rank, world = distributed()
    bar = tqdm(total=None, unit="tok", unit_scale=True, desc="collect", disable=not progress or rank != 0,
               dynamic_ncols=True)
    try:
        with ActivationCapture(model, layers, sites, on_activation) as cap:
            for input_ids, mask in batches:
                cap.run(input_ids, mask)
                recent.clear()
                bar.update(int(mask.sum()) * world)
    finally:
        bar.close()  # also on an error: its message then starts on a line of its own

    with torch.inference_mode():  # the totals were made inside the capture's inference mode
        for t in totals.values():
            if t.gram is not None:
                mirror_lower_(t.gram)
    if dist is not None:
        _all_reduce(dist, rank, totals, cross, dev)
    if any(t.n == 0 for t in totals.values()):
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
            t.shift = torch.zeros(w, dtype=torch.float64, device=dev)
            t.sum = torch.zeros(w, dtype=torch.float64, device=dev)
            t.gram = torch.zeros(w, w, dtype=torch.float64, device=dev)
        common = t.shift.clone()
        dist.broadcast(common, src=0)
        t._old_sum = t.sum.clone()  # S before re-centring, for the cross blocks
        t._d = _recentre(t, common)
    for (l, m), blk in cross.items():
        tl, tm = totals[(l, "mlp.neurons")], totals[(m, "mlp.neurons")]
        if blk is None:
            blk = torch.zeros(tl.shift.numel(), tm.shift.numel(), dtype=torch.float64, device=dev)
        # X' = X + S_l d_mᵀ + d_l S_mᵀ + n d_l d_mᵀ  (S at the old shifts)
        blk += torch.outer(tl._old_sum, tm._d) + torch.outer(tl._d, tm._old_sum) + tl.n * torch.outer(tl._d, tm._d)
        dist.all_reduce(blk)
        cross[(l, m)] = blk
    for t in totals.values():
        n = torch.tensor([t.n], dtype=torch.float64, device=dev)
        dist.all_reduce(n)
        dist.all_reduce(t.sum)
        dist.all_reduce(t.gram)
        t.n = int(n.item())
        del t._d, t._old_sum


# --------------------------------------------------------------------------------------------- the API
def collect(model, data, *, samples: int = 128, seqlen: int = 512, seed: int = 0, sites=("mlp.neurons",),
            layers=None, cross_layer_window: int = 0, batch_size: int | None = None, out=None,
            dtype="auto", device="auto", progress: bool = True, max_memory: int | None = None,
            padding_side: str = "right") -> "Stats":
    """Collect activation statistics and (with `out`) save them as one safetensors file.

    `model`: a LoadedModel or anything `load_model` accepts. `data`: a data spec (file or dataset name:
    `samples`×`seqlen` tokens are drawn with `seed`), a (B, T) tensor of token ids, or a list of token-id
    sequences of unequal length (padded per batch on `padding_side`; padding is excluded).
    Under `accelerate launch` / torch.distributed each process takes every W-th batch and rank 0 writes.
    """
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    m = lm.model
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
    all_batches = list(_batches(ids, batch_size, pad, padding_side))
    mine = all_batches[rank::world]
    totals, cross = accumulate(m, mine, layers=layers, sites=sites, cross_layer_window=cross_layer_window,
                               num_batches=len(mine), progress=progress, max_memory=max_memory)
    adapter = adapter_for(m)
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
        "sites": list(parse_sites(sites)),
        "cross_layer_window": int(cross_layer_window),
        "tokens": next(iter(totals.values())).n,
        "data": desc,
        "samples": samples,
        "seqlen": seqlen if isinstance(data, (str, os.PathLike)) else None,
        "seed": seed,
        "dtype": str(next(m.parameters()).dtype).replace("torch.", ""),
        "processes": world,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
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


# --------------------------------------------------------------------------------------------- loading
class Stats(TensorFile):
    """Statistics of one collection: raw shifted totals plus derived moments, per (layer, site).

    All derived quantities are float64 on the CPU:
    `mean` μ, `second_moment` E[h hᵀ], `covariance` Σ, `variance` diag Σ, `correlation` ρ (dead rows 0,
    unit diagonal for live neurons), `dead` (variance ≤ 1e-12·max variance of the layer, or exactly 0),
    `cross_covariance(l, m)` / `cross_correlation(l, m)` for collected cross-layer blocks.
    """

    # -- construction
    @classmethod
    def _from_totals(cls, totals, cross, meta):
        t = {}
        for (i, s), tot in totals.items():
            t[f"layer.{i}.{s}.count"] = torch.tensor([tot.n], dtype=torch.int64)
            t[f"layer.{i}.{s}.shift"] = tot.shift.cpu()
            t[f"layer.{i}.{s}.sum"] = tot.sum.cpu()
            t[f"layer.{i}.{s}.gram"] = tot.gram.cpu()
        for (l, m), blk in cross.items():
            t[f"cross.{l}.{m}.gram"] = blk.cpu()
        return cls(t, meta)

    # -- description
    @property
    def cross_pairs(self) -> list[tuple[int, int]]:
        return sorted(tuple(int(x) for x in k.split(".")[1:3]) for k in self._t if k.startswith("cross."))

    def _get(self, layer, site, what) -> torch.Tensor:
        key = f"layer.{layer}.{site}.{what}"
        if key not in self._t:
            raise NeuroprojError(
                f"the statistics have no layer {layer}, site {site} (layers {self.layers}, sites {self.sites}): "
                f"re-run collect with those --layers/--sites"
            )
        return self._t[key]

    def count(self, layer, site="mlp.neurons") -> int:
        return int(self._get(layer, site, "count")[0])

    def width(self, layer, site="mlp.neurons") -> int:
        return self._get(layer, site, "shift").numel()

    # -- moments
    def mean(self, layer, site="mlp.neurons") -> torch.Tensor:
        return self._get(layer, site, "shift") + self._get(layer, site, "sum") / self.count(layer, site)

    def covariance(self, layer, site="mlp.neurons") -> torch.Tensor:
        n = self.count(layer, site)
        m = self._get(layer, site, "sum") / n
        cov = self._get(layer, site, "gram") / n - torch.outer(m, m)
        return (cov + cov.T) / 2

    def second_moment(self, layer, site="mlp.neurons") -> torch.Tensor:
        """E[h hᵀ] = Σ + μ μᵀ (uncentred; what least-squares folds need)."""
        mu = self.mean(layer, site)
        return self.covariance(layer, site) + torch.outer(mu, mu)

    def variance(self, layer, site="mlp.neurons") -> torch.Tensor:
        return self.covariance(layer, site).diagonal().clamp(min=0)

    def dead(self, layer, site="mlp.neurons") -> torch.Tensor:
        return dead_neurons(self.variance(layer, site))

    def correlation(self, layer, site="mlp.neurons") -> torch.Tensor:
        return correlation(self.covariance(layer, site))

    def cross_covariance(self, l, m) -> torch.Tensor:
        """Cov(h_l, h_m), shape (N_l, N_m), from the cross block and both layers' totals."""
        key = f"cross.{l}.{m}.gram"
        if key not in self._t:
            raise NeuroprojError(f"no cross-layer block ({l}, {m}): collect with --cross-layer-window >= {m - l}")
        n = self.count(l)
        return self._t[key] / n - torch.outer(self._get(l, "mlp.neurons", "sum") / n,
                                              self._get(m, "mlp.neurons", "sum") / n)

    def cross_correlation(self, l, m) -> torch.Tensor:
        return correlation(self.cross_covariance(l, m), self.variance(l), self.variance(m), self.dead(l), self.dead(m))

    # -- checks
    def validate(self) -> None:
        """Every (layer, site) holds count ≥ 1, shift and sum (N,), a Gram (N, N), all finite, N as the header
        says; every cross block (N_l, N_m). Cost: one pass over the tensors."""
        where = self.path or "statistics"
        try:
            widths, d = list(self.meta["widths"]), int(self.meta["hidden_size"])
            layers, sites = self.layers, self.sites
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{where}: the header lacks widths/hidden_size/layers/sites: re-run collect") from None
        for i in layers:
            for s in sites:
                N = widths[i] if s == "mlp.neurons" else d
                shapes = {"count": (1,), "shift": (N,), "sum": (N,), "gram": (N, N)}
                for what, shape in shapes.items():
                    x = self._t.get(f"layer.{i}.{s}.{what}")
                    if x is None or tuple(x.shape) != shape:
                        raise NeuroprojError(f"{where}: layer {i} {s} {what} has shape "
                                             f"{None if x is None else tuple(x.shape)}, expected {shape}: "
                                             f"the file is damaged or edited; re-run collect")
                    if not torch.isfinite(x.double()).all():
                        raise NeuroprojError(f"{where}: layer {i} {s} {what} holds NaN/inf: re-run collect "
                                             f"(with --dtype float32 if the model overflows)")
                if int(self._t[f"layer.{i}.{s}.count"]) < 1:
                    raise NeuroprojError(f"{where}: layer {i} {s} counts no tokens: re-run collect")
        for l, m in self.cross_pairs:
            x = self._t[f"cross.{l}.{m}.gram"]
            if tuple(x.shape) != (widths[l], widths[m]) or not torch.isfinite(x).all():
                raise NeuroprojError(f"{where}: cross block ({l}, {m}) is damaged: re-run collect")

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse statistics that were collected on other weights."""
        if self.meta.get("fingerprint") != lm.fingerprint:
            raise NeuroprojError(
                f"statistics {self.path or ''} were collected on {self.meta.get('model')!r} "
                f"(fingerprint {self.meta.get('fingerprint')}), not on {lm.spec!r} ({lm.fingerprint}): "
                f"re-run collect on this model"
            )

    def file_hash(self) -> str | None:
        return file_sha256(self.path) if self.path else None


def load_stats(path) -> Stats:
    """Read a statistics file written by `collect`; a one-line error for a missing or corrupt file, and for
    one whose tensors do not fit its header (shapes, counts, non-finite values)."""
    tensors, meta = load_tensors(path, FORMAT, "statistics", "collect")
    st = Stats(tensors, meta, str(path))
    st.validate()
    return st


def second_moment_diagonals(path, layers=None, sites=None) -> tuple[dict, dict[tuple[int, str], "np.ndarray"]]:
    """(header, {(layer, site): E[h_j²] per neuron, float64}) read from a statistics file without loading it:
    per (layer, site) only count, shift, sum and the Gram's diagonal are read (E[h²] = max(Var, 0) + μ², as
    `Stats.variance(...) + Stats.mean(...)**2` gives). `layers`/`sites`: the subset to read (default all).
    Cost: O(N) memory and N strided page reads per (layer, site) — an 8B model's 53 GB file reads ~3 MB —
    where `load_stats` reads every N×N Gram. Shapes and finiteness of what is read are checked."""
    import numpy as np

    from .io import LazyTensorFile

    with LazyTensorFile(path, FORMAT, "statistics", "collect") as f:
        meta = f.meta
        try:
            file_layers, file_sites = [int(i) for i in meta["layers"]], [str(s) for s in meta["sites"]]
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{path}: the header lacks layers/sites: re-run collect") from None
        out = {}
        for i in file_layers if layers is None else [i for i in layers if i in file_layers]:
            for s in file_sites if sites is None else [s for s in sites if s in file_sites]:
                k = f"layer.{i}.{s}."
                if any(k + w not in f for w in ("count", "shift", "sum", "gram")):
                    raise NeuroprojError(f"{path}: layer {i} {s} is incomplete: the file is damaged; re-run collect")
                N = f.shape(k + "shift")[0] if len(f.shape(k + "shift")) == 1 else -1
                if N < 1 or f.shape(k + "sum") != (N,) or f.shape(k + "gram") != (N, N) or f.shape(k + "count") != (1,):
                    raise NeuroprojError(f"{path}: layer {i} {s} has inconsistent shapes: the file is damaged; "
                                         f"re-run collect")
                n = int(f.read(k + "count")[0])
                c, S, g = (f.read(k + "shift").astype(np.float64), f.read(k + "sum").astype(np.float64),
                           f.diagonal(k + "gram").astype(np.float64))
                if n < 1 or not (np.isfinite(c).all() and np.isfinite(S).all() and np.isfinite(g).all()):
                    raise NeuroprojError(f"{path}: layer {i} {s} counts no tokens or holds NaN/inf: re-run collect")
                m = S / n
                out[(i, s)] = np.maximum(g / n - m * m, 0.0) + (c + m) ** 2
    return meta, out
