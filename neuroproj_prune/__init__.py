"""neuroproj-prune: remove redundant MLP neurons of causal LMs, found through activation correlations.

    import neuroproj_prune as npp
    stats = npp.collect("smollm2-135m", "c4.jsonl", samples=128, seqlen=512, out="run/stats.safetensors")
"""
from .clustering import agreement, cluster, cluster_points, load_clusters
from .errors import NeuroprojError
from .evaluate import evaluate, perplexity
from .models import adapter_for, load_model, supported_model_types
from .projection import Projections, fit_exact, load_projections, project
from .plan import Plan
from .prune import plan, prune
from .stats import Stats, collect, load_stats
from .surgery import apply_plan, load_pruned, save_pruned
from .sweep import sweep

__all__ = ["NeuroprojError", "Plan", "Projections", "Stats", "adapter_for", "agreement", "apply_plan", "cluster",
           "cluster_points", "collect", "evaluate", "fit_exact", "load_clusters", "load_model", "load_projections",
           "load_pruned", "load_stats", "perplexity", "plan", "project", "prune", "save_pruned", "supported_model_types",
           "sweep"]
__version__ = "0.1.0"
