"""Analysis: the correlation geometry (projection, exact and minibatch), clustering into poles, heatmaps,
traces of a prompt's activations, and neuron-level skip connections between layers."""
from .clustering import Clusters, agreement, cluster, cluster_points, load_clusters
from .heatmap import heatmaps
from .projection import Projections, fit_exact, load_projections, project
from .skips import SkipReport, apply_skips, find_skips, run_skips
from .trace import Trace, load_trace, trace

__all__ = ["Clusters", "Projections", "SkipReport", "Trace", "agreement", "apply_skips", "cluster", "cluster_points",
           "find_skips", "fit_exact", "heatmaps", "load_clusters", "load_projections", "load_trace", "project",
           "run_skips", "trace"]
