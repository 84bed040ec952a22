"""`--to nemotron-nas`: the Hugging Face format with per-layer FFN widths (`DeciLMForCausalLM`, `block_configs`)
that vLLM, SGLang, mlx-lm, TensorRT-LLM and llama.cpp's converter read. Its readers compute a layer's width from
`ffn.ffn_mult` as `P = ceil256(int(2·ffn_mult·d/3))` and accept no exact width (mlx-lm refuses an unknown `ffn`
key), so each layer of K neurons is padded with P − K zero neurons: zero rows of gate and up give
`silu(0)·0 = 0`, zero columns of down add nothing. The exact widths ride along in `neuroproj_exact_widths`; the
modeling files written beside the weights (`trust_remote_code`) trim the zero padding again after loading, so
transformers runs the exact pruned shapes. A removed attention sub-layer is the format's attention-free block
(`no_op: true`, `n_heads_in_group: null`, as in Llama-3_1-Nemotron-51B): no weights, nothing added.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

from ..errors import NeuroprojError
from ..model import LoadedModel, adapter_for
from .common import EXPORTERS, HF_TYPES, TORCH_DTYPES, _refuse_extras, features, write_card


NAS_MULTIPLE = 256  # the width granularity of the nemotron-nas readers (ffn_mult → intermediate size)


def nas_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width the nemotron-nas readers (vLLM, mlx-lm, llama.cpp) build: ceil256(int(2·m·d/3))."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % NAS_MULTIPLE == 0 else n + NAS_MULTIPLE - n % NAS_MULTIPLE


def nas_ffn_mult(width: int, hidden: int) -> tuple[float, int]:
    """(ffn_mult, padded width P): the smallest P ≥ width the readers can express and an ffn_mult (6
    decimals, as mlx-lm rounds) that every reader maps to P."""
    P = -(-width // NAS_MULTIPLE) * NAS_MULTIPLE
    m = round(P * 3 / (2 * hidden), 6)
    while nas_width(m, hidden) < P:
        m = round(m + 1e-6, 6)
    assert nas_width(m, hidden) == P
    return m, P


def _check_llama(f: dict, fmt: str) -> None:
    if f["model_type"] != "llama":
        raise NeuroprojError(f"{fmt} holds llama-family models only (DeciLM is llama with per-layer widths); "
                             f"this model is {f['model_type']!r}: use --to hf, or --to gguf for uniform widths")
    if f["attention_bias"]:
        raise NeuroprojError(f"{fmt} cannot hold attention biases (attention_bias: true)")


def nas_config(model, widths: list[int], padded: list[int], mults: list[float], no_attn=()) -> dict:
    """config.json of a nemotron-nas checkpoint: the llama config plus `block_configs` (the layers in `no_attn`
    attention-free) and `auto_map`."""
    cfg = model.config.to_dict()
    cfg.pop("neuroproj_prune", None)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]  # the readers (mlx-lm, vLLM) read the top-level key
    if rope and rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    cfg.update({
        "model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "intermediate_size": max(padded),
        "block_configs": [{"attention": {"n_heads_in_group": None if i in no_attn else heads // kv,
                                         "no_op": i in no_attn, "replace_with_linear": False},
                           "ffn": {"ffn_mult": m, "no_op": False, "replace_with_linear": False}}
                          for i, m in enumerate(mults)],
        "neuroproj_exact_widths": [int(w) for w in widths],
    })
    return cfg


def _padded_state(model, padded: list[int]) -> dict[str, torch.Tensor]:
    """The state dict with each layer's MLP zero-padded to `padded[i]` neurons (rows of gate/up, columns of down)."""
    a = adapter_for(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for i, P in enumerate(padded):
        pre = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            w = state[pre + name + ".weight"]
            state[pre + name + ".weight"] = torch.cat([w, w.new_zeros(P - w.shape[0], w.shape[1])], 0)
        w = state[pre + "down_proj.weight"]
        state[pre + "down_proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], P - w.shape[1])], 1).contiguous()
    return state


def _zero_attention(model, layers) -> dict[str, torch.Tensor]:
    """The tensors of an attention of zero weights with one key/value head (and a norm of ones) in `layers`: its
    output o_proj · softmax(0)·0 is exactly zero."""
    c, d = model.config, adapter_for(model).hidden_size(model)
    H = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or d // H
    dt = next(model.parameters()).dtype
    out = {}
    for i in layers:
        pre = f"model.layers.{i}."
        out.update({pre + "input_layernorm.weight": torch.ones(d, dtype=dt),
                    pre + "self_attn.q_proj.weight": torch.zeros(H * hd, d, dtype=dt),
                    pre + "self_attn.k_proj.weight": torch.zeros(hd, d, dtype=dt),
                    pre + "self_attn.v_proj.weight": torch.zeros(hd, d, dtype=dt),
                    pre + "self_attn.o_proj.weight": torch.zeros(d, H * hd, dtype=dt)})
    return out


@EXPORTERS.register("nemotron-nas")
def export_nemotron_nas(lm: LoadedModel, tmp: Path, *, type: str = "f32", exact: bool = False,
                        zero_attention=()) -> None:
    """`DeciLMForCausalLM` checkpoint: padded weights, block_configs, modeling files for trust_remote_code.
    `exact=True` writes the unpadded weights (a staging directory for the GGUF converter, not for readers);
    `zero_attention`: removed attention sub-layers written as an attention of zero weights with one key/value head
    (it adds exactly nothing) instead of a no_op block, for a reader that cannot start with an attention-free one."""
    from safetensors.torch import save_file

    if type not in HF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to nemotron-nas: choose from {', '.join(HF_TYPES)}")
    f = features(lm.model)
    _check_llama(f, "nemotron-nas")
    _refuse_extras(f, "nemotron-nas")
    mults, padded = zip(*(nas_ffn_mult(w, f["hidden"]) for w in f["widths"]))
    state = {k: v for k, v in lm.model.state_dict().items()} if exact else _padded_state(lm.model, list(padded))
    if exact and getattr(lm.model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    zero = set(zero_attention) & set(f["no_attn"])
    state.update(_zero_attention(lm.model, zero))
    state = {k: v.detach().cpu().to(TORCH_DTYPES[type]).contiguous() for k, v in state.items()}
    cfg = nas_config(lm.model, f["widths"], list(padded), list(mults), set(f["no_attn"]) - zero)
    for i in zero:
        cfg["block_configs"][i]["attention"]["n_heads_in_group"] = cfg["num_attention_heads"]   # one key/value head
    cfg["dtype"] = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[type]
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = getattr(lm.model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(tmp)
    (tmp / "configuration_decilm.py").write_text(_CONFIGURATION_DECILM)
    (tmp / "modeling_decilm.py").write_text(_MODELING_DECILM)
    write_card(lm, tmp, "nemotron-nas", type, "trust_remote_code")


_CONFIGURATION_DECILM = '''"""DeciLM / nemotron-nas config (written by neuroproj-prune): llama plus per-layer `block_configs`."""
from transformers import LlamaConfig


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, neuroproj_exact_widths=None, **kwargs):
        self.block_configs = list(block_configs or [])
        self.neuroproj_exact_widths = neuroproj_exact_widths
        super().__init__(**kwargs)
'''


_MODELING_DECILM = '''"""DeciLM / nemotron-nas model (written by neuroproj-prune): llama with a per-layer FFN width.

Supported block configs: full attention with `n_heads_in_group` = heads / kv heads or none (`no_op`), and an FFN
of width ceil256(int(2 * ffn_mult * hidden / 3)) (the readers' formula). After `from_pretrained` the zero padding
beyond `neuroproj_exact_widths[i]` is trimmed when it is exactly zero (zero gate/up rows, zero down columns
contribute nothing), so the model computes with the exact pruned shapes.
"""
import copy

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

from .configuration_decilm import DeciLMConfig


def ffn_mult_to_intermediate_size(ffn_mult, n_embd):
    n = int(2 * ffn_mult * n_embd / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


class NoOpAttention(nn.Module):
    """An attention-free block: adds nothing; under a key/value cache it stores one zero channel per token so that
    the cache still counts the tokens (transformers reads the length from layer 0's slot)."""

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            zero = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(zero, zero, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        kv = config.num_key_value_heads or config.num_attention_heads
        for i, (layer, bc) in enumerate(zip(self.model.layers, config.block_configs)):
            attn, ffn = bc["attention"], bc["ffn"]
            if attn.get("replace_with_linear") or ffn.get("no_op") or ffn.get("replace_with_linear"):
                raise NotImplementedError(f"block {i}: linear blocks and no-op FFNs are not supported by this file")
            if attn.get("no_op"):
                layer.self_attn, layer.input_layernorm = NoOpAttention(i), nn.Identity()
            elif config.num_attention_heads // attn["n_heads_in_group"] != kv:
                raise NotImplementedError(f"block {i}: per-layer attention heads are not supported by this file")
            sub = copy.copy(config)
            sub.intermediate_size = ffn_mult_to_intermediate_size(ffn["ffn_mult"], config.hidden_size)
            if layer.mlp.gate_proj.out_features != sub.intermediate_size:
                layer.mlp = LlamaMLP(sub)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        model.trim_zero_padding()
        return model

    @torch.no_grad()
    def trim_zero_padding(self):
        """Drop neurons beyond the exact widths when their weights are all zero; returns the widths."""
        widths = getattr(self.config, "neuroproj_exact_widths", None)
        if not widths:
            return None
        for layer, k in zip(self.model.layers, widths):
            mlp = layer.mlp
            g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            if g.shape[0] == k or g[k:].any() or u[k:].any() or d[:, k:].any():
                continue
            for lin, w in ((mlp.gate_proj, g[:k]), (mlp.up_proj, u[:k])):
                lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
                lin.out_features = k
            mlp.down_proj.weight = nn.Parameter(d[:, :k].contiguous(), requires_grad=False)
            mlp.down_proj.in_features = k
        return widths
'''


def load_nemotron_nas(path, *, trust_remote_code: bool = False, dtype=torch.float32):
    """Load a nemotron-nas export in transformers. Runs the modeling files in `path`, hence only with
    `trust_remote_code=True` given by the caller; logged on stderr."""
    if not trust_remote_code:
        raise NeuroprojError(f"{path} is a nemotron-nas checkpoint whose modeling code is a file in it: "
                             f"pass --trust-remote-code (trust_remote_code=True) to run it")
    from transformers import AutoModelForCausalLM

    print(f"neuroproj-prune: loading {path} with trust_remote_code=True (its modeling_decilm.py)", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code, dtype=dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def verify_nemotron_nas(lm: LoadedModel, path, *, trust_remote_code: bool = False, tokens: int = 32) -> None:
    """Raise unless the export's logits on `tokens` tokens equal the source model's bit for bit."""
    model = load_nemotron_nas(path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    vocab = lm.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    if next(lm.model.parameters()).dtype != torch.float32:
        raise NeuroprojError("--verify compares float32 logits: load the model in float32")
    ref = lm.model(ids.to(next(lm.model.parameters()).device)).logits.cpu()
    got = model(ids).logits
    if not torch.equal(ref, got):
        raise NeuroprojError(f"the nemotron-nas export's logits differ from the model's (max |Δ| "
                             f"{(ref - got).abs().max().item():.3g}): not written")
