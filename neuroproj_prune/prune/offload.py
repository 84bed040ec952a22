"""Layer streaming for the sequential pass (`PruneConfig.offload`): where the decoder layers live while a model
is pruned layer by layer, and the memory formula `auto` chooses by.

- `none` — the whole model on the compute device, as `load_model` puts it.
- `cpu` — the decoder layers stay in host memory; layer i moves to the device for its turn (measure, select,
  fold, carry) and back once it is pruned. Embeddings, final norm and head stay on the device.
- `disk` — the layers are not held at all. The model is built empty (`accelerate.init_empty_weights`), its
  embeddings, final norm and head are read from its safetensors files, and layer i is read when its turn comes
  (`safetensors.safe_open`, that layer's tensors only). Once pruned it is written to a scratch file beside the
  output and dropped (its parameters go to the meta device); `checkpoint.save_pruned` then assembles the
  checkpoint from those files tensor by tensor: the files `save_pretrained` writes, byte for byte.

In every mode the calibration hidden states stay on the device when they fit there, else in host memory (pinned
under CUDA, for fast copies): `LayerStream.buffers`. Streaming changes where tensors live, never what is computed:
the checkpoint is the one `none` writes, bit for bit.

Memory, in bytes (`memory_needs`):

    P  the model's weights                  ℓ  its largest decoder layer       S = P − Σ layers (embeddings, head)
    T  calibration tokens of this process   t  tokens of one batch            d  hidden size
    N  the largest MLP width                b  bytes per weight (the model's dtype)
    c  bytes per activation value (the model's: 2 for bfloat16; float32 under bfloat16 autocast is 2 too)
    H = k·T·d·b   hidden states: the carried stream and the layer's outputs (k = 2), and with target dense or
                  residual the dense stream too (k = 3)
    A = T·N·c     one layer's neuron activations, kept for the closed-form carry (0 when the MLP output is normed
                  before the residual add)
    M = 8·N² (+ 8·d·N with a dense target)   the layer's float64 moments (Gram, target cross-moments)
    B = 4·t·(6N + 8d)                        one batch inside the layer (its activations, the weighted copy)
    F = 8·(4N² + 4d·N)                       the fold's float64 solve, on the host

    device:  none → P + M + B      cpu, disk → S + ℓ + M + B      (+ H + A when the hidden states stay there)
    host:    none → F              cpu → P − S + F                disk → ℓ + F   (+ H + A when they live there)

(disk's host ℓ: the layer's file pages while it is read.)

On a CPU the device is the host: a mode needs the sum. `auto` takes the first of none, cpu (with an accelerator
only), disk whose needs fit in 90 % of the free device memory (CUDA's free memory; on a CPU MemAvailable) and of
the available host memory divided among this machine's processes, with the hidden states on the device when they
fit there, and logs its choice and the numbers. Under several processes T is one process's share.
Cost of streaming: cpu — each layer crosses the host–device link twice (2·P bytes in all); disk — each layer is
read once and written once (P + the pruned size), plus the assembly's copy of the pruned checkpoint within the
filesystem.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import NeuroprojError
from ..io import stored_tensors, write_safetensors
from ..model import LoadedModel, adapter_for, load_model, model_config, model_source, resolve_device, resolve_dtype
from ..model.loading import _prepare_tokenizer, fingerprint_of, load_tokenizer, param_sample
from ..model.weights import checkpoint_names
from ..registry import Registry
from ..stats import available_memory, distributed

OFFLOADS = Registry("offload", "a LayerStream class: `open(spec, dtype, device, placement, out)` loads a model so "
                               "placed; `fetch(i)`/`release(i)` move layer i in and out")
HEADROOM = 0.9   # share of the free memory a placement may plan to use (allocator slack, other tensors)


# ------------------------------------------------------------------------------------------------ the formula
@dataclass
class Geometry:
    """What the memory formula needs to know of a model."""

    model: int            # P: bytes of its weights (parameters and buffers, each tied tensor once)
    layers: list[int]     # bytes of each decoder layer
    hidden: int           # d
    width: int            # N: the largest MLP width
    elem: int             # b: bytes per weight
    additive: bool        # the MLP output is added to the residual as is (closed-form carry)

    @property
    def skeleton(self) -> int:
        return self.model - sum(self.layers)

    @property
    def layer(self) -> int:
        return max(self.layers)

    @classmethod
    def of(cls, model: nn.Module) -> "Geometry":
        """Of a model in memory or built on the meta device (shapes are enough)."""
        a = adapter_for(model)
        L = a.num_layers(model)

        def nbytes(m):
            return sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])

        return cls(nbytes(model), [nbytes(layer) for layer in a.layers(model)], a.hidden_size(model),
                   max(a.width(model, i) for i in range(L)), next(model.parameters()).element_size(),
                   a.mlp_output_is_added(model))


def memory_needs(g: Geometry, tokens: int, batch_tokens: int, dense_target: bool) -> dict[str, int]:
    """The terms of the formula in the module docstring, in bytes."""
    c = g.elem   # the forward's dtype (a float32 model under bf16 autocast needs half of this: a bound)
    N, d = g.width, g.hidden
    return {"P": g.model, "S": g.skeleton, "l": g.layer,
            "H": (3 if dense_target else 2) * tokens * d * g.elem,
            "A": tokens * N * c if g.additive else 0,
            "M": 8 * N * N + (8 * d * N if dense_target else 0),
            "B": 4 * batch_tokens * (6 * N + 8 * d),
            "F": 8 * (4 * N * N + 4 * d * N)}


def placement_needs(mode: str, n: dict[str, int], states_on_device: bool, resident: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) that `mode` needs, by the formula (`n`: `memory_needs`). `resident`: the model is
    on the device already (its weights need no new room there)."""
    device = (0 if resident else n["P"] if mode == "none" else n["S"] + n["l"]) + n["M"] + n["B"]
    host = n["F"] + {"none": 0, "cpu": n["P"] - n["S"], "disk": n["l"]}[mode]
    states = n["H"] + n["A"]
    return (device + states, host) if states_on_device else (device, host + states)


@dataclass
class Placement:
    mode: str                 # none | cpu | disk
    device: torch.device      # where layers compute
    buffers: torch.device     # where the calibration hidden states live
    reason: str = ""
    device_bytes: int = 0     # what the formula says this placement needs on the device (on a CPU: in all)
    host_bytes: int = 0       # and in host memory (0 on a CPU)
    fits: bool = True         # within the free memory, by the formula

    def describe(self) -> dict:
        return {"mode": self.mode, "device": str(self.device), "hidden_states": str(self.buffers),
                "reason": self.reason, "device_bytes": self.device_bytes, "host_bytes": self.host_bytes,
                "fits": self.fits}


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def choose_placement(offload: str, g: Geometry, *, tokens: int, batch_tokens: int, device: torch.device,
                     dense_target: bool = False, streamable: bool = True, disk_ok: bool = True,
                     resident: bool = False, processes: int = 1) -> Placement:
    """`offload` made concrete for a model of geometry `g` on `device` (see the module docstring). `resident`: the
    model is in memory already (its weights need no new room). `processes`: processes sharing this host."""
    n = memory_needs(g, tokens, batch_tokens, dense_target)
    host = torch.device("cpu")
    free_host = available_memory(host) // max(1, processes)
    on_cpu = device.type == "cpu"
    free_dev = free_host if on_cpu else available_memory(device)
    allowed = ["none"] + (["cpu"] if streamable and not on_cpu else []) + (["disk"] if streamable and disk_ok else [])
    modes = [offload] if offload != "auto" else allowed

    def fits(mode, on_dev):
        # on a CPU, cpu streaming moves nothing: it needs what none needs
        dev, hst = placement_needs("none" if on_cpu and mode == "cpu" else mode, n, on_dev, resident)
        if on_cpu:
            return dev + hst <= HEADROOM * free_host, dev + hst, 0
        return dev <= HEADROOM * free_dev and hst <= HEADROOM * free_host, dev, hst

    sizes = (f"model {_gib(g.model)}, largest layer {_gib(g.layer)}, hidden states {_gib(n['H'])}, "
             f"activations {_gib(n['A'])}")

    def where(dev_need, host_need):
        if on_cpu:
            return f"needs {_gib(dev_need)} of {_gib(free_host)} available"
        return (f"needs {_gib(dev_need)} of {_gib(free_dev)} free on {device} and {_gib(host_need)} of "
                f"{_gib(free_host)} host memory")

    tried = []
    for mode in modes:
        for on_dev in (True,) if on_cpu else (True, False):
            ok, dev_need, host_need = fits(mode, on_dev)
            states = device if on_dev else host
            if ok:
                rejected = f" (not {'; not '.join(tried)})" if tried else ""
                return Placement(mode, device, states, f"{mode}, hidden states on {states}: "
                                 f"{where(dev_need, host_need)}{rejected}; {sizes}", dev_need, host_need)
            tried.append(f"{mode} with hidden states on {states}: {where(dev_need, host_need)}")
    mode = modes[-1]  # nothing fits by the formula: the most frugal mode allowed, said loudly
    _, dev_need, host_need = fits(mode, on_cpu)
    return Placement(mode, device, device if on_cpu else host,
                     f"{mode}, which may run out of memory: nothing fits by the memory formula "
                     f"({'; '.join(tried)}); {sizes}", dev_need, host_need, fits=False)


# -------------------------------------------------------------------------------------------------- streams
def _normal(device: torch.device) -> torch.device:
    """`cuda` → `cuda:<current>`: devices compare equal to the ones tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@OFFLOADS.register("none")
class LayerStream:
    """The decoder layers of a model as the sequential pass uses them: `fetch(i)` returns layer i on the compute
    device, `release(i)` puts it away once it is pruned; `stash` keeps a hidden state where the hidden states live
    and `bring` returns it to the device. This base class is `none`: everything stays where it is."""

    mode = "none"

    def __init__(self, model: nn.Module, placement: Placement | None = None):
        self.model, self.adapter = model, adapter_for(model)
        self.layers = self.adapter.layers(model)
        if placement is None:
            dev = next(model.parameters()).device
            placement = Placement(self.mode, dev, dev)
        self.placement = placement
        self.device, self.buffers = _normal(placement.device), _normal(placement.buffers)
        self.stored = None          # disk: {state-dict name: StoredTensor} of the layers written out
        self.declare_bias = False   # disk: the MLP biases update_config will declare, declared before writing

    @classmethod
    def open(cls, spec, dtype, device, placement, out) -> tuple[LoadedModel, "LayerStream"]:
        """`spec` loaded as this mode places it (none: all on the device)."""
        lm = load_model(spec, dtype=dtype, device=device)
        return lm, cls(lm.model, placement)

    def fetch(self, i: int) -> nn.Module:
        return self.layers[i]

    def release(self, i: int) -> None:
        pass

    def stash(self, x: torch.Tensor) -> torch.Tensor:
        if x.device == self.buffers:
            return x
        if self.buffers.type == "cpu" and x.device.type == "cuda":
            try:   # pinned: the copies back to the device can overlap compute
                return torch.empty(x.shape, dtype=x.dtype, pin_memory=True).copy_(x)
            except RuntimeError:   # the pinned pool is exhausted: pageable memory works, only slower
                return x.cpu()
        return x.to(self.buffers)

    def bring(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.device == self.device else x.to(self.device, non_blocking=True)

    def fingerprint(self) -> str | None:
        """The dense model's fingerprint when the stream had to compute it (disk), else None."""
        return None

    def describe(self) -> dict:
        return self.placement.describe()

    def close(self) -> None:
        pass


def _move_except(module: nn.Module, layers: nn.Module, device) -> None:
    """Move every parameter and buffer of `module` except those under `layers` (one of its descendants)."""
    for child in module.children():
        if child is layers:
            continue
        if any(m is layers for m in child.modules()):
            _move_except(child, layers, device)
        else:
            child.to(device)
    module._apply(lambda t: t.to(device), recurse=False)   # its own tensors (most models have none)


@OFFLOADS.register("cpu")
class CpuStream(LayerStream):
    """`cpu`: the layers in host memory, one at a time on the device."""

    mode = "cpu"

    @classmethod
    def open(cls, spec, dtype, device, placement, out):
        lm = load_model(spec, dtype=dtype, device="cpu")
        return lm, cls(lm.model, placement)

    def __init__(self, model, placement):
        super().__init__(model, placement)
        self.layers.to("cpu")
        _move_except(model, self.layers, self.device)

    def fetch(self, i):
        return self.layers[i].to(self.device)

    def release(self, i):
        self.layers[i].to("cpu")


@OFFLOADS.register("disk")
class DiskStream(LayerStream):
    """`disk`: layers read from the model's safetensors files when their turn comes, written to `scratch` (None: by
    another process) and dropped once pruned. Build it with `open_disk`."""

    mode = "disk"

    @classmethod
    def open(cls, spec, dtype, device, placement, out):
        source, _, _ = model_source(spec)
        return open_disk(spec, source, dtype, placement, out if distributed()[1] == 0 else None)

    def __init__(self, model, placement, names: dict[str, str], files: dict[str, Path], scratch: Path | None):
        super().__init__(model, placement)
        self.names, self.files, self.scratch = names, files, scratch
        self.stored = {} if scratch is not None else None
        module_names = {id(m): n for n, m in model.named_modules()}
        self.prefixes = [module_names[id(layer)] + "." for layer in self.layers]
        self.order: list[str] = []                  # parameter names of the dense model, for its fingerprint
        self.samples: dict[str, tuple] = {}

    def _read(self, module: nn.Module, prefix: str, required: bool) -> None:
        """Fill `module`'s parameters and persistent buffers from the files (each tensor copied to the device in
        the dtype the module was built with); a parameter the files lack is an error when `required`."""
        by_file: dict[Path, list] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            key = self.names.get(prefix + name)
            if key is None:
                if required and isinstance(t, nn.Parameter):
                    raise NeuroprojError(f"{prefix + name} is not in the model's safetensors files: offload 'disk' "
                                         f"reads tensors by name; use --offload cpu")
                continue
            by_file.setdefault(self.files[key], []).append((name, key, t))
        for path, items in by_file.items():
            with _weights(path) as f:
                for name, key, old in items:
                    value = f.get_tensor(key)
                    if tuple(value.shape) != tuple(old.shape):
                        raise NeuroprojError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects "
                                             f"{tuple(old.shape)}: the checkpoint does not match its config")
                    # a copy: the file's pages are mapped read-only and released with the handle
                    value = value.to(self.device, old.dtype if value.is_floating_point() else value.dtype, copy=True)
                    _put(module, name, value, isinstance(old, nn.Parameter))

    def load_rest(self) -> None:
        """Everything but the decoder layers: embeddings, norms, head (tied weights tied again)."""
        inside = {id(t) for t in [*self.layers.parameters(), *self.layers.buffers()]}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in inside:
                continue
            key = self.names.get(name)
            if key is not None:
                value = _load_one(self.files[key], key, t, self.device)
                _put(self.model, name, value, isinstance(t, nn.Parameter))
        self.model.tie_weights()
        missing = [n for n, p in self.model.named_parameters() if p.device.type == "meta" and id(p) not in inside]
        if missing:
            raise NeuroprojError(f"{missing[0]} is not in the model's safetensors files: offload 'disk' reads "
                                 f"tensors by name; use --offload cpu")
        _move_except(self.model, self.layers, self.device)   # buffers made at construction (rotary tables)
        self.order = [n for n, _ in self.model.named_parameters()]   # tied: once, as the loaded model has them
        for n, p in self.model.named_parameters():
            if id(p) not in inside:
                self.samples[n] = (tuple(p.shape), param_sample(p))

    def fetch(self, i):
        layer = self.layers[i]
        self._read(layer, self.prefixes[i], required=True)
        layer.to(self.device)   # buffers that are not stored (made at construction)
        for n, p in layer.named_parameters():
            self.samples[self.prefixes[i] + n] = (tuple(p.shape), param_sample(p))
        return layer

    def release(self, i):
        layer = self.layers[i]
        if self.declare_bias:
            self.adapter.declare_out_bias(self.model, [i])
        if self.scratch is not None:
            path = self.scratch / f"layer-{i:05d}.safetensors"
            write_safetensors(path, {self.prefixes[i] + n: t for n, t in layer.state_dict().items()})
            self.stored.update(stored_tensors(path))
        layer.to("meta")

    def fingerprint(self):
        if any(n not in self.samples for n in self.order):
            return None   # not every layer has been read
        return fingerprint_of(self.model.config.model_type, ((n, *self.samples[n]) for n in self.order))

    def close(self):
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


@contextlib.contextmanager
def _weights(path: Path):
    """`safe_open` of a weights file, its failures (a truncated or corrupt file) one NeuroprojError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            yield f
    except (OSError, SafetensorError) as e:
        raise NeuroprojError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:160]}): the "
                             f"checkpoint is damaged; download or write it again") from None


def _load_one(path: Path, key: str, like: torch.Tensor, device) -> torch.Tensor:
    with _weights(path) as f:
        value = f.get_tensor(key)
    if tuple(value.shape) != tuple(like.shape):
        raise NeuroprojError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(like.shape)}: "
                             f"the checkpoint does not match its config")
    return value.to(device, like.dtype if value.is_floating_point() else value.dtype, copy=True)


def _put(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(owner), leaf, nn.Parameter(value, requires_grad=False) if parameter else value)


def disk_refusal(spec, source, kwargs: dict, pruned: bool, out) -> str | None:
    """Why `spec` cannot be streamed from disk (None: it can)."""
    if out is None:
        return "writes each pruned layer to the output as it goes: give an output directory (--out, out=)"
    if kwargs.get("gguf_file"):
        return f"reads safetensors weights, and {spec} is a GGUF file: use --offload cpu"
    if not isinstance(source, Path):
        return f"reads a local model directory, and {spec!r} is a hub id: download it first, or use --offload cpu"
    if pruned:
        return (f"cannot rebuild {spec} (per-layer widths, added biases or skips) from its files layer by layer: "
                f"use --offload cpu")
    if not any(source.glob("*.safetensors")):
        return f"reads safetensors weights, and {source} holds none: use --offload cpu"
    try:   # the save steps save_streamed repeats (checked now, not after the pass)
        from transformers.core_model_loading import revert_weight_conversion  # noqa: F401
        from transformers.modeling_utils import remove_tied_weights_from_state_dict  # noqa: F401
    except ImportError:
        return "writes the checkpoint with transformers >= 5's save steps: upgrade transformers or use --offload cpu"
    return None


def open_disk(spec, source: Path, dtype: torch.dtype, placement: Placement, out) -> tuple[LoadedModel, DiskStream]:
    """The model of `source` built empty, its embeddings/norms/head read onto the device, its layers left on
    disk (see the module docstring); layers are written to a scratch directory beside `out` (None: another
    process writes). Memory: the non-layer weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model_config(spec, source, {})
    with init_empty_weights():   # parameters on the meta device; buffers (rotary tables) made for real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.eval()
    model.requires_grad_(False)
    files = {}
    for path in sorted(source.glob("*.safetensors")):
        for key in stored_tensors(path):
            files[key] = path
    names = checkpoint_names(model, files, str(spec))
    scratch = None
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        # named like atomic_dir's temporary directories, so that one a killed run left is removed by the next run
        scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-layers-"))
    stream = DiskStream(model, placement, names, files, scratch)
    try:
        stream.load_rest()
        tok = load_tokenizer(source, {}, spec)
    except BaseException:
        stream.close()
        raise
    return LoadedModel(model, _prepare_tokenizer(tok), str(spec), None), stream


# ---------------------------------------------------------------------------------------------- the entry
def calibration_tokens(cfg, data, world: int) -> tuple[int, int]:
    """(tokens this process calibrates on, tokens per batch), as the sequential pass will batch them."""
    if isinstance(data, torch.Tensor) and data.ndim == 2:
        samples, seqlen = data.shape
    else:
        samples, seqlen = cfg.samples, cfg.seqlen
    bs = min(cfg.batch_size or max(1, 4096 // seqlen), samples)
    batches = math.ceil(samples / bs)
    return min(samples, math.ceil(batches / world) * bs) * seqlen, bs * seqlen


def open_model(model, cfg, *, data=None, out=None, dtype="auto", device="auto", log: bool = True,
               warn: bool = True) -> tuple[LoadedModel, LayerStream]:
    """The model of a prune, placed as `cfg.offload` says, and its `LayerStream`. `model`: a LoadedModel (left
    where it is; with offload cpu its layers move to host memory; disk is refused) or anything `load_model` takes.
    `auto` decides by the memory formula (module docstring) and says why on stderr when `log`; a placement that
    does not fit by the formula is said when `warn`. Either way `LayerStream.describe()` records it."""
    _, _, world = distributed()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    tokens, batch_tokens = calibration_tokens(cfg, data, world)
    # what offload cpu/disk refuses (config.py) auto does not choose: whole-model passes need every layer held
    streamable = (cfg.calibration == "sequential" and cfg.allocation == "uniform" and cfg.output_weighting == "none"
                  and not (cfg.budgeted or cfg.drop_layers or cfg.drop_attn))
    kw = dict(tokens=tokens, batch_tokens=batch_tokens, dense_target=cfg.dense_stream,
              streamable=streamable, processes=processes)
    if isinstance(model, LoadedModel):
        if cfg.offload == "disk":
            raise NeuroprojError("offload 'disk' reads the layers from the model's safetensors files: pass the model "
                                 "directory, not a loaded model (or use offload cpu)")
        dev = next(model.model.parameters()).device
        p = choose_placement("none" if cfg.offload == "auto" else cfg.offload, Geometry.of(model.model),
                             device=dev, disk_ok=False, resident=True, **kw)
        lm, stream = model, OFFLOADS[p.mode](model.model, p)
    else:
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        source, kwargs, pruned = model_source(model)
        refusal = disk_refusal(model, source, kwargs, pruned, out)
        if cfg.offload == "disk" and refusal:
            raise NeuroprojError(f"offload 'disk' {refusal}")
        config = model_config(model, source, kwargs)
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):   # shapes only: nothing allocated
            shape_model = AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=False)
        p = choose_placement(cfg.offload, Geometry.of(shape_model), device=dev, disk_ok=refusal is None, **kw)
        del shape_model
        lm, stream = OFFLOADS[p.mode].open(model, dt, dev, p, out)
    # an auto choice is logged (a loaded model's only when its hidden states leave the device); a misfit always
    chose = cfg.offload == "auto" and (not isinstance(model, LoadedModel) or p.buffers != p.device)
    if (log and chose) or (warn and not p.fits):
        print(f"neuroproj-prune: offload {p.reason}", file=sys.stderr)
    return lm, stream
