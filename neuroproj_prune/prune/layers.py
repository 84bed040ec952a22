"""Whole decoder layers and attention sub-layers: which go, scored on the held-back calibration windows. One
registry, `LAYER_SELECTORS`, of functions `cost(lm, ids, compute, batch_size, progress, candidates, part) -> {layer:
cost}` (part `layer`: the whole layer; `attn`: its attention sub-layer alone, the stream x_i + MLP(x_i) instead of
x_i + attn_i + MLP(x_i + attn_i)); the layers of lowest cost go first:

    loss       the measured increase of the mean next-token loss when layer i alone is removed. The layers'
               inputs x_0 … x_L are computed once; candidate i re-runs the forward from x_i without layer i. Only
               the 2n + 4 layers of lowest influence (below) are candidates when n layers go: each costs a forward
               of the layers after it and an LM head pass (a quarter of SmolLM2's forward: its 49k vocabulary)
    influence  ShortGPT's block influence, the token mean of 1 − cos(x_i, x_i+1) (attn: 1 − cos(x_i, x_i + attn_i));
               one forward; no loss: it cannot see how much the later layers and the head amplify a layer's change

`choose_layers(lm, held, cfg, n)` takes the n cheapest by `cfg.layer_select`; the sequential pass then passes the
stream through them unchanged and refits the layers behind them against the dense model (calibrate.py), which is
where a refit beats plain layer dropping (a removed attention: the MLPs from its layer on). `mean_loss` is the
model's loss on windows, with layers or attention sub-layers left out: what the joint budget (budget.py) measures
its candidates by.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from ..errors import NeuroprojError
from ..model import linear_macs
from ..registry import Registry
from ..stats import compute_autocast, hooked
from .calibrate import layer_inputs, run_layer

LAYER_SELECTORS = Registry("layer select", "cost(lm, ids, compute, batch_size, progress, candidates, part) -> "
                           "{layer: cost}, lowest removed first; part: layer (whole) or attn (its attention sub-layer)")
PARTS = ("layer", "attn")


@contextmanager
def attention_off(model, a, i):
    """Layer i's attention sub-layer adds nothing inside (its output zeroed): the layer then computes what it does
    with the attention removed (`Adapter.remove_attention`), for the families that allow it."""
    def zero(mod, args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
    handle = a.attn(model, i).register_forward_hook(zero)
    try:
        yield
    finally:
        handle.remove()


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[b:b + batch_size] for b in range(0, ids.shape[0], batch_size)]


def head_loss(model, adapter, x: torch.Tensor, ids: torch.Tensor, compute=None, chunk_tokens: int = 2048) -> float:
    """The summed next-token cross-entropy of token ids `ids` (batch, T) given the last layer's output x: the final
    norm and the LM head on `chunk_tokens` rows at a time (bounded logits, whatever the vocabulary)."""
    d = x.shape[-1]
    rows, targets = x[:, :-1].reshape(-1, d), ids[:, 1:].reshape(-1).to(x.device)
    total = 0.0
    with torch.inference_mode(), compute_autocast(x.device, compute):
        for c in range(0, rows.shape[0], chunk_tokens):
            z = adapter.logits(model, adapter.head_input(model, rows[c:c + chunk_tokens])).float()
            total += float(torch.nn.functional.cross_entropy(z, targets[c:c + chunk_tokens], reduction="sum"))
    return total


def mean_loss(lm, ids: torch.Tensor, compute=None, batch_size: int = 4, skip=(), no_attn=()) -> float:
    """The mean next-token loss (nats per token) of the model on token ids (windows, T), the layers in `skip` left
    out (the stream passes them unchanged), the attention sub-layers in `no_attn` too. Cost: one forward of the kept
    layers and the LM head."""
    model, a = lm.model, lm.adapter
    total, batches = 0.0, _batches(ids, batch_size)
    for b, (x, args, kw) in zip(batches, layer_inputs(model, a, batches)):
        with torch.inference_mode():
            for i, layer in enumerate(a.layers(model)):
                if i in no_attn:
                    with attention_off(model, a, i):
                        x = run_layer(layer, x, args, kw, compute)
                elif i not in skip:
                    x = run_layer(layer, x, args, kw, compute)
        total += head_loss(model, a, x, b, compute)
    return total / ids[:, 1:].numel()


def _stream(lm, ids, compute, batch_size, attn: bool = False):
    """Per batch: (its ids, [x_0 … x_L] the input of every layer and the last one's output, args, kwargs, {layer:
    its attention's output} (with `attn`, else empty))."""
    model, a = lm.model, lm.adapter
    out = []
    for b, (x, args, kw) in zip(_batches(ids, batch_size), layer_inputs(model, a, _batches(ids, batch_size))):
        xs, att = [x], {}
        points = [(i, a.attn(model, i), "out") for i in range(a.num_layers(model))] if attn else []
        with torch.inference_mode(), hooked(points, att.__setitem__):
            for layer in a.layers(model):
                xs.append(run_layer(layer, xs[-1], args, kw, compute))
        out.append((b, xs, args, kw, att))
    return out


@LAYER_SELECTORS.register("loss")
def layer_loss(lm, ids, compute=None, batch_size: int = 4, progress: bool = False, candidates: int | None = None,
               part: str = "layer") -> dict[int, float]:
    """ΔL_i: the mean loss with layer i (part `attn`: its attention sub-layer) removed minus the dense model's, on
    `ids` (see the module docstring). `candidates`: measure only that many layers, those of lowest influence (from
    the same forward; the others get +inf): every candidate costs a forward of the layers after it and an LM head
    pass."""
    model, a = lm.model, lm.adapter
    layers, L = a.layers(model), a.num_layers(model)
    states = _stream(lm, ids, compute, batch_size, attn=part == "attn")
    count = sum(b[:, 1:].numel() for b, *_ in states)
    base = sum(head_loss(model, a, xs[L], b, compute) for b, xs, *_ in states) / count
    todo = range(L)
    if candidates is not None and candidates < L:
        infl = _influence(states, L, part)
        todo = sorted(sorted(infl, key=infl.get)[:candidates])
    cost = {i: math.inf for i in range(L)}
    for i in tqdm(todo, desc=f"{part} losses", unit="layer", disable=not progress, dynamic_ncols=True):
        total = 0.0
        for b, xs, args, kw, _ in states:
            h = xs[i]
            with torch.inference_mode():
                if part == "attn":
                    with attention_off(model, a, i):
                        h = run_layer(layers[i], h, args, kw, compute)
                for j in range(i + 1, L):
                    h = run_layer(layers[j], h, args, kw, compute)
            total += head_loss(model, a, h, b, compute)
        cost[i] = total / count - base
    return cost


def _influence(states, L, part: str = "layer") -> dict[int, float]:
    """The token mean of 1 − cos(in, out) of each layer (part `attn`: of its attention sub-layer, x_i against
    x_i + attn_i)."""
    cost = {}
    for i in range(L):
        cos = [torch.nn.functional.cosine_similarity(
            xs[i].float(), (xs[i + 1] if part == "layer" else xs[i] + att[i].to(xs[i].dtype)).float(), dim=-1
        ).reshape(-1) for _, xs, _, _, att in states]
        cost[i] = float(1 - torch.cat(cos).mean())
    return cost


@LAYER_SELECTORS.register("influence")
def layer_influence(lm, ids, compute=None, batch_size: int = 4, progress: bool = False, candidates=None,
                    part: str = "layer") -> dict[int, float]:
    """ShortGPT's block influence: the token mean of 1 − cos(x_i, x_i+1) (part `attn`: 1 − cos(x_i, x_i + attn_i))."""
    L = lm.adapter.num_layers(lm.model)
    return _influence(_stream(lm, ids, compute, batch_size, attn=part == "attn"), L, part)


def choose_layers(lm, ids, cfg, n: int, compute=None, progress: bool = False, candidates: int | None = None,
                  part: str = "layer", exclude=()) -> tuple[list[int], dict]:
    """The n layers of lowest cost by `cfg.layer_select` on token ids `ids` (sorted), and every layer's cost; part
    `attn`: the n attention sub-layers, none of the layers in `exclude` (removed whole). `loss` measures the 2n + 4
    of lowest influence (`candidates` to say otherwise)."""
    model, a = lm.model, lm.adapter
    L = a.num_layers(model)
    if part == "attn":
        if a.attn_refusal(model) is not None:
            raise NeuroprojError(a.attn_refusal(model))
        if not 0 <= n <= L - len(exclude):
            raise NeuroprojError(f"cannot remove {n} attention sub-layers of the model's {L - len(exclude)} layers: "
                                 f"remove at most {L - len(exclude)}")
    elif not 0 <= n < L:
        raise NeuroprojError(f"cannot remove {n} of the model's {L} layers: remove at most {L - 1}")
    if ids is None:
        raise NeuroprojError("choosing layers needs calibration text (the sequential calibration's windows)")
    bs = cfg.batch_size or max(1, 4096 // ids.shape[1])
    want = candidates if candidates is not None else 2 * n + 4 + len(exclude)
    cost = LAYER_SELECTORS[cfg.layer_select](lm, ids, compute, bs, progress, want, part)
    for i in exclude:
        cost[i] = math.inf
    ranked = sorted((i for i in cost if i not in exclude), key=cost.get)
    return sorted(ranked[:n]), cost


def block_candidates(lm, ids: torch.Tensor, compute=None, batch_size: int | None = None,
                     progress: bool = False) -> list[dict]:
    """Whole layers and attention sub-layers as skip candidates beside the neuron-level ones (`skips --blocks`):
    per layer and part, the measured loss increase on token ids `ids` when it alone is removed (`layer_loss`, every
    layer measured), its parameters and the multiply-accumulates per token of its linear maps it saves (attention
    scores not counted: they grow with the context). Cost: ≈ L forwards of `ids` per part."""
    model, a = lm.model, lm.adapter
    L = a.num_layers(model)
    bs = batch_size or max(1, 4096 // ids.shape[1])
    parts = ["layer"] + (["attn"] if a.attn_refusal(model) is None else [])
    rows = []
    for part in parts:
        cost = layer_loss(lm, ids, compute, bs, progress, None, part)
        for i in range(L):
            mod = a.layers(model)[i] if part == "layer" else a.attn(model, i)
            linear = linear_macs(mod)
            params = sum(p.numel() for p in mod.parameters()) if part == "layer" else a.attention_params(model, i)
            rows.append({"part": part, "layer": i, "loss_increase": cost[i], "ppl_factor": math.exp(cost[i]),
                         "params": int(params), "macs_saved_per_token": int(linear)})
    return rows
