"""What every exporter shares: the registry `EXPORTERS` (one signature: `write(lm, tmp, *, type)` writes the whole
output at the path `tmp` and raises `NeuroprojError` *before writing* for what its format cannot express), the
features of a model an exporter must be able to express, and the torch dtypes of the type names."""
from __future__ import annotations

import torch

from ..errors import NeuroprojError
from ..model import adapter_for
from ..registry import Registry

HF_TYPES = ("f32", "f16", "bf16")
EXPORTERS = Registry("export format", "write(lm: LoadedModel, tmp: Path, *, type: str) -> None")


TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


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
