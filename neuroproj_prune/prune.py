"""The `prune` pipeline: calibration → selection (plan) → fold (surgery) → checkpoint.

Two calibrations:
- `oneshot` — moments from a statistics file of the dense model (`collect`); every layer is planned from
  the dense activations and folded to preserve its own output: C = W G.
- `sequential` (default) — layer by layer, as SparseGPT/Wanda do: the calibration tokens' hidden states are
  carried through the already-pruned layers, so each layer is planned and folded on the inputs it will
  really see. The fold target is the layer's own output on those inputs (`target=layer`: C = W G̃), or the
  dense model's MLP output on the dense inputs (`target=dense`: C = E[y_dense h̃ᵀ], correcting upstream
  error too). The pruned layer's output is updated in closed form, out' = out − W h̃ + W' h̃_K, so the
  whole run costs one forward pass (two with target=dense) plus one N×N Gram product per layer and token.
  `target=residual` goes one step further: the MLP's target is its own output plus the gap between the
  dense and the pruned residual streams, y* = W h̃ + (out_dense − out), so each pruned MLP also repairs the
  drift that earlier layers left (architectures whose MLP output is added to the residual as is).
  Token weighting (`weighting=rms`, default): every later layer reads the residual stream through a norm,
  so an output error on token t is seen divided by rms(x_t); the moments weight token t by 1/mean(out_t²),
  which stops the few massive-activation tokens (attention sinks) from dominating the fit.

Per-layer widths (`allocation=global`, sequential): before the pass, `error_curves` measures on a subsample
(`alloc_samples` windows) every dense layer's refit error e_i(k) for every width k, in units of loss (tokens
weighted by ‖∂loss/∂x_i‖², one backward pass), and `plan.allocate_by_error` picks the widths minimising
Σ_i e_i(k_i) at the requested total. Layers whose errors the loss barely sees give up more neurons. The
checkpoint then has per-layer widths (`load_pruned`). One-shot global allocation uses FLAP's standardised
scores instead.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .errors import NeuroprojError
from .models import LoadedModel, adapter_for, load_model
from .plan import (SELECTORS, LayerMoments, Plan, allocate_by_error, check_sparsity, global_widths, layer_width,
                   make_layer_plan)
from .stats import gram_lower_, mirror_lower_
from .surgery import FOLDS, RIDGE, apply_plan, effective_ridge, fold_layer, prepare_out_dir, save_pruned

CALIBRATIONS = ("sequential", "oneshot")
ALLOCATIONS = ("uniform", "global")
TARGETS = ("layer", "dense", "residual")


# ------------------------------------------------------------------------------------------- helpers
def _check_method(select, fold, allocation, calibration, target):
    if select not in SELECTORS:
        raise NeuroprojError(f"unknown selection method {select!r}: choose from {', '.join(SELECTORS)}")
    if fold not in FOLDS:
        raise NeuroprojError(f"unknown fold {fold!r}: choose from {', '.join(FOLDS)}")
    if allocation not in ALLOCATIONS:
        raise NeuroprojError(f"unknown allocation {allocation!r}: choose from {', '.join(ALLOCATIONS)}")
    if calibration not in CALIBRATIONS:
        raise NeuroprojError(f"unknown calibration {calibration!r}: choose from {', '.join(CALIBRATIONS)}")
    if target not in TARGETS:
        raise NeuroprojError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")


def _points(G, mean, dims=3, seed=0):
    """Projection of one layer's neurons (distance ≈ 1 − ρ), for the `cluster` selection."""
    from .projection import fit_exact

    cov = G - torch.outer(mean, mean)
    sd = cov.diagonal().clamp(min=0).sqrt()
    rho = (cov / torch.outer(sd, sd).clamp(min=1e-30)).clamp(-1, 1)
    rho[sd <= 0] = 0
    rho.fill_diagonal_(1.0)
    P, _ = fit_exact(rho, dims=dims)
    return P.double().cpu()


def _in_norms(adapter, model, i):
    return torch.stack([w.detach().double().norm(dim=1) for w in adapter.in_weights(model, i)]).norm(dim=0).cpu()


def mlp_macs_per_token(model) -> int:
    a = adapter_for(model)
    n_in = len(a.in_weights(model, 0))
    return sum((n_in + 1) * a.hidden_size(model) * a.width(model, i) for i in range(a.num_layers(model)))


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------- sequential
class _StopAt(Exception):
    pass


def _layer_inputs(model, adapter, batches):
    """Hidden states entering layer 0 and the keyword arguments the model passes to its layers."""
    first = adapter.layers(model)[0]
    caught = []

    def grab(mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), args[1:], dict(kwargs)))
        raise _StopAt

    h = first.register_forward_pre_hook(grab, with_kwargs=True)
    dev = next(model.parameters()).device
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


def _run_layer(layer, hidden, args, kwargs, compute=None):
    """One decoder layer; with `compute` (e.g. torch.bfloat16) its matmuls run under autocast, the residual
    stream it returns keeps the model's dtype."""
    with torch.autocast(hidden.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
        out = layer(hidden, *args, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return out.to(hidden.dtype)


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


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


def sequential_prune(lm: LoadedModel, ids: torch.Tensor, *, widths: dict[int, int], select: str, fold: str,
                     target: str = "layer", batch_size: int = 8, seed: int = 0, ridge: float = RIDGE,
                     weighting: str = "none", add_bias: bool = False, output_weighting: str = "none",
                     compute=None, progress: bool = True) -> Plan:
    """Prune `lm.model` in place, layer by layer (see module docstring). Returns the plan it applied.

    Memory: the hidden states of all calibration tokens (tokens·d·4 bytes, twice with target=dense) and
    one layer's neuron activations (tokens·N·4 bytes)."""
    model, a = lm.model, lm.adapter
    from .skips import get_skips

    if get_skips(model):  # skip hooks hand activations from layer l to m within one forward pass
        raise NeuroprojError("the model has applied skip connections, which layer-by-layer calibration cannot "
                             "run: prune with --calibration oneshot, or prune before applying skips")
    dev = next(model.parameters()).device
    cdt = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    batches = [ids[b:b + batch_size] for b in range(0, ids.shape[0], batch_size)]
    states = _layer_inputs(model, a, batches)
    hidden = [s[0].clone() for s in states]
    dense = [s[0].clone() for s in states] if target in ("dense", "residual") else None
    additive = a.mlp_output_is_added(model)
    if target == "residual" and not additive:
        raise NeuroprojError(f"target 'residual' needs an MLP whose output is added to the residual; "
                             f"{model.config.model_type} normalises it first: use --target layer or dense")
    plan = Plan()
    bar = tqdm(total=a.num_layers(model), desc="prune", unit="layer", disable=not progress, dynamic_ncols=True)
    for i, layer in enumerate(a.layers(model)):
        out_proj = a.out_proj(model, i)
        W = a.out_weight(model, i).detach().to(cdt)
        b_old = a.out_bias(model, i)
        N, d = W.shape[1], W.shape[0]
        grab = {}
        hook = out_proj.register_forward_pre_hook(lambda mod, args: grab.__setitem__("h", args[0]))
        G = torch.zeros(N, N, dtype=torch.float64, device=dev)
        s = torch.zeros(N, dtype=torch.float64, device=dev)
        C = torch.zeros(d, N, dtype=torch.float64, device=dev) if dense is not None else None
        c = torch.zeros(d, dtype=torch.float64, device=dev) if dense is not None else None
        n, n_w0 = 0, None
        acts, outs = [], []
        with torch.inference_mode():
            for bi, (_, args, kw) in enumerate(states):
                out = _run_layer(layer, hidden[bi], args, kw, compute)
                h = grab["h"].reshape(-1, N).to(cdt)
                if weighting == "rms":  # the next norm divides each token's residual by its rms
                    w = rms_token_weights(out.reshape(-1, d).to(cdt))
                    if n_w0 is None:
                        n_w0 = float(w.mean())  # one scale for all batches keeps the weights comparable
                    w = (w / n_w0).unsqueeze(1)
                    hs = h * w.sqrt()
                    gram_lower_(G, hs)
                    s += (h * w).sum(0, dtype=torch.float64)
                    n += float(w.sum())
                else:
                    w, hs = None, h
                    gram_lower_(G, h)
                    s += h.sum(0, dtype=torch.float64)
                    n += h.shape[0]
                if dense is not None:
                    dense_out = _run_layer(layer, dense[bi], args, kw, compute)
                    if target == "dense":   # the dense MLP output on the dense stream
                        y = grab["h"].reshape(-1, N).to(cdt) @ W.T
                    else:                   # residual: also close the gap between the two streams
                        y = h @ W.T + (dense_out - out).reshape(-1, d).to(cdt)
                    C += (y.T @ (h if w is None else h * w)).double()
                    c += (y if w is None else y * w).sum(0, dtype=torch.float64)
                    dense[bi] = dense_out
                if additive:
                    acts.append(h)
                    outs.append(out)
        hook.remove()
        G, mean = (mirror_lower_(G) / n).cpu(), (s / n).cpu()
        tokens = sum(h.shape[0] for h in acts) if additive else int(n)
        layer_ridge = effective_ridge(ridge, tokens, N)
        if not torch.isfinite(G).all():
            raise NeuroprojError(f"non-finite activations at layer {i}: load the model with --dtype float32")
        if dense is not None:
            C, c = (C / n).cpu(), (c / n).cpu()
            from .surgery import _chol_solve

            W_eff = _chol_solve(G, C, layer_ridge)  # the full-width least-squares map onto the target
        else:
            W_eff = W.double().cpu()
        D = a.downstream_gain(model, i) if output_weighting == "norms" else None
        # selection sees the output error as the downstream norms do; the fold's optimum does not depend on it
        m = LayerMoments(i, G, mean, W_eff if D is None else D[:, None] * W_eff, _in_norms(a, model, i),
                         ridge=layer_ridge)
        if select == "cluster":
            m.points = _points(G, mean, seed=seed)
        sel = SELECTORS[select](m, widths[i], seed)
        plan.layers[i] = make_layer_plan(m, sel)
        keep = plan.keep(i)
        Wn, bn = fold_layer(fold, W.double().cpu(), keep, G=G, mean=mean,
                            bias=None if b_old is None else b_old.double().cpu(), C=C, c=c,
                            representative=plan.layers[i]["representative"], use_bias=b_old is not None or add_bias,
                            ridge=layer_ridge)
        a.select_neurons(model, i, keep)
        a.set_out_weight(model, i, Wn)
        if bn is not None:
            a.set_out_bias(model, i, bn)
        # carry the pruned layer's output forward: in closed form, out' = out − W h + W' h_K (+ Δb), when
        # the MLP output is added to the residual as is; otherwise run the pruned layer again
        with torch.inference_mode():
            if not additive:
                for bi, (_, args, kw) in enumerate(states):
                    hidden[bi] = _run_layer(layer, hidden[bi], args, kw, compute)
            else:
                # one matmul per batch: h_K W'ᵀ − h Wᵀ = h (W'_full − W)ᵀ, W' scattered back to full width
                dW = -W.clone()
                dW[:, keep.to(dev)] += Wn.to(dev, cdt)
                dWt = dW.T.contiguous()
                db = None if bn is None else (bn - (0 if b_old is None else b_old.double().cpu())).to(dev, cdt)
                for bi in range(len(states)):
                    delta = acts[bi] @ dWt
                    if db is not None:
                        delta += db
                    hidden[bi] = (outs[bi].to(cdt) + delta.view(outs[bi].shape)).to(outs[bi].dtype)
        del acts, outs
        bar.update(1)
    bar.close()
    return plan


def error_curves(lm: LoadedModel, ids: torch.Tensor, *, select: str, weights: str = "grad", batch_size: int = 4,
                 seed: int = 0, ridge: float = RIDGE, compute=None, progress: bool = True) -> dict[int, torch.Tensor]:
    """Per layer i, e_i(k): the dense layer's output error after the least-squares refit when it keeps the
    top-k neurons of `select` (see `plan.error_curve`), with token t weighted so that all layers share one
    unit. `grad`: w_t = ‖∂loss/∂x_i,t‖², the squared gradient of the summed next-token loss with respect to
    the residual stream after layer i; under an isotropic Fisher approximation an error δ_t there costs
    ΔL ≈ ½·w_t·‖δ_t‖²/d, so e_i(k) is in units of loss. `rms`: w_t = 1/mean(x_i,t²), the error as the next
    norm sees it (no backward pass, blind to how much later layers and the head amplify it).
    Cost: one forward (and with grad one backward) of the dense model over `ids`, one N² Gram per token and
    layer, one O(N³) Cholesky per layer; memory: one batch's activations and L float64 N×N Grams."""
    from .plan import error_curve

    model, a = lm.model, lm.adapter
    dev = next(model.parameters()).device
    L = a.num_layers(model)
    acts, outs = {}, {}
    G = [None] * L
    s = [None] * L
    wsum, n = [0.0] * L, 0

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
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the activations only
    batches = range(0, ids.shape[0], batch_size)
    try:
        for b in tqdm(batches, desc="allocate", unit="batch", disable=not progress, dynamic_ncols=True):
            x = ids[b:b + batch_size].to(dev)
            amp = torch.autocast(dev.type, dtype=compute or torch.bfloat16, enabled=compute is not None)
            if weights == "grad":
                with torch.enable_grad(), amp:
                    emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                    logits = model(inputs_embeds=emb, use_cache=False).logits
                    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(),
                                                      reduction="sum").backward()
                    del logits
            else:
                with torch.inference_mode(), amp:
                    model(input_ids=x, use_cache=False)
            with torch.no_grad():
                for i in range(L):
                    o = outs[i]
                    if weights == "grad":
                        w = o.grad.reshape(-1, o.shape[-1]).float().pow(2).sum(-1, keepdim=True)
                    else:
                        w = rms_token_weights(o.detach().reshape(-1, o.shape[-1]).float()).unsqueeze(1)
                    h = acts[i].reshape(w.shape[0], -1).float()
                    if G[i] is None:
                        G[i] = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=dev)
                        s[i] = torch.zeros(h.shape[1], dtype=torch.float64, device=dev)
                    gram_lower_(G[i], h * w.sqrt())
                    s[i] += (h * w).sum(0, dtype=torch.float64)
                    wsum[i] += float(w.sum())
                n += x.numel()
            acts.clear()
            outs.clear()
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
    curves = {}
    for i in range(L):
        Gi, mean = (mirror_lower_(G[i]) / wsum[i]).cpu(), (s[i] / wsum[i]).cpu()
        W = a.out_weight(model, i).detach().double().cpu()
        N = W.shape[1]
        # the fold's ridge rule keeps the Cholesky stable on few tokens (its warning belongs to the fold)
        m = LayerMoments(i, Gi, mean, W, _in_norms(a, model, i), ridge=effective_ridge(ridge, n, N, warn=False))
        if select == "cluster":
            m.points = _points(Gi, mean, seed=seed)
        curves[i] = error_curve(m, SELECTORS[select](m, N // 2, seed).scores) * (wsum[i] / n)
    return curves


# ------------------------------------------------------------------------------------------ one-shot
def plan(stats, model, *, sparsity: float | None = None, keep: int | None = None, select: str = "wanda-sp",
         allocation: str = "uniform", multiple: int = 64, seed: int = 0, projections=None,
         ridge: float = RIDGE) -> Plan:
    """A removal plan from dense statistics (one-shot). `model`: LoadedModel or nn.Module (for weights)."""
    lm_model = model.model if isinstance(model, LoadedModel) else model
    a = adapter_for(lm_model)
    if select not in SELECTORS:
        raise NeuroprojError(f"unknown selection method {select!r}: choose from {', '.join(SELECTORS)}")
    if keep is None:
        check_sparsity(sparsity)
    layers = range(a.num_layers(lm_model))
    missing = [i for i in layers if i not in stats.layers or "mlp.neurons" not in stats.sites]
    if missing:
        raise NeuroprojError(f"the statistics lack mlp.neurons of layers {missing[:5]}...: collect all layers")
    moments = {}
    for i in layers:
        m = LayerMoments(i, stats.second_moment(i), stats.mean(i), a.out_weight(lm_model, i).detach().double().cpu(),
                         _in_norms(a, lm_model, i), ridge=ridge)
        if select == "cluster":
            m.points = (projections.get(i, "mlp.neurons").double() if projections is not None
                        else _points(m.G, m.mean, seed=seed))
        moments[i] = m
    widths = _widths(moments, sparsity, keep, allocation, multiple, select, seed)
    p = Plan()
    for i, m in moments.items():
        p.layers[i] = make_layer_plan(m, SELECTORS[select](m, widths[i], seed))
    p.meta.update({"select": select, "allocation": allocation, "sparsity": sparsity, "keep": keep,
                   "multiple": multiple, "calibration": "oneshot", "stats": stats.path,
                   "fingerprint": stats.meta.get("fingerprint")})
    return p


def _widths(moments: dict[int, LayerMoments], sparsity, keep, allocation, multiple, select, seed) -> dict[int, int]:
    if allocation == "uniform":
        return {i: layer_width(m.N, sparsity, keep, multiple) for i, m in moments.items()}
    # global: scores standardised per layer; order-based methods (obs, clusters) allocate by FLAP's metric
    score_fn = SELECTORS[select] if select in ("magnitude", "wanda-sp", "flap") else SELECTORS["flap"]
    scores = {i: score_fn(m, m.N, seed).scores for i, m in moments.items()}
    total = sum(layer_width(m.N, sparsity, keep, 1) for m in moments.values())
    return global_widths(scores, total)


# ------------------------------------------------------------------------------------------- the API
def prune(model, data=None, *, sparsity: float | None = 0.3, keep: int | None = None, select: str = "wanda-sp",
          fold: str = "lstsq", allocation: str = "uniform", calibration: str = "sequential",
          target: str = "layer", multiple: int = 64, stats=None, samples: int = 128, seqlen: int = 512,
          seed: int = 0, batch_size: int | None = None, out=None, overwrite: bool = False,
          add_bias: bool | None = None, weighting: str = "rms", output_weighting: str = "none",
          ridge: float = RIDGE, plan_file=None, dtype="auto", alloc_samples: int = 32, max_shift: float = 1.0,
          alloc_weights: str = "grad", compute_dtype: str = "auto",
          device="auto", progress: bool = True):
    """Prune a model's MLP neurons and (with `out`) save the checkpoint; returns (LoadedModel, Plan, summary).

    Cost: sequential — one forward over samples×seqlen tokens plus N² per token and layer for the Gram;
    oneshot — the statistics pass (or none, with `stats`) plus the per-layer solves (O(N³))."""
    _check_method(select, fold, allocation, calibration, target)
    if plan_file is not None:  # a plan the user wrote or edited: apply it as is (one-shot moments for the fold)
        calibration, given_plan = "oneshot", Plan.load(plan_file)
    elif keep is None:
        check_sparsity(sparsity)
    if out is not None:
        prepare_out_dir(out, overwrite)  # refuse early, before any work
    if alloc_weights not in ("rms", "grad"):
        raise NeuroprojError(f"unknown allocation weights {alloc_weights!r}: choose rms or grad")
    if allocation == "global" and not 0.0 < max_shift <= 1.0:
        raise NeuroprojError(f"max_shift must be in (0, 1] (got {max_shift})")
    if weighting not in ("rms", "none") or output_weighting not in ("norms", "none"):
        raise NeuroprojError("--weighting takes rms or none; --output-weighting takes norms or none")
    if calibration == "sequential" and fold in ("bias", "representative", "none") and target != "layer":
        raise NeuroprojError(f"target {target!r} only changes the lstsq fold: use --fold lstsq or --target layer")
    t0 = time.time()
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    compute = compute_dtype_for(compute_dtype, lm.model)  # autocast of the sequential passes (validated here)
    a = lm.adapter
    had_bias = a.out_has_bias(lm.model)
    if add_bias == "auto":  # a bias only where the checkpoint stays standard (llama-style `mlp_bias`)
        add_bias = fold in ("lstsq", "bias") and (had_bias or a.config_can_express_out_bias(lm.model.config))
    before = {"params": num_params(lm.model), "macs": mlp_macs_per_token(lm.model)}
    from .stats import load_stats

    if calibration == "oneshot":
        if stats is None:
            if data is None:
                raise NeuroprojError("give calibration --data or a --stats file")
            from .stats import collect

            st = collect(lm, data, samples=samples, seqlen=seqlen, seed=seed, batch_size=batch_size,
                         progress=progress)
        else:
            st = load_stats(stats) if not hasattr(stats, "second_moment") else stats
            st.check_model(lm)
        if plan_file is not None:
            p = given_plan
            p.check(lm.model)
        else:
            p = plan(st, lm, sparsity=sparsity, keep=keep, select=select, allocation=allocation,
                     multiple=multiple, seed=seed, ridge=ridge)
        apply_plan(lm.model, p, stats=st, fold=fold, add_bias=add_bias, ridge=ridge)
        calib_desc = st.meta.get("data")
    else:
        if data is None:
            raise NeuroprojError("sequential calibration needs --data (a stats file alone is not enough)")
        from .data import calibration_samples

        max_len = getattr(lm.model.config, "max_position_embeddings", None)
        ids, calib_desc = calibration_samples(lm.tokenizer, str(data), samples, seqlen, seed, max_seqlen=max_len)
        L = a.num_layers(lm.model)
        bs = batch_size or max(1, 4096 // seqlen)
        if allocation == "global":  # widths from the dense layers' refit-error curves, on a subsample
            n_alloc = min(ids.shape[0], alloc_samples)
            curves = error_curves(lm, ids[:n_alloc], select=select, weights=alloc_weights, seed=seed, ridge=ridge,
                                  batch_size=max(1, 2048 // ids.shape[1]), compute=compute, progress=progress)
            total = sum(layer_width(a.width(lm.model, i), sparsity, keep, 1) for i in range(L))
            widths = allocate_by_error(curves, total, multiple, max_shift)
        else:
            widths = {i: layer_width(a.width(lm.model, i), sparsity, keep, multiple) for i in range(L)}
        p = sequential_prune(lm, ids, widths=widths, select=select, fold=fold, target=target,
                             batch_size=bs, seed=seed, weighting=weighting,
                             ridge=ridge, add_bias=bool(add_bias), output_weighting=output_weighting,
                             compute=compute, progress=progress)
        p.meta.update({"select": select, "allocation": allocation, "sparsity": sparsity, "keep": keep,
                       "multiple": multiple, "calibration": "sequential", "target": target,
                       "fingerprint": lm.fingerprint})
        from .surgery import _update_config

        _update_config(lm.model, p, added_bias=bool(add_bias) and not had_bias)
    after = {"params": num_params(lm.model), "macs": mlp_macs_per_token(lm.model)}
    kept = [a.width(lm.model, i) for i in range(a.num_layers(lm.model))]
    total_before = sum(p.layers[i]["width"] if i in p.layers else kept[i] for i in range(len(kept)))
    summary = {
        "model": lm.spec, "sparsity": sparsity, "keep": keep, "actual_sparsity": 1 - sum(kept) / total_before,
        "select": select, "fold": fold, "allocation": allocation, "calibration": calibration,
        "target": target if calibration == "sequential" else None, "calibration_data": calib_desc,
        "params_before": before["params"], "params_after": after["params"],
        "mlp_macs_per_token_before": before["macs"], "mlp_macs_per_token_after": after["macs"],
        "neurons_before": total_before, "neurons_after": sum(kept), "kept": kept,
        "seconds": round(time.time() - t0, 1),
    }
    lm.fingerprint = None  # the weights changed
    if out is not None:
        save_pruned(lm.model, lm.tokenizer, out, summary=summary, overwrite=overwrite,
                    extra_files={"plan.json": p.to_json()})
    return lm, p, summary

