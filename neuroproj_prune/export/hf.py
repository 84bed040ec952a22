"""`--to hf`: the checkpoint as `prune` writes it (a standard one for uniform widths, `load_pruned` otherwise)."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from ..errors import NeuroprojError
from ..model import LoadedModel
from .common import EXPORTERS, HF_TYPES, TORCH_DTYPES


@EXPORTERS.register("hf")
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
