"""Recipes: one command from recipe to report; re-runs recompute exactly what changed; bad recipes fail early."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from neuroproj_prune.cli import main
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.run import load_recipe, run

from conftest import C4, REPO, WIKI


def _recipe(tmp_path, model_dir, **over):
    r = {
        "model": str(model_dir),
        "output_dir": str(tmp_path / "run"),
        "calibration": {"data": str(C4), "samples": 8, "seqlen": 64},
        "stats": {"sites": ["mlp.neurons", "mlp.out", "attn.out"]},
        "clustering": {"algo": "kmeans", "keep_fraction": 0.5},
        "heatmaps": {"layers": "0"},
        "prune": {"sparsity": 0.25, "multiple": 8},
        "eval": {"data": str(WIKI), "seqlen": 128, "max_windows": 2},
        "trace": {"enabled": True, "prompt": "To be", "max_new_tokens": 3},
    }
    for k, v in over.items():
        r[k] = v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_recipe_runs_end_to_end_and_reruns_only_what_changed(tiny_dir, tmp_path):
    model = tiny_dir("llama")
    recipe = _recipe(tmp_path, model)
    res = run(recipe, progress=False, log=lambda *a: None)
    out = Path(res["output_dir"])
    assert set(res["ran"]) >= {"stats", "projection", "clustering", "heatmaps", "prune", "eval_dense", "eval",
                               "trace", "report"}
    for f in ("stats.safetensors", "projections.safetensors", "clusters.json", "plan.json", "pruned/config.json",
              "pruned/prune_summary.json", "eval.json", "eval_dense.json", "report.html", "run_state.json"):
        assert (out / f).exists(), f
    ev = json.loads((out / "eval.json").read_text())
    assert ev["perplexity"]["value"] > 1 and ev["perplexity"]["seqlen"] == 128
    # the checkpoint's model card names the base model and gained the numbers the eval stage measured
    card = (out / "pruned" / "README.md").read_text()
    dense = json.loads((out / "eval_dense.json").read_text())["perplexity"]["value"]
    assert yaml.safe_load(card.split("---")[1])["base_model"] == str(model)
    assert f"{ev['perplexity']['value']:.3f} (dense model: {dense:.3f})" in card
    # nothing changed: nothing but the report
    res = run(recipe, progress=False, log=lambda *a: None)
    assert res["ran"] == ["report"]
    # only the sparsity changed: plan + surgery (prune) and the evaluation of the pruned model
    res = run(recipe, ["prune.sparsity=0.5"], progress=False, log=lambda *a: None)
    assert res["ran"] == ["prune", "eval", "report"], res
    summary = json.loads((out / "pruned" / "prune_summary.json").read_text())
    assert summary["sparsity"] == 0.5


def test_recipe_eval_and_sweep_report_the_zeroshot_average(tiny_dir, tmp_path):
    """eval.tasks and sweep.tasks: eval.json / eval_dense.json and the sweep's table carry the zero-shot average
    beside the perplexity, and the report holds both. Needs `neuroproj-prune tasks fetch`."""
    import csv

    from neuroproj_prune.report.page import load_page_data

    off = {"enabled": False}
    recipe = _recipe(tmp_path, tiny_dir("llama"), stats=off, trace=off,
                     prune={"sparsity": 0.5, "multiple": 1, "select": "flap", "fold": "bias"},
                     eval={"data": str(WIKI), "seqlen": 128, "max_windows": 2, "tasks": "piqa", "limit": 2},
                     sweep={"enabled": True, "sparsities": [0.5], "select": ["flap"], "fold": ["bias"],
                            "calibration": ["sequential"], "tasks": ["piqa"], "limit": 2})
    res = run(recipe, progress=False, log=lambda *a: None)
    out = Path(res["output_dir"])
    for f in ("eval.json", "eval_dense.json"):
        ev = json.loads((out / f).read_text())
        assert ev["perplexity"]["value"] > 1, f
        zs = ev["lm_eval"]["zeroshot"]
        assert zs["average"] == ev["lm_eval"]["tasks"]["piqa"]["acc_norm"] and zs["limit"] == 2, f
    rows = list(csv.DictReader((out / "sweep" / "results.csv").open()))
    assert [r["method"] for r in rows] == ["dense", "flap+bias+sequential"]
    assert all(float(r["ppl"]) > 1 and 0 <= float(r["zeroshot_avg"]) <= 1 for r in rows)
    dense_avg = json.loads((out / "eval_dense.json").read_text())["lm_eval"]["zeroshot"]["average"]
    assert float(rows[0]["zeroshot_avg"]) == pytest.approx(dense_avg)    # same model, same settings
    page = load_page_data(out / "report.html")
    assert {e["label"]: e["lm_eval"]["zeroshot"]["average"] for e in page["eval"]}["dense"] == dense_avg
    assert "zeroshot_avg" in page["sweep"]["columns"]


@pytest.mark.parametrize("override,key", [
    ("prune.sparsityy=0.2", "prune"),            # unknown key (the error names the section it was looked up in)
    ("prune.sparsity=high", "prune.sparsity"),   # wrong type
    ("calibration.data=missing.jsonl", "calibration.data"),  # missing file
    ("bogus=1", "bogus"),
    ("prune.select=nope", "prune.select"),
    ("sweep.tasks=piqa,nope", "sweep.tasks"),    # the sweep's tasks are the zero-shot ones
    ("eval.limit=-1", "eval.limit"),
    ("sweep.limit=2.5", "sweep.limit"),
])
def test_invalid_recipe_fails_before_loading_a_model(override, key, tmp_path, capsys, monkeypatch):
    import neuroproj_prune.model.loading as models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    recipe = _recipe(tmp_path, tmp_path / "no-model-needed")
    assert main(["run", str(recipe), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "run").exists()


def test_set_reaches_sections_the_recipe_leaves_at_defaults(tmp_path):
    data = tmp_path / "c.txt"
    data.write_text("text " * 100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: smollm2-135m\noutput_dir: {tmp_path / 'out'}\ncalibration: {{data: {data}}}\n")
    r = load_recipe(recipe, ["stats.samples=4", "heatmaps.layers=0"])
    assert r["stats"]["samples"] == 4 and r["heatmaps"]["layers"] == "0"
    with pytest.raises(NeuroprojError, match="not a section"):
        load_recipe(recipe, ["model.x=1"])
    with pytest.raises(NeuroprojError, match="'nosuch' is not a section"):
        load_recipe(recipe, ["nosuch.x=1"])


def test_shipped_recipes_are_valid(tmp_path):
    """Every recipe the package ships validates, by name and from any directory (its data paths resolve)."""
    import os

    from neuroproj_prune.run import shipped_recipes

    names = shipped_recipes()
    assert {"smollm2-135m", "smollm2-135m-quality", "smollm2-135m-sweep", "llama-3.1-8b"} <= set(names)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name in names:
            r = load_recipe(name)
            assert r["model"] and r["output_dir"], name
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_reduced_default_recipe_on_smollm2(tmp_path):
    """The shipped default recipe, reduced with --set, runs on the real model and writes the report."""
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main(["run", "smollm2-135m", "--set", f"output_dir={tmp_path / 'r'}",
                     "--set", "calibration.samples=16", "--set", "calibration.seqlen=256",
                     "--set", "stats.samples=4", "--set", "stats.sites=mlp.neurons", "--set", "stats.layers=0-1",
                     "--set", "heatmaps.layers=0", "--set", "prune.sparsity=0.3",
                     "--set", "eval.seqlen=256", "--set", "eval.max_windows=2", "--set", "trace.max_new_tokens=2"])
    finally:
        os.chdir(cwd)
    assert code == 0
    out = tmp_path / "r"
    for f in ("pruned/model.safetensors", "eval.json", "report.html"):
        assert (out / f).exists(), f
    dense = json.loads((out / "eval_dense.json").read_text())["perplexity"]["value"]
    pruned = json.loads((out / "eval.json").read_text())["perplexity"]["value"]
    assert dense < pruned < 3 * dense
