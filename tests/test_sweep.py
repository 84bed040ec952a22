"""The tradeoff sweep: every cell, the table and the plot; a re-run recomputes nothing."""
from __future__ import annotations

import json
import sys

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
