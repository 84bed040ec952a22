"""What every exporter shares: the registry `EXPORTERS` (one signature: `write(lm, tmp, *, type)` writes the whole
output at the path `tmp` and raises `NeuroprojError` *before writing* for what its format cannot express), the
features of a model an exporter must be able to express, and the torch dtypes of the type names."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import NeuroprojError
from ..model import CARD_FILE, adapter_for, command, model_card
from ..registry import Registry

HF_TYPES = ("f32", "f16", "bf16")
EXPORTERS = Registry("export format", "write(lm: LoadedModel, tmp: Path, *, type: str) -> None")
# per format, what `export` checks before it loads the model: `preflight(type)` raises for a missing dependency
PREFLIGHTS: dict = {}


TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def features(model) -> dict:
    """What an exporter must be able to express: architecture, per-layer widths, removed attention sub-layers,
    biases, applied skips."""
    a = adapter_for(model)
    cfg = model.config
    section = dict(getattr(cfg, "neuroproj_prune", None) or {})
    widths = [a.width(model, i) for i in range(a.num_layers(model))]
    no_attn = [i for i in range(a.num_layers(model)) if not a.has_attention(model, i)]
    return {"model_type": cfg.model_type, "widths": widths, "no_attn": no_attn,
            "uniform": len(set(widths)) == 1 and not no_attn,   # (a removed attention is per-layer too)
            "skips": bool(section.get("skips")), "added_bias": bool(section.get("out_bias")),
            "layer_heads": bool(section.get("heads")),
            "mlp_bias": a.out_has_bias(model), "attention_bias": bool(getattr(cfg, "attention_bias", False)),
            "hidden": a.hidden_size(model)}


def _refuse_extras(f: dict, fmt: str) -> None:
    if f["skips"]:
        raise NeuroprojError(f"the model has applied skip connections, which the {fmt} format cannot hold: "
                             f"export the checkpoint before `skips --apply`, or use --to hf")
    if f["layer_heads"]:
        raise NeuroprojError(f"the model has a different number of attention heads per layer, which this {fmt} export "
                             f"cannot hold yet: prune with one head count for every layer (--head-sparsity, or a "
                             f"--target-params budget), or use --to hf")
    if f["added_bias"] or f["mlp_bias"]:
        raise NeuroprojError(f"the model has MLP biases (added by the bias fold or --add-bias), which this {fmt} "
                             f"export cannot hold: prune without --add-bias, or use --to hf")


def source_summary(lm) -> dict | None:
    """prune_summary.json of the checkpoint directory `lm` was loaded from (None for a dense model)."""
    f = Path(str(lm.spec)) / "prune_summary.json"
    if not f.is_file():
        return None
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise NeuroprojError(f"{f} is not readable JSON: the checkpoint is damaged; prune again") from None
    return doc if isinstance(doc, dict) else None


def write_card(lm, directory: Path, fmt: str, type: str, loader: str) -> None:
    """The model card of an export (README.md): the source checkpoint's summary, the format, the command."""
    card = model_card(source_summary(lm), spec=str(lm.spec), loader=loader,
                      export={"format": fmt, "type": type, "command": command()})
    (directory / CARD_FILE).write_text(card, encoding="utf-8")
