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
from .prune import ALLOCATIONS, PruneConfig, plan, prune
from .recover import RecoverConfig, recover
from .run import run
from .skips import apply_skips, find_skips
from .stats import Stats, collect, load_stats
from .checkpoint import load_pruned, save_pruned
from .surgery import FOLDS, apply_plan
from .calibrate import CALIBRATIONS
from .plan import SELECTORS
from .sweep import sweep
from .trace import Trace, load_trace, trace
from .view import load_page_data, view

__all__ = ["ALLOCATIONS", "CALIBRATIONS", "FOLDS", "SELECTORS", "PruneConfig", "RecoverConfig", "NeuroprojError", "Plan", "Projections", "Stats", "adapter_for", "agreement", "apply_plan", "cluster",
           "cluster_points", "collect", "evaluate", "apply_skips", "find_skips", "fit_exact", "load_clusters", "load_model", "load_projections",
           "load_pruned", "load_stats", "perplexity", "plan", "project", "prune", "recover", "run", "save_pruned", "supported_model_types",
           "sweep", "Trace", "load_trace", "trace", "load_page_data", "view"]
__version__ = "0.1.0"
