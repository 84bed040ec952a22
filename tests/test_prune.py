"""Pruning: plans, folds, checkpoints (issue 4's "Must show")."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.model import LoadedModel, adapter_for, model_fingerprint
from neuroproj_prune.prune import SELECTORS, Plan
from neuroproj_prune.prune import plan as make_plan
from neuroproj_prune.prune import prune
from neuroproj_prune.stats import collect
from neuroproj_prune.model import load_pruned
from neuroproj_prune.prune import FOLDS, apply_plan

from conftest import C4, WIKI, gqa_llama, tiny_model


def _lm(model, tokenizer, name="tiny"):
    return LoadedModel(model, tokenizer, name, model_fingerprint(model))


def _ids(seed=0, n=16, T=48):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (n, T), generator=g)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
@pytest.mark.parametrize("calibration", ["oneshot", "sequential"])
def test_zero_sparsity_is_bit_exact(family, calibration, tokenizer):
    base = tiny_model(family)
    ids = _ids()
    ref = base(ids).logits
    for fold in FOLDS:
        for select in ("obs", "flap"):
            lm = _lm(copy.deepcopy(base), tokenizer)
            kw = dict(stats=collect(lm, ids, progress=False)) if calibration == "oneshot" else {}
            target_data = None
            if calibration == "sequential":
                prune(lm, ids, keep=64, multiple=1, select=select, fold=fold, add_bias=False, batch_size=8,
                      weighting="none", compute_dtype="float32", progress=False)
            else:
                prune(lm, target_data, sparsity=0.0, select=select, fold=fold, calibration="oneshot",
                      progress=False, **kw)
            assert torch.equal(lm.model(ids).logits, ref), (family, calibration, fold, select)


def _duplicate_model():
    """Tiny llama whose neuron j=5 of layer 1 is exactly 0.7 × neuron r=9 (same gate row, up row scaled)."""
    m = tiny_model("llama")
    mlp = m.model.layers[1].mlp
    mlp.gate_proj.weight[5] = mlp.gate_proj.weight[9]
    mlp.up_proj.weight[5] = 0.7 * mlp.up_proj.weight[9]
    return m


def _remove_one_plan(model, j=5, r=9, layer=1):
    N = adapter_for(model).width(model, layer)
    keep = [k for k in range(N) if k != j]
    return Plan({layer: {"width": N, "keep": keep, "representative": {j: r}}})


@pytest.mark.parametrize("fold,exact", [("representative", True), ("lstsq", True), ("none", False)])
def test_duplicate_neuron_folds_away(fold, exact, tokenizer):
    base = _duplicate_model()
    lm = _lm(copy.deepcopy(base), tokenizer)
    st = collect(lm, _ids(0), compute_dtype="float32", progress=False)   # exact duplicates: float32 forwards
    apply_plan(lm.model, _remove_one_plan(lm.model), stats=st, fold=fold)
    held_out = _ids(1)
    ref, out = base(held_out).logits, lm.model(held_out).logits
    err = (out - ref).abs().max().item()
    if exact:
        assert err < 1e-5, err
    else:
        assert err > 1e-3, err


def _mlp_io(model, layer, ids):
    """(neuron activations, MLP output) of one layer on ids."""
    a = adapter_for(model)
    got = {}
    h1 = a.out_proj(model, layer).register_forward_pre_hook(lambda m, args: got.__setitem__("h", args[0]))
    h2 = a.out_proj(model, layer).register_forward_hook(lambda m, args, out: got.__setitem__("y", out))
    model(ids)
    h1.remove(), h2.remove()
    return got["h"], got["y"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_lstsq_beats_bias_beats_none(family, tokenizer):
    base = tiny_model(family)
    lm = _lm(base, tokenizer)
    st = collect(lm, _ids(0, n=32), progress=False)
    p = make_plan(st, lm, sparsity=0.5, select="flap", multiple=1)
    held = _ids(7, n=8)
    h, y_ref = _mlp_io(base, 1, held)
    err = {}
    for fold in ("none", "bias", "lstsq"):
        m = apply_plan(copy.deepcopy(base), p, stats=st, fold=fold, add_bias=True)
        keep = p.keep(1)
        y = m.get_submodule(_out_name(m))(h[..., keep])  # same input: isolate the fold
        err[fold] = (y - y_ref).pow(2).mean().item()
    assert err["lstsq"] < err["bias"] < err["none"], err


def _out_name(m):
    return {"opt": "model.decoder.layers.1.fc2", "llama": "model.layers.1.mlp.down_proj"}[m.config.model_type]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_checkpoints_reload_identically(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = _ids(3, n=4)
    # uniform widths: plain from_pretrained
    lm = _lm(tiny_model(family), tokenizer)
    prune(lm, None, sparsity=0.25, select="obs", fold="lstsq", calibration="oneshot",
          stats=collect(lm, _ids(0), progress=False), multiple=8, out=tmp_path / "u", progress=False)
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert "neuroproj_prune" not in cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()
    assert torch.equal(plain(ids).logits, lm.model(ids).logits)
    summary = json.loads((tmp_path / "u" / "prune_summary.json").read_text())
    for key in ("sparsity", "select", "fold", "params_before", "params_after", "mlp_macs_per_token_before",
                "mlp_macs_per_token_after", "kept"):
        assert key in summary
    assert summary["params_after"] < summary["params_before"]
    # per-layer widths: load_pruned
    lm = _lm(tiny_model(family), tokenizer)
    prune(lm, None, sparsity=0.4, select="flap", fold="lstsq", allocation="global", calibration="oneshot",
          stats=collect(lm, _ids(0), progress=False), out=tmp_path / "g", progress=False)
    widths = [adapter_for(lm.model).width(lm.model, i) for i in range(3)]
    assert len(set(widths)) > 1, widths
    again = load_pruned(tmp_path / "g")
    assert torch.equal(again(ids).logits, lm.model(ids).logits)
    again2 = npp.load_model(str(tmp_path / "g"), device="cpu")  # the loader dispatches on the config section
    assert torch.equal(again2.model(ids).logits, lm.model(ids).logits)


def test_added_bias_on_llama_is_a_standard_checkpoint(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = _lm(tiny_model("llama"), tokenizer)
    prune(lm, None, sparsity=0.25, select="flap", fold="bias", calibration="oneshot",
          stats=collect(lm, _ids(0), progress=False), multiple=8, out=tmp_path / "b", progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = _ids(4, n=2)
    assert torch.equal(plain(ids).logits, lm.model(ids).logits)


def test_added_bias_on_qwen2_needs_load_pruned(tokenizer, tmp_path):
    lm = _lm(tiny_model("qwen2"), tokenizer)
    prune(lm, None, sparsity=0.25, select="flap", fold="bias", calibration="oneshot",
          stats=collect(lm, _ids(0), progress=False), multiple=8, out=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["neuroproj_prune"]["out_bias"] is True
    ids = _ids(4, n=2)
    assert torch.equal(load_pruned(tmp_path / "b")(ids).logits, lm.model(ids).logits)


def test_every_selector_runs_and_keeps_the_requested_width(tokenizer):
    lm = _lm(tiny_model("llama"), tokenizer)
    st = collect(lm, _ids(0), progress=False)
    for name in SELECTORS:
        p = make_plan(st, lm, sparsity=0.5, select=name, multiple=1)
        for i, d in p.layers.items():
            assert len(d["keep"]) == 32, name
            removed = set(range(64)) - set(d["keep"])
            assert set(d["representative"]) == removed and set(d["representative"].values()) <= set(d["keep"])


def test_obs_removal_minimises_the_refit_error(tokenizer):
    """OBS's greedy choice is at least as good, for the lstsq objective, as FLAP's at the same width."""
    lm = _lm(tiny_model("llama"), tokenizer)
    st = collect(lm, _ids(0, n=32), progress=False)
    W = adapter_for(lm.model).out_weight(lm.model, 1).double()
    G = st.second_moment(1)

    def refit_error(keep):
        from neuroproj_prune.prune.fold import fold_layer

        Wk, _ = fold_layer("lstsq", W, torch.tensor(keep), G=G, mean=st.mean(1), ridge=1e-9)
        E = torch.zeros_like(W)
        E[:, keep] = Wk
        D = W - E
        return torch.trace(D @ G @ D.T).item()

    e_obs = refit_error(make_plan(st, lm, sparsity=0.5, select="obs", multiple=1).layers[1]["keep"])
    e_flap = refit_error(make_plan(st, lm, sparsity=0.5, select="flap", multiple=1).layers[1]["keep"])
    assert e_obs <= e_flap


@pytest.mark.slow
def test_smollm2_default_prune_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from neuroproj_prune.stats.data import eval_windows

    out = tmp_path / "p30"
    assert main(["prune", "--model", "smollm2-135m", "--data", str(C4), "--sparsity", "0.3", "--samples", "16",
                 "--seqlen", "256", "--device", "cpu", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = npp.load_model("smollm2-135m", device="cpu")
    windows, _ = eval_windows(dense.tokenizer, str(WIKI), 512)
    windows = windows[:8]

    def ppl(m):
        with torch.inference_mode():
            return torch.exp(m(windows, labels=windows).loss).item()

    p_dense, p_pruned = ppl(dense.model), ppl(model)
    assert torch.isfinite(torch.tensor(p_pruned)) and p_pruned < 3 * p_dense, (p_dense, p_pruned)
    s = json.loads((out / "prune_summary.json").read_text())
    assert s["mlp_macs_per_token_after"] < 0.75 * s["mlp_macs_per_token_before"]


def test_bad_input(tiny_dir, tmp_path, capsys):
    d = str(tiny_dir("llama"))
    capsys.readouterr()  # the fixture's own progress output, when it builds the model in this test
    data = str(C4)
    common = ["--model", d, "--data", data, "--samples", "4", "--seqlen", "32"]
    for sp in ("1.0", "-0.1", "1.5"):
        out = tmp_path / f"s{sp}"
        assert main(["prune", *common, "--sparsity", sp, "--out", str(out)]) == 2
        assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("neuroproj-prune: error: sparsity") for line in err)
    # an output directory that exists and is not empty
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["prune", *common, "--sparsity", "0.2", "--out", str(busy)]) == 2
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    assert "--overwrite" in capsys.readouterr().err
    # a layer pruned to zero width
    assert main(["prune", *common, "--keep", "0", "--out", str(tmp_path / "z")]) == 2
    assert "zero width" in capsys.readouterr().err and not (tmp_path / "z").exists()
    # unknown method
    assert main(["prune", *common, "--sparsity", "0.2", "--select", "nope", "--out", str(tmp_path / "n")]) == 2
    assert not (tmp_path / "n").exists()


def test_plan_for_another_model_is_refused(tokenizer):
    small = tiny_model("llama")
    other = tiny_model("llama", inter=48)
    lm = _lm(small, tokenizer)
    st = collect(lm, _ids(0), progress=False)
    p = make_plan(st, lm, sparsity=0.5, select="flap", multiple=1)
    with pytest.raises(npp.NeuroprojError, match="another model"):
        apply_plan(other, p, stats=st)
    deeper = tiny_model("llama", layers=2)
    p.layers[2] = p.layers[1]
    with pytest.raises(npp.NeuroprojError, match="another model"):
        apply_plan(deeper, p, stats=st)


def test_stats_of_another_model_are_refused(tokenizer):
    lm = _lm(tiny_model("llama", seed=0), tokenizer)
    other = _lm(tiny_model("llama", seed=1), tokenizer)
    st = collect(lm, _ids(0), progress=False)
    with pytest.raises(npp.NeuroprojError, match="re-run collect"):
        prune(other, None, sparsity=0.5, calibration="oneshot", stats=st, progress=False)


def test_an_edited_plan_is_applied_as_written(tiny_dir, tmp_path):
    d = str(tiny_dir("llama"))
    common = ["--model", d, "--data", str(C4), "--samples", "4", "--seqlen", "32"]
    assert main(["prune", *common, "--sparsity", "0.5", "--multiple", "1", "--out", str(tmp_path / "a")]) == 0
    doc = json.loads((tmp_path / "a" / "plan.json").read_text())
    doc["layers"]["0"]["keep"] = list(range(40))           # the user keeps a different set in layer 0
    doc["layers"]["0"]["representative"] = {}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    assert main(["prune", *common, "--plan", str(edited), "--out", str(tmp_path / "b")]) == 0
    model = npp.load_model(str(tmp_path / "b"), device="cpu").model
    a = adapter_for(model)
    assert [a.width(model, i) for i in range(3)] == [40, 32, 32]
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["layers"]["0"]["keep"] == list(range(40))
    # a plan for another model is refused before anything is written
    doc["layers"]["0"]["width"] = 99
    edited.write_text(json.dumps(doc))
    assert main(["prune", *common, "--plan", str(edited), "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("family,target", [("llama", "layer"), ("gpt2", "layer"), ("llama", "dense")])
def test_sequential_closed_form_equals_rerunning_layers(family, target, tokenizer, monkeypatch):
    """out' = out − W h + W' h_K (the closed-form carry) gives the same plan and weights as re-running each
    pruned layer, which is what architectures with a norm after the MLP do — with a dense target too (whose
    second forward must not replace the activations the carry uses)."""
    ids = _ids(2, n=8)
    kw = dict(keep=40, multiple=1, select="wanda-sp", fold="lstsq", target=target, batch_size=8, weighting="none",
              compute_dtype="float32", progress=False)
    fast = _lm(tiny_model(family), tokenizer)
    _, p_fast, _ = prune(fast, ids, **kw)
    slow = _lm(tiny_model(family), tokenizer)
    monkeypatch.setattr(type(adapter_for(slow.model)), "mlp_output_is_added", lambda self, model: False)
    _, p_slow, _ = prune(slow, ids, **kw)
    assert [p_fast.layers[i]["keep"] for i in range(3)] == [p_slow.layers[i]["keep"] for i in range(3)]
    held = _ids(5, n=2)
    assert torch.allclose(fast.model(held).logits, slow.model(held).logits, atol=1e-4, rtol=1e-4)


def test_too_few_calibration_tokens_raise_the_ridge(capsys):
    """Fewer than 2·N tokens: the refit is (nearly) underdetermined, so the ridge goes up to 1e-2, with a warning."""
    from neuroproj_prune.prune.fold import RIDGE, effective_ridge

    assert effective_ridge(RIDGE, tokens=4096, N=1536) == RIDGE
    assert effective_ridge(RIDGE, tokens=1024, N=1536) == 1e-2
    assert "ridge raised" in capsys.readouterr().err


def test_error_curve_equals_the_refit_error_for_every_width(tokenizer):
    """e(k) from one Cholesky equals the least-squares refit error computed directly for each k (numpy)."""
    import numpy as np

    from neuroproj_prune.prune.allocate import error_curve
    from neuroproj_prune.prune.select import LayerMoments

    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    G, W = X.T @ X / 400, torch.randn(8, 24, generator=g, dtype=torch.float64)
    m = LayerMoments(0, G, X.mean(0), W, torch.ones(24), ridge=1e-9)
    scores = torch.rand(24, generator=g, dtype=torch.float64)
    e = error_curve(m, scores)
    order = np.argsort(-scores.numpy())
    Xn, Y = X.numpy(), (X @ W.T).numpy()
    for k in (0, 1, 5, 12, 23, 24):
        K = order[:k]
        if k:
            B = np.linalg.lstsq(Xn[:, K], Y, rcond=None)[0]
            r = Y - Xn[:, K] @ B
        else:
            r = Y
        assert abs(float(e[k]) - (r**2).sum() / 400) < 1e-6 * (1 + float(e[0]))


def test_allocation_meets_the_budget_and_beats_uniform():
    """Σ k_i equals the budget (multiple 1), widths respect ±max_shift, and the total error is no larger than
    uniform widths'; on convex curves it equals the brute-force optimum."""
    import itertools

    from neuroproj_prune.prune.allocate import allocate_by_error

    g = torch.Generator().manual_seed(0)
    curves = {}
    for i in range(3):
        c = (torch.rand(10, generator=g, dtype=torch.float64) * (i + 1)).sort(descending=True).values
        curves[i] = torch.cat([c.flip(0).cumsum(0).flip(0), c.new_zeros(1)])  # convex, decreasing
    k = allocate_by_error(curves, 15, 1, 1.0)
    assert sum(k.values()) == 15
    total = sum(float(curves[i][k[i]]) for i in k)
    best = min(sum(float(curves[i][w]) for i, w in enumerate(ws))
               for ws in itertools.product(range(1, 11), repeat=3) if sum(ws) == 15)
    assert abs(total - best) < 1e-12
    assert total <= sum(float(curves[i][5]) for i in k)
    k = allocate_by_error(curves, 15, 1, 0.1)  # mean sparsity 0.5: every layer within [0.4, 0.6]
    assert sum(k.values()) == 15 and all(4 <= w <= 6 for w in k.values())


@pytest.mark.parametrize("weights", ["rms", "grad", "layer-grad"])
def test_sequential_global_allocation(weights, tokenizer, tmp_path):
    """Per-layer widths from the error curves: the budget is met exactly, the widths differ, and the
    checkpoint reloads to the same logits."""
    lm = _lm(tiny_model("llama"), tokenizer)
    _, p, s = prune(lm, C4, sparsity=0.4, allocation="global", alloc_weights=weights, multiple=1, samples=16,
                    seqlen=64, max_shift=0.3, progress=False, out=tmp_path / "g")
    assert s["neurons_after"] == 3 * round(0.6 * 64) and len(set(s["kept"])) > 1
    assert all(0.1 * 64 <= k <= 0.9 * 64 for k in s["kept"])
    ids = _ids(7, n=2)
    assert torch.equal(load_pruned(tmp_path / "g")(ids).logits, lm.model(ids).logits)


@pytest.mark.parametrize("weights", ["grad", "rms", "layer-grad"])
def test_curves_in_layer_groups_equal_one_pass(weights, tokenizer, monkeypatch):
    """Memory bounded by design: with room for one layer's Grams at a time, the allocation pass measures the token
    weights once and each further group of layers in a forward of its own — and every curve, head moment, fold
    moment, block and sub-layer cost equals the single pass's."""
    from neuroproj_prune.prune import allocate
    from neuroproj_prune.prune.allocate import layer_groups, measure_curves

    assert layer_groups([4, 4, 4], 8) == [[0, 1], [2]] and layer_groups([4, 4, 4], 1) == [[0], [1], [2]]
    lm = _lm(gqa_llama(layers=3), tokenizer)
    ids = _ids(3, n=6, T=32)
    kw = dict(select="wanda-sp", weights=weights, batch_size=2, progress=False, attn=True, blocks=True,
              sublayers=True, fold=True)
    one = measure_curves(lm, ids, gram_bytes=1 << 40, **kw)
    runs, real = [], allocate._trunk_forward
    monkeypatch.setattr(allocate, "_trunk_forward", lambda *a, **k: runs.append(k.get("upto")) or real(*a, **k))
    per = measure_curves(lm, ids, gram_bytes=1, **kw)   # below one layer: one layer per group
    # the first pass runs the trunk itself for the batches that take no backward: all (rms), all but the first
    # quarter's one (layer-grad: 2 of the 6 windows), none (grad)
    first = {"rms": 3, "layer-grad": 2}.get(weights, 0)
    assert runs == [None] * first + [1] * 3 + [2] * 3   # 3 batches per further group, each up to its last layer
    assert one.mlp.keys() == per.mlp.keys() == {0, 1, 2}
    for i in range(3):
        torch.testing.assert_close(per.mlp[i], one.mlp[i], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(per.attn[i].G, one.attn[i].G, rtol=1e-5, atol=1e-9)
        for site in ("mlp", "attn"):
            for a, b in zip(per.fold[site, i], one.fold[site, i]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert per.block == one.block and per.sub == one.sub and min(one.sub.values()) > 0


def test_layer_grad_curves_are_rms_curves_in_each_layers_unit_of_loss(tokenizer):
    """layer-grad: every curve and cost is the rms-weighted one times s_i = Σ_t ‖∂loss/∂x_i,t‖² / Σ_t 1/mean(x_i,t²)
    over the first quarter of the windows — the gradients here from plain autograd through the whole model's
    logits (no chunked head), the rms weights from the layers' outputs."""
    from neuroproj_prune.prune.allocate import measure_curves

    lm = _lm(gqa_llama(layers=3), tokenizer)
    ids = _ids(5, n=8, T=32)
    kw = dict(select="wanda-sp", batch_size=2, progress=False, attn=True, blocks=True, sublayers=True)
    rms = measure_curves(lm, ids, weights="rms", **kw)
    lg = measure_curves(lm, ids, weights="layer-grad", **kw)
    a, model = lm.adapter, lm.model
    outs = {}

    def keep(i):
        def hook(mod, args, out):
            t = out[0] if isinstance(out, tuple) else out
            t.retain_grad()
            outs[i] = t
        return hook
    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(a.layers(model))]
    hooks += [a.attn_out_proj(model, i).register_forward_hook(keep(("attn", i))) for i in range(3)]
    g2 = {k: 0.0 for k in [0, 1, 2, ("attn", 0), ("attn", 1), ("attn", 2)]}
    r = {i: 0.0 for i in range(3)}
    try:
        for b in range(2):   # the first quarter: 2 of the 8 windows
            x = ids[b:b + 1]
            emb = model.get_input_embeddings()(x).detach().requires_grad_(True)   # the weights need no gradient
            logits = model(inputs_embeds=emb).logits
            torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").backward()
            for k in g2:
                g2[k] += float(outs[k].grad.double().pow(2).sum())
            for i in range(3):
                r[i] += float((1.0 / (outs[i].detach().double().pow(2).mean(-1) + 1e-6)).sum())
            model.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    for i in range(3):
        s_mlp, s_attn = g2[i] / r[i], g2["attn", i] / r[i]
        torch.testing.assert_close(lg.mlp[i], rms.mlp[i] * s_mlp, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(lg.attn[i].G, rms.attn[i].G * s_attn, rtol=1e-4, atol=1e-12)
        assert lg.block[i] == pytest.approx(rms.block[i] * s_mlp, rel=1e-4)
        assert lg.sub[i] == pytest.approx(rms.sub[i] * s_attn, rel=1e-4)
    assert len({round(g2[i] / r[i], 6) for i in range(3)}) == 3   # the layers' units differ: the test can fail


def test_bfloat16_compute_changes_little(tokenizer):
    """Calibration matmuls under bfloat16 autocast: the pruned model's held-out loss stays within 2 % of the
    float32 run's, and the model keeps its float32 weights."""
    held = _ids(9, n=4)

    def loss(model):
        with torch.no_grad():
            logits = model(held).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), held[:, 1:].flatten()).item()

    out = {}
    for cd in ("float32", "bfloat16"):
        lm = _lm(tiny_model("llama"), tokenizer)
        prune(lm, C4, sparsity=0.5, multiple=1, samples=16, seqlen=64, compute_dtype=cd, progress=False)
        assert next(lm.model.parameters()).dtype == torch.float32
        out[cd] = loss(lm.model)
    assert abs(out["bfloat16"] - out["float32"]) < 0.02 * out["float32"]
    with pytest.raises(npp.NeuroprojError, match="compute dtype"):
        prune(_lm(tiny_model("llama"), tokenizer), C4, sparsity=0.5, compute_dtype="int8", progress=False)


def test_token_id_tensor_as_calibration_data(tokenizer):
    """A (windows, tokens) id tensor is calibration data as given: the same plan and weights as the text spec
    those very ids were drawn from; a float or 1-D tensor is refused in one line."""
    from neuroproj_prune.stats import calibration_ids

    lm_text = _lm(tiny_model("llama"), tokenizer)
    ids, _ = calibration_ids(lm_text, str(C4), 8, 32, 0)
    _, p_text, s_text = prune(lm_text, str(C4), sparsity=0.5, samples=8, seqlen=32, multiple=8, progress=False)
    lm_ids = _lm(tiny_model("llama"), None)
    _, p_ids, s_ids = prune(lm_ids, ids, sparsity=0.5, multiple=8, progress=False)
    assert p_ids.layers == p_text.layers and s_ids["calibration_data"] == "in-memory token ids (8×32)"
    for a, b in zip(lm_text.model.parameters(), lm_ids.model.parameters()):
        assert torch.equal(a, b)
    for bad in (ids.float(), ids[0]):
        with pytest.raises(npp.NeuroprojError, match="integer tensor"):
            prune(_lm(tiny_model("llama"), None), bad, sparsity=0.5, multiple=8, progress=False)
