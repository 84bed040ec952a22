"""The report: one self-contained HTML page (`view`) built from what a run directory holds."""
from .page import build_data, load_page_data, render, trace_activations, view

__all__ = ["build_data", "load_page_data", "render", "trace_activations", "view"]
