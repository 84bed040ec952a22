"""Checkpoints: save, load, the `neuroproj_prune` config section, and the modules a checkpoint may hold.

- Uniform widths and no added bias: a standard checkpoint (`config.intermediate_size` changed) that plain
  `AutoModelForCausalLM.from_pretrained` loads.
- Attention heads removed uniformly (`num_attention_heads`, `num_key_value_heads` changed) and whole layers removed
  (`num_hidden_layers` and the per-layer lists such as `layer_types` shortened) are standard too.
- Per-layer widths, per-layer head counts, removed attention sub-layers, an MLP bias the config cannot declare, or
  applied skip connections: the config carries a `neuroproj_prune` section (`format`, `widths`, `heads`, `no_attn`,
  `out_bias`, `skips`) and
  `load_pruned` rebuilds the modules and loads the weights strictly; it refuses what it cannot reproduce exactly.

Loading a model never imports the pruning stages: this module needs the adapters, the skip modules and io only.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import NeuroprojError
from ..io import StoredTensor, atomic_dir, write_safetensors, write_text
from .adapters import adapter_for
from .card import CARD_FILE, model_card
from .skip_modules import attach_skips, skips_spec
from .weights import check_weights, stored_shapes

SECTION = "neuroproj_prune"
CHECKPOINT_FORMAT = "neuroproj-prune/checkpoint/1"
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")   # auto: the dtype of the model's own files


# ------------------------------------------------------------------------------------------- config
def update_config(model, added_bias: bool = False) -> None:
    """Make the config describe the model's MLP widths (uniform → the standard width key; per-layer → the
    section's `widths`), an added output bias (declared in the config where it can be, else `out_bias`) and the
    applied skip modules (`skips`)."""
    a = adapter_for(model)
    L = a.num_layers(model)
    widths = [a.width(model, i) for i in range(L)]
    section = dict(getattr(model.config, SECTION, None) or {})
    if len(set(widths)) == 1:
        a.set_config_width(model.config, widths[0])
        section.pop("widths", None)
    else:
        a.set_config_width(model.config, max(widths))
        section["widths"] = widths
    if added_bias:
        if a.config_can_express_out_bias(model.config):
            a.declare_out_bias(model)
        else:
            section["out_bias"] = True
    gone = [i for i in range(L) if not a.has_attention(model, i)] if a.attn_refusal(model) is None else []
    if gone:   # removed attention sub-layers: the section rebuilds them as such
        section["no_attn"] = gone
    else:
        section.pop("no_attn", None)
    if a.heads_refusal(model) is None:   # attention heads: uniform → the config's counts, per-layer → the section
        heads = [[a.num_heads(model, i), a.num_kv_heads(model, i)] if i not in gone else [0, 0] for i in range(L)]
        present = {tuple(h) for i, h in enumerate(heads) if i not in gone}
        if len(present) <= 1:
            c = model.config
            h0 = list(present.pop()) if present else None
            if h0 and h0 != [c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads]:
                a.set_config_heads(c, *h0)
            section.pop("heads", None)
        else:
            section["heads"] = heads
    spec = skips_spec(model)
    if spec:   # the skip modules are rebuilt by load_pruned, which reads the widths explicitly
        section["widths"] = widths
        section["skips"] = spec
    else:
        section.pop("skips", None)
    if section:
        section["format"] = CHECKPOINT_FORMAT
        setattr(model.config, SECTION, section)
    elif hasattr(model.config, SECTION):
        delattr(model.config, SECTION)


# ---------------------------------------------------------------------------------------- save / load
def save_pruned(model, tokenizer, out, *, summary: dict | None = None, extra_files: dict | None = None,
                overwrite: bool = False, stored: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the checkpoint atomically: a temporary directory beside `out`, renamed when complete.
    Uniform widths and no added bias → a standard checkpoint (plain `from_pretrained`); otherwise the
    config carries a `neuroproj_prune` section and `load_pruned` rebuilds the modules.
    `stored`: {state-dict name: io.StoredTensor} for weights that are not in memory (meta tensors: the layers a
    disk-streamed prune wrote out as it went); the weights are then written by `save_streamed`.
    `dtype`: the floating-point dtype the weights are stored in (None: the model's); the model in memory is left
    as it is (the cast copy costs one tensor at a time for streamed layers, else the stored size once).
    With a `summary` (prune_summary.json) the model card README.md is written too."""
    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        if stored:
            save_streamed(model, tmp, stored, dtype=dtype)
        else:
            save_cast(model, tmp, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            (tmp / "prune_summary.json").write_text(json.dumps(summary, indent=2))
            (tmp / CARD_FILE).write_text(model_card(summary, loader=loader(model.config)), encoding="utf-8")
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return out


def write_card(directory, *, evaluation: dict | None = None, dense_evaluation: dict | None = None) -> Path:
    """Render a checkpoint directory's model card again from its prune_summary.json and config.json, with the
    numbers an evaluation measured (eval.json of the checkpoint and of its dense model); written atomically."""
    d = Path(directory)
    try:
        summary = json.loads((d / "prune_summary.json").read_text(encoding="utf-8"))
        section = json.loads((d / "config.json").read_text(encoding="utf-8")).get(SECTION)
    except (OSError, UnicodeDecodeError, ValueError):
        raise NeuroprojError(f"{d} holds no readable prune_summary.json and config.json: prune again") from None
    card = model_card(summary, evaluation=evaluation, dense_evaluation=dense_evaluation,
                      loader="load_pruned" if section else "transformers")
    return write_text(d / CARD_FILE, card)


def loader(config) -> str:
    """How a checkpoint of this config loads: plain transformers, or `load_pruned` (a neuroproj_prune section)."""
    return "load_pruned" if getattr(config, SECTION, None) else "transformers"


def save_cast(model, directory, dtype: torch.dtype | None) -> None:
    """`model.save_pretrained(directory)` with the floating-point weights stored in `dtype` and the config saying
    so. Tied weights stay tied (one cast copy per storage), so they are still stored once."""
    current = next(model.parameters()).dtype
    if dtype is None or dtype == current:
        model.save_pretrained(directory)
        return
    cast, state = {}, {}
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            t = cast.setdefault(key, t.detach().to(dtype))
        state[name] = t
    model.save_pretrained(directory, state_dict=state)
    _set_config_dtype(Path(directory), dtype)


def _set_config_dtype(directory: Path, dtype: torch.dtype) -> None:
    """config.json's `dtype` (save_pretrained writes the in-memory model's): the dtype the files hold."""
    f = directory / "config.json"
    cfg = json.loads(f.read_text())
    cfg["dtype"] = str(dtype).split(".")[1]
    cfg.pop("torch_dtype", None)
    f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_streamed(model, directory, stored: dict, max_shard_size=None, dtype: torch.dtype | None = None) -> None:
    """What `model.save_pretrained(directory)` writes — config.json, generation_config.json, the safetensors
    shards (and their index when there are several), byte for byte — for a model some of whose weights are not in
    memory: each meta tensor's bytes are copied from the file `stored[name]` names, the others written from
    memory, one tensor at a time. The steps are save_pretrained's own (transformers >= 5, no quantizer, adapters
    or tensor parallelism): dtype and architectures in the config, the ignored keys dropped, tied weights stored
    once (`remove_tied_weights_from_state_dict`), save-time renames (`revert_weight_conversion`), shards of at
    most `max_shard_size` (save_pretrained's default) in state-dict order (`split_torch_state_dict_into_shards`).
    `dtype`: floating-point tensors are cast to it as they are written (a stored one is then read into memory).
    Memory: the largest in-memory tensor; disk reads: each stored tensor once."""
    import inspect

    try:
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
    except ImportError:
        raise NeuroprojError("writing a checkpoint from streamed layers needs transformers >= 5 (its save steps): "
                             "upgrade transformers or prune with --offload cpu") from None
    directory = Path(directory)
    if max_shard_size is None:
        max_shard_size = inspect.signature(type(model).save_pretrained).parameters["max_shard_size"].default
    model.config.dtype = str(dtype or model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    source = {id(t): name for name, t in state.items()}   # renames keep the tensor objects: find each one's name
    state = revert_weight_conversion(model, state)
    split = split_torch_state_dict_into_shards(state, filename_pattern=SAFE_WEIGHTS_NAME.replace(
        ".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size)
    for shard, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            t = state[name]
            if t.device.type == "meta":
                where = stored.get(source.get(id(t)))
                if where is None or list(where.shape) != list(t.shape):
                    raise NeuroprojError(f"{name} is neither in memory nor in the streamed layer files: this "
                                         f"architecture cannot be written from streamed layers; use --offload cpu")
                t = where
            tensors[name] = _cast(t, dtype)
        write_safetensors(directory / shard, tensors, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                                         encoding="utf-8")


def pruned_section(config, where) -> dict:
    """The `neuroproj_prune` section of a checkpoint config, its schema checked: a known format and keys, one
    whole-number width per layer in [1, the config's width] (the config's width is their maximum), `out_bias` true or
    false, `skips` a mapping. An edited section is refused here, before any module is built from it."""
    section = getattr(config, SECTION, None) or {}
    if not isinstance(section, dict):
        raise NeuroprojError(f"{where}: the config's neuroproj_prune section is not a mapping: prune again")
    if section and section.get("format") != CHECKPOINT_FORMAT:
        raise NeuroprojError(f"{where}: unknown neuroproj_prune checkpoint format {section.get('format')!r}; "
                             f"upgrade neuroproj-prune")
    unknown = set(section) - {"format", "widths", "out_bias", "skips", "heads", "no_attn"}
    if unknown:
        raise NeuroprojError(f"{where}: the checkpoint needs features this version cannot rebuild: {sorted(unknown)}")
    a = adapter_for(config)
    widths = section.get("widths")
    if widths is not None:
        L, W = a.config_layers(config), a.config_width(config)
        ok = isinstance(widths, list) and len(widths) == L and all(
            isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= W for w in widths)
        if not ok:
            raise NeuroprojError(f"{where}: the neuroproj_prune section's widths must be {L} whole numbers in [1, {W}] "
                                 f"(one per layer; {a.width_key} is their maximum), got {str(widths)[:80]}: fix the "
                                 f"section, or prune again")
    gone = section.get("no_attn", [])
    L = a.config_layers(config)
    if not (isinstance(gone, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < L for i in gone)
            and len(set(gone)) == len(gone)):
        raise NeuroprojError(f"{where}: the neuroproj_prune section's no_attn must list distinct layer numbers in "
                             f"[0, {L}), got {str(gone)[:80]}: fix the section, or prune again")
    if gone and a.attn_refusal(config) is not None:
        raise NeuroprojError(f"{where}: {a.attn_refusal(config)}")
    if not isinstance(section.get("out_bias", False), bool) or not isinstance(section.get("skips") or {}, dict):
        raise NeuroprojError(f"{where}: the neuroproj_prune section's out_bias must be true/false and skips a mapping: "
                             f"fix the section, or prune again")
    return section


def build_pruned(config, section: dict, dtype, where):
    """The model a checkpoint's config and `neuroproj_prune` section describe (weights uninitialised): per-layer
    widths sliced, added biases and skip modules attached. On the meta device (`with torch.device("meta")`) it
    costs nothing and gives the shapes `check_weights` compares."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    a = adapter_for(model)
    if section.get("widths") is not None:
        for i, w in enumerate(section["widths"]):
            a.select_neurons(model, i, torch.arange(int(w)))
    gone = set(section.get("no_attn", []))
    for i in sorted(gone):
        a.remove_attention(model, i)
    heads = section.get("heads")
    if heads is not None:
        L = a.num_layers(model)
        ok = (isinstance(heads, list) and len(heads) == L and a.heads_refusal(model) is None
              and all(isinstance(h, list) and len(h) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  and (v == 0) == (i in gone) and v >= 0 for v in h)
                      for i, h in enumerate(heads)))
        if not ok:
            raise NeuroprojError(f"{where}: 'heads' must give [query heads, key/value heads] for each of the {L} layers"
                                 f" ([0, 0] exactly for the layers no_attn lists)")
        for i, (h, kv) in enumerate(heads):
            if i in gone:
                continue
            H, KV = a.num_heads(model, i), a.num_kv_heads(model, i)
            if kv > KV or h % kv or h // kv > H // KV:
                raise NeuroprojError(f"{where}: layer {i} cannot have {h} heads in {kv} groups (the config has {H} in "
                                     f"{KV})")
            g = H // KV   # each kept group's first h/kv query heads: the layout the pruned model was written in
            a.select_heads(model, i, [k * g + j for k in range(kv) for j in range(h // kv)], list(range(kv)))
    if section.get("out_bias"):
        for i in range(a.num_layers(model)):
            if a.out_bias(model, i) is None:
                a.set_out_bias(model, i, torch.zeros(a.hidden_size(model)))
    if section.get("skips"):
        try:
            attach_skips(model, section["skips"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise NeuroprojError(f"{where}: the neuroproj_prune section's skips are damaged ({type(e).__name__}): "
                                 f"apply the skips again") from None
    return model


def _cast(t, dtype: torch.dtype | None):
    """A tensor (or a StoredTensor, read from its file only when it must change) in `dtype` if floating-point."""
    if dtype is None:
        return t
    if isinstance(t, StoredTensor):
        if t.tag not in _FLOAT_TAGS or _FLOAT_TAGS[t.tag] == dtype:
            return t
        t = t.load()
    return t.to(dtype) if t.is_floating_point() else t


_FLOAT_TAGS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def load_pruned(path, dtype=None, device=None, return_tokenizer: bool = False):
    """Rebuild a checkpoint whose config has a `neuroproj_prune` section (per-layer widths, added MLP
    biases, applied skips) and load its weights strictly; refuse what cannot be reproduced exactly: a section
    that does not fit the config (`pruned_section`), weights that do not fit the section (`check_weights`: layer
    count, widths, hidden size from the tensors' shapes, before any is read)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise NeuroprojError(f"cannot read the checkpoint config in {path}: {str(e).splitlines()[0][:200]}") from None
    section = pruned_section(config, path)
    dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32").replace("torch.", ""))
    model = build_pruned(config, section, dt, path)
    a = adapter_for(model)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NeuroprojError(f"{path} holds no .safetensors weights")
    check_weights(model, stored_shapes(path), str(path), section.get("widths"))
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (OSError, SafetensorError) as e:
            raise NeuroprojError(f"{f} is not a readable safetensors file ({str(e)[:120]}): the checkpoint is "
                                 f"damaged; write it again") from None
    tied = a.ties_head(config)
    if tied:  # the head is the embedding: stored once, tied again below
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise NeuroprojError(f"{path}: the checkpoint does not match its neuroproj_prune section "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tied:
        model.tie_weights()
    model.to(device or "cpu").eval()
    model.requires_grad_(False)
    if return_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError):
            tok = None
        return model, tok
    return model
