"""A model's config checked against its weights before either is used.

A config that disagrees with its weights is the worst kind of bad input: transformers initialises what the files
lack at random (a layer the config adds), drops what the config does not name (a layer it leaves out), and stops
with a traceback on a shape it did not expect. Every model the package reads passes `check_weights` first: the
model the config makes (built on the meta device: shapes only, nothing allocated) against the tensors the
safetensors files hold (their headers only: no weight is read). The first disagreement is said as a fact of the
tensors — layer count, MLP width (of the config or of the `neuroproj_prune` section), hidden size, attention
shapes — in one NeuroprojError. `refusal_of_report` does the same with transformers' own loading report, for
what the headers cannot say beforehand (a GGUF file, a hub cache, `.bin` weights).
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import nn

from ..errors import NeuroprojError
from ..io import stored_tensors
from .adapters import adapter_for


# ------------------------------------------------------------------------------------------- the files
def stored_shapes(source) -> dict[str, tuple[int, ...]]:
    """{checkpoint key: shape} of every tensor in the directory's `*.safetensors` files, from their headers
    (`io.stored_tensors`: one small read per file; a damaged header or a truncated file is a NeuroprojError)."""
    return {k: t.shape for path in sorted(Path(source).glob("*.safetensors")) for k, t in stored_tensors(path).items()}


def rename_keys(model: nn.Module, keys) -> tuple[dict[str, str], list[str], list[str]]:
    """How `from_pretrained` pairs checkpoint keys with the state-dict names of `model` (built from its config):
    the renames transformers applies on loading (legacy names, e.g. gpt_neox's `embed_out`), the base-model prefix
    added or dropped. Returns ({state-dict name: key}, the keys no name takes, the keys transformers converts
    (merges or splits) on loading). Records the renames used as `model._weight_conversions`, as `from_pretrained`
    does, so that saving reverts them the same way."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:   # transformers 4: names as stored
        state = model.state_dict()
        return {k: k for k in keys if k in state}, [k for k in keys if k not in state], []
    mapping = get_model_conversion_mapping(model)
    renames = [m for m in mapping if not isinstance(m, WeightConverter)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    names, unmapped, converted = {}, [], []
    for key in keys:
        name, conv = rename_source_key(key, renames, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, conv = rename_source_key(key, [], [], prefix, meta_state)
        if conv is not None:
            converted.append(key)
        elif name in meta_state:
            names[name] = key
        else:
            unmapped.append(key)
    model._weight_conversions = [m for m in mapping if m.was_used()]
    return names, unmapped, converted


def checkpoint_names(model: nn.Module, keys, where: str) -> dict[str, str]:
    """{state-dict name: checkpoint key} (`rename_keys`) for a reader that takes tensors as stored: a checkpoint
    whose tensors transformers merges or splits on loading is refused."""
    names, _, converted = rename_keys(model, keys)
    if converted:
        raise NeuroprojError(f"{where}: transformers converts {converted[0]} when it loads this checkpoint, and "
                             f"offload 'disk' reads tensors as stored: use --offload cpu")
    return names


# ------------------------------------------------------------------------------------------- the check
def check_weights(model: nn.Module, stored: dict[str, tuple], where: str, section_widths=None) -> None:
    """Refuse `stored` ({checkpoint key: shape}) unless it holds exactly the parameters of `model` (built from the
    config, on any device, meta included), each in its shape: nothing missing (it would be initialised at random),
    nothing left over (it would be dropped), no shape that differs. `section_widths`: the per-layer widths of a
    `neuroproj_prune` section the model was built with (then a width disagreement names the section). Cost: one
    pass over the names; no tensor is read. Checkpoints whose tensors transformers converts on loading are left to
    its loading report (`refusal_of_report`)."""
    names, unmapped, converted = rename_keys(model, stored)
    if converted:
        return
    params = dict(model.named_parameters())            # tied weights once: the head of a tied model is not stored
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    missing = [n for n in params if n not in names]
    unexpected = [k for k in unmapped if not any(p.search(k) for p in ignore)]
    mismatched = [(n, stored[names[n]], tuple(p.shape)) for n, p in params.items()
                  if n in names and tuple(stored[names[n]]) != tuple(p.shape)]
    if missing or unexpected or mismatched:
        raise NeuroprojError(disagreement(model, where, missing, unexpected, mismatched, section_widths))


def refusal_of_report(model: nn.Module, where: str, info: dict) -> None:
    """Refuse what transformers' loading report (`from_pretrained(..., output_loading_info=True)`) lists: missing
    keys (initialised at random), unexpected ones (dropped), mismatched shapes, loading errors."""
    missing = list(info.get("missing_keys") or ())
    unexpected = list(info.get("unexpected_keys") or ())
    mismatched = [tuple(m) if isinstance(m, (list, tuple)) and len(m) == 3 else (str(m), None, None)
                  for m in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        raise NeuroprojError(disagreement(model, where, missing, unexpected, mismatched))
    if info.get("error_msgs"):
        raise NeuroprojError(f"{where}: the weights do not load ({str(info['error_msgs'][0]).splitlines()[0][:200]}): "
                             f"download or write the checkpoint again")


def _layer_prefix(model, a) -> str:
    layers = a.layers(model)
    return next(n for n, m in model.named_modules() if m is layers) + "."


def _layer_of(name: str, prefix: str) -> int | None:
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _span(idx) -> str:
    idx = sorted(idx)
    return "none" if not idx else f"{idx[0]}" if len(idx) == 1 else f"{idx[0]}-{idx[-1]}" \
        if idx == list(range(idx[0], idx[-1] + 1)) else ",".join(map(str, idx))


def disagreement(model, where: str, missing, unexpected, mismatched, section_widths=None) -> str:
    """One sentence for the first disagreement between a model built from its config and its weights, said as a
    fact of the tensors (layer count, MLP width, hidden size, attention shapes), then what to do."""
    a = adapter_for(model)
    config = model.config
    L = a.num_layers(model)
    fix = "fix config.json, or use it with the weights it was written for"
    prefix = _layer_prefix(model, a)
    # layers: a layer whose every tensor is missing is not in the files; a left-over key of a layer i >= L is one
    # the config leaves out
    per_layer, lacking = {}, set(missing)
    for n, _ in model.named_parameters():
        i = _layer_of(n, prefix)
        if i is not None:
            per_layer.setdefault(i, []).append(n)
    gone = {i for i, ns in per_layer.items() if all(n in lacking for n in ns)}
    extra = {i for i in (_layer_of(k, prefix) or _layer_of(_prefixed(k, model), prefix) for k in unexpected)
             if i is not None and i >= L}
    if gone or extra:
        held = sorted((set(range(L)) - gone) | extra)
        return (f"{where}: its config says {L} layer{'s' * (L != 1)} ({a.layers_key}), the weights hold {len(held)} "
                f"(layers {_span(held)}): {fix}")
    shapes = {n: (s, m) for n, s, m in mismatched}
    emb = next((n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight), None)
    if emb in shapes and shapes[emb][0] is not None:
        (s, m) = shapes[emb]
        return (f"{where}: its config says hidden size {m[-1]}, the weights' token embedding is {s[-1]} wide "
                f"({emb} {tuple(s)}): {fix}")
    for i in range(L):
        W, p = a.out_weight(model, i), a.out_proj(model, i).weight
        name = next((n for n, q in model.named_parameters() if q is p), None)
        if name in shapes and shapes[name][0] is not None:
            s = shapes[name][0]
            held = s[1] if W is p else s[0]   # the stored orientation: (d, N) for Linear, (N, d) for Conv1D
            if len(s) == 2 and s[0 if W is p else 1] == W.shape[0]:   # the hidden size agrees: the width does not
                if section_widths is not None:
                    return (f"{where}: its neuroproj_prune section says layer {i} keeps {section_widths[i]} MLP "
                            f"neurons, the weights hold {held}: fix the section's widths, or prune again")
                return (f"{where}: its config says MLP width {a.width(model, i)} ({a.width_key}), the weights hold "
                        f"{held} in layer {i}: {fix}")
    attn_prefixes = []
    for i in range(L):
        try:
            mod = a.attn(model, i)
        except (NotImplementedError, AttributeError):
            continue
        attn_prefixes += [n + "." for n, m in model.named_modules() if m is mod]
    for n, (s, m) in shapes.items():
        if s is not None and any(n.startswith(ap) for ap in attn_prefixes):
            heads = ", ".join(f"{k} {getattr(config, k)}" for k in a.head_keys if getattr(config, k, None))
            return (f"{where}: the weights hold {n} of shape {tuple(s)}, its config's head counts ({heads}) make "
                    f"{tuple(m)}: {fix}")
    if mismatched:
        n, s, m = mismatched[0]
        return f"{where}: the weights hold {n} of shape {s and tuple(s)}, its config makes {m and tuple(m)}: {fix}"
    if missing:
        return (f"{where}: the weights lack {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                else "") + f", which transformers would initialise at random: {fix}")
    return (f"{where}: the weights hold {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1
            else "") + f", which its config has no place for (it would be dropped): {fix}")


def _prefixed(key: str, model) -> str:
    """A checkpoint key with the base-model prefix added, as the model names it (`layers.0.x` → `model.layers.0.x`)."""
    return f"{model.base_model_prefix}.{key}"
