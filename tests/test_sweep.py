"""The tradeoff sweep: every cell, the table and the plot; a re-run recomputes nothing."""
from __future__ import annotations

import json
import sys

import pytest

from neuroproj_prune.cli import main

from conftest import C4, WIKI


def test_sweep_two_methods_two_sparsities_and_resume(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_dir("llama")), "--data", str(C4), "--eval-data", str(WIKI),
            "--sparsities", "0.25,0.5", "--methods", "flap+bias+oneshot,obs+lstsq+sequential", "--multiple", "1",
            "--samples", "4", "--seqlen", "64", "--eval-seqlen", "128", "--max-windows", "2", "--out", str(out)]
    assert main(args) == 0
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    keys = {c["key"] for c in cells}
    assert keys == {"dense", "flap+bias+oneshot@0.25", "flap+bias+oneshot@0.5", "obs+lstsq+sequential@0.25",
                    "obs+lstsq+sequential@0.5"}
    dense = next(c for c in cells if c["key"] == "dense")
    for c in cells:
        assert c["ppl"] > 1
        if c["key"] != "dense":
            assert c["params"] < dense["params"] and c["mlp_macs_per_token"] < dense["mlp_macs_per_token"]
            assert abs(c["actual_sparsity"] - c["sparsity"]) < 0.02
    for f in ("results.csv", "results.md", "tradeoff.png", "stats.safetensors"):
        assert (out / f).exists(), f
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| flap+bias+oneshot |" in md and "| obs+lstsq+sequential |" in md
    capsys.readouterr()

    # a re-run recomputes nothing: no pruning, no evaluation, no statistics pass
    def boom(*a, **k):
        raise AssertionError("recomputed a finished cell")

    sweep_mod = sys.modules["neuroproj_prune.sweep"]  # the names the sweep calls
    monkeypatch.setattr(sweep_mod, "prune", boom)
    monkeypatch.setattr(sweep_mod, "perplexity", boom)
    monkeypatch.setattr(sweep_mod, "collect", boom)
    assert main(args) == 0
    assert len((out / "cells.jsonl").read_text().splitlines()) == len(cells)
    # extending the sweep computes only the new cells
    monkeypatch.undo()
    calls = []
    orig = sweep_mod.prune
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: calls.append(a[2].sparsity) or orig(*a, **k))
    i = args.index("--sparsities")
    assert main([*args[:i + 1], "0.25,0.5,0.75", *args[i + 2:]]) == 0
    assert sorted(calls) == [0.75, 0.75]


def test_sweep_global_allocation_cell(tiny_dir, tmp_path):
    """A method with +global prunes with per-layer widths and is its own line in the table."""
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_dir("llama")), "--data", str(C4), "--eval-data", str(WIKI),
            "--sparsities", "0.5", "--methods", "wanda-sp+lstsq+sequential+global,wanda-sp+lstsq+sequential",
            "--multiple", "1", "--samples", "4", "--seqlen", "64", "--eval-seqlen", "128", "--max-windows", "2",
            "--out", str(out)]
    assert main(args) == 0
    cells = {c["key"]: c for c in map(json.loads, (out / "cells.jsonl").read_text().splitlines())}
    assert set(cells) == {"dense", "wanda-sp+lstsq+sequential+global@0.5", "wanda-sp+lstsq+sequential@0.5"}
    assert cells["wanda-sp+lstsq+sequential+global@0.5"]["allocation"] == "global"
    assert abs(cells["wanda-sp+lstsq+sequential+global@0.5"]["actual_sparsity"] - 0.5) < 0.02
    assert "| wanda-sp+lstsq+sequential+global |" in (out / "results.md").read_text()


def test_sweep_axes_compare_at_the_same_parameter_count(tiny_dir, tmp_path):
    """--axes: each method per axis set at a parameter budget; every cell removes its share of the decoder layers'
    parameters, the MLP-only one with no head or attention touched, and each axis set is its own line."""
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tiny_dir("llama", layers=4)), "--data", str(C4), "--eval-data", str(WIKI),
            "--sparsities", "0.3", "--methods", "wanda-sp+lstsq+sequential", "--axes", "mlp,mlp+attn",
            "--multiple", "1", "--samples", "8", "--seqlen", "64", "--search-samples", "4", "--eval-seqlen", "128",
            "--max-windows", "2", "--out", str(out)]
    assert main(args) == 0
    cells = {c["key"]: c for c in map(json.loads, (out / "cells.jsonl").read_text().splitlines())}
    assert set(cells) == {"dense", "wanda-sp+lstsq+sequential[mlp]@0.3", "wanda-sp+lstsq+sequential[mlp+attn]@0.3"}
    for k in ("wanda-sp+lstsq+sequential[mlp]@0.3", "wanda-sp+lstsq+sequential[mlp+attn]@0.3"):
        assert abs(cells[k]["removed_trunk_fraction"] - 0.3) < 0.02, cells[k]
        assert cells[k]["params"] < cells["dense"]["params"]
    assert "| wanda-sp+lstsq+sequential[mlp+attn] |" in (out / "results.md").read_text()


@pytest.mark.parametrize("axes", ["mlp+wings", "mlp+mlp", "+"])
def test_sweep_bad_axes_is_one_line(axes, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tmp_path / "no-model-needed"), "--data", str(C4), "--eval-data", str(WIKI),
            "--sparsities", "0.5", "--axes", axes, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an axis set" in err[0], err
    assert not out.exists()


def test_sweep_zeroshot_columns_equal_evaluate_and_resume(tiny_dir, tmp_path, monkeypatch):
    """--tasks adds each task's headline accuracy and their average to every cell: a sweep made without tasks
    gains them on a re-run (pruned again, perplexity not recomputed), the numbers are what `evaluate` gives
    for the same models, and a second re-run recomputes nothing. Needs `neuroproj-prune tasks fetch`."""
    import csv

    from neuroproj_prune.evaluate import evaluate
    from neuroproj_prune.evaluate.tasks import HEADLINE

    sweep_mod = sys.modules["neuroproj_prune.sweep"]
    model, out = str(tiny_dir("llama")), tmp_path / "sweep"
    args = ["sweep", "--model", model, "--data", str(C4), "--eval-data", str(WIKI), "--sparsities", "0.5",
            "--methods", "flap+bias+oneshot", "--multiple", "1", "--samples", "4", "--seqlen", "64",
            "--eval-seqlen", "128", "--max-windows", "2", "--out", str(out)]
    assert main(args) == 0                                   # perplexity only
    before = {c["key"]: c for c in map(json.loads, (out / "cells.jsonl").read_text().splitlines())}
    assert not any("lm_eval" in c for c in before.values())
    assert "zeroshot_avg" not in (out / "results.csv").read_text()

    def boom(*a, **k):
        raise AssertionError("recomputed")

    pruned, scored = [], []
    orig_prune, orig_scores = sweep_mod.prune, sweep_mod.task_scores
    monkeypatch.setattr(sweep_mod, "perplexity", boom)
    monkeypatch.setattr(sweep_mod, "collect", boom)
    monkeypatch.setattr(sweep_mod, "prune", lambda *a, **k: pruned.append(1) or orig_prune(*a, **k))
    monkeypatch.setattr(sweep_mod, "task_scores", lambda *a, **k: scored.append(k["tasks"]) or orig_scores(*a, **k))
    zs_args = [*args, "--tasks", "piqa,arc_easy", "--limit", "2"]
    assert main(zs_args) == 0                                # the cells gain the tasks
    assert len(pruned) == 1 and scored == [["piqa", "arc_easy"]] * 2
    cells = {c["key"]: c for c in map(json.loads, (out / "cells.jsonl").read_text().splitlines())}
    for key, c in cells.items():
        assert c["ppl"] == before[key]["ppl"]
        le = c["lm_eval"]
        assert le["limit"] == 2 and le["max_length"] == 128 and set(le["tasks"]) == {"piqa", "arc_easy"}
        assert all(le["tasks"][t]["samples"] == 2 for t in le["tasks"])
    assert cells["dense"]["lm_eval"] != cells["flap+bias+oneshot@0.5"]["lm_eval"]

    # the same numbers as `eval` of the same models (the pruned one rebuilt by `prune` from the sweep's stats)
    pdir = tmp_path / "pruned"
    monkeypatch.undo()
    assert main(["prune", "--model", model, "--stats", str(out / "stats.safetensors"), "--sparsity", "0.5",
                 "--select", "flap", "--fold", "bias", "--multiple", "1", "--out", str(pdir)]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    for key, path in (("dense", model), ("flap+bias+oneshot@0.5", str(pdir))):
        ref = evaluate(path, tasks="piqa,arc_easy", limit=2, seqlen=128, device="cpu", progress=False)["lm_eval"]
        got = cells[key]["lm_eval"]["tasks"]
        for t in ("piqa", "arc_easy"):
            for m in ("acc", "acc_norm", "acc_stderr", "samples"):
                assert got[t][m] == ref["tasks"][t][m], (key, t, m)
        row = rows[cells[key]["method"]]
        assert float(row["zeroshot_avg"]) == pytest.approx(ref["zeroshot"]["average"])
        assert float(row["piqa_acc_norm"]) == pytest.approx(ref["tasks"]["piqa"]["acc_norm"])
        assert row["zeroshot_limit"] == "2"
    md = (out / "results.md").read_text()
    assert "Zero-shot average accuracy (%) over piqa (acc_norm), arc_easy (acc_norm)" in md
    assert "the first 2 documents of each task" in md and "| piqa acc_norm | arc_easy acc_norm | zero-shot avg |" in md

    # a re-run recomputes nothing
    n = len((out / "cells.jsonl").read_text().splitlines())
    for name in ("prune", "perplexity", "collect", "task_scores"):
        monkeypatch.setattr(sweep_mod, name, boom)
    assert main(zs_args) == 0
    assert len((out / "cells.jsonl").read_text().splitlines()) == n


@pytest.mark.parametrize("extra,msg", [(["--tasks", "piqa,nonsense"], "unknown zero-shot task 'nonsense'"),
                                       (["--tasks", "piqa", "--limit", "-1"], "limit must be"),
                                       (["--tasks", "piqa", "--limit", "2.5"], "limit must be")])
def test_sweep_bad_tasks_or_limit_is_one_line(extra, msg, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(tmp_path / "no-model-needed"), "--data", str(C4), "--eval-data", str(WIKI),
            "--sparsities", "0.5", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not out.exists()
