"""The model: architecture adapters (every family fact), loading, checkpoints and the skip modules a checkpoint
may hold. The bottom of the package: it imports no stage."""
from .adapters import ADAPTERS, Adapter, adapter_for, context_length, mlp_macs, num_params, supported_model_types
from .checkpoint import SECTION, load_pruned, save_pruned, save_streamed, update_config
from .loading import (LoadedModel, cache_dir, load_model, model_config, model_fingerprint, model_source,
                      resolve_device, resolve_dtype)
from .skip_modules import get_skips

__all__ = ["ADAPTERS", "Adapter", "LoadedModel", "SECTION", "adapter_for", "cache_dir", "context_length", "get_skips",
           "load_model", "load_pruned", "mlp_macs", "model_config", "model_fingerprint", "model_source", "num_params",
           "resolve_device", "resolve_dtype", "save_pruned", "save_streamed", "supported_model_types",
           "update_config"]
