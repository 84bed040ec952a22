"""The pruning core: one config behind CLI, recipe and API; registries; layering; every recipe stage runs."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import neuroproj_prune as npp
from neuroproj_prune.cli import build_parser, main
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.model import load_model
from neuroproj_prune.prune import PruneConfig
from neuroproj_prune.run import DEFAULTS, load_recipe, run

from conftest import C4, REPO, WIKI


def test_import_layers_contract():
    """`lint-imports` (pyproject's [tool.importlinter] layers contract) passes: no module imports upward."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.fail("import-linter is not installed: run scripts/setup.sh")
    r = subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_one_config_makes_cli_recipe_and_api():
    """Every PruneConfig field is a `prune` flag, a recipe key (prune or calibration section) and a keyword of
    the API; the defaults agree."""
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    sub = build_parser()._subparsers._group_actions[0].choices["prune"]
    flags = {a.dest for a in sub._actions}
    assert names <= flags
    recipe_keys = (set(DEFAULTS["prune"]) - {"enabled"}) | {"samples", "seqlen", "seed"}
    assert recipe_keys == names
    for f in dataclasses.fields(PruneConfig):
        default = list(f.default) if isinstance(f.default, tuple) else f.default   # a recipe holds lists
        if f.name in DEFAULTS["prune"]:
            assert DEFAULTS["prune"][f.name] == default, f.name
        else:
            assert DEFAULTS["calibration"][f.name] == default, f.name
    # sweep shares every field but the ones it sweeps (a parameter budget's among them: --axes sweeps it)
    from neuroproj_prune.sweep import SWEPT
    sw = build_parser()._subparsers._group_actions[0].choices["sweep"]
    assert set(SWEPT) == {"sparsity", "keep", "select", "fold", "calibration", "allocation", "target_params",
                          "target_speedup", "axes"}
    assert names - set(SWEPT) <= {a.dest for a in sw._actions}


@pytest.mark.parametrize("bad,match", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": 0.3, "keep": 10}, "not both"), ({"keep": 0}, "zero width"),
    ({"select": "nope"}, "unknown select"), ({"fold": "x"}, "unknown fold"), ({"calibration": "x"}, "unknown"),
    ({"allocation": "x"}, "unknown allocation"), ({"multiple": 0}, "multiple"), ({"max_shift": 0.0}, "max_shift"),
    ({"keep": 1.5}, "whole number"), ({"ridge": float("nan")}, "finite"), ({"samples": "many"}, "whole number"),
    ({"fold": "bias", "target": "dense"}, "lstsq"), ({"add_bias": "yes"}, "true or false"),
])
def test_config_refuses_bad_values(bad, match):
    with pytest.raises(NeuroprojError, match=match):
        PruneConfig.make(**bad)


def test_registries_share_one_signature():
    from neuroproj_prune.prune.calibrate import CALIBRATIONS, Calibration
    from neuroproj_prune.prune import SELECTORS
    from neuroproj_prune.prune import ALLOCATIONS
    from neuroproj_prune.prune import FOLDS

    assert {"wanda-sp", "obs", "cluster", "corr-cluster", "flap", "magnitude", "random"} <= set(SELECTORS)
    assert set(FOLDS) == {"none", "representative", "bias", "lstsq"}
    assert set(CALIBRATIONS) == {"oneshot", "sequential"} and all(issubclass(c, Calibration) for c in CALIBRATIONS.values())
    assert set(ALLOCATIONS) == {"uniform", "global", "search"}
    # the same names are what the config accepts
    for name in SELECTORS:
        PruneConfig.make(select=name)


def test_prune_with_clusters_uses_them_as_written(tiny_dir, tmp_path):
    """A clusters.json given to `prune` is the plan: each pole keeps its representative, members fold into it."""
    d = tiny_dir("llama")
    lm = load_model(str(d), device="cpu")
    st = npp.collect(lm, str(C4), samples=8, seqlen=64, out=tmp_path / "s.safetensors", progress=False)
    npp.project(tmp_path / "s.safetensors", mode="exact", dims=3, out=tmp_path / "p.safetensors", progress=False)
    cl = npp.cluster(tmp_path / "p.safetensors", algo="kmeans", keep_fraction=0.5, out=tmp_path / "c.json")
    assert main(["prune", "--model", str(d), "--stats", str(tmp_path / "s.safetensors"), "--clusters",
                 str(tmp_path / "c.json"), "--fold", "representative", "--out", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    for i in cl.layers:
        assert plan["layers"][str(i)]["keep"] == [int(j) for j in cl[i].keep()]
        rep = cl[i].representative_of()
        assert all(rep[int(j)] == r for j, r in plan["layers"][str(i)]["representative"].items())
    # the checkpoint loads and has those widths
    again = load_model(str(tmp_path / "out"), device="cpu")
    assert [again.adapter.width(again.model, i) for i in cl.layers] == [len(cl[i].keep()) for i in cl.layers]
    del st


def test_recipe_with_every_stage(tiny_dir, tmp_path):
    """A reduced recipe with every stage on (cross-layer statistics, sweep, skips applied, trace): each stage
    runs and writes its outputs, so no stage can break silently."""
    r = {
        "model": str(tiny_dir("llama")), "output_dir": str(tmp_path / "run"),
        "calibration": {"data": str(C4), "samples": 8, "seqlen": 64},
        "stats": {"sites": ["mlp.neurons", "mlp.out"], "cross_layer_window": 1},
        "clustering": {"algo": "kmeans", "keep_fraction": 0.5},
        "heatmaps": {"layers": "0"},
        "prune": {"sparsity": 0.25, "multiple": 8},
        "eval": {"data": str(WIKI), "seqlen": 128, "max_windows": 2},
        "sweep": {"enabled": True, "sparsities": [0.5], "select": ["flap"], "fold": ["lstsq"],
                  "calibration": ["oneshot"]},
        "skips": {"enabled": True, "min_r2": 0.0, "top_k": 2, "apply": True},
        "trace": {"enabled": True, "prompt": "To be", "max_new_tokens": 2},
        "export": {"enabled": True, "to": ["hf"]},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    res = run(path, progress=False, log=lambda *a: None)
    stages = {"stats", "projection", "clustering", "heatmaps", "prune", "eval_dense", "eval", "sweep", "skips",
              "trace", "export", "report"}
    assert set(res["ran"]) == stages, res
    out = Path(res["output_dir"])
    for f in ("sweep/results.csv", "skips/skips.json", "skipped/config.json", "trace.safetensors", "report.html",
              "export/hf/config.json"):
        assert (out / f).exists(), f
    skipped = load_model(str(out / "skipped"), device="cpu")
    assert npp.model.get_skips(skipped.model)  # the applied skips were saved and rebuilt
    # a skips stage without cross-layer statistics is refused before anything runs
    with pytest.raises(NeuroprojError, match="cross_layer_window"):
        load_recipe(path, ["stats.cross_layer_window=0"])


def test_zero_sparsity_config_roundtrip_is_exact(tiny_dir, tmp_path):
    """The API with a PruneConfig and with keyword arguments are the same run; 0 % keeps logits bit for bit."""
    d = tiny_dir("llama")
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))
    dense = load_model(str(d), device="cpu")
    ref = dense.model(ids).logits
    cfg = PruneConfig.make(sparsity=0.0, samples=4, seqlen=32)
    a, pa, _ = npp.prune(str(d), str(C4), cfg, progress=False)
    b, pb, _ = npp.prune(str(d), str(C4), sparsity=0.0, samples=4, seqlen=32, progress=False)
    assert torch.equal(a.model(ids).logits, ref) and torch.equal(b.model(ids).logits, ref)
    assert pa.layers == pb.layers
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["layers"]["0"]["keep"].__setitem__(1, 1.5), "whole numbers"),
    (lambda d: d["layers"]["0"]["keep"].__setitem__(1, "3"), "whole numbers"),
    (lambda d: d["layers"]["0"]["representative"].update({"1": 10 ** 6}), "representatives"),
    (lambda d: d["meta"].update({"fingerprint": "0" * 32}), "another model"),
])
def test_edited_plans_are_checked(tiny_dir, tmp_path, capsys, edit, match):
    """An edited plan with a non-integer index, a bad representative or another model's fingerprint: one
    error line, exit 2, no checkpoint."""
    d = str(tiny_dir("llama"))
    common = ["--model", d, "--data", str(C4), "--samples", "4", "--seqlen", "32", "--multiple", "1"]
    assert main(["prune", *common, "--sparsity", "0.25", "--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "plan.json").read_text())
    doc["layers"]["0"]["representative"] = {str(j): doc["layers"]["0"]["keep"][0]
                                            for j in range(64) if j not in doc["layers"]["0"]["keep"]}
    edit(doc)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["prune", *common, "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "b")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # (not the loading bars)
    assert len(err) == 1 and err[0].startswith("neuroproj-prune: error:") and match in err[0], err
    assert not (tmp_path / "b").exists()
