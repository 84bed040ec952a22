"""Skip modules: neuron-level skip connections applied to a model (see analysis/skips.py).

A `SkipModule` feeds the output columns of skipped neurons of layer m from a linear predictor of stored
activations of earlier layers; it is a real module (its buffers and parameters are saved with the
checkpoint and restored by `load_pruned`), attached with forward hooks.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import NeuroprojError
from .adapters import adapter_for

SKIPS_ATTR = "neuroproj_skips"

# ------------------------------------------------------------------------------------------- modules
class SkipModule(nn.Module):
    """The skip connections into one target layer m (see the module docstring)."""

    def __init__(self, target: int, sources: list, count: int, k: int, hidden: int, dtype=torch.float32):
        super().__init__()
        self.target, self.count, self.k, self.hidden = int(target), int(count), int(k), int(hidden)
        # sources: [[layer, n_stored, layer_width], ...] in increasing layer order
        self.sources = [[int(l), int(n), int(w)] for l, n, w in sources]
        for l, n, _ in self.sources:
            self.register_buffer(f"idx_{l}", torch.zeros(n, dtype=torch.long))
        self.register_buffer("pos", torch.zeros(self.count, self.k, dtype=torch.long))
        self.coef = nn.Parameter(torch.zeros(self.count, self.k, dtype=dtype), requires_grad=False)
        self.intercept = nn.Parameter(torch.zeros(self.count, dtype=dtype), requires_grad=False)
        self.weight = nn.Parameter(torch.zeros(self.hidden, self.count, dtype=dtype), requires_grad=False)
        self._cache: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def spec(self) -> dict:
        return {"target": self.target, "sources": [list(s) for s in self.sources], "count": self.count,
                "k": self.k, "hidden": self.hidden}

    def macs_per_token(self) -> int:
        """Output columns (d·s) plus the predictors (s·k)."""
        return self.hidden * self.count + self.count * self.k

    def stored_per_token(self) -> int:
        """Source activations held from layer l to layer m, per token (values)."""
        return sum(n for _, n, _ in self.sources)

    # -- hooks
    def _store(self, layer: int, width: int, mod, args):
        h = args[0]
        if h.shape[-1] != width:
            raise NeuroprojError(
                f"layer {layer} has {h.shape[-1]} neurons but the skip connections into layer {self.target} were "
                f"attached at width {width}: it was sliced outside apply_plan (e.g. sequential pruning after "
                f"skipping); prune before applying skips, or prune with --calibration oneshot")
        self._cache[layer] = h.index_select(-1, getattr(self, f"idx_{layer}"))

    def _add(self, mod, args, out):
        try:
            z = torch.cat([self._cache.pop(l) for l, _, _ in self.sources], dim=-1)
        except KeyError:
            raise NeuroprojError(f"skip connections into layer {self.target}: a source layer did not run "
                                 f"before it") from None
        pred = (z[..., self.pos] * self.coef).sum(-1) + self.intercept       # (..., s)
        if isinstance(out, tuple):
            return (out[0] + (pred @ self.weight.T).to(out[0].dtype),) + tuple(out[1:])
        return out + (pred @ self.weight.T).to(out.dtype)

    def attach(self, model) -> None:
        a = adapter_for(model)
        self.detach()
        for l, _, w in self.sources:
            self._handles.append(a.out_proj(model, l).register_forward_pre_hook(
                functools.partial(self._store, l, w)))
        self._handles.append(a.mlp(model, self.target).register_forward_hook(self._add))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()

    def extra_repr(self) -> str:
        return (f"target={self.target}, sources={[l for l, _, _ in self.sources]}, skipped={self.count}, "
                f"k={self.k}, stored={self.stored_per_token()}")


def get_skips(model) -> nn.ModuleDict | None:
    return getattr(model, SKIPS_ATTR, None)


def skips_spec(model) -> dict | None:
    mods = get_skips(model)
    if not mods:
        return None
    return {"modules": [mods[k].spec() for k in sorted(mods, key=int)]}


def attach_skips(model, spec: dict):
    """Create the skip modules described by `spec` (values zero: the state dict fills them) and register
    their hooks. Used by `load_pruned` before the strict state-dict load."""
    if not spec or not spec.get("modules"):
        return model
    a = adapter_for(model)
    L = a.num_layers(model)
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    detach_skips(model)
    mods = nn.ModuleDict()
    for s in spec["modules"]:
        t = int(s["target"])
        if not 0 <= t < L or any(not 0 <= int(l) < t for l, _, _ in s["sources"]):
            raise NeuroprojError(f"skip spec {s} does not fit a model of {L} layers")
        mods[str(t)] = SkipModule(t, s["sources"], s["count"], s["k"], s.get("hidden", a.hidden_size(model)),
                                  dtype=dtype).to(dev)
    setattr(model, SKIPS_ATTR, mods)
    for m in mods.values():
        m.attach(model)
    return model


def detach_skips(model) -> None:
    """Remove the hooks and the modules (the skipped neurons stay removed)."""
    mods = get_skips(model)
    if mods is not None:
        for m in mods.values():
            m.detach()
        delattr(model, SKIPS_ATTR)


def skip_macs_per_token(model) -> int:
    mods = get_skips(model)
    return sum(m.macs_per_token() for m in mods.values()) if mods else 0


def total_mlp_macs_per_token(model) -> int:
    """MLP MACs per token including the skip modules (what `Adapter.mlp_macs_per_token` does not see)."""
    return adapter_for(model).mlp_macs_per_token(model) + skip_macs_per_token(model)


def skip_source_remapper(model, keeps: dict):
    """For pruning after skipping: check that no kept-set in `keeps` (layer → kept old indices) drops a
    neuron that a skip reads, and return a function that remaps the index buffers (call it after the
    layers are sliced), or None when the model has no skips."""
    mods = get_skips(model)
    if not mods:
        return None
    new_index = {}
    for l, keep in keeps.items():
        keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        for mod in mods.values():
            for sl, _, w in mod.sources:
                if sl != int(l):
                    continue
                mp = torch.full((w,), -1, dtype=torch.long)
                mp[keep] = torch.arange(keep.numel())
                idx = getattr(mod, f"idx_{sl}").cpu()
                new = mp[idx]
                if (new < 0).any():
                    lost = idx[new < 0].tolist()[:5]
                    raise NeuroprojError(
                        f"the plan removes neuron(s) {lost} of layer {sl} that the skip connections into layer "
                        f"{mod.target} read: keep them, or prune before applying skips")
                new_index[(mod.target, sl)] = (new, keep.numel())

    def remap():
        for (t, sl), (new, width) in new_index.items():
            mod = mods[str(t)]
            buf = getattr(mod, f"idx_{sl}")
            buf.copy_(new.to(buf.device))
            for s in mod.sources:
                if s[0] == sl:
                    s[2] = int(width)
            mod.attach(model)
        # (the config's skips section is rewritten by checkpoint.update_config after the slicing)

    return remap
