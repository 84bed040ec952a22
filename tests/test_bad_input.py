"""The bad-input matrix: every class of hostile input, across the subcommands, gets exit 2, one line
`neuroproj-prune: error: …`, no traceback, and leaves no output behind."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.io import load_tensors, save_tensors

from conftest import C4, WIKI, tiny_model


@pytest.fixture(scope="module")
def env(tiny_dir, tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("bad")
    model = str(tiny_dir("llama"))
    st = d / "s.safetensors"
    npp.collect(model, str(C4), samples=4, seqlen=32, cross_layer_window=1, out=st, progress=False)
    npp.project(st, mode="exact", dims=3, out=d / "p.safetensors", progress=False)
    t, meta = load_tensors(st, "neuroproj-prune/stats/1", "statistics", "collect")
    nan = dict(t)
    nan["layer.1.mlp.neurons.gram"] = t["layer.1.mlp.neurons.gram"].clone()
    nan["layer.1.mlp.neurons.gram"][0, 0] = float("nan")
    save_tensors(d / "nan.safetensors", nan, meta)
    shape = dict(t)
    shape["layer.0.mlp.neurons.gram"] = t["layer.0.mlp.neurons.gram"][:-1, :-1].clone()
    save_tensors(d / "shape.safetensors", shape, meta)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "number.jsonl").write_text('{"text": 42}\n')
    (d / "afile").write_text("x")
    busy = d / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("x")
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    m.save_pretrained(d / "nanmodel")
    tokenizer.save_pretrained(d / "nanmodel")
    trunc = d / "truncated"
    tiny_model("llama").save_pretrained(trunc)
    tokenizer.save_pretrained(trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    nosafe = d / "nosafe"   # a model directory whose weights are not safetensors (here: none at all)
    nosafe.mkdir()
    (nosafe / "config.json").write_bytes((tiny_dir("llama") / "config.json").read_bytes())
    tokenizer.save_pretrained(nosafe)
    recipe = {"model": model, "output_dir": str(d / "run"), "calibration": {"data": str(C4), "samples": 4, "seqlen": 32}}
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return {"d": d, "model": model, "stats": str(st), "proj": str(d / "p.safetensors")}


COMMON = ["--data", str(C4), "--samples", "4", "--seqlen", "32"]

# (name, argv with {placeholders}, text the error must contain, output that must not exist)
CASES = [
    ("collect reversed layers", ["collect", "--model", "{model}", *COMMON, "--layers", "2-1", "--out", "{d}/o1"], "low-high", "o1"),
    ("collect binary data", ["collect", "--model", "{model}", "--data", "{d}/binary.txt", "--out", "{d}/o2"], "UTF-8", "o2"),
    ("collect number text", ["collect", "--model", "{model}", "--data", "{d}/number.jsonl", "--out", "{d}/o3"], "string", "o3"),
    ("collect absent device", ["collect", "--model", "{model}", *COMMON, "--device", "cuda:7", "--out", "{d}/o4"], "CUDA", "o4"),
    ("collect under a file", ["collect", "--model", "{model}", *COMMON, "--out", "{d}/afile/s.safetensors"], "is a file", None),
    ("collect truncated model", ["collect", "--model", "{d}/truncated", *COMMON, "--out", "{d}/o5"], "truncated", "o5"),
    ("info NaN Gram", ["info", "{d}/nan.safetensors"], "NaN", None),
    ("info wrong-shape Gram", ["info", "{d}/shape.safetensors"], "shape", None),
    ("project reversed layers", ["project", "{stats}", "--layers", "2-0", "--out", "{d}/o6"], "low-high", "o6"),
    ("heatmap reversed layers", ["heatmap", "{stats}", "--layers", "2-1", "--out", "{d}/o7"], "low-high", "o7"),
    ("heatmap into a busy dir", ["heatmap", "{stats}", "--layers", "0", "--out", "{d}/busy"], "--overwrite", None),
    ("prune NaN statistics", ["prune", "--model", "{model}", "--stats", "{d}/nan.safetensors", "--sparsity", "0.3",
                              "--out", "{d}/o8"], "NaN", "o8"),
    ("prune keep above width", ["prune", "--model", "{model}", *COMMON, "--keep", "1000", "--out", "{d}/o9"], "exceeds", "o9"),
    ("prune sparsity and keep", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--keep", "10",
                                 "--out", "{d}/o10"], "not both", "o10"),
    ("prune bad select", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--select", "best",
                          "--out", "{d}/o11"], "unknown select", "o11"),
    ("prune NaN model", ["prune", "--model", "{d}/nanmodel", *COMMON, "--sparsity", "0.3", "--out", "{d}/o12"],
     "non-finite", "o12"),
    ("prune under a file", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--out", "{d}/afile/x"],
     "is a file", None),
    ("prune unknown offload", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--offload", "gpu",
                               "--out", "{d}/o17"], "unknown offload 'gpu'", "o17"),
    ("prune disk without safetensors", ["prune", "--model", "{d}/nosafe", *COMMON, "--sparsity", "0.3",
                                        "--offload", "disk", "--out", "{d}/o18"], "holds none", "o18"),
    ("prune disk of a hub id", ["prune", "--model", "some-org/some-model", *COMMON, "--sparsity", "0.3",
                                "--offload", "disk", "--out", "{d}/o19"], "hub id", "o19"),
    ("prune disk truncated model", ["prune", "--model", "{d}/truncated", *COMMON, "--sparsity", "0.3",
                                    "--offload", "disk", "--out", "{d}/o21"], "damaged", "o21"),
    ("prune disk with one-shot", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--calibration",
                                  "oneshot", "--offload", "disk", "--out", "{d}/o20"], "calibration sequential", "o20"),
    ("eval NaN model", ["eval", "--model", "{d}/nanmodel", "--data", str(WIKI), "--seqlen", "64", "--max-windows", "2",
                        "--json", "{d}/o13.json"], "non-finite", "o13.json"),
    ("eval json under a file", ["eval", "--model", "{model}", "--data", str(WIKI), "--json", "{d}/afile/e.json"],
     "is a file", None),
    ("sweep bad sparsities", ["sweep", "--model", "{model}", *COMMON, "--eval-data", str(WIKI), "--sparsities", "abc",
                              "--out", "{d}/o14"], "comma list", "o14"),
    ("sweep sparsity 1", ["sweep", "--model", "{model}", *COMMON, "--eval-data", str(WIKI), "--sparsities", "0.2,1.0",
                          "--out", "{d}/o15"], "sparsities must be in", "o15"),
    ("skips min-r2 above 1", ["skips", "--stats", "{stats}", "--min-r2", "5", "--report", "{d}/o16"], "min_r2", "o16"),
    ("cluster under a file", ["cluster", "{proj}", "--algo", "kmeans", "--keep-fraction", "0.5",
                              "--out", "{d}/afile/c.json"], "is a file", None),
    ("view under a file", ["view", "{d}", "--out", "{d}/afile/r.html"], "is a file", None),
    ("view max-mb 0", ["view", "{d}", "--max-mb", "0", "--out", "{d}/r1.html"], "max_mb must be > 0", "r1.html"),
    ("view max-mb below the code", ["view", "{d}", "--max-mb", "2", "--out", "{d}/r2.html"], "leaves no room", "r2.html"),
    ("view layers without projections", ["view", "{d}", "--layers", "1", "--out", "{d}/r3.html"], "no projections",
     "r3.html"),
    ("trace under a file", ["trace", "--model", "{model}", "--projections", "{proj}", "--prompt", "hi",
                            "--out", "{d}/afile/t.safetensors"], "is a file", None),
    ("recipe fractional keep", ["run", "{d}/recipe.yaml", "--set", "prune.keep=1.5"], "prune.keep", "run"),
    ("recipe sparsity 2", ["run", "{d}/recipe.yaml", "--set", "prune.sparsity=2"], "prune.sparsity", "run"),
    ("recipe missing model", ["run", "{d}/recipe.yaml", "--set", "model={d}/no-such-model"], "not found", "run"),
]


@pytest.mark.parametrize("name,argv,text,left", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, capsys, name, argv, text, left):
    argv = [a.format(**env) for a in argv]
    before = sorted(p.name for p in env["d"].iterdir())
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]  # (progress bars of loading aside)
    assert len(lines) == 1 and lines[0].startswith("neuroproj-prune: error: ") and text in lines[0], err[-800:]
    assert "Traceback" not in err
    if left:
        assert not (env["d"] / left).exists(), left
    after = sorted(p.name for p in env["d"].iterdir())
    assert after == before, set(after) ^ set(before)  # no temporary leftovers either


def test_strict_json_and_modes(tmp_path):
    """Results with NaN are refused rather than written as bare NaN; files come out with the umask's modes."""
    import os

    from neuroproj_prune.io import write_json

    with pytest.raises(npp.NeuroprojError, match="NaN"):
        write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists()
    write_json(tmp_path / "y.json", {"v": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "y.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert json.loads((tmp_path / "y.json").read_text()) == {"v": 1}


def test_stale_temporary_directory_is_removed(tiny_dir, tmp_path):
    """A temporary directory that a killed run left beside the output (its process is gone) is cleaned up by
    the next write there; one of a live process is left alone."""
    import os

    from neuroproj_prune.io import atomic_dir

    out = tmp_path / "ck"
    dead = tmp_path / ".ck.tmp-999999999-abc"
    live = tmp_path / f".ck.tmp-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x" and not dead.exists() and live.exists()
