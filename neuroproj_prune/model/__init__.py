"""The model: architecture adapters (every family fact), loading, checkpoints and the skip modules a checkpoint
may hold. The bottom of the package: it imports no stage."""
from .adapters import (ADAPTERS, Adapter, adapter_for, context_length, linear_macs, mlp_macs, num_params,
                       supported_model_types)
from .card import CARD_FILE, api_call, command, invocation, model_card
from .checkpoint import (SAVE_DTYPES, SECTION, load_pruned, loader, save_cast, save_pruned, save_streamed, update_config,
                         write_card)
from .loading import (LoadedModel, cache_dir, load_model, model_config, model_fingerprint, model_source,
                      resolve_device, resolve_dtype, save_dtype, source_dtype)
from .skip_modules import get_skips

__all__ = ["ADAPTERS", "Adapter", "CARD_FILE", "LoadedModel", "SAVE_DTYPES", "SECTION", "adapter_for", "api_call",
           "cache_dir", "command", "context_length", "get_skips", "invocation", "linear_macs",
           "load_model", "load_pruned", "loader",
           "mlp_macs", "model_card", "model_config", "model_fingerprint", "model_source", "num_params",
           "resolve_device", "resolve_dtype", "save_cast", "save_dtype", "save_pruned", "save_streamed",
           "source_dtype", "supported_model_types", "update_config", "write_card"]
