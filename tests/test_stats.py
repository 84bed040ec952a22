"""Exact streaming statistics (issue 2, "Must show"): agreement with numpy on independently captured
activations for every family, padding, two processes under `accelerate launch`, the real SmolLM2, and
one-line errors for bad input.

The reference activations are captured here with our own hooks on modules named per family (not through
`neuroproj_prune`'s adapters or ActivationCapture), on a full `model(input_ids)` forward pass.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune import cli
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.model import LoadedModel, model_fingerprint

from conftest import C4, FAMILIES, REPO, SHAKESPEARE, gqa_llama, tiny_model

SITES = ("mlp.neurons", "mlp.out", "attn.out")
GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")


# ---------------------------------------------------------------------------------------- references
def _modules(model, family, i):
    """(output projection, MLP block, attention block) of layer i, by module name, per family."""
    if family in GATED:
        layer = model.model.layers[i]
        return layer.mlp.down_proj, layer.mlp, layer.self_attn
    if family == "gpt2":
        layer = model.transformer.h[i]
        return layer.mlp.c_proj, layer.mlp, layer.attn
    if family == "opt":  # no MLP module: the MLP's output is fc2's output
        layer = model.model.decoder.layers[i]
        return layer.fc2, layer.fc2, layer.self_attn
    if family == "gpt_neox":
        layer = model.gpt_neox.layers[i]
        return layer.mlp.dense_4h_to_h, layer.mlp, layer.attention
    raise ValueError(family)


def reference_activations(model, family, ids: torch.Tensor) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, site): (tokens, width) float64 array} from plain hooks on a full forward pass."""
    acts: dict[tuple[int, str], list] = {}

    def keep(i, site, h):
        h = h[0] if isinstance(h, tuple) else h
        acts.setdefault((i, site), []).append(h.detach().reshape(-1, h.shape[-1]).double().numpy().copy())

    handles = []
    for i in range(model.config.num_hidden_layers):
        out_proj, mlp, attn = _modules(model, family, i)
        handles.append(out_proj.register_forward_pre_hook(lambda m, a, i=i: keep(i, "mlp.neurons", a[0])))
        handles.append(mlp.register_forward_hook(lambda m, a, o, i=i: keep(i, "mlp.out", o)))
        handles.append(attn.register_forward_hook(lambda m, a, o, i=i: keep(i, "attn.out", o)))
    try:
        with torch.no_grad():
            for row in ids:   # one sequence at a time: no padding, no batching in the reference
                model(input_ids=row[None])
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in acts.items()}


def rel(a, b) -> float:
    """max |a − b| / max |b| (relative in the max norm; entry-wise relative error is meaningless near 0)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def loaded(model, name="tiny"):
    return LoadedModel(model, None, name, model_fingerprint(model))


def random_ids(rows, cols, seed=1):
    return torch.randint(1, 384, (rows, cols), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ exactness, every family
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_numpy_every_family(family):
    """Mean, covariance, correlation (np.corrcoef) and cross-layer covariance/correlation, all three sites,
    to 1e-10 relative in float64; three batches (the last partial) so the shift and accumulation matter."""
    model = tiny_model(family, dtype=torch.float64)
    ids = random_ids(7, 24)
    st = npp.collect(loaded(model), ids, sites=",".join(SITES), cross_layer_window=2, batch_size=3, progress=False)
    ref = reference_activations(model, family, ids)
    L = model.config.num_hidden_layers
    assert st.layers == list(range(L)) and st.sites == list(SITES)
    assert st.cross_pairs == [(0, 1), (0, 2), (1, 2)]
    for i in range(L):
        for site in SITES:
            h = ref[(i, site)]
            assert st.count(i, site) == h.shape[0] == 7 * 24
            assert st.width(i, site) == h.shape[1]
            assert not st.dead(i, site).any()
            assert rel(st.mean(i, site), h.mean(0)) < 1e-10, (i, site)
            assert rel(st.covariance(i, site), np.cov(h.T, bias=True)) < 1e-10, (i, site)
            assert rel(st.correlation(i, site), np.corrcoef(h.T)) < 1e-10, (i, site)
            assert rel(st.second_moment(i, site), h.T @ h / h.shape[0]) < 1e-10, (i, site)
    for l, m in st.cross_pairs:
        hl, hm = ref[(l, "mlp.neurons")], ref[(m, "mlp.neurons")]
        Nl = hl.shape[1]
        assert rel(st.cross_covariance(l, m), np.cov(hl.T, hm.T, bias=True)[:Nl, Nl:]) < 1e-10, (l, m)
        assert rel(st.cross_correlation(l, m), np.corrcoef(hl.T, hm.T)[:Nl, Nl:]) < 1e-10, (l, m)


def test_head_site_matches_numpy_gqa(tmp_path):
    """Site attn.heads (the input of o_proj) on a grouped-query llama: count, mean, covariance, correlation and
    E[z zᵀ] equal numpy's on activations taken by a hook of this test's own on `self_attn.o_proj`, to 1e-10 in
    float64, batched with left padding (padding excluded); the header's layout (head_dim 8, 6 heads in 2 groups
    per layer) survives a save, and it is the model's: with the value rows of key/value head 1 zeroed in layer 2,
    exactly the channels of query heads 3-5 (head c // 8, group head // 3) are dead there."""
    model = gqa_llama(dtype=torch.float64)
    seqs = [random_ids(1, n, seed=n)[0].tolist() for n in (24, 17, 24, 9, 20)]
    out = tmp_path / "s.safetensors"
    st = npp.collect(loaded(model), seqs, sites="mlp.neurons,attn.heads", batch_size=2, padding_side="left",
                     out=out, progress=False)
    ref: dict[int, list] = {}
    hs = [model.model.layers[i].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a, i=i: ref.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).double().numpy().copy()))
        for i in range(4)]
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s]))
    finally:
        for h in hs:
            h.remove()
    back = npp.load_stats(out)
    assert back.sites == ["mlp.neurons", "attn.heads"]
    assert back.head_layout == {"head_dim": 8, "heads": [6] * 4, "kv_heads": [2] * 4}
    for i in range(4):
        z = np.concatenate(ref[i])
        assert z.shape == (sum(map(len, seqs)), 48) and back.count(i, "attn.heads") == z.shape[0]
        assert back.width(i, "attn.heads") == 48 and not back.dead(i, "attn.heads").any()
        assert rel(back.mean(i, "attn.heads"), z.mean(0)) < 1e-10, i
        assert rel(back.covariance(i, "attn.heads"), np.cov(z.T, bias=True)) < 1e-10, i
        assert rel(back.correlation(i, "attn.heads"), np.corrcoef(z.T)) < 1e-10, i
        assert rel(back.second_moment(i, "attn.heads"), z.T @ z / z.shape[0]) < 1e-10, i
    # the layout says which channels a key/value head feeds: silence kv head 1 of layer 2
    model.model.layers[2].self_attn.v_proj.weight[8:16] = 0
    dead = npp.collect(loaded(model), random_ids(3, 16), sites="attn.heads", layers="2", progress=False)
    lay = dead.head_layout
    group = (np.arange(48) // lay["head_dim"]) // (lay["heads"][2] // lay["kv_heads"][2])
    assert dead.dead(2, "attn.heads").numpy().tolist() == (group == 1).tolist()


@pytest.mark.parametrize("family", ["gpt2", "phi3"])
def test_head_site_refused_where_heads_are_unknown(capsys, tmp_path, tiny_dir, family):
    """A family whose adapter refuses heads (gpt2 has no head layout; phi3 fuses q/k/v): collect's site attn.heads is
    one error naming the site, exit 2, no file; the API refuses the same before any forward pass."""
    out = tmp_path / "s.safetensors"
    msg = _fails(capsys, _collect_args(tiny_dir(family), SHAKESPEARE, out, "--sites", "mlp.neurons,attn.heads"),
                 "site attn.heads is not supported for", out)
    assert family in msg
    with pytest.raises(NeuroprojError, match="attn.heads"):
        npp.collect(loaded(tiny_model(family)), random_ids(2, 8), sites="attn.heads", progress=False)


def test_layer_subset_and_file_roundtrip(tmp_path):
    """--layers collects only those layers; the saved file reloads with the same moments and metadata."""
    model = tiny_model("llama", dtype=torch.float64)
    ids = random_ids(4, 16)
    out = tmp_path / "s.safetensors"
    st = npp.collect(loaded(model), ids, layers="0,2", sites="mlp.neurons,attn.out", cross_layer_window=2,
                     out=out, progress=False)
    assert st.layers == [0, 2] and st.cross_pairs == [(0, 2)]
    back = npp.load_stats(out)
    assert back.meta["layers"] == [0, 2] and back.meta["tokens"] == 64 and back.meta["format"] == st.meta["format"]
    for i in (0, 2):
        assert torch.equal(back.correlation(i), st.correlation(i))
        assert torch.equal(back.mean(i, "attn.out"), st.mean(i, "attn.out"))
    assert torch.equal(back.cross_covariance(0, 2), st.cross_covariance(0, 2))
    ref = reference_activations(model, "llama", ids)
    assert rel(back.correlation(2), np.corrcoef(ref[(2, "mlp.neurons")].T)) < 1e-10
    with pytest.raises(NeuroprojError, match="no layer 1"):
        back.correlation(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]   # no temporary file left


def test_dead_neurons_flagged():
    """A neuron whose gate and up rows are zero never fires: flagged dead, correlation row and column 0,
    diagonal 0 there and 1 elsewhere."""
    model = tiny_model("llama", dtype=torch.float64)
    mlp = model.model.layers[1].mlp
    mlp.gate_proj.weight[5] = 0
    mlp.up_proj.weight[5] = 0
    st = npp.collect(loaded(model), random_ids(3, 16), progress=False)
    dead = st.dead(1)
    assert dead.tolist() == [j == 5 for j in range(64)]
    rho = st.correlation(1)
    assert (rho[5] == 0).all() and (rho[:, 5] == 0).all()
    assert rho.diagonal().tolist() == [0.0 if j == 5 else 1.0 for j in range(64)]
    assert not st.dead(0).any()


# ------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_left_and_right_equal_unpadded(family):
    """Unequal sequences padded left or right in batches give the statistics of the sequences run alone."""
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 384, (n,), generator=g) for n in (19, 5, 12, 16, 3, 9)]
    kw = dict(sites=",".join(SITES), cross_layer_window=1, compute_dtype="float32", progress=False)
    for side in ("left", "right"):
        dtype, tol = torch.float64, 1e-10
        if family == "gemma2":
            # transformers' eager attention (gemma2's default, for logit soft-capping) takes its softmax in
            # float32 even for a float64 model: padded key rows change float32 rounding (~1e-8 here).
            tol = 1e-6
        if family == "gemma2" and side == "left":
            # ... and it casts the float64 mask value finfo(float64).min to float32: -inf, so a left-pad
            # query row that sees only padding is NaN, and 0·NaN carries it into real tokens at the next
            # layer. The statistics refuse that with a clear error; in float32 left padding works.
            with pytest.raises(NeuroprojError, match="non-finite activations"):
                npp.collect(loaded(tiny_model(family, dtype=torch.float64)), seqs, batch_size=4,
                            padding_side=side, **kw)
            dtype, tol = torch.float32, 1e-5
        lm = loaded(tiny_model(family, dtype=dtype))
        alone = npp.collect(lm, seqs, batch_size=1, **kw)     # batches of one: no padding at all
        assert alone.count(0) == sum(len(s) for s in seqs)
        padded = npp.collect(lm, seqs, batch_size=4, padding_side=side, **kw)
        for i in padded.layers:
            for site in SITES:
                assert padded.count(i, site) == alone.count(i, site)
                assert rel(padded.mean(i, site), alone.mean(i, site)) < tol, (side, i, site)
                assert rel(padded.covariance(i, site), alone.covariance(i, site)) < tol, (side, i, site)
                assert rel(padded.correlation(i, site), alone.correlation(i, site)) < tol, (side, i, site)
        for l, m in padded.cross_pairs:
            assert rel(padded.cross_covariance(l, m), alone.cross_covariance(l, m)) < tol, (side, l, m)


# ------------------------------------------------------------------------------------ two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_equal_one(tiny_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, config tests/accelerate_cpu2.yaml) gives the totals of
    one process to 1e-12 relative, and the file is written once, by rank 0."""
    model_dir = tiny_dir("llama", dtype=torch.float64)
    args = ["collect", "--model", str(model_dir), "--data", str(SHAKESPEARE), "--samples", "5", "--seqlen", "32",
            "--batch-size", "2", "--dtype", "float64", "--device", "auto", "--sites", ",".join(SITES),
            "--cross-layer-window", "2"]
    one, two_dir = tmp_path / "one.safetensors", tmp_path / "two"
    two_dir.mkdir()
    two = two_dir / "stats.safetensors"
    assert cli.main(args + ["--out", str(one)]) == 0

    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is not installed"
    log = tmp_path / "saves.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", NPP_SAVE_LOG=str(log),
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [accelerate, "launch", "--config_file", str(REPO / "tests" / "accelerate_cpu2.yaml"),
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "dist_collect.py"),
           *args, "--out", str(two)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    saves = log.read_text().splitlines()
    assert saves == [f"0 {two}"], saves                   # written once, by rank 0
    assert [p.name for p in two_dir.iterdir()] == ["stats.safetensors"]
    a, b = npp.load_stats(one), npp.load_stats(two)
    assert a.meta["processes"] == 1 and b.meta["processes"] == 2
    assert a.meta["tokens"] == b.meta["tokens"] == 160
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    assert sorted(a._t) == sorted(b._t)
    for key in a._t:
        if key.endswith(".count"):
            assert torch.equal(a._t[key], b._t[key]), key
        else:
            assert rel(b._t[key], a._t[key]) < 1e-12, key   # shift, sum, gram, cross blocks
    for i in a.layers:
        for site in SITES:
            assert rel(b.correlation(i, site), a.correlation(i, site)) < 1e-12
            assert rel(b.mean(i, site), a.mean(i, site)) < 1e-12


# -------------------------------------------------------------------------------------- real SmolLM2
@pytest.mark.slow
def test_smollm2_alias_collect_c4(smollm2, tmp_path):
    """SmolLM2-135M through the alias; 16×256 tokens of C4: symmetric correlations, unit diagonal except
    dead neurons, within [-1, 1]."""
    m = smollm2.model
    assert smollm2.spec == "smollm2-135m" and m.config.model_type == "llama"
    ad = npp.adapter_for(m)
    assert ad.num_layers(m) == 30 and ad.width(m, 0) == 1536 and ad.hidden_size(m) == 576
    out = tmp_path / "smollm2.safetensors"
    npp.collect(smollm2, str(C4), samples=16, seqlen=256, out=out, progress=False)
    st = npp.load_stats(out)
    st.check_model(smollm2)
    assert st.meta["tokens"] == 16 * 256 and st.meta["model"] == "smollm2-135m"
    assert st.layers == list(range(30))
    for i in st.layers:
        rho, dead = st.correlation(i), st.dead(i)
        assert rho.shape == (1536, 1536) and rho.dtype == torch.float64
        assert torch.isfinite(rho).all()
        assert torch.equal(rho, rho.T), i
        assert torch.equal(rho.diagonal(), (~dead).double()), i
        assert rho.abs().max() <= 1.0
        assert (rho[dead] == 0).all()
        assert dead.sum() < 1536 // 2
        assert torch.isfinite(st.mean(i)).all()


# ------------------------------------------------------------------------------------------ bad input
def _fails(capsys, argv, match: str, out: Path | None = None):
    """The CLI exits 2 with exactly one `neuroproj-prune: error: ...` line and leaves no output file."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("neuroproj-prune:")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("neuroproj-prune: error: "), err
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]   # no temp file
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "empty.jsonl").write_text("\n")
    (d / "short.txt").write_text("To be, or not to be, that is the question.\n")
    from transformers import BloomConfig

    BloomConfig(vocab_size=384, hidden_size=32, n_layer=2, n_head=4).save_pretrained(d / "bloom")
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64))
    return d


def _collect_args(model, data, out, *extra):
    return ["collect", "--model", model, "--data", data, "--samples", "4", "--seqlen", "32", "--out", out, *extra]


def test_error_unknown_model_path(capsys, tmp_path, tiny_dir):
    out = tmp_path / "s.safetensors"
    _fails(capsys, _collect_args(tmp_path / "no-such-model", SHAKESPEARE, out), "not found", out)
    (tmp_path / "not-a-model").mkdir()
    _fails(capsys, _collect_args(tmp_path / "not-a-model", SHAKESPEARE, out), "without config.json", out)
    _fails(capsys, _collect_args(tmp_path / "missing.gguf", SHAKESPEARE, out), "not found", out)


def test_error_unsupported_architecture(capsys, tmp_path, bad_inputs):
    out = tmp_path / "s.safetensors"
    msg = _fails(capsys, _collect_args(bad_inputs / "bloom", SHAKESPEARE, out), "unsupported architecture", out)
    assert "'bloom'" in msg and "llama" in msg and "gpt_neox" in msg


def test_error_bad_data(capsys, tmp_path, tiny_dir, bad_inputs):
    model, out = tiny_dir("llama"), tmp_path / "s.safetensors"
    _fails(capsys, _collect_args(model, bad_inputs / "empty.txt", out), "holds no text", out)
    _fails(capsys, _collect_args(model, bad_inputs / "empty.jsonl", out), "holds no text", out)
    _fails(capsys, _collect_args(model, tmp_path / "missing.txt", out), "not found", out)
    msg = _fails(capsys, _collect_args(model, bad_inputs / "short.txt", out), "too few", out)
    assert "128 needed" in msg                                          # 4 samples x 32 tokens
    _fails(capsys, _collect_args(model, SHAKESPEARE, out, "--seqlen", "1024"),
           "exceeds the model's context of 512", out)
    _fails(capsys, _collect_args(model, SHAKESPEARE, out, "--layers", "0-7"), "out of range", out)
    _fails(capsys, _collect_args(model, SHAKESPEARE, out, "--sites", "mlp.bogus"), "unknown site", out)
    _fails(capsys, _collect_args(model, SHAKESPEARE, out, "--max-memory-gb", "1e-6"), "GiB", out)


def test_error_stats_file_mismatch_and_corrupt(capsys, tmp_path, tiny_dir, bad_inputs):
    model, other = tiny_dir("llama"), tiny_dir("llama", seed=1)
    stats = tmp_path / "s.safetensors"
    assert cli.main(_collect_args(str(model), str(SHAKESPEARE), str(stats))) == 0
    capsys.readouterr()
    assert cli.main(["info", str(stats), "--model", str(model)]) == 0
    assert "matches the model: yes" in capsys.readouterr().out
    _fails(capsys, ["info", stats, "--model", other], "re-run collect on this model")
    _fails(capsys, ["info", bad_inputs / "corrupt.safetensors"], "not a readable statistics file")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(stats.read_bytes()[: stats.stat().st_size // 2])
    _fails(capsys, ["info", truncated], "not a readable statistics file")
    _fails(capsys, ["info", tmp_path / "missing.safetensors"], "not found")
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"neuroproj_prune": '{"format": "other"}'})
    _fails(capsys, ["info", foreign], "not a neuroproj-prune statistics file")


def test_error_nan_activations(capsys, tmp_path, tokenizer):
    """A NaN weight makes activations NaN: a clear error in the API (a model in memory); the CLI refuses the
    checkpoint when it loads, naming the tensor (no file left)."""
    model = tiny_model("llama", dtype=torch.float32)
    model.model.layers[1].mlp.up_proj.weight[3, 0] = float("nan")
    with pytest.raises(NeuroprojError, match="non-finite activations at layer 1"):
        npp.collect(loaded(model), random_ids(2, 16), progress=False)
    d = tmp_path / "nan-model"
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    out = tmp_path / "s.safetensors"
    msg = _fails(capsys, _collect_args(d, SHAKESPEARE, out), "non-finite weights (NaN/inf in model.layers.1.mlp.up_proj", out)
    assert "NaN" in msg


def test_cli_subprocess_exit_code(tmp_path):
    """The installed console script: exit 2 and one stderr line."""
    exe = shutil.which("neuroproj-prune", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "neuroproj_prune.cli"]
    out = tmp_path / "s.safetensors"
    r = subprocess.run(cmd + _collect_args(str(tmp_path / "nope"), str(SHAKESPEARE), str(out)),
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("neuroproj-prune: error: model ")
    assert not out.exists()


@pytest.mark.parametrize("dtype,product,tol", [(torch.float64, None, 1e-12), (torch.float32, None, 1e-5)])
def test_gram_lower_triangle_symmetrized_equals_the_product(dtype, product, tol):
    """The Gram's column blocks of the lower triangle, in the activations' dtype, accumulate over batches to xᵀx
    of the values they multiply, once symmetrized."""
    from neuroproj_prune.stats.moments import gram_, symmetrize_

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1000, generator=g, dtype=torch.float64)
    G = torch.zeros(1000, 1000, dtype=torch.float64)
    for part in (x[:100], x[100:]):
        gram_(G, part.to(dtype), product, block=384)
    v = x.to(product or dtype).double()
    ref = v.T @ v
    assert torch.allclose(symmetrize_(G), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_bfloat16_gram_on_cpu_rounds_each_block_of_rows_once(monkeypatch):
    """bfloat16 products on a CPU (no float32-output product there): each partial Gram of ≤ GRAM_ROWS tokens is
    rounded to bfloat16 once, so the total's error is at most Σ over partials of 2⁻⁸·|partial| — and splitting
    the rows makes it smaller than one rounding of the whole product."""
    from neuroproj_prune.stats import moments
    from neuroproj_prune.stats.moments import gram_, symmetrize_

    monkeypatch.setattr(moments, "GRAM_ROWS", 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 400, generator=g, dtype=torch.float64).abs()   # all-positive: partials add coherently
    v = x.to(torch.bfloat16).double()
    ref = v.T @ v
    bound = sum((c.T @ c).abs() for c in v.split(64)) * 2.0 ** -8
    G = torch.zeros(400, 400, dtype=torch.float64)
    gram_(G, x.float(), torch.bfloat16)
    err = (symmetrize_(G) - ref).abs()
    assert (err <= bound + 1e-12).all()
    whole = (v.T.bfloat16() @ v.bfloat16()).double()                    # one rounding of the whole product
    assert err.mean() < 0.5 * (whole - ref).abs().mean()


def test_cholesky_of_a_gram_that_rounding_made_indefinite():
    """A rank-deficient Gram pushed just below PSD (as rounded products can) still factors, with the least jitter
    that makes it positive definite; a PSD one factors exactly as torch's Cholesky does."""
    from neuroproj_prune.stats import cholesky

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:, :2]], 1)                                   # two exact duplicates: rank 8 of 10
    A = x.T @ x
    v = torch.zeros(10, dtype=torch.float64)
    v[0], v[8] = 1, -1
    A_bad = A - 1e-6 * torch.outer(v, v)                              # a negative eigenvalue of -2e-6
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(A_bad)
    L = cholesky(A_bad)
    assert torch.isfinite(L).all()
    jitter = float(((L @ L.T) - A_bad).diagonal().mean() / A_bad.diagonal().mean())
    assert 1e-8 <= jitter <= 1e-5                                      # the least that worked, not a large ridge
    B = A + torch.eye(10, dtype=torch.float64)
    assert torch.equal(cholesky(B), torch.linalg.cholesky(B))


def test_wide_layers_use_the_blocked_gram(tokenizer):
    """Widths above the Gram block (384): statistics of a float64 model equal numpy's."""
    from neuroproj_prune.model import LoadedModel, model_fingerprint
    from neuroproj_prune.stats import collect
    from neuroproj_prune.stats.moments import GRAM_BLOCK

    g = torch.Generator().manual_seed(0)

    model = tiny_model("llama", dtype=torch.float64, inter=GRAM_BLOCK + 136)
    ids = torch.randint(0, 384, (6, 40), generator=g)
    st = collect(LoadedModel(model, tokenizer, "t", model_fingerprint(model)), ids, progress=False, batch_size=2)
    acts = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in range(0, 6, 2):
            model(ids[b:b + 2])
    h.remove()
    H = torch.cat(acts).numpy()
    np.testing.assert_allclose(st.correlation(1).numpy(), np.corrcoef(H.T), rtol=1e-10, atol=1e-10)
