"""`--to hf`: the checkpoint as `prune` writes it (a standard one for uniform widths, `load_pruned` otherwise)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import NeuroprojError
from ..model import LoadedModel, loader, save_cast
from .common import EXPORTERS, HF_TYPES, TORCH_DTYPES, write_card


@EXPORTERS.register("hf")
def export_hf(lm: LoadedModel, tmp: Path, *, type: str = "f32") -> None:
    """The checkpoint as `prune` writes it: config, safetensors, tokenizer, model card (+ prune_summary.json,
    plan.json), its weights in `type`."""
    if type not in HF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to hf: choose from {', '.join(HF_TYPES)}")
    tmp.mkdir(parents=True)
    save_cast(lm.model, tmp, TORCH_DTYPES[type])
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(tmp)
    write_card(lm, tmp, "hf", type, loader(lm.model.config))
    src = Path(lm.spec)
    for name in ("prune_summary.json", "plan.json"):
        if src.is_dir() and (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
