"""Statistics: the moments every stage shares (one accumulator, one ridge rule), capturing activations,
calibration data, processes, and the `collect` stage with the statistics file it writes."""
from .capture import (COMPUTE_DTYPES, HEAD_SITE, SITES, ActivationCapture, batches, check_sites, compute_dtype_for,
                      hooked, nonfinite_hint, parse_layers, parse_sites, site_width)
from .collect import accumulate, calibration_ids, collect
from .data import calibration_samples, eval_windows, read_text, tokenize
from .moments import (Moments, cholesky, compute_autocast, correlation, dead_neurons, energy, products_for,
                      ridge_lambda, ridged)
from .processes import available_memory, distributed, join_processes
from .stats_file import (FORMAT, HEAD_KEYS, Stats, head_layout, head_meta, load_stats, second_moment_diagonals,
                         site_width_of)

__all__ = ["COMPUTE_DTYPES", "FORMAT", "HEAD_KEYS", "HEAD_SITE", "SITES", "check_sites", "head_layout", "head_meta",
           "site_width", "site_width_of", "compute_dtype_for", "nonfinite_hint", "ActivationCapture", "Moments",
           "products_for", "Stats", "accumulate", "available_memory", "batches", "calibration_ids",
           "calibration_samples", "cholesky", "collect", "compute_autocast", "correlation", "dead_neurons",
           "distributed", "energy", "eval_windows", "hooked", "join_processes", "load_stats", "parse_layers",
           "parse_sites", "read_text", "ridge_lambda", "ridged", "second_moment_diagonals", "tokenize"]
