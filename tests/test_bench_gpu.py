"""eval/bench_gpu.py in its CPU smoke mode (`--geometry tiny`): every stage runs, is checked and timed, and the
table lists each one (the GPU geometries run the same code on a device; see eval/results/gpu.md)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "eval" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_bench_times_every_stage(tmp_path):
    b = _bench()
    r = b.run_bench("tiny", out=tmp_path / "tiny", work_dir=tmp_path / "work")
    rows = {x["stage"]: x for x in r["stages"]}
    measured = ["build", "forward", "trunk", "collect", "project", "project: fit_exact alone", "prune"]
    assert list(rows) == ["build", "forward", "trunk", "collect", "collect / forward", "project",
                          "project: fit_exact alone", "prune", "prune (offload=cpu)", "prune (offload=disk)"]
    for name in measured:
        assert rows[name]["ok"] is True and rows[name]["seconds"] > 0, rows[name]
    assert rows["project: fit_exact alone"]["seconds"] <= rows["project"]["seconds"]
    assert r["collect_over_forward"] == round(rows["collect"]["seconds"] / rows["forward"]["seconds"], 3)
    assert r["layers"] == 2 and r["width"] == 256 and r["tokens"] == 4 * 64
    assert "256 → 192" in rows["prune"]["check"] and "layer inputs" in rows["prune"]["note"]
    parts = dict(p.rsplit(" ", 2)[:2] for p in rows["prune"]["note"].split(", "))
    assert set(parts) == {"layer inputs", "moments", "select + fold", "carry"}
    assert sum(float(v) for v in parts.values()) <= rows["prune"]["seconds"] * 1.05 + 0.01
    for name, mode in (("prune (offload=cpu)", "cpu"), ("prune (offload=disk)", "disk")):   # streamed, checked
        row = rows[name]
        assert row["ok"] is True and row["seconds"] > 0, row
        assert f"layers {mode}" in row["check"] and "loads with plain transformers" in row["check"], row["check"]
        assert "256 → 192" in row["check"] and "write checkpoint" in row["note"] and "fetch layers" in row["note"]
    assert all(x.get("host_peak_gb") is None or x["host_peak_gb"] > 0 for x in rows.values())
    assert list((tmp_path / "work").iterdir()) == []   # the model and checkpoints it wrote are removed
    md = (tmp_path / "tiny.md").read_text()
    assert all(f"| {name} |" in md for name in rows) and "python eval/bench_gpu.py --geometry tiny" in md
    assert json.loads((tmp_path / "tiny.json").read_text())["stages"] == json.loads(json.dumps(r["stages"]))
