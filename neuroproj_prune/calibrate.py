"""Calibrations: where each layer's moments come from. Two implementations of one interface, in `CALIBRATIONS`.

A calibration yields, layer by layer, a `LayerWork`: the moments a selection reads (`moments`) and those a
fold uses (`fold`). The caller prunes that layer in place (select → fold → slice, `prune.prune_layer`) and
records the kept set and new weights in the work item before asking for the next layer, so a calibration
that runs the model (sequential) sees the already-pruned layers.

- `oneshot` — moments of the dense model from a statistics file (`collect`, or one pass made here); every
  layer is planned and folded to preserve its own dense output: C = W G. Cost: one statistics pass (none
  with a given file) plus O(N³) per layer.
- `sequential` (default) — layer by layer, as SparseGPT/Wanda do: the calibration tokens' hidden states are
  carried through the already-pruned layers, so each layer is planned and folded on the inputs it will
  really see. The fold target is the layer's own output on those inputs (`target=layer`: C = W G̃), or the
  dense model's MLP output on the dense inputs (`target=dense`: C = E[y_dense h̃ᵀ], correcting upstream
  error too), or (`target=residual`) its own output plus the gap between the dense and the pruned residual
  streams, y* = W h̃ + (out_dense − out), so each MLP also repairs earlier layers' drift. The pruned layer's
  output is updated in closed form, out' = out − W h̃ + W' h̃_K, when the MLP output is added to the residual
  as is (else the layer runs again). Token weighting (`weighting=rms`, default): every later layer reads
  the residual stream through a norm, so an output error on token t is seen divided by rms(x_t); the
  moments weight token t by 1/mean(out_t²), which stops the few massive-activation tokens (attention sinks)
  from dominating the fit. Cost: one forward pass (two with a dense target) plus one N×N Gram per layer and
  token; memory: the hidden states of all calibration tokens (the carried stream and the layer's outputs,
  2·tokens·d values, 3· with a dense target) and one layer's neuron activations (tokens·N·4 bytes) — with the
  model's layers where `offload.LayerStream` keeps them (all on the device, in host memory or on disk, one at a
  time on the device), and the hidden states on the device or in host memory: the formula is in offload.py.
  Under several processes (torch.distributed) each takes every W-th batch and each layer's moments are
  all-reduced before it is pruned, so all of them prune alike (`Sequential.layers`).

Each calibration also measures per-layer importance its own way for `allocation=global`
(`global_widths`): one-shot from FLAP's standardised scores, sequential from the dense layers' refit-error
curves in units of loss (`error_curves`).

To add a calibration: subclass `Calibration`, implement `layers` and `global_widths`, and register it with
`@register_calibration("name")`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .checkpoint import get_skips
from .errors import NeuroprojError
from .models import LoadedModel
from .moments import Moments
from .offload import LayerStream
from .plan import SELECTORS, LayerMoments, allocate_by_error, error_curve, global_widths, width_grids
from .reconstruct import reconstruct
from .search import Supernet, activations_only, loss_and_grads, loss_backward, search_widths
from .stats import calibration_ids, collect, distributed, load_stats
from .surgery import FoldInputs, chol_solve, effective_ridge

TARGETS = ("layer", "dense", "residual")
RECONSTRUCT_SCOPES = ("mlp", "layer")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class LayerWork:
    """One layer handed to the shared select → fold → slice step; the step fills `keep`, `W_new`, `b_new`."""

    layer: int
    moments: LayerMoments        # what selection reads
    fold: FoldInputs             # what the fold uses
    keep: torch.Tensor | None = None
    W_new: torch.Tensor | None = None
    b_new: torch.Tensor | None = None
    held: tuple | None = None    # --swaps: (G of the fit windows, G of the held-back ones)
    swaps: dict | None = None    # --swaps: what the refinement did (surgery.refine_swaps)


CALIBRATIONS: dict = {}


def register_calibration(name):
    def deco(cls):
        cls.name = name
        CALIBRATIONS[name] = cls
        return cls
    return deco


class Calibration:
    """The interface: `layers()` yields LayerWork in layer order; `global_widths(cfg, total)` gives
    per-layer widths summing to about `total` (`search`: refined by measured loss); `description` names the calibration data; `meta` goes
    into the plan. `stream` (offload.LayerStream) says where the decoder layers live; only the sequential
    calibration streams them (the config refuses offload cpu/disk for the others)."""

    name = ""

    def __init__(self, lm: LoadedModel, cfg, *, data=None, stats=None, projections=None, progress: bool = True,
                 stream: LayerStream | None = None):
        self.lm, self.cfg, self.progress = lm, cfg, progress
        self.stream = stream if stream is not None else LayerStream(lm.model)
        self.description, self.meta = None, {}

    def widths(self) -> dict[int, int]:
        a, m = self.lm.adapter, self.lm.model
        return {i: a.width(m, i) for i in range(a.num_layers(m))}

    def layers(self) -> Iterator[LayerWork]:
        raise NotImplementedError

    def global_widths(self, cfg, total: int, search: bool = False) -> dict[int, int]:
        """Per-layer widths summing to about `total`; `search`: refined by the measured loss of candidates
        (calibrations that hold calibration text)."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- one-shot
@register_calibration("oneshot")
class OneShot(Calibration):
    """Dense moments from a statistics file (or one `collect` pass over `data`)."""

    def __init__(self, lm, cfg, *, data=None, stats=None, projections=None, progress=True, stream=None):
        super().__init__(lm, cfg, progress=progress, stream=stream)
        if stats is None:
            if data is None:
                raise NeuroprojError("give calibration --data or a --stats file")
            stats = collect(lm, data, samples=cfg.samples, seqlen=cfg.seqlen, seed=cfg.seed,
                            batch_size=cfg.batch_size, progress=progress)
        else:
            stats = load_stats(stats) if not hasattr(stats, "second_moment") else stats
            if lm.fingerprint is not None:
                stats.check_model(lm)
        a, m = lm.adapter, lm.model
        missing = [i for i in range(a.num_layers(m)) if i not in stats.layers or "mlp.neurons" not in stats.sites]
        if missing:
            raise NeuroprojError(f"the statistics lack mlp.neurons of layers {missing[:5]}...: collect all layers")
        self.stats, self.projections = stats, projections
        self.description = stats.meta.get("data")
        self.meta = {"stats": stats.path, "fingerprint": stats.meta.get("fingerprint")}

    def moments(self, i: int) -> LayerMoments:
        a, m, st = self.lm.adapter, self.lm.model, self.stats
        W = a.out_weight(m, i).detach().double().cpu()
        lm_ = LayerMoments(i, st.second_moment(i), st.mean(i), W, a.in_norms(m, i),
                           ridge=effective_ridge(self.cfg.ridge, st.count(i), W.shape[1]))
        if self.projections is not None:
            lm_.points = self.projections.get(i, "mlp.neurons").double()
        return lm_

    def layers(self):
        for i in range(self.lm.adapter.num_layers(self.lm.model)):
            m = self.moments(i)
            yield LayerWork(i, m, FoldInputs(m.G, m.mean, ridge=m.ridge))

    def global_widths(self, cfg, total, search=False):
        if search:
            raise NeuroprojError("allocation search needs the sequential calibration's text: use --calibration "
                                 "sequential or --allocation global")
        # FLAP: scores standardised per layer; order-based methods (obs, clusters) allocate by FLAP's metric
        score_fn = SELECTORS[cfg.select] if cfg.select in ("magnitude", "wanda-sp", "flap") else SELECTORS["flap"]
        scores = {}
        for i in self.widths():
            m = self.moments(i)
            scores[i] = score_fn(m, m.N, cfg.seed).scores
        return global_widths(scores, total)


# ------------------------------------------------------------------------------------------- sequential
class _StopAt(Exception):
    pass


def layer_inputs(model, adapter, batches, keep=None):
    """Hidden states entering layer 0 and the keyword arguments the model passes to its layers, per batch.
    `keep(x)` puts each batch's hidden states where they are to live (default: where the model made them)."""
    first = adapter.layers(model)[0]
    caught = []

    def grab(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach() if keep is None else keep(hidden.detach()), args[1:], dict(kwargs)))
        raise _StopAt

    h = first.register_forward_pre_hook(grab, with_kwargs=True)
    dev = model.get_input_embeddings().weight.device  # (a streamed model's layers may live elsewhere)
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    model(input_ids=ids.to(dev), use_cache=False)
                except _StopAt:
                    pass
    finally:
        h.remove()
    return caught


def rms_token_weights(x: torch.Tensor) -> torch.Tensor:
    """w_t = 1/mean(x_t²) for residual-stream rows x_t (last dim d): the next norm divides token t by its rms,
    so an error δ_t there is seen as ‖δ_t‖²·w_t. Shape: x's without the last dim."""
    return 1.0 / (x.pow(2).mean(-1) + 1e-6)


def run_layer(layer, hidden, args, kwargs, compute=None):
    """One decoder layer; with `compute` (e.g. torch.bfloat16) its matmuls run under autocast, the residual
    stream it returns keeps the model's dtype."""
    with torch.autocast(hidden.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
        out = layer(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(hidden.dtype)


def compute_dtype_for(name: str, model) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards (None: the model's own). `auto`: bfloat16 for a float32
    model on hardware with fast bfloat16 matmuls (CUDA with bf16, CPUs with AVX512-BF16/AMX), else none."""
    if name not in COMPUTE_DTYPES:
        raise NeuroprojError(f"unknown compute dtype {name!r}: choose from {', '.join(COMPUTE_DTYPES)}")
    p = next(model.parameters())
    if name == "float32" or p.dtype != torch.float32:
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if p.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if p.device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def _nonfinite_hint(model, compute) -> str:
    if any(not torch.isfinite(p).all() for p in model.parameters() if p.device.type != "meta"):
        return "the model's weights hold NaN/inf: check or re-download the checkpoint"
    if next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        return "the model overflows in its dtype: load it with --dtype float32"
    if compute is not None:
        return "the bfloat16 calibration matmuls overflow: pass --compute-dtype float32"
    return "the model produces huge activations on this text"


@register_calibration("sequential")
class Sequential(Calibration):
    """Layer by layer on the inputs the pruned model produces (see the module docstring)."""

    def __init__(self, lm, cfg, *, data=None, stats=None, projections=None, progress=True, ids=None, stream=None):
        super().__init__(lm, cfg, progress=progress, stream=stream)
        self.held = None    # the held-back windows of --allocation search
        if cfg.reconstruct and distributed()[2] > 1:
            raise NeuroprojError("block reconstruction (--reconstruct) runs in one process (its Adam steps would "
                                 "need gradients all-reduced across processes): prune in one process or with "
                                 "--reconstruct 0")
        if get_skips(lm.model):  # skip hooks hand activations from layer l to m within one forward pass
            raise NeuroprojError("the model has applied skip connections, which layer-by-layer calibration cannot "
                                 "run: prune with --calibration oneshot, or prune before applying skips")
        if ids is None and isinstance(data, torch.Tensor):
            ids = data                  # token ids given directly (benchmarks, scripts): nothing is sampled
        if ids is None:
            if data is None:
                raise NeuroprojError("sequential calibration needs --data (a stats file alone is not enough)")
            hold = cfg.search_samples if cfg.allocation == "search" else 0
            ids, self.description = calibration_ids(lm, data, cfg.samples, cfg.seqlen, cfg.seed, holdout=hold)
            if hold:
                ids, self.held = ids[:cfg.samples], ids[cfg.samples:]
        elif self.description is None:
            if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
                raise NeuroprojError(f"calibration token ids must be a (windows, tokens) integer tensor with at "
                                     f"least 2 tokens, got shape {tuple(ids.shape)} {ids.dtype}")
            self.description = f"in-memory token ids ({ids.shape[0]}×{ids.shape[1]})"
        if self.held is None and cfg.allocation == "search":   # ids given as they are: their last rows score the
            # search (they stay in the fit too: the caller chose every window)
            self.held = ids[-min(cfg.search_samples, ids.shape[0]):]
        self.ids = ids
        self.compute = compute_dtype_for(cfg.compute_dtype, lm.model)
        if cfg.target == "residual" and not lm.adapter.mlp_output_is_added(lm.model):
            raise NeuroprojError(f"target 'residual' needs an MLP whose output is added to the residual; "
                                 f"{lm.model.config.model_type} normalises it first: use --target layer or dense")
        self.meta = {"target": cfg.target, "fingerprint": lm.fingerprint}

    def global_widths(self, cfg, total, search: bool = False):
        """Widths minimising the summed error curves (`error_curves` on the first `alloc_samples` windows);
        with `search`, then refined by the measured loss on the held-back windows (search.py)."""
        n = min(self.ids.shape[0], cfg.alloc_samples)
        fold = {} if search else None
        curves = error_curves(self.lm, self.ids[:n], select=cfg.select, weights=cfg.alloc_weights, seed=cfg.seed,
                              ridge=cfg.ridge, batch_size=max(1, 2048 // self.ids.shape[1]), compute=self.compute,
                              progress=self.progress, fold_moments=fold)
        widths = allocate_by_error(curves, total, cfg.multiple, cfg.max_shift)
        if not search:
            return widths
        model, a = self.lm.model, self.lm.adapter
        orders = {}
        for i, (G, mean) in fold.items():
            W = a.out_weight(model, i).detach().double().cpu()
            m = LayerMoments(i, G, mean, W, a.in_norms(model, i), ridge=cfg.ridge)
            orders[i] = torch.argsort(SELECTORS[cfg.select](m, m.N, cfg.seed).scores, descending=True)
        ridge = effective_ridge(cfg.ridge, n * self.ids.shape[1], max(self.widths().values()), warn=False)
        net, fold = Supernet(model, a, fold, orders, ridge), None   # the supernet holds what it needs
        grids = width_grids({i: c.numel() - 1 for i, c in curves.items()}, total, cfg.multiple, cfg.max_shift)
        bs = max(1, 2048 // self.held.shape[1])

        def measure(w):
            net.apply(w)
            return loss_and_grads(model, a, self.held, list(w), batch_size=bs, compute=self.compute)
        try:
            r = search_widths(net, widths, grids, measure, rounds=cfg.search_rounds, pairs=cfg.search_pairs,
                              stride=-(-cfg.search_step // cfg.multiple), progress=self.progress)
        finally:
            net.restore()
        self.meta["search"] = {"held_out_windows": int(self.held.shape[0]), "rounds": r.rounds,
                               "loss_start": r.loss_start, "loss_end": r.loss_end, "moves": r.moves}
        return r.widths

    def layers(self):
        """Under several processes (torch.distributed) each takes every W-th batch of calibration windows, and
        each layer's moments are all-reduced before it is selected and folded: every process computes the same
        kept set and weights (equal to one process up to the order of the float64 sums). Block reconstruction is
        refused there (in `__init__`): its Adam steps would need their gradients all-reduced too."""
        model, a, cfg, stream = self.lm.model, self.lm.adapter, self.cfg, self.stream
        _, rank, world = distributed()
        bs = cfg.batch_size or max(1, 4096 // self.ids.shape[1])
        batches = [self.ids[b:b + bs] for b in range(0, self.ids.shape[0], bs)]
        if len(batches) < world:
            raise NeuroprojError(f"{len(batches)} calibration batches for {world} processes: every process needs one; "
                                 f"give more --samples or a smaller --batch-size")
        states = layer_inputs(model, a, batches[rank::world], keep=stream.stash)
        hidden = [s[0] for s in states]          # the stream entering the current layer, per batch
        calls = [s[1:] for s in states]          # each batch's (args, kwargs) for the layers
        del states
        dense = [h.clone() for h in hidden] if cfg.target in ("dense", "residual") else None
        # a streamed layer is written as the checkpoint will hold it: with the MLP biases update_config declares
        stream.declare_bias = cfg.adds_bias and not a.out_has_bias(model)
        bar = tqdm(total=a.num_layers(model), desc="prune", unit="layer", disable=not self.progress or rank != 0,
                   dynamic_ncols=True)
        self.reconstructed, self.swapped = {}, {}
        try:
            for i in range(a.num_layers(model)):
                layer = stream.fetch(i)
                W = a.out_weight(model, i).detach().to(self.cdt)
                b_old = a.out_bias(model, i)
                work, acts, outs, blocks = self._measure(i, layer, W, calls, hidden, dense)
                yield work  # the caller prunes layer i in place and fills work.keep / W_new / b_new
                if work.swaps is not None:
                    self.swapped[i] = work.swaps
                work.held = None
                if blocks is not None:  # gate/up change too: the closed-form carry no longer holds
                    self.reconstructed[i] = self._reconstruct(i, layer, blocks)
                    acts.clear()
                self._carry(work, layer, W, b_old, calls, hidden, acts, outs)
                stream.release(i)
                bar.update(1)
        finally:
            bar.close()
        if self.meta.get("fingerprint") is None:  # a disk stream saw the dense weights one layer at a time
            self.meta["fingerprint"] = stream.fingerprint()
        if self.swapped:
            sw = self.swapped.values()
            self.meta["swaps"] = {"accepted": sum(x["swaps"] for x in sw), "trials": sum(x["trials"] for x in sw),
                                  "held_out_error_before": sum(x["held_before"] for x in sw) / len(sw),
                                  "held_out_error_after": sum(x["held_after"] for x in sw) / len(sw),
                                  "layers": self.swapped}
        if self.reconstructed:
            r = self.reconstructed.values()
            self.meta["reconstruct"] = {
                "held_out_error_before": sum(x.loss_before for x in r) / len(r),
                "held_out_error_after": sum(x.loss_after for x in r) / len(r),
                "layers": {i: vars(x) for i, x in self.reconstructed.items()}}

    def _reconstruct(self, i, layer, blocks):
        """Block reconstruction of layer i after its fold (see reconstruct.py): the last `holdout` share of the
        calibration windows is held back for early stopping, the rest is fitted."""
        cfg = self.cfg
        n = sum(b[0].shape[0] for b in blocks)                   # windows
        k = min(max(1, round(cfg.reconstruct_holdout * n)), n - 1) if n > 1 else 0
        fit, held, seen = [], [], 0
        for b in blocks:                                          # split at a window boundary
            cut = min(max(n - k - seen, 0), b[0].shape[0])
            if cut > 0:
                fit.append(tuple(t[:cut] if torch.is_tensor(t) else t for t in b[:3]) + b[3:])
            if cut < b[0].shape[0]:
                held.append(tuple(t[cut:] if torch.is_tensor(t) else t for t in b[:3]) + b[3:])
            seen += b[0].shape[0]
        if cfg.reconstruct_scope == "layer":
            if k and any(b[0].shape[0] != len(blocks[0][0]) for b in fit + held):
                fit, held = blocks, blocks  # windows carry per-batch arguments: no split inside a batch
            block, batch = layer, 1
        else:
            block, batch = self.lm.adapter.mlp(self.lm.model, i), cfg.reconstruct_tokens
        held = held or fit
        return reconstruct(block, fit, held, steps=cfg.reconstruct, lr=cfg.reconstruct_lr, batch=batch,
                           compute=self.compute, seed=cfg.seed + i)

    @property
    def cdt(self):
        return torch.float64 if next(self.lm.model.parameters()).dtype == torch.float64 else torch.float32

    def _measure(self, i, layer, W, calls, hidden, dense):
        """Run layer i on every batch and accumulate its (token-weighted) moments, and with a dense target
        the target's cross-moments; keep each batch's activations h and layer output for the carry. Under
        several processes the totals are summed across them (one weight scale: rank 0's first batch's)."""
        model, a, cfg, compute, cdt = self.lm.model, self.lm.adapter, self.cfg, self.compute, self.cdt
        stream, (dist, _, _) = self.stream, distributed()
        dev = stream.device
        N, d = W.shape[1], W.shape[0]
        additive = a.mlp_output_is_added(model)
        grab = {}
        hooks = [a.out_proj(model, i).register_forward_pre_hook(lambda mod, args: grab.__setitem__("h", args[0]))]
        scope = cfg.reconstruct_scope if cfg.reconstruct else None
        if scope == "mlp":  # the MLP's input and its dense output on that input are the block's data
            hooks.append(a.mlp(model, i).register_forward_hook(
                lambda mod, args, out: grab.update(x=args[0], y=out[0] if isinstance(out, tuple) else out)))
        blocks = [] if scope else None
        mo = Moments(N, dev)
        # --swaps: the last swap_holdout share of the batches also goes into `mh`, which judges the swaps
        n_held = min(len(calls) - 1, max(1, round(cfg.swap_holdout * len(calls)))) if cfg.swaps else 0
        mh = mo.part() if n_held > 0 else None
        C = torch.zeros(d, N, dtype=torch.float64, device=dev) if dense is not None else None
        c = torch.zeros(d, dtype=torch.float64, device=dev) if dense is not None else None
        acts, outs = [], []
        try:
            with torch.inference_mode():
                for bi, (args, kw) in enumerate(calls):
                    x = stream.bring(hidden[bi])
                    out = run_layer(layer, x, args, kw, compute)
                    h = grab["h"].reshape(-1, N).to(cdt)
                    # the next norm divides each token's residual by its rms
                    w = rms_token_weights(out.reshape(-1, d).to(cdt)).unsqueeze(1) if cfg.weighting == "rms" else None
                    if bi == 0 and w is not None and dist is not None:
                        mo.share_scale(w, dist)
                    w = mo.add(h, w)
                    if mh is not None and bi >= len(calls) - n_held:
                        mh.add(h, w)
                    if dense is not None:
                        dense_out = run_layer(layer, stream.bring(dense[bi]), args, kw, compute)
                        if cfg.target == "dense":   # the dense MLP output on the dense stream
                            y = grab["h"].reshape(-1, N).to(cdt) @ W.T
                        else:                       # residual: also close the gap between the two streams
                            y = h @ W.T + (dense_out - out).reshape(-1, d).to(cdt)
                        C += (y.T @ (h if w is None else h * w)).double()
                        c += (y if w is None else y * w).sum(0, dtype=torch.float64)
                        dense[bi] = stream.stash(dense_out)
                    if additive:  # in the forward's own dtype (bf16 model or autocast: 2 bytes), exact in it
                        acts.append(stream.stash(grab["h"].reshape(-1, N)))
                        outs.append(stream.stash(out))
                    if scope is not None:  # (input, target, token weights, call arguments), per window
                        tw = None if w is None else w.reshape(out.shape[:-1]).float()  # (its scale cancels)
                        if scope == "mlp":
                            blocks.append((grab["x"].float().clone(), grab["y"].float().clone(), tw, (), {}))
                        else:
                            blocks.append((x, out.float(), tw, args, kw))
        finally:
            for hk in hooks:
                hk.remove()
        if dist is not None:  # every process gets the totals of all tokens (NaN included, so all refuse alike)
            mo.all_reduce(dist)
            if mh is not None:
                mh.all_reduce(dist)
            if C is not None:
                dist.all_reduce(C)
                dist.all_reduce(c)
        G, mean = mo.finish()
        if not torch.isfinite(G).all():
            raise NeuroprojError(f"non-finite activations at layer {i}: {_nonfinite_hint(model, compute)}")
        ridge = effective_ridge(cfg.ridge, mo.tokens, N)
        if dense is not None:
            C, c = (C / mo.n).cpu(), (c / mo.n).cpu()
            W_eff = chol_solve(G, C, ridge)  # the full-width least-squares map onto the target
        else:
            W_eff = W.double().cpu()
        work = LayerWork(i, LayerMoments(i, G, mean, W_eff, a.in_norms(model, i), ridge=ridge),
                         FoldInputs(G, mean, C, c, ridge=ridge))
        if mh is not None:    # the selection and the final fold use all windows; the swaps fit and judge apart
            work.held = (mo.without(mh).finish()[0], mh.finish()[0])
        return work, acts, outs, blocks

    def _carry(self, work, layer, W, b_old, calls, hidden, acts, outs):
        """Carry the pruned layer's output forward: in closed form, out' = out − W h + W' h_K (+ Δb), when the
        MLP output is added to the residual as is (one matmul per batch); otherwise run the pruned layer again."""
        cdt, stream = self.cdt, self.stream
        with torch.inference_mode():
            if not acts:
                for bi, (args, kw) in enumerate(calls):
                    hidden[bi] = stream.stash(run_layer(layer, stream.bring(hidden[bi]), args, kw, self.compute))
                return
            dev = W.device
            # h_K W'ᵀ − h Wᵀ = h (W'_full − W)ᵀ, W' scattered back to full width
            dW = -W.clone()
            dW[:, work.keep.to(dev)] += work.W_new.to(dev, cdt)
            dWt = dW.T.contiguous().to(acts[0].dtype)  # the carry's product in the activations' dtype
            bn = work.b_new
            db = None if bn is None else (bn - (0 if b_old is None else b_old.double().cpu())).to(dev, cdt)
            for bi in range(len(calls)):
                delta = (stream.bring(acts[bi]) @ dWt).to(cdt)
                if db is not None:
                    delta += db
                o = stream.bring(outs[bi])
                hidden[bi] = stream.stash((o.to(cdt) + delta.view(o.shape)).to(o.dtype))
        acts.clear()  # one layer's activations at a time
        outs.clear()


def error_curves(lm: LoadedModel, ids: torch.Tensor, *, select: str, weights: str = "grad", batch_size: int = 4,
                 seed: int = 0, ridge: float = 1e-7, compute=None, progress: bool = True,
                 fold_moments: dict | None = None) -> dict[int, torch.Tensor]:
    """Per layer i, e_i(k): the dense layer's output error after the least-squares refit when it keeps the
    top-k neurons of `select` (see `plan.error_curve`), with token t weighted so that all layers share one
    unit. `grad`: w_t = ‖∂loss/∂x_i,t‖², the squared gradient of the summed next-token loss with respect to
    the residual stream after layer i; under an isotropic Fisher approximation an error δ_t there costs
    ΔL ≈ ½·w_t·‖δ_t‖²/d, so e_i(k) is in units of loss. `rms`: w_t = 1/mean(x_i,t²), the error as the next
    norm sees it (no backward pass, blind to how much later layers and the head amplify it).
    Cost: one forward (and with grad one backward) of the dense model over `ids`, one N² Gram per token and
    layer, one O(N³) Cholesky per layer; memory: one batch's activations and L float64 N×N Grams.
    `fold_moments` (a dict): also filled with {layer: (E[h hᵀ], E[h])} of the same pass under the fold's rms
    token weights (what `search.Supernet` folds with); twice the Grams' memory."""
    model, a = lm.model, lm.adapter
    dev = next(model.parameters()).device
    L = a.num_layers(model)
    acts, outs = {}, {}
    mom: list[Moments | None] = [None] * L
    fmom: list[Moments | None] = [None] * L
    n = 0

    def grab_h(i):
        return lambda mod, args: acts.__setitem__(i, args[0].detach())

    def grab_out(i):
        def hook(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            if x.requires_grad:
                x.retain_grad()
            outs[i] = x
        return hook

    hooks = [a.out_proj(model, i).register_forward_pre_hook(grab_h(i)) for i in range(L)]
    hooks += [layer.register_forward_hook(grab_out(i)) for i, layer in enumerate(a.layers(model))]
    try:
        for b in tqdm(range(0, ids.shape[0], batch_size), desc="allocate", unit="batch", disable=not progress,
                      dynamic_ncols=True):
            x = ids[b:b + batch_size].to(dev)
            if weights == "grad":
                with activations_only(model):
                    loss_backward(model, x, compute)
            else:
                with torch.inference_mode(), torch.autocast(dev.type, dtype=compute or torch.bfloat16,
                                                            enabled=compute is not None):
                    model(input_ids=x, use_cache=False)
            with torch.no_grad():
                for i in range(L):
                    o = outs[i]
                    rms = rms_token_weights(o.detach().reshape(-1, o.shape[-1]).float()).unsqueeze(1) \
                        if weights == "rms" or fold_moments is not None else None
                    w = rms if weights == "rms" else o.grad.reshape(-1, o.shape[-1]).float().pow(2).sum(-1, keepdim=True)
                    h = acts[i].reshape(w.shape[0], -1).float()
                    if mom[i] is None:
                        mom[i] = Moments(h.shape[1], dev)
                        fmom[i] = Moments(h.shape[1], dev) if fold_moments is not None else None
                    mom[i].add(h, w)
                    if fmom[i] is not None:
                        fmom[i].add(h, rms)
                n += x.numel()
            acts.clear()
            outs.clear()
    finally:
        for h in hooks:
            h.remove()
    curves = {}
    for i in range(L):
        Gi, mean = mom[i].finish()
        W = a.out_weight(model, i).detach().double().cpu()
        N = W.shape[1]
        # the fold's ridge rule keeps the Cholesky stable on few tokens (its warning belongs to the fold)
        m = LayerMoments(i, Gi, mean, W, a.in_norms(model, i), ridge=effective_ridge(ridge, n, N, warn=False))
        curves[i] = error_curve(m, SELECTORS[select](m, N // 2, seed).scores) * (mom[i].weight / n)
        mom[i] = None
        if fold_moments is not None:
            fold_moments[i] = fmom[i].finish()
    return curves
