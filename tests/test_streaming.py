"""Streaming the sequential pass (`offload cpu|disk`) and running it on several processes (issue 17): the
checkpoint of the plain path, bit for bit; disk streaming's peak memory within its formula; two processes
(gloo under `accelerate launch`) give the checkpoint of one."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neuroproj_prune as npp
from neuroproj_prune import cli
from neuroproj_prune.model import save_streamed
from neuroproj_prune.model import load_model
from neuroproj_prune.prune.offload import Geometry, Placement, choose_placement, memory_needs, open_disk

from conftest import SHAKESPEARE, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _ids(n=8, T=32, seed=0):
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))


def _save(model, tokenizer, d: Path) -> Path:
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


# (name, family, model keyword arguments, config changes, prune settings)
VARIANTS = [
    ("llama", "llama", {}, {}, {}),
    ("llama tied, residual target", "llama", {}, {"tie_word_embeddings": True}, {"target": "residual"}),
    ("llama bias fold (declared mlp_bias)", "llama", {}, {}, {"fold": "bias", "select": "flap"}),
    ("gpt2 (Conv1D, tied)", "gpt2", {}, {}, {"target": "dense"}),
    ("gpt_neox (embed_out renamed on save)", "gpt_neox", {}, {}, {}),
]


@pytest.mark.parametrize("name,family,kw,changes,settings", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_streamed_prune_is_bit_identical(name, family, kw, changes, settings, tokenizer, tmp_path):
    """offload cpu and disk (forced on the CPU) write the checkpoint offload none writes: the same files byte for
    byte (weights, config, plan), the same tensors and logits, and leave no scratch files behind."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(family, **kw)
    cfg.initializer_range = 0.2
    for k, v in changes.items():
        setattr(cfg, k, v)
    d = _save(AutoModelForCausalLM.from_config(cfg).eval(), tokenizer, tmp_path / "dense")
    ids, held = _ids(), _ids(n=2, seed=1)
    runs = {}
    for off in ("none", "cpu", "disk"):
        out = tmp_path / off
        lm, plan, summary = npp.prune(str(d), ids, sparsity=0.25, multiple=8, offload=off, out=out, device="cpu",
                                      progress=False, **settings)
        assert summary["offload"]["mode"] == off
        runs[off] = (lm, plan, out)
    ref_lm, ref_plan, ref_out = runs["none"]
    ref_logits = _logits(ref_lm.model, held)
    files = sorted(p.name for p in ref_out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    for off in ("cpu", "disk"):
        lm, plan, out = runs[off]
        assert sorted(p.name for p in out.iterdir()) == files
        for f in files:
            if f not in ("prune_summary.json", "README.md"):   # they record the offload (the command), the seconds
                assert (out / f).read_bytes() == (ref_out / f).read_bytes(), (off, f)
        a, b = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), off
        assert plan.layers == ref_plan.layers and plan.meta["fingerprint"] == ref_plan.meta["fingerprint"]
        again = npp.load_model(str(out), device="cpu").model   # plain from_pretrained, or load_pruned
        assert torch.equal(_logits(again, held), ref_logits), off
    assert torch.equal(_logits(runs["cpu"][0].model, held), ref_logits)   # on a CPU, cpu streaming moves nothing
    assert all(p.device.type == "meta" for p in runs["disk"][0].adapter.layers(runs["disk"][0].model).parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu", "dense", "disk", "none"]   # no scratch left


def test_sharded_checkpoint_is_written_like_save_pretrained(tiny_dir, tmp_path):
    """Layers streamed through a disk stream and written back (no pruning) with shards of 40 kB: the same shard
    files and index as save_pretrained writes for the model loaded whole."""
    d = tiny_dir("llama")
    whole = load_model(str(d), device="cpu").model
    whole.save_pretrained(tmp_path / "ref", max_shard_size="40kB")
    dev = torch.device("cpu")
    lm, stream = open_disk(str(d), d, torch.float32, Placement("disk", dev, dev), tmp_path / "out")
    try:
        for i in range(len(stream.layers)):
            stream.fetch(i)
            stream.release(i)
        (tmp_path / "out").mkdir()
        save_streamed(lm.model, tmp_path / "out", stream.stored, max_shard_size="40kB")
    finally:
        stream.close()
    ref = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert len([f for f in ref if f.endswith(".safetensors")]) > 2 and "model.safetensors.index.json" in ref
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ref
    for f in ref:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]   # the stream's scratch is gone


def test_auto_placement_follows_the_formula():
    """auto keeps a model that fits as it is, streams one that cannot fit from disk, says so when nothing fits;
    the hidden states' bytes are the formula's (k·T·d·b)."""
    small = Geometry(model=4 << 20, layers=[1 << 20] * 3, hidden=64, width=256, elem=4, additive=True)
    huge = Geometry(model=(1 << 40) + (4 << 20), layers=[64 << 20] * (1 << 14), hidden=64, width=256, elem=4,
                    additive=True)   # 1 TiB in layers of 64 MiB
    cpu = torch.device("cpu")
    kw = dict(tokens=4096, batch_tokens=512, device=cpu)
    p = choose_placement("auto", small, **kw)
    assert (p.mode, p.buffers) == ("none", cpu) and p.device_bytes > small.model
    p = choose_placement("auto", huge, **kw)
    assert p.mode == "disk" and p.fits and "(not none" in p.reason and p.device_bytes < huge.model
    p = choose_placement("auto", huge, disk_ok=False, **kw)
    assert p.mode == "none" and not p.fits and "nothing fits" in p.reason
    assert choose_placement("cpu", small, **kw).mode == "cpu"                      # explicit modes are kept
    n = memory_needs(small, 4096, 512, dense_target=True)
    assert n["H"] == 3 * 4096 * 64 * 4 and n["A"] == 4096 * 256 * 4 and n["l"] == 1 << 20


# ------------------------------------------------------------------------------------------ peak memory
PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import neuroproj_prune as npp

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    model, warm, offload, out = sys.argv[1:5]
    ids = torch.randint(0, 384, (4, 128), generator=torch.Generator().manual_seed(0))
    # the same prune of a tiny model first: lazy imports and one-time kernel set-up happen before the baseline
    npp.prune(warm, ids, sparsity=0.25, offload=offload, out=out + "-warm", device="cpu", progress=False)
    base = status("VmRSS")
    _, _, s = npp.prune(model, ids, sparsity=0.25, offload=offload, out=out, device="cpu", progress=False)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "offload": s["offload"]}))
""")


def test_disk_offload_peak_memory_within_formula(tiny_dir, tokenizer, tmp_path):
    """A 10-layer model of 223 MiB (layers of 23 MiB) pruned with offload disk: the process's peak resident memory
    above its baseline stays within the formula's S + 2ℓ + M + B + F + H + A (well under the model's size), while
    offload none peaks above the model's size. Measured in a fresh process by VmHWM (ru_maxrss would count the
    forked parent's pages). glibc's mmap threshold is fixed at 64 kB: by default it grows with freed blocks up to
    32 MB, so the tiny model's 4 MB tensors would stay cached in the heap after release (inflating the peak by the
    allocator's caching, not by what the prune holds); an 8B model's tensors (≥ 32 MB) are returned anyway."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", layers=10, hidden=1024, inter=512)
    cfg.num_attention_heads = cfg.num_key_value_heads = 8
    cfg.head_dim = 128
    model = AutoModelForCausalLM.from_config(cfg)
    P = sum(p.numel() * p.element_size() for p in model.parameters())
    d = _save(model, tokenizer, tmp_path / "big")
    del model
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    got = {}
    for off in ("disk", "none"):
        r = subprocess.run([sys.executable, str(script), str(d), str(tiny_dir("llama")), off, str(tmp_path / off)],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        got[off] = json.loads(r.stdout.strip().splitlines()[-1])
    disk, none = got["disk"], got["none"]
    bound = disk["offload"]["device_bytes"] + disk["offload"]["host_bytes"]   # on a CPU: one memory
    rise = {k: (v["peak"] - v["base"]) / 2**20 for k, v in got.items()}
    print(f"model {P / 2**20:.0f} MiB; peak above baseline: disk {rise['disk']:.0f} MiB (formula {bound / 2**20:.0f} "
          f"MiB), none {rise['none']:.0f} MiB")
    assert bound < 0.7 * P                                   # the bound says something at this size
    assert disk["peak"] - disk["base"] <= bound, rise
    assert none["peak"] - none["base"] >= P, rise            # the measurement sees a whole model
    a, b = load_file(tmp_path / "none" / "model.safetensors"), load_file(tmp_path / "disk" / "model.safetensors")
    # the same plan (every sliced tensor bit for bit); the refitted output projections within float32 rounding:
    # logged in both runs, the fold's inputs (W, G, kept set, C, ridge) were identical bit for bit and its float64
    # Cholesky solve still differed in the last bits from layer 3 on (LAPACK on operands at other addresses), which
    # float32 rounding shows now and then
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) or ("down_proj" in k and torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6)), k


# -------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, tests/accelerate_cpu2.yaml; the second also streams from
    disk) prunes to the checkpoint of one process: the same kept sets, weights within 1e-6 (float64, target
    residual: the Gram, sums, counts and cross-moments are all-reduced; 3 batches, shared 2 + 1), written once."""
    model_dir = tiny_dir("llama", dtype=torch.float64)
    args = ["prune", "--model", str(model_dir), "--data", str(SHAKESPEARE), "--samples", "6", "--seqlen", "32",
            "--batch-size", "2", "--dtype", "float64", "--device", "cpu", "--sparsity", "0.25", "--multiple", "8",
            "--target", "residual"]
    one, two = tmp_path / "one", tmp_path / "runs" / "two"
    assert cli.main(args + ["--offload", "none", "--out", str(one)]) == 0

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [accelerate, "launch", "--config_file", str(REPO / "tests" / "accelerate_cpu2.yaml"),
           "--main_process_port", str(_free_port()), "-m", "neuroproj_prune.cli",
           *args, "--offload", "disk", "--out", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("pruned ") == 1                   # rank 0 reports
    assert [p.name for p in two.parent.iterdir()] == ["two"]   # written once, no scratch left

    plan1, plan2 = (json.loads((d / "plan.json").read_text()) for d in (one, two))
    assert plan1["layers"] == plan2["layers"]               # kept sets (and representatives)
    s1, s2 = (json.loads((d / "prune_summary.json").read_text()) for d in (one, two))
    assert s1["kept"] == s2["kept"] and s2["offload"]["mode"] == "disk"
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float64 and (a[k] - b[k]).abs().max() <= 1e-6, k
    assert (one / "config.json").read_text() == (two / "config.json").read_text()


# ------------------------------------------------------------------------------------------ refusals
def test_refusals(tiny_dir, tmp_path, tokenizer):
    """Streaming what cannot be streamed is one clear error before any work (the CLI cases are in
    tests/test_bad_input.py)."""
    d = str(tiny_dir("llama"))
    lm = load_model(d, device="cpu")
    with pytest.raises(npp.NeuroprojError, match="not a loaded model"):
        npp.prune(lm, _ids(), sparsity=0.25, offload="disk", out=tmp_path / "o", progress=False)
    with pytest.raises(npp.NeuroprojError, match="output directory"):
        npp.prune(d, _ids(), sparsity=0.25, offload="disk", progress=False)
    with pytest.raises(npp.NeuroprojError, match="allocation global"):
        npp.prune(d, _ids(), sparsity=0.25, offload="cpu", allocation="global", progress=False)
    with pytest.raises(npp.NeuroprojError, match="calibration sequential"):
        npp.prune(d, None, sparsity=0.25, offload="disk", calibration="oneshot", progress=False)
    with pytest.raises(npp.NeuroprojError, match="unknown offload 'gpu'"):
        npp.PruneConfig.make(offload="gpu")
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
