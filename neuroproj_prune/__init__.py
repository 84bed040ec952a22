"""neuroproj-prune: remove redundant MLP neurons of causal LMs, found through activation correlations.

    import neuroproj_prune as npp
    stats = npp.collect("smollm2-135m", "c4.jsonl", samples=128, seqlen=512, out="run/stats.safetensors")
"""
from .errors import NeuroprojError
from .models import adapter_for, load_model, supported_model_types
from .stats import Stats, collect, load_stats

__all__ = ["NeuroprojError", "Stats", "adapter_for", "collect", "load_model", "load_stats",
           "supported_model_types"]
__version__ = "0.1.0"
