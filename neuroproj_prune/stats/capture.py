"""Capturing activations: the one hook mechanism of the package, the sites it reads, and batching.

`hooked(points, fn)` registers forward hooks on modules and hands `fn(key, value)` a module's first input
(`"in"`, a pre-hook), its output (`"out"`; the first element of a tuple) or its whole call (`"call"`: (args,
kwargs), before it runs). Everything that reads
activations goes through it: `ActivationCapture` (statistics, minibatch projection, traces, skips), the
sequential pass of `prune` (a layer's neuron activations) and the allocation's error curves and search.

The forwards that capture run under bfloat16 autocast where `compute_dtype_for` says the hardware is fast at it
(`compute_dtype` "auto": CPUs with AVX512-BF16/AMX, CUDA): the activations are then bfloat16 products.

Sites of a layer: `mlp.neurons` = input of the MLP output projection, `mlp.out` = output of the MLP block,
`attn.out` = output of the attention block, `attn.heads` = input of the attention output projection (the heads'
outputs concatenated: head h owns channels [h·head_dim, (h+1)·head_dim); only in families whose adapter knows the
head layout, see `check_sites`).
"""
from __future__ import annotations

import contextlib
import inspect
import re

import torch

from ..errors import NeuroprojError
from ..model import Adapter, adapter_for
from .moments import compute_autocast


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def compute_dtype_for(name: str, model) -> torch.dtype | None:
    """The autocast dtype of the calibration forwards (None: the model's own). `auto`: bfloat16 for a float32
    model on hardware with fast bfloat16 matmuls (CUDA with bf16, CPUs with AVX512-BF16/AMX), else none."""
    if name not in COMPUTE_DTYPES:
        raise NeuroprojError(f"unknown compute dtype {name!r}: choose from {', '.join(COMPUTE_DTYPES)}")
    p = next(model.parameters())
    if name == "float32" or p.dtype != torch.float32:
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if p.device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if p.device.type == "cpu":
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


def nonfinite_hint(model, compute) -> str:
    """What to do about NaN/inf activations: the weights, the model's dtype or the bfloat16 autocast."""
    if any(not torch.isfinite(p).all() for p in model.parameters() if p.device.type != "meta"):
        return "the model's weights hold NaN/inf: check or re-download the checkpoint"
    if next(model.parameters()).dtype in (torch.float16, torch.bfloat16):
        return "the model overflows in its dtype: load it with --dtype float32"
    if compute is not None:
        return "the bfloat16 calibration matmuls overflow: pass --compute-dtype float32"
    return "the model produces huge activations on this text"


@contextlib.contextmanager
def hooked(points, fn):
    """Inside: `fn(key, value)` is called with the first input (`where="in"`), the output (`"out"`, a tuple's
    first element) or the call's (args, kwargs) (`"call"`) of each module of `points` = [(key, module, where), ...]
    whenever it runs. Hooks are removed on exit; an exception `fn` raises stops the forward pass."""
    handles = []
    try:
        for key, module, where in points:
            if where == "in":
                handles.append(module.register_forward_pre_hook(lambda mod, args, key=key: fn(key, args[0])))
            elif where == "call":
                handles.append(module.register_forward_pre_hook(lambda mod, args, kwargs, key=key: fn(key, (args, kwargs)),
                                                                with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(
                    lambda mod, args, out, key=key: fn(key, out[0] if isinstance(out, tuple) else out)))
        yield
    finally:
        for h in handles:
            h.remove()


SITES = ("mlp.neurons", "mlp.out", "attn.out", "attn.heads")
HEAD_SITE = "attn.heads"


def check_sites(model, sites) -> None:
    """Refuse, in one line, a site the model's family does not have: `attn.heads` needs an adapter that knows
    the heads' layout (`Adapter.heads_refusal` is None). `model`: a model or its config."""
    if HEAD_SITE in sites:
        why = adapter_for(model).heads_refusal(model)
        if why is not None:
            raise NeuroprojError(f"site {HEAD_SITE} is not supported for {getattr(model, 'config', model).model_type} models (the tool "
                                 f"reads attention heads only in the families whose heads it can prune); use the "
                                 f"sites {', '.join(s for s in SITES if s != HEAD_SITE)}")


def site_width(model, i, site) -> int:
    """Channels of `site` in layer i: the MLP width (`mlp.neurons`), heads × head_dim (`attn.heads`), else the
    hidden size."""
    a = adapter_for(model)
    if site == "mlp.neurons":
        return a.width(model, i)
    if site == HEAD_SITE:
        check_sites(model, [site])
        return a.num_heads(model, i) * a.head_dim(model)
    return a.hidden_size(model)


def parse_layers(spec, num_layers: int) -> list[int]:
    """`"0-3,7"` → [0, 1, 2, 3, 7]; None/"all" → every layer. Negative indices count from the end (`-1` is the
    last layer, `"0,-1"` the first and the last, `"-4--1"` the last four)."""
    if spec is None or spec == "all" or spec == "":
        return list(range(num_layers))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    if not isinstance(spec, str):
        try:
            parts = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise NeuroprojError(f"bad layer spec {spec!r}: use e.g. '0-3,7'") from None
        spec = ",".join(str(i) for i in parts)

    def index(v: int) -> int:
        return v + num_layers if v < 0 else v

    out = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise NeuroprojError(f"bad layer spec {spec!r}: use e.g. '0-3,7' (negative indices count from the end)")
        a = index(int(m.group(1)))
        b = index(int(m.group(2))) if m.group(2) is not None else a
        bad = [v for v in (a, b) if not 0 <= v < num_layers]
        if bad:
            raise NeuroprojError(f"layer {part!r} out of range: the model has {num_layers} layers (0-{num_layers - 1}, "
                                 f"or -{num_layers}--1 from the end)")
        if b < a:
            raise NeuroprojError(f"bad layer range {part!r} in {spec!r}: write it low-high, e.g. '{m.group(2)}-{m.group(1)}'")
        out.update(range(a, b + 1))
    return sorted(out)


def parse_sites(spec) -> list[str]:
    sites = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise NeuroprojError(f"unknown site(s) {bad}: choose from {', '.join(SITES)}")
    return sites


class _Stop(Exception):
    """Raised after the last captured layer: the rest of the network is not needed."""


class ActivationCapture:
    """Hooks that hand `fn(layer, site, h)` the activations of every non-padding token, h of shape
    (tokens, width), in the order the layers run. Used by statistics, minibatch projection and traces.

    Sites: `mlp.neurons` = input of the MLP output projection (forward pre-hook), `mlp.out` = output of
    the MLP block, `attn.out` = output of the attention block, `attn.heads` = input of the attention output
    projection (forward pre-hook; refused in one line for families without a known head layout).
    """

    def __init__(self, model, layers, sites, fn, stop_after_last: bool = True, compute: torch.dtype | None = None):
        self.model, self.fn, self.compute = model, fn, compute
        self.adapter: Adapter = adapter_for(model)
        self.layers, self.sites = list(layers), list(sites)
        check_sites(model, self.sites)
        self.stop_after_last = stop_after_last
        self._mask: torch.Tensor | None = None
        sig = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in sig

    def _rows(self, h: torch.Tensor) -> torch.Tensor:
        h = h.reshape(-1, h.shape[-1])  # (B, T, W) or OPT's flattened (B·T, W)
        return h if self._mask is None else h[self._mask]

    def points(self) -> list:
        a, m = self.adapter, self.model
        pts = []
        for i in self.layers:   # (the forward's order decides when each fires, not this list's)
            if "mlp.neurons" in self.sites:
                pts.append(((i, "mlp.neurons"), a.out_proj(m, i), "in"))
            if HEAD_SITE in self.sites:
                pts.append(((i, HEAD_SITE), a.attn_out_proj(m, i), "in"))
            if "attn.out" in self.sites:
                pts.append(((i, "attn.out"), a.attn(m, i), "out"))
            if "mlp.out" in self.sites:
                pts.append(((i, "mlp.out"), a.mlp(m, i), "out"))
        return pts

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(hooked(self.points(), lambda key, h: self.fn(*key, self._rows(h))))
        if self.stop_after_last and self.layers:
            def stop(key, out):
                raise _Stop
            self._stack.enter_context(hooked([(None, self.adapter.layers(self.model)[max(self.layers)], "out")], stop))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Forward one batch. Positions follow the mask (left padding keeps real tokens at 0, 1, …)."""
        dev = next(self.model.parameters()).device
        input_ids = input_ids.to(dev)
        kwargs = {}
        if attention_mask is not None and not bool(attention_mask.all()):
            attention_mask = attention_mask.to(dev)
            self._mask = attention_mask.reshape(-1).bool()
            kwargs["attention_mask"] = attention_mask
            if self._takes_positions:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            self._mask = None
        try:
            with compute_autocast(dev, self.compute):
                return self.model(input_ids=input_ids, use_cache=False, **kwargs)
        except _Stop:
            return None
        finally:
            self._mask = None


def batches(ids: torch.Tensor | list, batch_size: int, pad_id: int, padding_side: str = "right"):
    """Yield (input_ids, attention_mask) batches; a list of unequal sequences is padded on padding_side."""
    if isinstance(ids, torch.Tensor):
        for b in range(0, ids.shape[0], batch_size):
            chunk = ids[b:b + batch_size]
            yield chunk, torch.ones_like(chunk)
        return
    for b in range(0, len(ids), batch_size):
        chunk = [torch.as_tensor(s, dtype=torch.long) for s in ids[b:b + batch_size]]
        T = max(len(s) for s in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, s in enumerate(chunk):
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            x[r, sl], mask[r, sl] = s, 1
        yield x, mask
