"""The bad-input matrix: every class of hostile input, across the subcommands, gets exit 2, one line
`neuroproj-prune: error: …`, no traceback, and leaves no output behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

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
    _hostile_files(d, model, t, meta, tokenizer)
    return {"d": d, "model": model, "stats": str(st), "proj": str(d / "p.safetensors")}


def _edit_config(src, dst, **changes):
    """A copy of the model directory `src` whose config.json says `changes` (the weights unchanged)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))


def _hostile_files(d, model, t, meta, tokenizer):
    """The inputs of the classes below: models whose config disagrees with their weights, impossible statistics,
    clusterings of another model or with labels out of range, run directories the report must refuse."""
    # -- models checked against their weights (config.json edited; the weights are a 3-layer, width-64 tiny llama)
    two = d / "two-layers"
    tiny_model("llama", layers=2).save_pretrained(two)
    tokenizer.save_pretrained(two)
    _edit_config(two, d / "says3", num_hidden_layers=3)               # transformers would initialise layer 2
    _edit_config(Path(model), d / "says1", num_hidden_layers=1)       # it would drop layers 1 and 2
    _edit_config(Path(model), d / "width48", intermediate_size=48)
    _edit_config(Path(model), d / "hidden48", hidden_size=48)
    _edit_config(Path(model), d / "heads2", num_attention_heads=2)
    shutil.rmtree(two)
    pl = d / "perlayer"   # a per-layer-width checkpoint: its config has a neuroproj_prune section with widths
    npp.prune(model, str(C4), sparsity=0.4, samples=4, seqlen=32, multiple=1, allocation="global", out=pl,
              progress=False)
    section = json.loads((pl / "config.json").read_text())["neuroproj_prune"]
    widths = section["widths"]
    assert len(set(widths)) > 1
    edited = list(widths)
    i = widths.index(min(widths))
    edited[i] = max(widths)                                           # fits the config, not the tensors
    _edit_config(pl, d / "pl-edited", neuroproj_prune={"widths": edited})
    _edit_config(pl, d / "pl-strings", neuroproj_prune={"widths": [str(w) for w in widths]})
    shutil.rmtree(pl)
    (d / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01\x00")   # cut inside its header
    notok = d / "notok"                                               # weights and config, no tokenizer
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(model) / f, notok / f)
    # -- statistics no activations give
    neg = {k: (-v if k.endswith(".gram") else v) for k, v in t.items()}
    save_tensors(d / "neg.safetensors", neg, meta)                    # negative E[h²]
    rho = dict(t)
    G = t["layer.1.mlp.neurons.gram"].clone()
    G[0, 1] = G[1, 0] = 100 * (G[0, 0] + G[1, 1])                     # |rho| far above 1, diagonal intact
    rho["layer.1.mlp.neurons.gram"] = G
    save_tensors(d / "rho.safetensors", rho, meta)
    lacks = {k: v for k, v in t.items() if not k.startswith("layer.2.") and not k.startswith("cross.1.2")}
    save_tensors(d / "lacks.safetensors", lacks, meta)               # the header still lists layer 2
    pt, pmeta = load_tensors(d / "p.safetensors", "neuroproj-prune/projection/1", "projection", "project")
    pt = dict(pt)
    pt["layer.1.mlp.neurons"] = pt["layer.1.mlp.neurons"].clone()
    pt["layer.1.mlp.neurons"][3, 0] = float("nan")
    save_tensors(d / "pnan.safetensors", pt, pmeta)
    # -- clusterings: of another model (same shapes, other weights), with a label out of range
    other = d / "other"
    tiny_model("llama", seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    so = npp.collect(str(other), str(C4), samples=4, seqlen=32, progress=False)
    po = npp.project(so, mode="exact", dims=3, out=d / "p-other.safetensors", progress=False)
    npp.cluster(po, algo="kmeans", keep_fraction=0.5, out=d / "c-other.json")
    shutil.rmtree(other)
    c = json.loads((d / "c-other.json").read_text())
    c["layers"]["0"]["labels"][0] = 999
    (d / "c-labels.json").write_text(json.dumps(c))
    # -- run directories the report refuses: empty, NaN statistics beside projections, a damaged plan / eval
    for name in ("v-empty", "v-nan", "v-plan", "v-eval"):
        (d / name).mkdir()
    for name in ("v-nan", "v-plan", "v-eval"):
        shutil.copy(d / "p.safetensors", d / name / "projections.safetensors")
    shutil.copy(d / "nan.safetensors", d / "v-nan" / "stats.safetensors")
    (d / "v-plan" / "plan.json").write_text('{"format": "neuroproj-prune/plan/1", "layers": ')
    (d / "v-eval" / "eval.json").write_text("[1, 2]")


COMMON = ["--data", str(C4), "--samples", "4", "--seqlen", "32"]
EVAL = ["--data", str(WIKI), "--seqlen", "32", "--max-windows", "1"]

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
    # -- a model is checked against its weights before use (model/weights.py: config vs the tensors' headers)
    ("eval config says 3 layers, weights 2", ["eval", "--model", "{d}/says3", *EVAL], "says 3 layers", None),
    ("prune config says 1 layer, weights 3", ["prune", "--model", "{d}/says1", *COMMON, "--sparsity", "0.3",
                                              "--out", "{d}/o30"], "the weights hold 3", "o30"),
    ("eval config width 48, weights 64", ["eval", "--model", "{d}/width48", *EVAL], "weights hold 64", None),
    ("eval config hidden 48, weights 32", ["eval", "--model", "{d}/hidden48", *EVAL], "hidden size 48", None),
    ("eval config heads 2, weights 4", ["eval", "--model", "{d}/heads2", *EVAL], "head counts", None),
    ("prune disk config says 3 layers", ["prune", "--model", "{d}/says3", *COMMON, "--sparsity", "0.3", "--offload",
                                         "disk", "--out", "{d}/o31"], "says 3 layers", "o31"),
    ("eval edited per-layer widths", ["eval", "--model", "{d}/pl-edited", *EVAL], "neuroproj_prune section says",
     None),
    ("export per-layer widths not numbers", ["export", "{d}/pl-strings", "--to", "hf", "--out", "{d}/o32"],
     "widths must be 3 whole numbers", "o32"),
    ("recipe model disagrees with weights", ["run", "{d}/recipe.yaml", "--set", "model={d}/says1"], "says 1 layer",
     "run"),
    ("eval GGUF cut in its header", ["eval", "--model", "{d}/cut.gguf", *EVAL], "not a readable GGUF", None),
    # -- every file by its schema and physics (stats_file.Stats.validate, clustering.LayerClusters.check, ...)
    ("prune negative E[h2]", ["prune", "--model", "{model}", "--stats", "{d}/neg.safetensors", "--sparsity", "0.3",
                              "--out", "{d}/o33"], "negative E[h²]", "o33"),
    ("info |rho| above 1", ["info", "{d}/rho.safetensors"], "outside [-1, 1]", None),
    ("project layers the tensors lack", ["project", "{d}/lacks.safetensors", "--out", "{d}/o34"],
     "lists layer 2", "o34"),
    ("prune clusters of another model", ["prune", "--model", "{model}", *COMMON, "--clusters", "{d}/c-other.json",
                                         "--out", "{d}/o35"], "clustering was made for another model", "o35"),
    ("prune clusters label out of range", ["prune", "--model", "{model}", *COMMON, "--clusters", "{d}/c-labels.json",
                                           "--out", "{d}/o36"], "labels must lie in [-1, 32)", "o36"),
    ("heatmap projections of another model", ["heatmap", "{stats}", "--projections", "{d}/p-other.safetensors",
                                              "--layers", "0", "--out", "{d}/o53"], "made on another model", "o53"),
    ("trace projections of another model", ["trace", "--model", "{model}", "--projections", "{d}/p-other.safetensors",
                                            "--out", "{d}/o54"], "made on another model", "o54"),
    ("recipe is a directory", ["run", "{d}/busy"], "is a directory", None),
    ("collect data empty", ["collect", "--model", "{model}", "--data", "", "--out", "{d}/o55"], "the data is empty",
     "o55"),
    ("cluster NaN projections", ["cluster", "{d}/pnan.safetensors", "--out", "{d}/o52"], "NaN/inf points", "o52"),
    ("recipe binary", ["run", "{d}/binary.txt"], "not UTF-8", None),
    ("recipe --set not YAML", ["run", "{d}/recipe.yaml", "--set", "prune.sparsity=[0.2"], "not YAML", "run"),
    # -- NaN models, refused by every command when they load
    ("trace NaN model", ["trace", "--model", "{d}/nanmodel", "--projections", "{proj}", "--out", "{d}/o37"],
     "non-finite weights", "o37"),
    ("export NaN model", ["export", "{d}/nanmodel", "--to", "hf", "--out", "{d}/o38"], "non-finite weights", "o38"),
    # -- outputs: one check before any work (io.check_output), parents a failure made removed
    ("collect out is a directory", ["collect", "--model", "{model}", *COMMON, "--out", "{d}/busy"], "is a directory",
     None),
    ("eval json is a directory", ["eval", "--model", "{model}", *EVAL, "--json", "{d}/busy"], "is a directory", None),
    ("trace out is a directory", ["trace", "--model", "{model}", "--projections", "{proj}", "--out", "{d}/busy"],
     "is a directory", None),
    ("export gguf out is a directory", ["export", "{model}", "--to", "gguf", "--out", "{d}/busy"], "is a directory",
     None),
    ("prune out is a file", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--out", "{d}/afile"],
     "is a file", None),
    ("collect out empty", ["collect", "--model", "{model}", *COMMON, "--out", ""], "--out is empty", None),
    ("prune out empty with overwrite", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3", "--out", "",
                                        "--overwrite"], "--out is empty", None),
    ("eval json empty", ["eval", "--model", "{model}", *EVAL, "--json", ""], "--json is empty", None),
    ("sweep late failure, new parents", ["sweep", "--model", "{model}", *COMMON, "--eval-data", "{d}/no-such.txt",
                                         "--sparsities", "0.2", "--out", "{d}/new1/new2/sw"], "not found", "new1"),
    # -- the report refuses what it cannot show
    ("view empty directory", ["view", "{d}/v-empty", "--out", "{d}/r4.html"], "holds nothing", "r4.html"),
    ("view NaN statistics", ["view", "{d}/v-nan", "--out", "{d}/r5.html"], "NaN", "r5.html"),
    ("view damaged plan", ["view", "{d}/v-plan", "--out", "{d}/r6.html"], "plan", "r6.html"),
    ("view damaged eval", ["view", "{d}/v-eval", "--out", "{d}/r7.html"], "eval.json", "r7.html"),
    # -- messages that say what is wrong
    ("model is a text file", ["eval", "--model", "{d}/afile", *EVAL], "is a file, not a model", None),
    ("data is a directory", ["collect", "--model", "{model}", "--data", "{d}/busy", "--out", "{d}/o39"],
     "is a directory", "o39"),
    ("model empty", ["eval", "--model", "", *EVAL], "the model is empty", None),
    ("model without a tokenizer", ["eval", "--model", "{d}/notok", *EVAL], "has no tokenizer", None),
    # -- ranges that depend on the input, checked before the expensive work
    ("project dims above the points", ["project", "{stats}", "--dims", "64", "--out", "{d}/o40"], "64 neurons",
     "o40"),
    ("prune alloc-samples above the windows", ["prune", "--model", "{model}", *COMMON, "--sparsity", "0.3",
                                               "--allocation", "global", "--alloc-samples", "500", "--out", "{d}/o41"],
     "calibration has 4 windows", "o41"),
    ("trace past the context", ["trace", "--model", "{model}", "--projections", "{proj}", "--max-new-tokens", "600",
                                "--out", "{d}/o42"], "context of 512", "o42"),
    ("collect absent mps", ["collect", "--model", "{model}", *COMMON, "--device", "mps", "--out", "{d}/o43"], "MPS",
     "o43"),
    # -- options by their declared range (config.Config.validate) and conflicting ones named in pairs
    ("collect batch-size 0", ["collect", "--model", "{model}", *COMMON, "--batch-size", "0", "--out", "{d}/o44"],
     "batch_size must be at least 1", "o44"),
    ("project max-iter -1", ["project", "{stats}", "--max-iter", "-1", "--out", "{d}/o45"], "max_iter", "o45"),
    ("heatmap band 0", ["heatmap", "{stats}", "--band", "0", "--out", "{d}/o46"], "band must be", "o46"),
    ("trace top-p 2", ["trace", "--model", "{model}", "--projections", "{proj}", "--sample", "--top-p", "2",
                       "--out", "{d}/o47"], "top_p", "o47"),
    ("trace temperature 0", ["trace", "--model", "{model}", "--projections", "{proj}", "--sample", "--temperature",
                             "0", "--out", "{d}/o48"], "temperature", "o48"),
    ("project minibatch lr nan", ["project", "--mode", "minibatch", "--model", "{model}", *COMMON, "--lr", "nan",
                                  "--out", "{d}/o49"], "lr must be a finite number", "o49"),
    ("eval num-fewshot -1", ["eval", "--model", "{model}", "--tasks", "local_wikitext2", "--num-fewshot", "-1"],
     "num_fewshot", None),
    ("eval few-shot on zero-shot tasks", ["eval", "--model", "{model}", "--tasks", "zeroshot", "--num-fewshot", "2"],
     "no training split", None),
    ("eval max-windows 0", ["eval", "--model", "{model}", "--max-windows", "0"], "max_windows", None),
    ("sweep sparsities empty", ["sweep", "--model", "{model}", *COMMON, "--eval-data", str(WIKI), "--sparsities", "",
                                "--out", "{d}/o50"], "sparsities", "o50"),
    ("prune plan and sparsity", ["prune", "--model", "{model}", *COMMON, "--plan", "{d}/afile", "--sparsity", "0.3",
                                 "--out", "{d}/o51"], "--plan says which neurons", "o51"),
    # -- a recipe is validated whole, every stage, before the first one runs
    ("recipe unknown eval task", ["run", "{d}/recipe.yaml", "--set", "eval.tasks=nope"], "eval.tasks", "run"),
    ("recipe export type", ["run", "{d}/recipe.yaml", "--set", "export.enabled=true", "--set", "export.to=hf",
                            "--set", "export.type=q4_0"], "export.type", "run"),
    ("recipe heatmap layer out of range", ["run", "{d}/recipe.yaml", "--set", "heatmaps.layers=7"], "heatmaps.layers",
     "run"),
    ("recipe eval window past the context", ["run", "{d}/recipe.yaml", "--set", "eval.seqlen=4096"], "eval.seqlen",
     "run"),
    ("recipe trace past the context", ["run", "{d}/recipe.yaml", "--set", "trace.enabled=true", "--set",
                                       "trace.max_new_tokens=600"], "trace.max_new_tokens", "run"),
    ("recipe dims above the points", ["run", "{d}/recipe.yaml", "--set", "projection.dims=64"], "projection.dims",
     "run"),
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


# ----------------------------------------------------------------------------- valid inputs once refused
def test_sweep_select_is_a_comma_list(env, capsys):
    """`sweep --select wanda-sp,flap` (documented as a comma list) runs both selections: the sweep's own --select
    is not also read as the shared prune settings' --select."""
    out = env["d"] / "sweep-ok"
    argv = ["sweep", "--model", env["model"], *COMMON, "--eval-data", str(WIKI), "--sparsities", "0.25", "--select",
            "wanda-sp,flap", "--fold", "lstsq", "--eval-seqlen", "32", "--max-windows", "1", "--out", str(out)]
    try:
        assert main(argv) == 0, capsys.readouterr().err[-800:]
        text = (out / "results.csv").read_text()
        assert "wanda-sp" in text and "flap" in text
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_recipe_without_heatmaps_section(env, capsys):
    """A recipe without a `heatmaps` section (the shipped quality recipe has none) draws the default layers
    "0,-1": the first and the last, negative indices counting from the end."""
    out = env["d"] / "run-heat"
    overrides = [f"output_dir={out}", "projection.enabled=false", "clustering.enabled=false", "prune.enabled=false",
                 "eval.enabled=false", "report.enabled=false"]
    try:
        assert main(["run", str(env["d"] / "recipe.yaml"), *[x for o in overrides for x in ("--set", o)]]) == 0, \
            capsys.readouterr().err[-800:]
        pictures = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
        assert pictures and {p.split("-")[0] for p in pictures} == {"layer0", "layer2"}, pictures
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------- files a command resumes from
def test_truncated_recover_state_is_refused(env, tmp_path, capsys):
    """A recover state whose files were cut (a full disk, a copy interrupted) is one error before training, never a
    traceback from torch or safetensors; --overwrite starts over instead of reading it."""
    from neuroproj_prune.recover.distill import STATE_DIR

    pruned = tmp_path / "pruned"
    npp.prune(env["model"], str(C4), sparsity=0.5, samples=4, seqlen=32, multiple=1, out=pruned, progress=False)
    out = tmp_path / "rec"
    cfg = dict(tokens=6 * 64, seqlen=32, batch_size=2, grad_accum=1, eval_windows=2, eval_every=0, save_every=1)

    def stop(step, record, model):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        npp.recover(pruned, str(C4), out, progress=False, callback=stop, **cfg)
    state = out / STATE_DIR
    files = sorted(p for p in state.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pkl"))
    assert files, sorted(state.rglob("*"))
    argv = ["recover", str(pruned), "--data", str(C4), "--out", str(out), "--quiet",
            *[x for k, v in cfg.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    for f in files:
        whole = f.read_bytes()
        f.write_bytes(whole[: len(whole) // 2])
        capsys.readouterr()
        assert main(argv) == 2, f
        err = capsys.readouterr().err
        assert "neuroproj-prune: error: " in err and "damaged or truncated" in err and "Traceback" not in err, err
        f.write_bytes(whole)
    assert (state / "progress.json").is_file()   # refused, not removed: the user decides


def test_read_only_task_cache(tmp_path, monkeypatch):
    """A task cache that cannot be written (a read-only shared copy) is read in place: the task YAMLs it would
    refresh go to a private folder. A cache that fetch must write, and cannot, is refused before the download."""
    from neuroproj_prune.evaluate import tasks as T
    from neuroproj_prune.io import check_output, file_sha256

    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    entries = {}
    for name in T.TASKS:
        f = cache / "data" / f"{name}.jsonl"
        f.write_text('{"x": 1}\n')
        entries[name] = {"file": f"data/{name}.jsonl", "sha256": file_sha256(f), "docs": 1}
    (cache / "manifest.json").write_text(json.dumps({"format": T.FORMAT, "tasks": entries}))
    real = T.write_text

    def read_only(path, text):   # what atomic_write says where the cache cannot be written
        if str(path).startswith(str(cache)):
            raise npp.NeuroprojError(f"cannot write {path}: Permission denied")
        return real(path, text)

    monkeypatch.setattr(T, "write_text", read_only)
    d = T.yaml_dir(cache)
    assert not str(d).startswith(str(cache)) and sorted(p.stem for p in d.glob("*.yaml")) == sorted(T.TASKS)
    assert not (cache / "lm_eval").exists()
    monkeypatch.setattr("neuroproj_prune.io.os.access", lambda p, mode: False)
    with pytest.raises(npp.NeuroprojError, match="not writable"):
        check_output(cache, "dir", into=True, flag="--cache")


def test_writes_that_fail_are_one_error(tmp_path, monkeypatch):
    """A file that cannot be written (permissions, a read-only filesystem) or a directory in its place at the last
    moment is a NeuroprojError, never an OSError traceback, and leaves no temporary file."""
    from neuroproj_prune.io import write_text

    (tmp_path / "dir").mkdir()
    with pytest.raises(npp.NeuroprojError, match="is a directory"):
        write_text(tmp_path / "dir", "x")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("neuroproj_prune.io.tempfile.mkstemp", denied)
    with pytest.raises(npp.NeuroprojError, match="Permission denied"):
        write_text(tmp_path / "x.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_api_refuses_conflicting_settings(env):
    """The API, like the CLI, names the pair: a plan (or clustering) gives the kept sets, a sparsity would choose them
    too; nothing is read or loaded before the refusal."""
    for given in ({"plan_file": "no-such-plan.json"}, {"clusters": "no-such-clusters.json"}):
        with pytest.raises(npp.NeuroprojError, match="sparsity chooses them too"):
            npp.prune(env["model"], str(C4), sparsity=0.3, progress=False, **given)
