"""Calibrations: where each layer's moments come from. Two implementations of one interface, in `CALIBRATIONS`.

A calibration yields, layer by layer, a `LayerWork`: the moments a selection reads (`moments`) and those a
fold uses (`fold`). The one loop (`api.prune_layers`) prunes that layer in place (select → fold → slice) and
records the kept set and new weights in the work item before asking for the next layer, so a calibration
that runs the model (sequential) sees the already-pruned layers.

- `oneshot` — moments of the dense model from a statistics file (`collect`, or one pass made here); every
  layer is planned and folded to preserve its own dense output: C = W G. Cost: one statistics pass (none
  with a given file) plus O(N³) per layer.
- `sequential` (default) — layer by layer, as SparseGPT/Wanda do: the calibration tokens' hidden states are
  carried through the already-pruned layers, so each layer is planned and folded on the inputs it will really
  see. This module is the *pipeline*: the inputs of layer 0, the batches, the offload stream (offload.py),
  the share of each process, and the carry — the pruned layer's output updated in closed form,
  out' = out − W h̃ + W' h̃_K, when the MLP output is added to the residual as is (else the layer runs again).
  What a layer's forward accumulates (token weights, moments, the fold target's cross-moments) is measure.py;
  optional steps (swaps.py, reconstruct.py) are pass hooks. Cost: one forward pass (two with a dense target)
  plus one N×N Gram per layer and token; memory: the hidden states of all calibration tokens (the carried
  stream and the layer's outputs, 2·tokens·d values, 3· with a dense target) and one layer's neuron activations
  (tokens·N in the forward's dtype) — with the model's layers where the `offload.LayerStream` keeps them, and the
  hidden states on the device or in host memory: the formula is in offload.py. Under several processes
  (torch.distributed) each takes every W-th batch and each layer's moments are all-reduced before it is pruned,
  so all of them prune alike.

What a calibration offers the allocations (allocate.py): `widths()`, `ids` (its calibration windows; None for
one-shot statistics), `held` (windows held back from the fit), `moments(i)` (one-shot: the dense layer's).
To add a calibration: subclass `Calibration`, implement `layers`, and register it with
`@CALIBRATIONS.register("name")`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..errors import NeuroprojError
from ..model import LoadedModel, get_skips
from ..registry import Registry
from ..stats import (COMPUTE_DTYPES, HEAD_SITE, Moments, calibration_ids, collect, compute_autocast, compute_dtype_for,
                     distributed, hooked, load_stats, nonfinite_hint, products_for)
from .fold import FoldInputs, chol_solve, effective_ridge
from .measure import TARGETS, WEIGHTINGS, Batch, PassHook, TargetInputs, TargetMoments
from .offload import LayerStream
from .reconstruct import Reconstruction
from .select import LayerMoments
from .swaps import Swaps

CALIBRATIONS = Registry("calibration", "a Calibration subclass: Calibration(lm, cfg, data=, stats=, ...)")


@dataclass
class LayerWork:
    """One layer handed to the loop's select → fold → slice step; the step fills `keep`, `W_new`, `b_new`."""

    layer: int
    moments: LayerMoments | None     # what selection reads (None: no statistics, only fold `none` applies)
    fold: FoldInputs | None          # what the fold uses
    site: str = "mlp"                # mlp (neurons) or attn (heads)
    keep: torch.Tensor | None = None
    W_new: torch.Tensor | None = None
    b_new: torch.Tensor | None = None
    hooks: list = field(default_factory=list)   # the pass hooks that may refine the selection

    def refine(self, layer_plan: dict) -> dict:
        """The layer plan after every pass hook's refinement (swaps)."""
        for h in self.hooks:
            layer_plan = h.refine(self, layer_plan)
        return layer_plan


class Calibration:
    """The interface: `layers()` yields LayerWork in layer order; `description` names the calibration data;
    `meta` goes into the plan. `stream` (offload.LayerStream) says where the decoder layers live; only the
    sequential calibration streams them (the config refuses offload cpu/disk for the others)."""

    name = ""
    ids = held = None       # calibration windows, held-back windows (sequential)
    compute = None
    drop: list[int] = []    # whole layers the plan removes: no work for them (set before `layers()`)
    no_attn: list[int] = [] # layers whose attention sub-layer the plan removes (sequential: before measuring them)
    heads = False           # whether the attention heads are pruned too: an `attn` work item before each MLP

    def __init__(self, lm: LoadedModel, cfg, *, data=None, stats=None, projections=None, progress: bool = True,
                 stream: LayerStream | None = None):
        self.lm, self.cfg, self.progress = lm, cfg, progress
        self.stream = stream if stream is not None else LayerStream(lm.model)
        self.description, self.meta = None, {}

    def widths(self) -> dict[int, int]:
        """The MLP width of every layer this calibration prunes (the layers a plan removes whole are not)."""
        a, m = self.lm.adapter, self.lm.model
        return {i: a.width(m, i) for i in range(a.num_layers(m)) if i not in self.drop}

    def layers(self) -> Iterator[LayerWork]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- one-shot
@CALIBRATIONS.register("oneshot")
class OneShot(Calibration):
    """Dense moments from a statistics file (or one `collect` pass over `data`), or given per layer
    (`moments`: {layer: {"G", "mean"[, "C", "c"]}}). With neither and no data, layers carry no moments: only
    fold `none` applies (slicing a written plan)."""

    def __init__(self, lm, cfg, *, data=None, stats=None, projections=None, progress=True, stream=None,
                 moments: dict | None = None):
        super().__init__(lm, cfg, progress=progress, stream=stream)
        self.given, self.stats, self.projections = moments, None, projections
        if moments is not None or (stats is None and data is None and not self.needs_moments(cfg)):
            return
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
        self.stats = stats
        self.description = stats.meta.get("data")
        self.meta = {"stats": stats.path, "fingerprint": stats.meta.get("fingerprint")}

    @staticmethod
    def needs_moments(cfg) -> bool:
        return cfg.fold != "none" or cfg.adds_bias

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
            if i in self.drop:
                continue
            if self.heads:   # dense statistics hold no attention site: a plan's heads are sliced (fold none)
                yield LayerWork(i, None, None, site="attn")
            if self.given is not None:
                g = self.given.get(i)
                yield LayerWork(i, None, None if g is None else FoldInputs(g["G"], g["mean"], g.get("C"), g.get("c"),
                                                                           ridge=self.cfg.ridge))
            elif self.stats is None:
                yield LayerWork(i, None, None)
            else:
                m = self.moments(i)
                yield LayerWork(i, m, FoldInputs(m.G, m.mean, ridge=m.ridge))


# ------------------------------------------------------------------------------------------- sequential
class _StopAt(Exception):
    pass


def layer_inputs(model, adapter, batches, keep=None):
    """Hidden states entering layer 0 and the keyword arguments the model passes to its layers, per batch.
    `keep(x)` puts each batch's hidden states where they are to live (default: where the model made them)."""
    caught = []

    def grab(key, call):
        args, kwargs = call
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach() if keep is None else keep(hidden.detach()), args[1:], kwargs))
        raise _StopAt

    dev = model.get_input_embeddings().weight.device  # (a streamed model's layers may live elsewhere)
    with torch.inference_mode(), hooked([(0, adapter.layers(model)[0], "call")], grab):
        for ids in batches:
            try:
                model(input_ids=ids.to(dev), use_cache=False)
            except _StopAt:
                pass
    return caught


def run_layer(layer, hidden, args, kwargs, compute=None):
    """One decoder layer; with `compute` (e.g. torch.bfloat16) its matmuls run under autocast, the residual
    stream it returns keeps the model's dtype."""
    with compute_autocast(hidden.device, compute):
        out = layer(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(hidden.dtype)


@CALIBRATIONS.register("sequential")
class Sequential(Calibration):
    """Layer by layer on the inputs the pruned model produces (see the module docstring)."""

    def __init__(self, lm, cfg, *, data=None, stats=None, projections=None, progress=True, stream=None):
        super().__init__(lm, cfg, progress=progress, stream=stream)
        if cfg.reconstruct and distributed()[2] > 1:
            raise NeuroprojError("block reconstruction (--reconstruct) runs in one process (its Adam steps would "
                                 "need gradients all-reduced across processes): prune in one process or with "
                                 "--reconstruct 0")
        if get_skips(lm.model):  # skip hooks hand activations from layer l to m within one forward pass
            raise NeuroprojError("the model has applied skip connections, which layer-by-layer calibration cannot "
                                 "run: prune with --calibration oneshot, or prune before applying skips")
        self.ids, self.held, self.description = self._windows(lm, cfg, data)
        self.compute = compute_dtype_for(cfg.compute_dtype, lm.model)
        additive = {f"target {cfg.target!r}": TARGETS[cfg.target].additive and "--target layer or dense",
                    "--drop-fold previous": cfg.drop_fold == "previous" and "--drop-fold none"}
        for what, fix in additive.items():
            if fix and not lm.adapter.mlp_output_is_added(lm.model):
                raise NeuroprojError(f"{what} needs an MLP whose output is added to the residual; "
                                     f"{lm.model.config.model_type} normalises it first: use {fix}")
        self.hooks: list[PassHook] = []
        if cfg.swaps:
            self.hooks.append(Swaps(cfg))
        if cfg.reconstruct:
            self.hooks.append(Reconstruction(cfg, lm, self.compute))
        self.meta = {"target": cfg.target, "fingerprint": lm.fingerprint}

    @staticmethod
    def _windows(lm, cfg, data):
        """(calibration windows, held-back windows or None, description). `data`: a data spec (`samples` windows
        of `seqlen` tokens drawn with `seed`, plus the held-back ones beside them) or a (windows, tokens) tensor
        of token ids used as given (the held-back windows are then its last rows, also fitted)."""
        hold = cfg.held_out_windows
        if isinstance(data, torch.Tensor):
            ids = data
            if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.dtype.is_floating_point:
                raise NeuroprojError(f"calibration token ids must be a (windows, tokens) integer tensor with at "
                                     f"least 2 tokens, got shape {tuple(ids.shape)} {ids.dtype}")
            held = ids[-min(hold, ids.shape[0]):] if hold else None
            return ids, held, f"in-memory token ids ({ids.shape[0]}×{ids.shape[1]})"
        if data is None:
            raise NeuroprojError("sequential calibration needs --data (a stats file alone is not enough)")
        ids, desc = calibration_ids(lm, data, cfg.samples, cfg.seqlen, cfg.seed, holdout=hold)
        return (ids[:cfg.samples], ids[cfg.samples:], desc) if hold else (ids, None, desc)

    @property
    def cdt(self):
        """The totals' precision of the per-batch products (float64 for a float64 model, else float32)."""
        return torch.float64 if next(self.lm.model.parameters()).dtype == torch.float64 else torch.float32

    def layers(self):
        """Each layer in turn: measure it on the carried hidden states, hand it to the loop to prune, let the pass
        hooks act on the pruned layer, then carry its output forward."""
        model, a, cfg, stream = self.lm.model, self.lm.adapter, self.cfg, self.stream
        calls, hidden, dense = self._inputs()
        # a streamed layer is written as the checkpoint will hold it: with the MLP biases update_config declares
        stream.declare_bias = cfg.adds_bias and not a.out_has_bias(model)
        bar = tqdm(total=a.num_layers(model), desc="prune", unit="layer",
                   disable=not self.progress or distributed()[1] != 0, dynamic_ncols=True)
        try:
            for i in range(a.num_layers(model)):
                layer = stream.fetch(i)
                dense_step = self._dense_step(layer, calls, dense) if dense is not None else None
                if i in self.drop:   # removed whole: the pruned stream goes on unchanged (identity)
                    stream.release(i)
                    bar.update(1)
                    continue
                if i in self.no_attn and a.has_attention(model, i):   # the MLP is measured without it
                    a.remove_attention(model, i)
                if self.heads and i not in self.no_attn:  # heads first; the MLP is then measured behind them
                    yield self._measure_heads(i, layer, calls, hidden)
                W = a.out_weight(model, i).detach().to(self.cdt)
                b_old = a.out_bias(model, i)
                work, acts, outs = self._measure(i, layer, W, calls, hidden, dense_step)
                yield work  # the loop prunes layer i in place and fills work.keep / W_new / b_new
                changed = [h.folded(work, layer) for h in self.hooks]
                mlp_change = next((c for c in changed if isinstance(c, list)), None)
                if any(c is True for c in changed):
                    acts.clear()   # the layer changed beyond its output projection: run it again
                self._carry(work, layer, W, b_old, calls, hidden, acts, outs, mlp_change)
                stream.release(i)
                bar.update(1)
        finally:
            bar.close()
        if self.meta.get("fingerprint") is None:  # a disk stream saw the dense weights one layer at a time
            self.meta["fingerprint"] = stream.fingerprint()
        for h in self.hooks:
            if h.report() is not None:
                self.meta[h.name] = h.report()

    def _inputs(self):
        """The calibration batches of this process (every W-th under W processes): the layers' call arguments,
        the hidden states entering layer 0 (kept where the stream says) and, for a target that needs it, a copy
        that will carry the dense model's stream."""
        _, rank, world = distributed()
        bs = self.cfg.batch_size or max(1, 4096 // self.ids.shape[1])
        batches = [self.ids[b:b + bs] for b in range(0, self.ids.shape[0], bs)]
        if len(batches) < world:
            raise NeuroprojError(f"{len(batches)} calibration batches for {world} processes: every process needs one; "
                                 f"give more --samples or a smaller --batch-size")
        states = layer_inputs(self.lm.model, self.lm.adapter, batches[rank::world], keep=self.stream.stash)
        hidden = [s[0] for s in states]          # the stream entering the current layer, per batch
        calls = [s[1:] for s in states]          # each batch's (args, kwargs) for the layers
        behind = (self.drop or self.no_attn) and self.cfg.drop_target != "layer"   # refits behind a removal
        carry_dense = TARGETS[self.cfg.target].dense_stream or bool(behind)
        dense = [h.clone() for h in hidden] if carry_dense else None
        return calls, hidden, dense

    def _target(self, i: int) -> str:
        """The fold target of layer i's MLP: the configured one, or `drop_target` residual / dense behind a removed
        layer or attention sub-layer (the MLPs after a removal refit against the dense model's stream, to make up for
        the missing part; a removed attention's own MLP is behind it). `drop_target` layer (the default): the
        configured one everywhere."""
        cfg = self.cfg
        first = min([d + 1 for d in self.drop] + list(self.no_attn), default=None)
        if first is not None and i >= first and cfg.target == "layer" and cfg.fold == "lstsq" \
                and cfg.drop_target != "layer":
            additive_ok = self.lm.adapter.mlp_output_is_added(self.lm.model)
            return cfg.drop_target if additive_ok or not TARGETS[cfg.drop_target].additive else "dense"
        return cfg.target

    def _ahead(self, i: int) -> list:
        """The removed layers right after layer i (i+1, i+2, … while removed) whose work layer i's MLP takes over
        (`drop_fold` previous): its fold target becomes its own output plus what they add to the stream,
        y*_t = W h_t + (F(out_t) − out_t), F the removed layers run on layer i's output. Empty where nothing is
        removed behind i or with `drop_fold` none (the config and __init__ refuse `previous` where it cannot apply)."""
        if self.cfg.drop_fold != "previous":
            return []
        run, j = [], i + 1
        while j in self.drop:
            run.append(j)
            j += 1
        return run

    def _dense_step(self, layer, calls, dense) -> list:
        """Advance the dense model's stream through the (still dense) layer; per batch (its MLP neuron activations,
        its output) for the dense fold targets."""
        a, model, stream, grab, out = self.lm.adapter, self.lm.model, self.stream, {}, []
        i = list(a.layers(model)).index(layer)
        with torch.inference_mode(), hooked([("h", a.out_proj(model, i), "in")], grab.__setitem__):
            for bi, (args, kw) in enumerate(calls):
                dense_out = run_layer(layer, stream.bring(dense[bi]), args, kw, self.compute)
                out.append((stream.stash(grab["h"]), stream.stash(dense_out)))
                dense[bi] = out[-1][1]
        return out

    def _measure_heads(self, i, layer, calls, hidden) -> LayerWork:
        """Run layer i on every batch and accumulate the (token-weighted) moments of its attention output
        projection's input — the heads' outputs — for the head selection and the o_proj refit (heads.py)."""
        model, a, cfg, stream = self.lm.model, self.lm.adapter, self.cfg, self.stream
        dist = distributed()[0]
        o = a.attn_out_proj(model, i)
        W = o.weight.detach().double().cpu()
        mo = Moments(W.shape[1], stream.device, product_dtype=products_for(HEAD_SITE, self.compute))
        weigh, grab = WEIGHTINGS[cfg.weighting], {}
        with torch.inference_mode(), hooked([("z", o, "in")], grab.__setitem__):
            for bi, (args, kw) in enumerate(calls):
                out = run_layer(layer, stream.bring(hidden[bi]), args, kw, self.compute)
                w = weigh(out.reshape(-1, out.shape[-1]).to(self.cdt))
                if bi == 0 and w is not None and dist is not None:
                    mo.share_scale(w, dist)
                mo.add(grab["z"].reshape(-1, W.shape[1]), w)
        if dist is not None:
            mo.all_reduce(dist)
        G, mean = mo.finish()
        if not torch.isfinite(G).all():
            raise NeuroprojError(f"non-finite activations at layer {i}: {nonfinite_hint(model, self.compute)}")
        ridge = effective_ridge(cfg.ridge, mo.tokens, W.shape[1])
        w_in = a.attn(model, i).q_proj.weight.detach().double().norm(dim=1).cpu()
        return LayerWork(i, LayerMoments(i, G, mean, W, w_in, ridge=ridge), FoldInputs(G, mean, ridge=ridge),
                         site="attn")

    def _measure(self, i, layer, W, calls, hidden, dense_step):
        """Run layer i on every batch and accumulate its moments (measure.py), telling the pass hooks of each
        batch; keep each batch's activations h and layer output for the carry. Under several processes the
        totals are summed across them (one weight scale: rank 0's first batch's). Returns (work, acts, outs)."""
        model, a, cfg, compute, cdt, stream = self.lm.model, self.lm.adapter, self.cfg, self.compute, self.cdt, self.stream
        dist = distributed()[0]
        N, d = W.shape[1], W.shape[0]
        weigh, target = WEIGHTINGS[cfg.weighting], TARGETS[self._target(i)]
        ahead = [stream.fetch(j) for j in self._ahead(i)]   # removed layers whose work this MLP takes over
        mo = Moments(N, stream.device, product_dtype=products_for("mlp.neurons", compute))
        tm = TargetMoments(d, N, stream.device) if target.dense_stream or ahead else None
        closed_form = a.mlp_output_is_added(model)   # else the carry runs the pruned layer again
        acts, outs, grab = [], [], {}
        for h_ in self.hooks:
            h_.begin(i, layer, mo, len(calls))
        try:
            with torch.inference_mode(), hooked([("h", a.out_proj(model, i), "in")], grab.__setitem__):
                for bi, (args, kw) in enumerate(calls):
                    x = stream.bring(hidden[bi])
                    out = run_layer(layer, x, args, kw, compute)
                    h = grab["h"].reshape(-1, N)   # the forward's dtype (bf16 under autocast): no copy
                    w = weigh(out.reshape(-1, d).to(cdt))
                    if bi == 0 and w is not None and dist is not None:
                        mo.share_scale(w, dist)
                    w = mo.add(h, w)                # converts as it weighs: one pass over h
                    for h_ in self.hooks:
                        h_.batch(Batch(bi, x, out, h, w, args, kw))
                    if tm is not None:
                        hc = h.to(cdt)
                        if target.dense_stream:
                            h_dense, dense_out = (stream.bring(t) for t in dense_step[bi])
                            y = target(TargetInputs(hc, h_dense.reshape(-1, N).to(cdt), out, dense_out, W))
                        else:
                            y = hc @ W.T   # the layer's own output (W is in the totals' precision)
                        if ahead:
                            y = y + self._gap(ahead, out, args, kw).reshape(-1, d)
                        tm.add(y, hc, w)
                    if closed_form:  # in the forward's own dtype (bf16 model or autocast: 2 bytes), exact in it
                        acts.append(stream.stash(h))
                        outs.append(stream.stash(out))
        finally:
            for h_ in self.hooks:
                h_.end()
        if dist is not None:  # every process gets the totals of all tokens (NaN included, so all refuse alike)
            mo.all_reduce(dist)
            for h_ in self.hooks:
                h_.all_reduce(dist)
            if tm is not None:
                tm.all_reduce(dist)
        G, mean = mo.finish()
        if not torch.isfinite(G).all():
            raise NeuroprojError(f"non-finite activations at layer {i}: {nonfinite_hint(model, compute)}")
        ridge = effective_ridge(cfg.ridge, mo.tokens, N)
        C = c = None
        if tm is not None:
            C, c = tm.finish(mo.n)
            W_eff = chol_solve(G, C, ridge)  # the full-width least-squares map onto the target
        else:
            W_eff = W.double().cpu()
        work = LayerWork(i, LayerMoments(i, G, mean, W_eff, a.in_norms(model, i), ridge=ridge),
                         FoldInputs(G, mean, C, c, ridge=ridge), hooks=self.hooks)
        for h_ in self.hooks:
            h_.measured(work)
        return work, acts, outs

    def _gap(self, ahead, out, args, kw) -> torch.Tensor:
        """What the removed layers `ahead` add to the stream after `out`: F(out) − out (the totals' precision)."""
        y = out
        for layer in ahead:
            y = run_layer(layer, y, args, kw, self.compute)
        return y.to(self.cdt) - out.to(self.cdt)

    def _carry(self, work, layer, W, b_old, calls, hidden, acts, outs, mlp_change=None):
        """Carry the pruned layer's output forward: in closed form, out' = out − W h + W' h_K (+ Δb), when the
        MLP output is added to the residual as is (one matmul per batch); after a hook retrained the whole MLP,
        out' = out + (MLP'(x) − MLP(x)) from the change it measured; otherwise run the pruned layer again."""
        cdt, stream = self.cdt, self.stream
        with torch.inference_mode():
            if not acts:
                for bi, (args, kw) in enumerate(calls):
                    hidden[bi] = stream.stash(run_layer(layer, stream.bring(hidden[bi]), args, kw, self.compute))
                return
            if work.keep is None and mlp_change is None:   # a plan that leaves this MLP as it is
                hidden[:] = outs
                acts.clear()
                outs.clear()
                return
            if mlp_change is not None:   # a hook measured MLP'(x) − MLP(x) per batch

                def delta(bi):
                    d, mlp_change[bi] = mlp_change[bi], None
                    return d
            else:                        # h_K W'ᵀ − h Wᵀ = h (W'_full − W)ᵀ, W' scattered back to full width
                dev = W.device
                dW = -W.clone()
                dW[:, work.keep.to(dev)] += work.W_new.to(dev, cdt)
                dWt = dW.T.contiguous().to(acts[0].dtype)  # the carry's product in the activations' dtype
                bn = work.b_new
                db = None if bn is None else (bn - (0 if b_old is None else b_old.double().cpu())).to(dev, cdt)

                def delta(bi):
                    d = (stream.bring(acts[bi]) @ dWt).to(cdt)
                    return d if db is None else d + db
            for bi in range(len(calls)):
                o = stream.bring(outs[bi])
                hidden[bi] = stream.stash((o.to(cdt) + delta(bi).to(o.device, cdt).view(o.shape)).to(o.dtype))
        acts.clear()  # one layer's activations at a time
        outs.clear()
