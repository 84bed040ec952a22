"""neuroproj-prune: remove redundant MLP neurons of causal LMs, found through activation correlations.

    import neuroproj_prune as npp
    stats = npp.collect("smollm2-135m", "c4.jsonl", samples=128, seqlen=512, out="run/stats.safetensors")
    lm, plan, summary = npp.prune("smollm2-135m", "c4.jsonl", sparsity=0.3, out="run/pruned")

The package by stage (each a sub-package): `model` (adapters, loading, checkpoints), `stats` (moments, capture,
data, processes, `collect`), `analysis` (projection, clustering, heatmaps, traces, skips), `prune` (the one
per-layer loop and its methods), `evaluate`, `export`, `recover`, `report`; `sweep`, `run` and `cli` on top.
"""
from .analysis import (Projections, Trace, agreement, apply_skips, cluster, cluster_points, find_skips, fit_exact,
                       load_clusters, load_projections, load_trace, project, trace)
from .errors import NeuroprojError
from .evaluate import evaluate, perplexity
from .export.latency import LatencyConfig, measure_latency
from .model import adapter_for, load_model, load_pruned, save_pruned, supported_model_types
from .prune.speed import Latency
from .prune import (ALLOCATIONS, CALIBRATIONS, FOLDS, SELECTORS, Plan, PruneConfig, apply_plan, plan, prune,
                    prune_layers)
from .recover import RecoverConfig, recover
from .report import load_page_data, view
from .run import run
from .stats import Stats, collect, load_stats
from .sweep import sweep

__all__ = ["ALLOCATIONS", "CALIBRATIONS", "FOLDS", "SELECTORS", "PruneConfig", "RecoverConfig", "NeuroprojError",
           "Plan", "Projections", "Stats", "adapter_for", "agreement", "apply_plan", "cluster", "cluster_points",
           "collect", "evaluate", "apply_skips", "find_skips", "fit_exact", "load_clusters", "load_model",
           "load_projections", "load_pruned", "load_stats", "perplexity", "plan", "project", "prune", "prune_layers",
           "recover", "run", "save_pruned", "supported_model_types", "sweep", "Trace", "load_trace", "trace",
           "load_page_data", "view", "Latency", "LatencyConfig", "measure_latency"]
__version__ = "0.1.0"
