"""The plan file: which neurons each layer keeps and into which kept neuron each removed one folds.

`plan.json` (format `neuroproj-prune/plan/1`): `{"format", "meta": {settings, fingerprint, ...}, "layers":
{"<i>": {"width": N, "keep": [sorted kept indices], "representative": {"<removed j>": kept r}}}}`. A plan that
also prunes attention heads or whole layers is `neuroproj-prune/plan/2`, with `"heads": {"<i>": {"heads": H,
"kv_heads": KV, "keep": [kept query heads], "keep_kv": [kept key/value heads]}}`, `"drop_layers": [i, ...]` and
`"drop_attn": [i, ...]` (the layers whose attention sub-layer goes; their MLP stays; layer indices are the dense
model's). `prune`
writes it beside every checkpoint; `prune --plan` applies a written (or edited) one as it is, and
`Plan.from_clusters` makes one from a `cluster` file. Readers import this module; `Plan.load` checks the schema.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NeuroprojError
from ..io import write_text
from ..model import adapter_for


FORMAT = "neuroproj-prune/plan/1"
FORMAT_BLOCKS = "neuroproj-prune/plan/2"     # with heads or dropped layers


@dataclass
class Plan:
    """Per layer: kept neurons (sorted), removed neurons and each one's representative; JSON on disk."""

    layers: dict[int, dict] = field(default_factory=dict)  # i -> {"keep": [...], "representative": {j: r}, "width": N}
    meta: dict = field(default_factory=dict)
    heads: dict[int, dict] = field(default_factory=dict)   # i -> {"heads", "kv_heads", "keep", "keep_kv"}
    drop: list[int] = field(default_factory=list)          # whole decoder layers removed (dense indices)
    no_attn: list[int] = field(default_factory=list)       # attention sub-layers removed, the MLP kept

    @property
    def blocks(self) -> bool:
        """Whether the plan removes more than MLP neurons (format 2; applied by the sequential pass)."""
        return bool(self.heads or self.drop or self.no_attn)

    def table(self, site: str) -> dict:
        """The per-layer entries of a site: `mlp` (neurons) or `attn` (heads)."""
        return self.layers if site == "mlp" else self.heads

    def keep(self, i) -> torch.Tensor:
        return torch.tensor(self.layers[i]["keep"], dtype=torch.long)

    def to_json(self) -> str:
        doc = {"format": FORMAT_BLOCKS if self.blocks else FORMAT, "meta": self.meta,
               "layers": {str(i): {"width": d["width"], "keep": d["keep"],
                                   "representative": {str(k): v for k, v in d["representative"].items()}}
                          for i, d in sorted(self.layers.items())}}
        if self.blocks:
            doc["heads"] = {str(i): {k: d[k] for k in ("heads", "kv_heads", "keep", "keep_kv")}
                            for i, d in sorted(self.heads.items())}
            doc["drop_layers"] = sorted(self.drop)
            doc["drop_attn"] = sorted(self.no_attn)
        return json.dumps(doc, indent=1)

    def save(self, path) -> Path:
        """Write atomically (temporary file, then rename)."""
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path) -> "Plan":
        """Read a plan file; every layer index, width, kept index and representative must be a whole number
        (an edited plan with `1.5` or `"3"` is refused, not truncated)."""
        try:
            doc = json.loads(Path(path).read_text())
            assert isinstance(doc, dict) and doc.get("format") in (FORMAT, FORMAT_BLOCKS)
            assert isinstance(doc["layers"], dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError, KeyError, TypeError):
            raise NeuroprojError(f"{path} is not a readable neuroproj-prune plan file") from None
        layers = {}
        for i, d in doc["layers"].items():
            where = f"{path}: layer {i!r}"
            if not (isinstance(i, str) and i.isdigit()) or not isinstance(d, dict):
                raise NeuroprojError(f"{where}: layers must be keyed by layer numbers and hold objects")
            keep, rep = d.get("keep"), d.get("representative", {})
            if not isinstance(keep, list) or not all(_whole(j) for j in keep) or not _whole(d.get("width")):
                raise NeuroprojError(f"{where}: 'width' and every 'keep' entry must be whole numbers")
            if not isinstance(rep, dict) or not all(str(k).isdigit() and _whole(v) for k, v in rep.items()):
                raise NeuroprojError(f"{where}: 'representative' must map removed to kept neuron numbers")
            layers[int(i)] = {"width": d["width"], "keep": list(keep),
                              "representative": {int(k): v for k, v in rep.items()}}
        heads = {}
        for i, d in (doc.get("heads") or {}).items():
            ok = (isinstance(i, str) and i.isdigit() and isinstance(d, dict)
                  and all(_whole(d.get(k)) for k in ("heads", "kv_heads"))
                  and all(isinstance(d.get(k), list) and all(_whole(j) for j in d[k]) for k in ("keep", "keep_kv")))
            if not ok:
                raise NeuroprojError(f"{path}: heads of layer {i!r}: 'heads', 'kv_heads' and every 'keep'/'keep_kv' "
                                     f"entry must be whole numbers")
            heads[int(i)] = {k: d[k] for k in ("heads", "kv_heads", "keep", "keep_kv")}
        drop, no_attn = doc.get("drop_layers") or [], doc.get("drop_attn") or []
        for key, v in (("drop_layers", drop), ("drop_attn", no_attn)):
            if not isinstance(v, list) or not all(_whole(i) for i in v):
                raise NeuroprojError(f"{path}: '{key}' must be a list of layer numbers")
        return cls(layers, doc.get("meta", {}) if isinstance(doc.get("meta"), dict) else {}, heads, sorted(drop),
                   sorted(no_attn))

    @classmethod
    def from_clusters(cls, clusters, model) -> "Plan":
        """The plan a clustering describes, as written: each layer keeps its poles' representatives and its
        unclustered neurons; every other member folds into its pole's representative. Layers the clustering
        does not cover keep all their neurons."""
        a = adapter_for(model)
        meta = getattr(clusters, "meta", {}) or {}
        site = meta.get("site") or "mlp.neurons"
        if site != "mlp.neurons":
            raise NeuroprojError(f"the clustering groups {site} channels; prune keeps and folds MLP neurons: cluster "
                                 f"projections of the site mlp.neurons")
        # the fingerprint of the model the clustering was made on: `check` compares it with the pruned model's
        p = cls(meta={"select": "clusters", "clusters": getattr(clusters, "path", None),
                      "fingerprint": meta.get("fingerprint")})
        for i in clusters.layers:
            lc = clusters[i]
            N = a.width(model, i) if 0 <= i < a.num_layers(model) else lc.n_neurons
            if lc.n_neurons != N:
                raise NeuroprojError(f"the clustering of layer {i} has {lc.n_neurons} neurons, the model {N}: "
                                     f"it is for another model")
            keep = [int(j) for j in lc.keep()]
            kept, rep_of = set(keep), lc.representative_of()
            p.layers[i] = {"width": N, "keep": keep,
                           "representative": {j: int(rep_of[j]) for j in range(N) if j not in kept}}
        return p

    def check(self, model, fingerprint: str | None = None) -> None:
        """Refuse a plan that does not fit the model (layer count, widths, indices) or, given the model's
        `fingerprint`, one made for other weights."""
        a = adapter_for(model)
        L = a.num_layers(model)
        fp = self.meta.get("fingerprint")
        for i, d in self.layers.items():
            if not 0 <= i < L:
                raise NeuroprojError(f"the plan prunes layer {i} but the model has {L} layers: it is for another model")
            N = a.width(model, i)
            if d["width"] != N:
                raise NeuroprojError(f"the plan expects layer {i} to have {d['width']} neurons, the model has {N}: "
                                     f"it is for another model")
            k = d["keep"]
            if not k:
                raise NeuroprojError(f"the plan prunes layer {i} to zero width")
            if min(k) < 0 or max(k) >= N or len(set(k)) != len(k):
                raise NeuroprojError(f"the plan's kept indices for layer {i} are invalid (each in [0, {N}), "
                                     f"no repeats)")
            kept = set(k)
            bad = [(j, r) for j, r in d["representative"].items() if not (0 <= j < N and j not in kept and r in kept)]
            if bad:
                raise NeuroprojError(f"the plan's representatives for layer {i} are invalid ({bad[0][0]} -> "
                                     f"{bad[0][1]}): each removed neuron must fold into a kept one")
        for i, d in self.heads.items():
            self._check_heads(a, model, L, i, d)
        if any(not 0 <= i < L for i in self.drop) or len(set(self.drop)) >= L or len(set(self.drop)) != len(self.drop):
            raise NeuroprojError(f"the plan drops layers {self.drop}; the model has {L} layers (each in [0, {L}), "
                                 f"no repeats, at least one kept)")
        both = sorted((set(self.layers) | set(self.heads) | set(self.no_attn)) & set(self.drop))
        if both:
            raise NeuroprojError(f"the plan both prunes and removes layer {both[0]}: give its neurons, heads or "
                                 f"attention or list it in drop_layers, not both")
        if any(not 0 <= i < L for i in self.no_attn) or len(set(self.no_attn)) != len(self.no_attn):
            raise NeuroprojError(f"the plan removes the attention of layers {self.no_attn}; the model has {L} layers "
                                 f"(each in [0, {L}), no repeats)")
        if self.no_attn and a.attn_refusal(model) is not None:
            raise NeuroprojError(a.attn_refusal(model))
        both = sorted(set(self.heads) & set(self.no_attn))
        if both:
            raise NeuroprojError(f"the plan both prunes the heads of layer {both[0]} and removes its attention: give "
                                 f"one of them")
        if fp and fingerprint and fingerprint != fp:
            made = "clustering" if self.meta.get("select") == "clusters" else "plan"
            raise NeuroprojError(f"the {made} was made for another model (its fingerprint differs from this model's): "
                                 f"make the {made} on this model")


    @staticmethod
    def _check_heads(a, model, L, i, d) -> None:
        if not 0 <= i < L:
            raise NeuroprojError(f"the plan prunes the heads of layer {i} but the model has {L} layers")
        refusal = a.heads_refusal(model)
        if refusal:
            raise NeuroprojError(refusal)
        H, KV = a.num_heads(model, i), a.num_kv_heads(model, i)
        if (d["heads"], d["kv_heads"]) != (H, KV):
            raise NeuroprojError(f"the plan expects layer {i} to have {d['heads']} heads in {d['kv_heads']} groups, "
                                 f"the model has {H} in {KV}: it is for another model")
        g, keep, kv = H // KV, d["keep"], d["keep_kv"]
        per = [sum(1 for h in keep if h // g == k) for k in kv]
        if (not keep or len(set(keep)) != len(keep) or not all(0 <= h < H for h in keep) or len(set(kv)) != len(kv)
                or not all(0 <= k < KV for k in kv) or any(h // g not in kv for h in keep) or len(set(per)) != 1):
            raise NeuroprojError(f"the plan's heads for layer {i} are invalid: each kept query head's key/value head "
                                 f"kept, the same number of query heads kept in every kept group")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
