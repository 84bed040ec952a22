"""One config per stage: its fields are the stage's CLI flags, its recipe section and its API keywords, with one
set of defaults and declared ranges — checked for every stage, so that they cannot drift apart."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

import neuroproj_prune as npp
from neuroproj_prune.analysis.clustering import ClusterConfig
from neuroproj_prune.analysis.heatmap import HeatmapConfig
from neuroproj_prune.analysis.projection import ProjectConfig
from neuroproj_prune.analysis.skips import SkipsConfig, run_skips
from neuroproj_prune.analysis.trace import TraceConfig
from neuroproj_prune.cli import build_parser
from neuroproj_prune.config import ConfigError
from neuroproj_prune.evaluate.api import EvalConfig
from neuroproj_prune.export import ExportConfig, export
from neuroproj_prune.prune import PruneConfig
from neuroproj_prune.recover import RecoverConfig
from neuroproj_prune.report.page import ViewConfig
from neuroproj_prune.run import DEFAULTS, SECTIONS
from neuroproj_prune.stats.collect import CollectConfig
from neuroproj_prune.sweep import SweepConfig

# (command, the arguments it requires, config, recipe section, API function)
STAGES = [
    ("collect", ["--model", "m", "--data", "d", "--out", "o"], CollectConfig, "stats", npp.collect),
    ("project", ["s", "--out", "o"], ProjectConfig, "projection", npp.project),
    ("cluster", ["p", "--out", "o"], ClusterConfig, "clustering", npp.cluster),
    ("heatmap", ["s", "--out", "o"], HeatmapConfig, "heatmaps", npp.analysis.heatmaps),
    ("prune", ["--model", "m", "--out", "o"], PruneConfig, "prune", npp.prune),
    ("recover", ["p", "--data", "d", "--out", "o"], RecoverConfig, "recover", npp.recover),
    ("eval", ["--model", "m"], EvalConfig, "eval", npp.evaluate),
    ("sweep", ["--model", "m", "--data", "d", "--eval-data", "e", "--out", "o"], SweepConfig, "sweep", npp.sweep),
    ("skips", ["--stats", "s", "--report", "r"], SkipsConfig, "skips", run_skips),
    ("trace", ["--model", "m", "--projections", "p", "--out", "o"], TraceConfig, "trace", npp.trace),
    ("export", ["m", "--to", "gguf", "--out", "o"], ExportConfig, "export", export),
    ("view", ["run"], ViewConfig, "report", npp.view),
]


@pytest.mark.parametrize("command,required,cls,section,api", STAGES, ids=[s[0] for s in STAGES])
def test_cli_recipe_and_api_share_fields_and_defaults(command, required, cls, section, api):
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    # CLI: every field is a flag, and the flags left out give the config's defaults
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    assert set(fields) <= {a.dest for a in sub._actions}, set(fields) - {a.dest for a in sub._actions}
    args = parser.parse_args([command, *required])
    assert cls.from_args(args) == cls(), command
    # recipe: the section is the config's fields (less those the recipe takes elsewhere) with the same defaults
    _, left_out, own = SECTIONS[section]
    recipe = {k: v for k, v in DEFAULTS[section].items() if k not in own}
    assert set(recipe) == set(fields) - set(left_out) - set(own)
    assert recipe == cls.recipe_defaults(exclude=(*left_out, *own))
    # API: the function takes the config, and its fields as keywords (**settings) — none with another default
    # (None, as everywhere in the configs, means "the config's")
    params = inspect.signature(api).parameters
    assert "config" in params or "prune_config" in params
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, default in fields.items():
        if name in params and params[name].default is not inspect.Parameter.empty:
            assert params[name].default in (default, None), (command, name)


@pytest.mark.parametrize("cls,bad,match", [
    (CollectConfig, {"batch_size": 0}, "batch_size must be at least 1"),
    (CollectConfig, {"sites": "mlp.bogus"}, "unknown sites"),
    (CollectConfig, {"sites": ""}, "non-empty"),
    (CollectConfig, {"cross_layer_window": 1, "sites": "mlp.out"}, "mlp.neurons"),
    (ProjectConfig, {"max_iter": -1}, "max_iter must be at least 1"),
    (ProjectConfig, {"lr": float("nan"), "mode": "minibatch"}, "finite"),
    (ProjectConfig, {"refine": "smacof", "norm_order": 1.0}, "SMACOF"),
    (ClusterConfig, {"k": 3, "keep_fraction": 0.5}, "not both"),
    (ClusterConfig, {"algo": "dbscan", "k": 3}, "kmeans"),
    (ClusterConfig, {"algo": "hdbscan"}, "unknown clustering algo 'hdbscan': choose from dbscan, kmeans"),
    (HeatmapConfig, {"band": 0}, "band must be at least 1"),
    (TraceConfig, {"top_p": 2.0, "sample": True}, "top_p must be in"),
    (TraceConfig, {"temperature": 0.0, "sample": True}, "temperature must be > 0"),
    (TraceConfig, {"top_k": 5}, "--sample"),
    (EvalConfig, {"max_windows": 0}, "max_windows must be at least 1"),
    (EvalConfig, {"num_fewshot": -1, "tasks": "piqa"}, "num_fewshot must be at least 0"),
    (EvalConfig, {"num_fewshot": 5, "tasks": "piqa"}, "no training split"),
    (EvalConfig, {"limit": 5}, "--tasks"),
    (SweepConfig, {"sparsities": ""}, "non-empty"),
    (SweepConfig, {"sparsities": "0.2,1.5"}, "sparsities must be in"),
    (SkipsConfig, {"min_r2": 1.5}, "min_r2 must be in"),
    (SkipsConfig, {"predictor": "topk", "top_k": 1}, "top-k"),
    (ViewConfig, {"max_points": 0}, "max_points must be at least 1"),
    (ExportConfig, {"verify": True}, "trust-remote-code"),
    (PruneConfig, {"reconstruct_lr": 0.0}, "reconstruct_lr must be > 0"),
])
def test_declared_ranges_and_conflicts_are_refused(cls, bad, match):
    with pytest.raises(ConfigError, match=match):
        cls.make(**bad)


def test_comma_lists_are_lists():
    """A documented comma list is accepted as one (sweep --select wanda-sp,flap was refused before)."""
    assert SweepConfig.make(select="wanda-sp,flap").select == ("wanda-sp", "flap")
    assert SweepConfig.make(sparsities="0.2, 0.3").sparsities == (0.2, 0.3)
    assert CollectConfig.make(sites=["mlp.neurons", "attn.out"]).sites == ("mlp.neurons", "attn.out")
    assert EvalConfig.make(tasks=[]).tasks is None
