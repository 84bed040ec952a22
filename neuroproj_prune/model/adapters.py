"""Architecture adapters: every fact about a model family, in one class per family.

Pruning acts on the MLP's intermediate neurons: the input of the MLP's output projection. An adapter
knows, for one architecture family, where the MLP of layer i is, which tensors belong to neuron j, how to
slice them, and the config facts the rest of the package needs (context length, tied head, MLP cost). The
rest of the package talks to `adapter_for(model)` only; no other module branches on `model_type`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import NeuroprojError


# --------------------------------------------------------------------------------------------- adapters
class Adapter:
    """Where the MLP of layer i lives and which tensors belong to neuron j.

    Subclasses set `model_types`, `width_key` (the config field of the MLP width) and implement
    `layers`, `attn`, `in_projs`, `out_proj`. `mlp(model, i)` is the module whose output is the site
    `mlp.out`. Weights are exposed in one orientation, whatever the storage: `out_weight` is W in
    `y = W h` (d_model × N), `in_weights` the (N × d_model) row blocks that compute neuron pre-activations.
    """

    model_types: tuple[str, ...] = ()
    width_key = "intermediate_size"
    layers_key = "num_hidden_layers"
    head_keys = ("num_attention_heads", "num_key_value_heads", "head_dim")   # the config keys of attention shapes

    # -- structure
    def layers(self, model) -> nn.ModuleList:
        raise NotImplementedError

    def mlp(self, model, i) -> nn.Module:
        return self.layers(model)[i].mlp

    def attn(self, model, i) -> nn.Module:
        raise NotImplementedError

    def in_projs(self, model, i) -> list[nn.Module]:
        raise NotImplementedError

    def out_proj(self, model, i) -> nn.Module:
        raise NotImplementedError

    def num_layers(self, model) -> int:
        return len(self.layers(model))

    def width(self, model, i) -> int:
        return self.out_weight(model, i).shape[1]

    def hidden_size(self, model) -> int:
        return self.out_weight(model, 0).shape[0]

    def out_has_bias(self, model, i=0) -> bool:
        return self.out_proj(model, i).bias is not None

    def in_has_bias(self, model, i=0) -> bool:
        return any(p.bias is not None for p in self.in_projs(model, i))

    def is_gated(self) -> bool:
        return False

    def residual_norms(self, model, i) -> list[nn.Module]:
        """The norm modules that read the residual stream after layer i's MLP (later layers and the final
        norm); [] when unknown."""
        return []

    def norm_gain(self, norm: nn.Module) -> torch.Tensor:
        """The per-dimension gain γ a norm applies (its weight; gemma stores γ − 1)."""
        return norm.weight.detach()

    def downstream_gain(self, model, i) -> torch.Tensor | None:
        """sqrt of the mean γ² over the norms that read layer i's MLP output: how much an error in each hidden
        dimension is seen downstream. None when the architecture does not say."""
        norms = self.residual_norms(model, i)
        if not norms:
            return None
        g2 = torch.stack([self.norm_gain(n).double().cpu() ** 2 for n in norms]).mean(0)
        return g2.sqrt()

    # -- attention heads: the second site. The input of the attention output projection is the heads' outputs
    #    concatenated (head h: channels [h·hd, (h+1)·hd)), as the input of the MLP's output projection is its
    #    neurons; under grouped-query attention query head h reads key/value head h // (H/KV).
    def heads_refusal(self, model) -> str | None:
        """Why this family's attention heads cannot be pruned (None: they can). `model`: a model or its config."""
        return (f"{getattr(model, 'config', model).model_type}: pruning attention heads is not supported for this family (its "
                f"attention reads the head count from the shared config); prune MLP neurons or layers only")

    def head_dim(self, model) -> int:
        raise NotImplementedError

    def num_heads(self, model, i) -> int:
        raise NotImplementedError

    def num_kv_heads(self, model, i) -> int:
        raise NotImplementedError

    def attn_out_proj(self, model, i) -> nn.Module:
        raise NotImplementedError

    def select_heads(self, model, i, heads, kv_heads) -> None:
        """Keep only query heads `heads` and key/value heads `kv_heads` (sorted) of layer i; every kept query
        head's key/value head must be kept, and the kept query heads per kept key/value head must be equal."""
        raise NotImplementedError

    def set_config_heads(self, config, heads: int, kv_heads: int) -> None:
        raise NotImplementedError

    # -- attention sub-layers: removed whole, the layer keeps its MLP (the residual stream passes the attention)
    def attn_refusal(self, model) -> str | None:
        """Why this family's attention sub-layers cannot be removed alone (None: they can)."""
        return (f"{getattr(model, 'config', model).model_type}: removing attention sub-layers is not supported for "
                f"this family; remove whole layers (--drop-layers) instead")

    def has_attention(self, model, i) -> bool:
        return not isinstance(self.attn(model, i), NoAttention)

    def remove_attention(self, model, i) -> None:
        """Replace layer i's attention and the norm that only feeds it by modules without weights: the layer's
        output is then x + MLP(norm(x)) exactly."""
        raise NotImplementedError

    def attention_params(self, model, i) -> int:
        """Parameters removing layer i's attention sub-layer removes (the attention and the norm that feeds it)."""
        raise NotImplementedError

    def head_params(self, model, i) -> tuple[float, float]:
        """Parameters one query head and one key/value head of layer i hold (q rows + o columns; k and v rows),
        biases included."""
        raise NotImplementedError

    def drop_layers(self, model, drop) -> None:
        """Remove the decoder layers `drop` (indices of the current model) in place: the layer list, the layer
        count and the config's per-layer lists (`per_layer_keys`) shrink, and the kept layers' `layer_idx` (their
        key/value cache slot) is renumbered, so the model is a standard one of fewer layers."""
        drop = {int(i) for i in drop}
        old = self.layers(model)
        L = len(old)
        kept = nn.ModuleList([l for i, l in enumerate(old) if i not in drop])
        for name, mod in model.named_modules():
            if mod is old:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, kept)
                break
        config = model.config
        setattr(config, self.layers_key, len(kept))
        for key in self.per_layer_keys:
            v = getattr(config, key, None)
            if isinstance(v, (list, tuple)) and len(v) == L:
                setattr(config, key, [x for i, x in enumerate(v) if i not in drop])
        for j, layer in enumerate(kept):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = j

    per_layer_keys = ("layer_types",)

    # -- the head: what follows the last decoder layer
    def final_norm(self, model) -> nn.Module | None:
        """The norm between the last decoder layer and the LM head (None: none)."""
        raise NotImplementedError

    def head_input(self, model, x: torch.Tensor) -> torch.Tensor:
        """The LM head's input for the last decoder layer's output x (the final norm applied)."""
        norm = self.final_norm(model)
        return x if norm is None else norm(x)

    def logits(self, model, h: torch.Tensor) -> torch.Tensor:
        """The LM head on its input h (what the model's forward does after the trunk)."""
        return model.get_output_embeddings()(h)

    def mlp_output_is_added(self, model) -> bool:
        """True when the layer output is `residual + mlp_out` (no norm after the MLP): then a change of
        the MLP output changes the layer output by exactly that much, which sequential pruning uses."""
        return True

    def config_width(self, config) -> int:
        return getattr(config, self.width_key)

    def config_layers(self, config) -> int:
        """The number of decoder layers a config says (before any weights are read)."""
        return int(getattr(getattr(config, "config", config), self.layers_key))

    def set_config_width(self, config, width: int) -> None:
        setattr(config, self.width_key, int(width))

    # -- weights in one orientation
    def out_weight(self, model, i) -> torch.Tensor:
        """W of `y = W h`, shape (d_model, N)."""
        return self.out_proj(model, i).weight

    def in_weights(self, model, i) -> list[torch.Tensor]:
        """Row blocks (N, d_model) that compute the pre-activations of neuron j (row j of each)."""
        return [p.weight for p in self.in_projs(model, i)]

    def in_norms(self, model, i) -> torch.Tensor:
        """‖w_in,j‖ over all input row blocks of neuron j (float64, CPU): what weight-only scores read."""
        return torch.stack([w.detach().double().norm(dim=1) for w in self.in_weights(model, i)]).norm(dim=0).cpu()

    def in_blocks(self) -> int:
        """Input row blocks per neuron: 2 for a gated MLP (gate and up), 1 for a plain one."""
        return 2 if self.is_gated() else 1

    def macs_per_neuron(self, model) -> int:
        """Multiply-accumulates per token that one MLP neuron costs (input rows + output column)."""
        return mlp_macs(self.in_blocks(), self.hidden_size(model), [1])

    def mlp_macs_per_token(self, model) -> int:
        """MLP multiply-accumulates per token (skip modules not included); see `mlp_macs`."""
        return mlp_macs(self.in_blocks(), self.hidden_size(model),
                        [self.width(model, i) for i in range(self.num_layers(model))])

    # -- config facts
    context_keys = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")

    def context_length(self, config) -> int | None:
        """The longest sequence the model's positions allow (None when the config does not say)."""
        config = getattr(config, "config", config)
        for key in self.context_keys:
            v = getattr(config, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    def ties_head(self, config) -> bool:
        """Whether the LM head shares the input embedding's weight (then a checkpoint stores it once)."""
        return bool(getattr(getattr(config, "config", config), "tie_word_embeddings", False))

    # -- surgery
    def set_out_weight(self, model, i, W: torch.Tensor) -> None:
        """Replace W (d_model × N) of layer i's output projection, in the storage's orientation and dtype."""
        p = self.out_proj(model, i)
        p.weight = nn.Parameter(W.to(p.weight.dtype).to(p.weight.device).contiguous(), requires_grad=False)

    def out_bias(self, model, i) -> torch.Tensor | None:
        b = self.out_proj(model, i).bias
        return None if b is None else b.detach()

    def set_out_bias(self, model, i, b: torch.Tensor) -> None:
        """Set (adding it when absent) the bias of layer i's output projection."""
        p = self.out_proj(model, i)
        ref = p.weight
        p.bias = nn.Parameter(b.to(ref.dtype).to(ref.device).contiguous(), requires_grad=False)

    def config_can_express_out_bias(self, config) -> bool:
        """Whether a standard config can say "the MLP has biases" (then plain from_pretrained loads it)."""
        return self.out_has_bias_in_config(config)

    def out_has_bias_in_config(self, config) -> bool:
        return True  # plain MLPs (gpt2, opt, gpt_neox) always carry biases

    def declare_out_bias(self, model, layers=None) -> None:
        """Make the config and modules of a standard checkpoint carry the MLP biases (no-op for plain MLPs).
        `layers`: only those layers' modules (a disk-streamed prune declares each layer before writing it)."""

    def select_neurons(self, model, i, keep: torch.Tensor) -> None:
        """Keep only neurons `keep` (sorted indices) of layer i: slice input rows/biases, output columns."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        for proj in self.in_projs(model, i):
            _slice_linear_(proj, keep, dim=0)
        _slice_linear_(self.out_proj(model, i), keep, dim=1)


class NoAttention(nn.Module):
    """A removed attention sub-layer: it adds nothing to the residual stream and holds no weights. Under a key/value
    cache it stores one zero channel per token in its slot, so that the cache still counts the tokens (transformers
    reads the sequence length from a layer's slot, layer 0's by default)."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            b, t = hidden_states.shape[:2]
            zero = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(zero, zero, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def _slice_linear_(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Slice an nn.Linear in place along output (dim 0) or input (dim 1) features."""
    idx = idx.to(lin.weight.device)
    w = lin.weight.data.index_select(dim, idx).contiguous()
    lin.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = w.shape[0]
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).contiguous(), requires_grad=False)
    else:
        lin.in_features = w.shape[1]


class GatedAdapter(Adapter):
    """llama, mistral, qwen2, qwen3, gemma (gemma2 below): `down(act(gate(x)) * up(x))`; neuron j = rows j of
    gate and up, column j of down."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma")

    def layers(self, model):
        return model.model.layers

    def attn(self, model, i):
        return self.layers(model)[i].self_attn

    def in_projs(self, model, i):
        mlp = self.mlp(model, i)
        return [mlp.gate_proj, mlp.up_proj]

    def out_proj(self, model, i):
        return self.mlp(model, i).down_proj

    def is_gated(self):
        return True

    # attention: q/k/v/o projections of their own; the attention reads head counts from the projections' widths
    # and `num_key_value_groups` (transformers >= 5), so layers may differ
    def heads_refusal(self, model):
        return None

    def head_dim(self, model):
        present = [self.attn(model, i) for i in range(self.num_layers(model)) if self.has_attention(model, i)]
        c = model.config
        if present:
            return present[0].head_dim
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def num_heads(self, model, i):
        return self.attn(model, i).q_proj.weight.shape[0] // self.head_dim(model)

    def num_kv_heads(self, model, i):
        return self.attn(model, i).k_proj.weight.shape[0] // self.head_dim(model)

    def attn_out_proj(self, model, i):
        return self.attn(model, i).o_proj

    def select_heads(self, model, i, heads, kv_heads):
        at, hd = self.attn(model, i), self.head_dim(model)
        heads, kv_heads = sorted(int(h) for h in heads), sorted(int(k) for k in kv_heads)
        group = self.num_heads(model, i) // self.num_kv_heads(model, i)
        per_kv = {k: [h for h in heads if h // group == k] for k in kv_heads}
        if any(h // group not in per_kv for h in heads) or len({len(v) for v in per_kv.values()}) != 1:
            raise ValueError(f"layer {i}: heads {heads} with key/value heads {kv_heads} break the GQA layout")

        def rows(idx):
            return torch.tensor([c for j in idx for c in range(j * hd, (j + 1) * hd)], dtype=torch.long)

        _slice_linear_(at.q_proj, rows(heads), dim=0)
        _slice_linear_(at.k_proj, rows(kv_heads), dim=0)
        _slice_linear_(at.v_proj, rows(kv_heads), dim=0)
        _slice_linear_(at.o_proj, rows(heads), dim=1)
        at.num_key_value_groups = len(heads) // len(kv_heads)

    def head_params(self, model, i):
        at = self.attn(model, i)
        H, KV = self.num_heads(model, i), self.num_kv_heads(model, i)
        q = sum(p.numel() for p in at.q_proj.parameters()) + at.o_proj.weight.numel()
        kv = sum(p.numel() for proj in (at.k_proj, at.v_proj) for p in proj.parameters())
        return q / H, kv / KV

    def attn_refusal(self, model):
        return None

    def attention_params(self, model, i):
        layer = self.layers(model)[i]
        return sum(p.numel() for m in (layer.self_attn, layer.input_layernorm) for p in m.parameters())

    def remove_attention(self, model, i):
        layer = self.layers(model)[i]
        layer.self_attn = NoAttention(layer.self_attn.layer_idx)
        layer.input_layernorm = nn.Identity()

    def set_config_heads(self, config, heads, kv_heads):
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.num_attention_heads, config.num_key_value_heads = int(heads), int(kv_heads)

    def residual_norms(self, model, i):
        later = [m for l in self.layers(model)[i + 1:] for m in (l.input_layernorm, l.post_attention_layernorm)
                 if not isinstance(m, nn.Identity)]   # (a removed attention's norm)
        return later + [model.model.norm]

    def final_norm(self, model):
        return model.model.norm

    def norm_gain(self, norm):
        w = norm.weight.detach()
        return 1 + w if type(norm).__name__.startswith("Gemma") else w  # Gemma's RMSNorm scales by (1 + w)

    def out_has_bias_in_config(self, config) -> bool:
        # llama-style configs have `mlp_bias` (biases on gate, up and down); the others have no such switch
        return "mlp_bias" in config.to_dict()

    def declare_out_bias(self, model, layers=None) -> None:
        if not self.out_has_bias_in_config(model.config):
            return
        model.config.mlp_bias = True
        for i in range(self.num_layers(model)) if layers is None else layers:
            for proj in self.in_projs(model, i):
                if proj.bias is None:
                    proj.bias = nn.Parameter(torch.zeros(proj.weight.shape[0], dtype=proj.weight.dtype,
                                                         device=proj.weight.device), requires_grad=False)
            out = self.out_proj(model, i)
            if out.bias is None:
                out.bias = nn.Parameter(torch.zeros(out.weight.shape[0], dtype=out.weight.dtype,
                                                    device=out.weight.device), requires_grad=False)


class Gemma2Adapter(GatedAdapter):
    """gemma2: as llama, but the MLP output passes `post_feedforward_layernorm` before the residual add."""

    model_types = ("gemma2",)

    def mlp_output_is_added(self, model):
        return False

    def attn_refusal(self, model):   # its attention output passes post_attention_layernorm: not a plain add
        return Adapter.attn_refusal(self, model)

    def logits(self, model, h):
        z = model.get_output_embeddings()(h)
        cap = getattr(model.config, "final_logit_softcapping", None)
        return z if cap is None else torch.tanh(z / cap) * cap


class Phi3Adapter(GatedAdapter):
    """phi3: gate and up fused in `gate_up_proj` (rows [0, N) gate, [N, 2N) up)."""

    model_types = ("phi3",)

    def heads_refusal(self, model):   # fused qkv_proj split by the shared config's head count
        return Adapter.heads_refusal(self, model)

    def in_projs(self, model, i):
        return [self.mlp(model, i).gate_up_proj]

    def in_weights(self, model, i):
        w = self.mlp(model, i).gate_up_proj.weight
        return list(w.chunk(2, dim=0))

    def select_neurons(self, model, i, keep):
        keep = torch.as_tensor(keep, dtype=torch.long)
        n = self.width(model, i)
        _slice_linear_(self.mlp(model, i).gate_up_proj, torch.cat([keep, keep + n]), dim=0)
        _slice_linear_(self.out_proj(model, i), keep, dim=1)


class GPT2Adapter(Adapter):
    """gpt2: Conv1D `c_fc`/`c_proj`, weights stored transposed (in_features, out_features)."""

    model_types = ("gpt2",)
    width_key = "n_inner"
    layers_key = "n_layer"
    head_keys = ("n_head",)

    context_keys = ("n_positions",)

    def layers(self, model):
        return model.transformer.h

    def final_norm(self, model):
        return model.transformer.ln_f

    def attn(self, model, i):
        return self.layers(model)[i].attn

    def in_projs(self, model, i):
        return [self.mlp(model, i).c_fc]

    def out_proj(self, model, i):
        return self.mlp(model, i).c_proj

    def config_width(self, config):
        return config.n_inner if config.n_inner is not None else 4 * config.n_embd

    def out_weight(self, model, i):
        return self.out_proj(model, i).weight.T

    def in_weights(self, model, i):
        return [self.mlp(model, i).c_fc.weight.T]

    def set_out_weight(self, model, i, W):
        super().set_out_weight(model, i, W.T)

    def select_neurons(self, model, i, keep):
        keep = torch.as_tensor(keep, dtype=torch.long)
        c_fc, c_proj = self.mlp(model, i).c_fc, self.out_proj(model, i)
        idx = keep.to(c_fc.weight.device)
        c_fc.weight = nn.Parameter(c_fc.weight.data.index_select(1, idx).contiguous(), requires_grad=False)
        c_fc.bias = nn.Parameter(c_fc.bias.data.index_select(0, idx).contiguous(), requires_grad=False)
        c_fc.nf = len(keep)
        c_proj.weight = nn.Parameter(c_proj.weight.data.index_select(0, idx).contiguous(), requires_grad=False)
        if hasattr(c_proj, "nx"):
            c_proj.nx = len(keep)


class OPTAdapter(Adapter):
    """opt: `fc1`/`fc2` directly on the decoder layer (there is no MLP module: `mlp.out` is fc2's output).
    The decoder flattens tokens to (batch·seq, d) around the MLP; captures reshape accordingly."""

    model_types = ("opt",)
    width_key = "ffn_dim"

    def layers(self, model):
        return model.model.decoder.layers

    def final_norm(self, model):
        return model.model.decoder.final_layer_norm

    def head_input(self, model, x):
        x = super().head_input(model, x)
        out = model.model.decoder.project_out   # OPT-350m projects to a smaller embedding width
        return x if out is None else out(x)

    def mlp(self, model, i):
        return self.layers(model)[i].fc2

    def mlp_output_is_added(self, model):
        return bool(getattr(model.config, "do_layer_norm_before", True))  # OPT-350m norms after the add

    def attn(self, model, i):
        return self.layers(model)[i].self_attn

    def in_projs(self, model, i):
        return [self.layers(model)[i].fc1]

    def out_proj(self, model, i):
        return self.layers(model)[i].fc2


class GPTNeoXAdapter(Adapter):
    """gpt_neox (Pythia): `dense_h_to_4h`/`dense_4h_to_h`."""

    model_types = ("gpt_neox",)

    def layers(self, model):
        return model.gpt_neox.layers

    def final_norm(self, model):
        return model.gpt_neox.final_layer_norm

    def attn(self, model, i):
        return self.layers(model)[i].attention

    def in_projs(self, model, i):
        return [self.mlp(model, i).dense_h_to_4h]

    def out_proj(self, model, i):
        return self.mlp(model, i).dense_4h_to_h


ADAPTERS: dict[str, Adapter] = {}
for _cls in (GatedAdapter, Gemma2Adapter, Phi3Adapter, GPT2Adapter, OPTAdapter, GPTNeoXAdapter):
    for _t in _cls.model_types:
        ADAPTERS[_t] = _cls()


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    """The adapter of a model, a config or a `model_type` string; a clear error listing the supported
    families otherwise."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NeuroprojError(
            f"unsupported architecture {model_type!r}: neuroproj-prune supports "
            f"{', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]


def mlp_macs(in_blocks: int, hidden: int, widths) -> int:
    """MLP multiply-accumulates per token: Σ_i (in_blocks + 1)·d·N_i (input rows plus the output column)."""
    return int(sum((in_blocks + 1) * hidden * int(w) for w in widths))


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_macs(module) -> int:
    """Multiply-accumulates per token of the nn.Linear maps inside `module` (their weights' sizes)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def context_length(model_or_config) -> int | None:
    """The model's context length by its family's adapter (the generic config keys for other families)."""
    config = getattr(model_or_config, "config", model_or_config)
    return ADAPTERS.get(getattr(config, "model_type", None), Adapter()).context_length(config)
