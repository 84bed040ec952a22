"""Prompt traces: generate from a prompt, then record every token's activations at the projected sites.

`trace(model, projections, prompt, max_new_tokens=32)` generates (greedy by default; `sample=True` draws
with `seed`), then runs ONE full forward pass over prompt + generated tokens with `ActivationCapture`
hooks. Row t of each stored activation matrix is therefore the activation computed at position t, exactly
what a forward pass over the first t + 1 tokens gives at its last position (causal attention): no
KV-cache bookkeeping can shift generated tokens by one.

File (`trace.safetensors`): tensors `layer.{i}.{site}` of shape (T, width), float32, for every layer and
site the projections have; `input_ids` (T,) int64; metadata key `neuroproj_prune` holding JSON with
`format`, `tokens` (each token's text, decoded incrementally), `raw_tokens` (the tokenizer's pieces),
`n_prompt` (the first n_prompt tokens are the prompt, the rest generated), `prompt`, `generated`,
`layers`, `sites`, `sample`, `seed`, `model`, `projections`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..io import TensorFile, check_same_weights, load_tensors
from ..model import LoadedModel, load_model
from ..stats import SITES, ActivationCapture, parse_layers, parse_sites
from .projection import Projections, load_projections

FORMAT = "neuroproj-prune/trace/1"


class Trace(TensorFile):
    """A prompt trace: `get(layer, site)` → (T, width) float32 activations; `tokens`, `n_prompt`, `meta`."""

    @property
    def tokens(self) -> list[str]:
        return list(self.meta["tokens"])

    @property
    def n_prompt(self) -> int:
        return int(self.meta["n_prompt"])

    @property
    def input_ids(self) -> torch.Tensor:
        return self._t["input_ids"]

    def get(self, layer: int, site: str = "mlp.neurons") -> torch.Tensor:
        key = f"layer.{int(layer)}.{site}"
        if key not in self._t:
            raise NeuroprojError(f"the trace has no layer {layer} / site {site} "
                                 f"(layers {self.layers}, sites {self.sites})")
        return self._t[key]

    def has(self, layer: int, site: str) -> bool:
        return f"layer.{int(layer)}.{site}" in self._t

    def __repr__(self):
        return (f"Trace({len(self.tokens)} tokens ({self.n_prompt} prompt), layers {self.layers[:3]}..., "
                f"sites {self.sites})")


def load_trace(path) -> Trace:
    """Read a trace file; a one-line NeuroprojError for a missing, corrupt or foreign file, and for one whose tensors
    do not fit its header: T token ids and texts, n_prompt ≤ T, a finite (T, width) matrix per listed (layer,
    site)."""
    tensors, meta = load_tensors(path, FORMAT, "trace", "trace")
    tr = Trace(tensors, meta, str(path))
    damaged = f"{path}: the file is damaged or edited; re-run trace"
    try:
        T, n_prompt = len(tr.tokens), tr.n_prompt
        keys = [f"layer.{int(i)}.{s}" for i in tr.layers for s in tr.sites]
    except (KeyError, TypeError, ValueError):
        raise NeuroprojError(f"{damaged} (its header lacks tokens/n_prompt/layers/sites)") from None
    ids = tensors.get("input_ids")
    if ids is None or tuple(ids.shape) != (T,) or not 0 < n_prompt <= T:
        raise NeuroprojError(f"{damaged} ({T} tokens in the header, input ids "
                             f"{None if ids is None else tuple(ids.shape)})")
    for k in keys:
        h = tensors.get(k)
        if h is None or h.ndim != 2 or h.shape[0] != T or not torch.isfinite(h).all():
            raise NeuroprojError(f"{damaged} ({k}: {None if h is None else tuple(h.shape)}, expected ({T}, width), "
                                 f"finite)")
    return tr


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, decoded incrementally so that byte-level pieces show as the characters they form
    (a piece that completes a multi-byte character carries it; a partial one is empty)."""
    out, prev = [], ""
    for t in range(len(ids)):
        cur = tokenizer.decode(ids[: t + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if cur.startswith(prev) and not cur.endswith("\ufffd"):
            out.append(cur[len(prev):])
            prev = cur
        elif cur.endswith("\ufffd"):
            out.append("")  # an incomplete multi-byte character: shown with the token that completes it
        else:
            out.append(tokenizer.decode([ids[t]], skip_special_tokens=False))
            prev = cur
    return out


def capture_activations(model, input_ids: torch.Tensor, layers, sites) -> dict[tuple[int, str], torch.Tensor]:
    """One forward pass over `input_ids` (1, T); returns {(layer, site): (T, width) float32 CPU}."""
    acts: dict[tuple[int, str], torch.Tensor] = {}

    def on(i, site, h):
        acts[(i, site)] = h.detach().float().cpu().clone()

    with ActivationCapture(model, layers, sites, on) as cap:
        cap.run(input_ids)
    return acts


@dataclass
class TraceConfig(Config):
    """Every setting of `trace` (CLI flags, the recipe's `trace` section, keywords of `trace()`)."""

    what = "trace"

    prompt: str = opt("The capital of France is", "prompt text")
    max_new_tokens: int = opt(32, "tokens to generate (0: the prompt only)", ge=0)
    sample: bool = opt(False, "sample instead of greedy decoding")
    seed: int = opt(0, "sampling seed", ge=0)
    temperature: float = opt(1.0, "sampling temperature", gt=0.0)
    top_k: int | None = opt(None, "sampling: keep the k most likely tokens", kind=int, ge=1)
    top_p: float | None = opt(None, "sampling: nucleus probability", kind=float, gt=0.0, le=1.0)
    layers: str | None = opt(None, "layer SPEC subset of the projections' layers", kind=str)
    sites: tuple | None = opt(None, "comma subset of the projections' sites", SITES, kind=list, item=str)

    def check(self) -> None:
        if not self.prompt.strip():
            raise ConfigError("prompt", "give a non-empty --prompt")
        if not self.sample and (self.top_k is not None or self.top_p is not None or self.temperature != 1.0):
            raise ConfigError("sample", "--temperature, --top-k and --top-p shape sampling: add --sample, or drop "
                              "them for greedy decoding")


def trace(model, projections, prompt: str | None = None, config: TraceConfig | None = None, *, out=None,
          dtype="auto", device="auto", **settings) -> Trace:
    """Generate from `prompt` and record the per-token activations of every layer and site the projections
    have (or `layers`/`sites`, a subset). `model`: a LoadedModel or a spec; `projections`: a Projections or
    a path (its widths must match the model's). Greedy unless `sample=True` (then seeded with `seed`).
    `config` (or the `TraceConfig` fields as keywords) says how. Cost: the generation plus one forward pass over
    prompt and continuation; memory T × Σ widths float32 values."""
    if prompt is not None:
        settings["prompt"] = prompt
    cfg = config.replace(**settings) if config is not None else TraceConfig.make(**settings)
    prompt, max_new_tokens, sample, seed = cfg.prompt, cfg.max_new_tokens, cfg.sample, cfg.seed
    temperature, top_k, top_p, layers, sites = cfg.temperature, cfg.top_k, cfg.top_p, cfg.layers, cfg.sites
    proj = projections if isinstance(projections, Projections) else load_projections(projections)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    check_same_weights(model=lm.fingerprint, projections=proj.meta.get("fingerprint"))
    a = lm.adapter
    L = a.num_layers(lm.model)
    lay = [i for i in proj.layers if i in parse_layers(layers, L)] if layers is not None else proj.layers
    bad = [i for i in lay if not 0 <= i < L]
    if bad:
        raise NeuroprojError(f"the projections have layers {bad} but the model has {L} layers: another model?")
    st = proj.sites if sites is None else [s for s in parse_sites(sites) if s in proj.sites]
    if not lay or not st:
        raise NeuroprojError("nothing to trace: the chosen layers/sites are not in the projections")
    tok = lm.tokenizer
    enc = tok(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.shape[1] == 0:
        raise NeuroprojError("the prompt tokenizes to no tokens")
    ctx = a.context_length(lm.model.config)   # positions past it are not the model's (checked before generating)
    if ctx is not None and ids.shape[1] + max_new_tokens > ctx:
        raise NeuroprojError(f"the prompt ({ids.shape[1]} tokens) and --max-new-tokens {max_new_tokens} exceed the "
                             f"model's context of {ctx} tokens: give --max-new-tokens {max(0, ctx - ids.shape[1])} "
                             f"or less (or a shorter prompt)")
    dev = next(lm.model.parameters()).device
    t0 = time.time()
    if max_new_tokens > 0:
        gen_kw = dict(max_new_tokens=max_new_tokens, do_sample=bool(sample),
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if sample:
            torch.manual_seed(seed)
            gen_kw.update(temperature=temperature, top_k=top_k if top_k is not None else 0, top_p=top_p or 1.0)
        else:
            gen_kw.update(temperature=None, top_k=None, top_p=None)
        with torch.inference_mode():
            full = lm.model.generate(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev), **gen_kw)
        full = full[:, : ids.shape[1] + max_new_tokens].cpu()
    else:
        full = ids
    acts = capture_activations(lm.model, full, lay, st)
    T = full.shape[1]
    tensors = {"input_ids": full[0].to(torch.int64).clone()}
    for i in lay:
        for s in st:
            h = acts[(i, s)]
            P = proj.get(i, s)
            if h.shape != (T, P.shape[0]):
                raise NeuroprojError(f"layer {i} {s}: the model has width {h.shape[1]}, the projections "
                                     f"{P.shape[0]} points: the projections were made on another model")
            tensors[f"layer.{i}.{s}"] = h
    id_list = full[0].tolist()
    n_prompt = int(ids.shape[1])
    meta = {
        "format": FORMAT, "model": lm.spec, "fingerprint": lm.fingerprint, "projections": proj.path,
        "prompt": prompt, "generated": tok.decode(id_list[n_prompt:], skip_special_tokens=False),
        "tokens": token_texts(tok, id_list), "raw_tokens": [str(x) for x in tok.convert_ids_to_tokens(id_list)],
        "n_prompt": n_prompt, "layers": list(lay), "sites": list(st), "sample": bool(sample),
        "seed": int(seed) if sample else None, "temperature": temperature if sample else None,
        "max_new_tokens": int(max_new_tokens), "seconds": round(time.time() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "alignment": "row t = activation at position t of one full forward over prompt + generated tokens",
    }
    tr = Trace(tensors, meta)
    if out is not None:
        tr.save(out)
    return tr
