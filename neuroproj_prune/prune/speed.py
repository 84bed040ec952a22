"""What a removal saves of a decoded token's time: the latency model `--target-speedup` prices removals by.

    t = fixed + attn · n_attn + mlp · n_mlp + per_param · P          (ms per decoded token)

n_attn / n_mlp: the attention and MLP sub-layers the model has, P: the decoder layers' parameters in millions (the
weights read per token; the LM head's, read every token too, sits in `fixed` with sampling and the embedding row).
`attn` and `mlp` are what a sub-layer costs beyond its weights: the runtime's fixed cost per operation (a llama.cpp
decode step launches ~19 operations per layer, most of them in attention: norms, RoPE, the key/value cache, softmax).

Two sources:
- measured (`neuroproj-prune latency`, export/latency.py): the dense model and four cut copies of it (half and a
  quarter of its layers, every MLP at a quarter width, every other attention sub-layer removed) exported to GGUF and
  timed in llama.cpp, the four numbers fitted by least squares; written as `latency.json` (format below), read by
  `prune --latency FILE`;
- the bytes proxy (no file): attn = mlp = 0, per_param = 1 per parameter and fixed = the LM head's parameters, i.e.
  the weights read per token. On a 2-core CPU it misses most of the time (eval/results/latency_q8_0.md: SmolLM2 at
  q8_0, an attention sub-layer cost 0.28–0.33 ms per token, its weights 0.02–0.03 ms of it).

`latency.json`: {"format": "neuroproj-prune/latency/1", "fixed", "attn", "mlp", "per_param" (ms; per_param per
million parameters), "model": {"layers", "hidden_size", "width", "trunk_params"} (what it was measured on; `check`
refuses another shape), "meta": {runtime, type, threads, machine, date, command, probes: [{name, n_attn, n_mlp,
params, ms, min, max, predicted}]}}. Cost: nothing (a few floats).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import NeuroprojError

FORMAT = "neuroproj-prune/latency/1"
COSTS = ("fixed", "attn", "mlp", "per_param")


@dataclass(frozen=True)
class Latency:
    fixed: float
    attn: float
    mlp: float
    per_param: float
    model: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the model
    def ms(self, n_attn: float, n_mlp: float, params: float) -> float:
        """Predicted time per decoded token of a model with these sub-layers and decoder-layer parameters."""
        return self.fixed + self.attn * n_attn + self.mlp * n_mlp + self.per_param * params / 1e6

    def saved(self, layers: int, attns: int, params: float) -> float:
        """Time a removal saves: `layers` whole layers, `attns` more attention sub-layers and `params` parameters in
        all (theirs included)."""
        return (self.attn + self.mlp) * layers + self.attn * attns + self.per_param * params / 1e6

    @property
    def source(self) -> str:
        return "bytes proxy" if self.meta.get("proxy") else "measured"

    @classmethod
    def bytes_proxy(cls, head_params: float) -> "Latency":
        """The weights read per token as the time: one unit per parameter, the LM head's in `fixed`."""
        return cls(fixed=float(head_params), attn=0.0, mlp=0.0, per_param=1e6, meta={"proxy": True})

    # ------------------------------------------------------------------ the file
    def to_json(self) -> dict:
        return {"format": FORMAT, **{k: getattr(self, k) for k in COSTS}, "model": self.model, "meta": self.meta}

    @classmethod
    def load(cls, path) -> "Latency":
        """Read a latency file; every cost a finite number ≥ 0 (per_param > 0), the model's shape whole numbers."""
        try:
            doc = json.loads(Path(path).read_text())
            assert isinstance(doc, dict) and doc.get("format") == FORMAT
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
            raise NeuroprojError(f"{path} is not a readable neuroproj-prune latency file: measure one with "
                                 f"`neuroproj-prune latency MODEL --out FILE`") from None
        costs = {k: doc.get(k) for k in COSTS}
        for k, v in costs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                    or (k == "per_param" and v == 0):
                raise NeuroprojError(f"{path}: {k!r} must be a finite number of milliseconds "
                                     f"({'> 0' if k == 'per_param' else '>= 0'}), got {v!r}: measure the file again")
        model = doc.get("model")
        keys = ("layers", "hidden_size", "width", "trunk_params")
        if not isinstance(model, dict) or not all(isinstance(model.get(k), int) and not isinstance(model.get(k), bool)
                                                  and model[k] > 0 for k in keys):
            raise NeuroprojError(f"{path}: 'model' must give the measured model's {', '.join(keys)} as whole numbers")
        meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
        return cls(**{k: float(v) for k, v in costs.items()}, model={k: model[k] for k in keys}, meta=meta)

    def check(self, shape: dict, path) -> None:
        """Refuse a file measured on a model of another shape (its costs would price other layers)."""
        for k, v in self.model.items():
            if shape.get(k) != v:
                raise NeuroprojError(f"{path} was measured on a model with {k} {v}, this one has {shape.get(k)}: "
                                     f"measure it for this model (`neuroproj-prune latency MODEL`)")


def trunk_params(model, a) -> int:
    """Parameters of the decoder layers (what `target_params` is a fraction of; embeddings and head excluded)."""
    return sum(p.numel() for layer in a.layers(model) for p in layer.parameters())


def model_shape(model, a) -> dict:
    """What a latency file records of the model it was measured on (the dense model, before any removal)."""
    return {"layers": a.num_layers(model), "hidden_size": a.hidden_size(model), "width": a.width(model, 0),
            "trunk_params": trunk_params(model, a)}


def read_latency(path, model, a) -> Latency:
    lat = Latency.load(path)
    lat.check(model_shape(model, a), path)
    return lat
