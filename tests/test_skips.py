"""Neuron-level skip connections: planted dependencies are found, an exact skip is lossless, checkpoints
round-trip, pruning after skipping remaps the sources."""
from __future__ import annotations

import json

import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.model import LoadedModel, model_fingerprint
from neuroproj_prune.prune import Plan
from neuroproj_prune.analysis.skips import find_skips
from neuroproj_prune.model.skip_modules import get_skips, skip_macs_per_token, total_mlp_macs_per_token
from neuroproj_prune.stats import Moments, Stats

from conftest import SHAKESPEARE, tiny_model


# ------------------------------------------------------------------------------------ synthetic stats
def stats_from_activations(acts: dict[int, torch.Tensor], window: int, model_type="llama", hidden=16) -> Stats:
    """A Stats object built directly from per-layer activation matrices (tokens × N), shift 0."""
    totals, cross = {}, {}
    for i, X in acts.items():
        X = X.double()
        t = Moments()
        t.shift = torch.zeros(X.shape[1], dtype=torch.float64)
        t.add(X)
        totals[(i, "mlp.neurons")] = t.complete()
    for m in acts:
        for l in range(m - window, m):
            if l in acts:
                cross[(l, m)] = acts[l].double().T @ acts[m].double()
    L = max(acts) + 1
    meta = {"format": "neuroproj-prune/stats/1", "model": "synthetic", "model_type": model_type, "fingerprint": None,
            "num_layers": L, "hidden_size": hidden, "widths": [acts[i].shape[1] for i in range(L)],
            "layers": sorted(acts), "sites": ["mlp.neurons"], "cross_layer_window": window,
            "tokens": next(iter(acts.values())).shape[0], "data": "synthetic", "seed": 0}
    return Stats._from_totals(totals, cross, meta)


def planted():
    g = torch.Generator().manual_seed(0)
    n, N = 4000, 48
    acts = {i: torch.randn(n, N, generator=g, dtype=torch.float64) for i in range(3)}
    acts[1][:, 3] = 1.5 * acts[0][:, 7] + 0.2               # l=0 -> m=1
    acts[1][:, 10] = -0.5 * acts[0][:, 2] + 1.0             # negative slope
    acts[2][:, 5] = 3.0 * acts[0][:, 1] - 2.0               # across two layers (window 2)
    acts[2][:, 0] = 2.0 * acts[1][:, 4]                     # l=1 -> m=2
    acts[2][:, 9] = acts[1][:, 20] + 0.7 * torch.randn(n, generator=g, dtype=torch.float64)  # R² ≈ 0.67: must fail
    acts[1][:, 30] = 4.0                                    # dead: never a candidate
    return acts, {(1, 3): (0, 7, 1.5, 0.2), (1, 10): (0, 2, -0.5, 1.0), (2, 5): (0, 1, 3.0, -2.0),
                  (2, 0): (1, 4, 2.0, 0.0)}


def test_planted_dependencies_found_and_nothing_else():
    acts, truth = planted()
    st = stats_from_activations(acts, window=2)
    rep = find_skips(st, top_k=3)
    for pred in ("single", "topk"):
        found = {(m, j) for m in rep.targets for j in (rep.r2(m, pred) >= 0.9).nonzero().flatten().tolist()}
        assert found == set(truth), pred
    for (m, j), (l, i, a, b) in truth.items():
        s = rep.single[m]
        assert (int(s["src_layer"][j]), int(s["src_index"][j])) == (l, i)
        assert float(s["r2"][j]) == pytest.approx(1.0, abs=1e-9)
        assert float(s["slope"][j]) == pytest.approx(a, abs=1e-9)
        assert float(s["intercept"][j]) == pytest.approx(b, abs=1e-8)
        assert float(rep.topk[m]["r2"][j]) == pytest.approx(1.0, abs=1e-3)  # ridge shrinks a little
    assert bool(rep.dead[1][30]) and rep.r2(1)[30] == -float("inf")
    # the noisy pair is the best source but stays below the threshold
    assert int(rep.single[2]["src_index"][9]) == 20 and 0.5 < float(rep.single[2]["r2"][9]) < 0.8
    # selection: all four, none twice, savings as stated (gated: 2·d_model − 1 per neuron)
    chosen = rep.select(0.95, "single")
    assert {(c["target"], c["neuron"]) for c in chosen} == set(truth)
    cost = rep.plan_cost(chosen)
    assert cost["macs_saved_per_token"] == 4 * (2 * 16 - 1)
    assert cost["stored_values_per_token"] == 4
    assert rep.select(0.95, "single", max_per_layer=1) and len(rep.select(0.95, "single", max_per_layer=1)) == 2


def test_skipped_neuron_is_never_a_source():
    g = torch.Generator().manual_seed(1)
    n, N = 2000, 16
    acts = {i: torch.randn(n, N, generator=g, dtype=torch.float64) for i in range(3)}
    acts[1][:, 2] = 2 * acts[0][:, 5]
    acts[2][:, 7] = 3 * acts[1][:, 2]      # its best source (1, 2) is itself skipped; (0, 5) ties
    st = stats_from_activations(acts, window=1)   # window 1: (0, 5) is out of reach of layer 2
    rep = find_skips(st, top_k=1)
    chosen = rep.select(0.95)
    assert [(c["target"], c["neuron"]) for c in chosen] == [(1, 2)]


def test_report_files(tmp_path):
    acts, _ = planted()
    rep = find_skips(stats_from_activations(acts, window=2), top_k=2)
    rep.save(tmp_path / "rep", min_r2=0.9)
    doc = json.loads((tmp_path / "rep" / "skips.json").read_text())
    assert doc["counts"]["single"]["total"] == [4, 4, 4]
    assert len(doc["candidates"]["single"]) == 4
    assert (tmp_path / "rep" / "skips.csv").read_text().count("\n") == 1 + 2 * 48
    assert "R²≥0.95" in (tmp_path / "rep" / "skips.md").read_text()
    assert (tmp_path / "rep" / "skips.png").stat().st_size > 1000


def test_no_cross_blocks_is_an_error():
    acts, _ = planted()
    with pytest.raises(NeuroprojError, match="cross-layer"):
        find_skips(stats_from_activations(acts, window=0))


# ----------------------------------------------------------------------------------- exact tiny model
L0, M1, I_SRC, J_TGT = 0, 1, 5, 17


def exact_model():
    """Tiny llama where neuron (1, 17) = 2 · neuron (0, 5) on every input: layer 0's MLP writes nothing
    (down_proj = 0) and layer 1's attention writes nothing (o_proj = 0), so both MLPs read the same
    residual; same norm weights; layer 1's gate row 17 = layer 0's gate row 5, up row 17 = 2 × up row 5."""
    model = tiny_model("llama", layers=3, hidden=32, inter=64)
    lay = model.model.layers
    with torch.no_grad():
        lay[L0].mlp.down_proj.weight.zero_()
        lay[M1].self_attn.o_proj.weight.zero_()
        lay[M1].post_attention_layernorm.weight.copy_(lay[L0].post_attention_layernorm.weight)
        lay[M1].mlp.gate_proj.weight[J_TGT] = lay[L0].mlp.gate_proj.weight[I_SRC]
        lay[M1].mlp.up_proj.weight[J_TGT] = 2 * lay[L0].mlp.up_proj.weight[I_SRC]
    return model


@pytest.fixture(scope="module")
def exact(tokenizer):
    model = exact_model()
    lm = LoadedModel(model, tokenizer, "tiny-exact", model_fingerprint(model))
    g = torch.Generator().manual_seed(0)
    fit = torch.randint(0, 384, (8, 64), generator=g)
    held = torch.randint(0, 384, (4, 64), generator=g)
    st = npp.collect(lm, fit, cross_layer_window=1, compute_dtype="float32", progress=False)  # exact: R² = 1
    rep = find_skips(st, top_k=2, model=lm, data=held, progress=False)
    x = torch.randint(0, 384, (2, 48), generator=g)
    return lm, st, rep, x


def _logits(model, x):
    with torch.inference_mode():
        return model(input_ids=x).logits


def _flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model(input_ids=x)
    return fc.get_total_flops()


def test_exact_skip_found_applied_lossless(exact, tmp_path):
    import copy

    lm, st, rep, x = exact
    s = rep.single[M1]
    assert (int(s["src_layer"][J_TGT]), int(s["src_index"][J_TGT])) == (L0, I_SRC)
    assert float(s["r2"][J_TGT]) == pytest.approx(1, abs=1e-6)
    assert float(s["r2_heldout"][J_TGT]) == pytest.approx(1, abs=1e-6)
    assert float(s["slope"][J_TGT]) == pytest.approx(2, abs=1e-5)
    chosen = rep.select(0.999, "single")
    assert [(c["target"], c["neuron"]) for c in chosen] == [(M1, J_TGT)]  # only the planted neuron

    model = copy.deepcopy(lm.model)
    ref, flops_ref = _logits(model, x), _flops(model, x)
    d = model.config.hidden_size
    info = npp.apply_skips(model, rep, min_r2=0.999)
    assert info["skipped"] == 1 and model.model.layers[M1].mlp.gate_proj.weight.shape[0] == 63
    out = _logits(model, x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), (out - ref).abs().max()
    # MACs: gate + up rows (2·d) minus the predictor's 1 multiply; measured matmul work drops by 2·d per token
    assert info["macs_removed_per_token"] == 2 * d - 1
    assert total_mlp_macs_per_token(model) == info["mlp_macs_per_token_after"]
    assert skip_macs_per_token(model) == d + 1
    tokens = x.numel()
    assert flops_ref - _flops(model, x) == 2 * (2 * d) * tokens
    cfg = model.config.neuroproj_prune
    assert cfg["widths"] == [64, 63, 64] and cfg["skips"]["modules"][0]["sources"] == [[0, 1, 64]]

    # save → load_pruned → identical logits; load_model recognises the directory too
    npp.save_pruned(model, lm.tokenizer, tmp_path / "ck")
    back = npp.load_pruned(tmp_path / "ck")
    assert get_skips(back) is not None
    assert torch.equal(_logits(back, x), out)
    again = npp.load_model(str(tmp_path / "ck"), dtype="float32", device="cpu")
    assert torch.equal(_logits(again.model, x), out)


def test_prune_after_skip_remaps_sources(exact, tmp_path):
    import copy

    lm, st, rep, x = exact
    model = copy.deepcopy(lm.model)
    npp.apply_skips(model, rep, min_r2=0.999)
    ref = _logits(model, x)
    # layer 0 writes nothing: removing its other neurons changes nothing, if the source index is remapped
    keep = [j for j in range(64) if j % 3 != 0 or j == I_SRC]
    plan = Plan({L0: {"width": 64, "keep": keep, "representative": {}}})
    npp.apply_plan(model, plan, fold="none")
    assert int(get_skips(model)["1"].idx_0[0]) == keep.index(I_SRC)
    assert torch.allclose(_logits(model, x), ref, atol=1e-5, rtol=0)
    npp.save_pruned(model, lm.tokenizer, tmp_path / "ck2")
    assert torch.equal(_logits(npp.load_pruned(tmp_path / "ck2"), x), _logits(model, x))
    # a plan that removes the source neuron is refused before anything changes
    bad = Plan({L0: {"width": len(keep), "keep": [j for j in range(len(keep)) if j != keep.index(I_SRC)],
                     "representative": {}}})
    with pytest.raises(NeuroprojError, match="skip connections into layer 1 read"):
        npp.apply_plan(model, bad, fold="none")


def test_sequential_prune_after_skip_is_refused(exact):
    """Layer-by-layer calibration cannot carry skip activations across layers: a clear refusal, model untouched."""
    import copy

    from neuroproj_prune.model import LoadedModel

    lm, st, rep, x = exact
    model = copy.deepcopy(lm.model)
    npp.apply_skips(model, rep, min_r2=0.999)
    ref = _logits(model, x)
    with pytest.raises(NeuroprojError, match="oneshot"):
        npp.prune(LoadedModel(model, lm.tokenizer, "t", None), x, sparsity=0.5, multiple=1, select="obs",
                  progress=False)
    assert torch.equal(_logits(model, x), ref)


def test_skip_after_prune_and_refusals(exact):
    import copy

    lm, st, rep, x = exact
    model = copy.deepcopy(lm.model)
    npp.apply_plan(model, Plan({2: {"width": 64, "keep": list(range(32)), "representative": {}}}), fold="none")
    with pytest.raises(NeuroprojError, match="widths differ"):   # stats of the dense model: refused
        npp.apply_skips(model, rep, min_r2=0.999)
    m2 = copy.deepcopy(lm.model)
    npp.apply_skips(m2, rep, min_r2=0.999)
    with pytest.raises(NeuroprojError, match="already has skip"):
        npp.apply_skips(m2, rep, min_r2=0.999)


def _replaced_logits(model, chosen, x):
    """Reference: the unmodified model with each chosen neuron's activation replaced by its prediction from
    the same forward pass's source activations (what the applied skip must compute)."""
    from neuroproj_prune.model import adapter_for

    a, seen, handles = adapter_for(model), {}, []

    def pre(mod, args, i):
        h = args[0].clone()
        seen[i] = h
        for c in chosen:
            if c["target"] == i:
                h[..., c["neuron"]] = sum(w * seen[l][..., s] for (l, s), w in zip(c["sources"], c["coef"])) + c["intercept"]
        return (h,)

    for i in range(a.num_layers(model)):
        handles.append(a.out_proj(model, i).register_forward_pre_hook(lambda mod, args, i=i: pre(mod, args, i)))
    try:
        return _logits(model, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_plain_families_apply_and_roundtrip(family, tokenizer, tmp_path):
    """Approximate skips on random plain MLPs: the hook runs where the adapter says (OPT: fc2), the output
    equals the prediction formula's, and the checkpoint reloads identically."""
    model = tiny_model(family, layers=3, hidden=32, inter=64)
    lm = LoadedModel(model, tokenizer, family, model_fingerprint(model))
    g = torch.Generator().manual_seed(0)
    st = npp.collect(lm, torch.randint(0, 384, (4, 64), generator=g), cross_layer_window=2, progress=False)
    rep = find_skips(st, top_k=3)
    chosen = rep.select(-1.0, "topk", max_per_layer=3)  # whatever is best, to exercise the machinery
    assert len(chosen) == 6
    x = torch.randint(0, 384, (2, 32), generator=g)
    expected = _replaced_logits(model, chosen, x)
    before = total_mlp_macs_per_token(model)
    info = npp.apply_skips(model, rep, chosen=chosen, predictor="topk")
    assert info["macs_removed_per_token"] == 6 * (32 - 3) == before - total_mlp_macs_per_token(model)
    out = _logits(model, x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0), (out - expected).abs().max()
    npp.save_pruned(model, tokenizer, tmp_path / family)
    assert torch.equal(_logits(npp.load_pruned(tmp_path / family), x), out)


def test_cli_skips(exact, tmp_path, tokenizer):
    from neuroproj_prune.cli import main

    lm, st, rep, x = exact
    d = tmp_path / "model"
    lm.model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    stats_path = tmp_path / "stats.safetensors"
    loaded = npp.load_model(str(d), dtype="float32", device="cpu")
    npp.collect(loaded, torch.randint(0, 384, (8, 64), generator=torch.Generator().manual_seed(3)),
                cross_layer_window=1, progress=False, out=stats_path)
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:20000])
    rc = main(["skips", "--stats", str(stats_path), "--model", str(d), "--data", str(text), "--samples", "4",
               "--seqlen", "64", "--min-r2", "0.999", "--apply", "--out", str(tmp_path / "out"),
               "--eval-data", str(text), "--eval-seqlen", "64", "--max-windows", "3", "--report",
               str(tmp_path / "rep"), "--quiet", "--blocks"])
    assert rc == 0
    doc = json.loads((tmp_path / "rep" / "skips.json").read_text())
    # block-level rows: layer 1's attention writes nothing (o_proj = 0), so removing it costs exactly nothing
    rows = {(r["part"], r["layer"]): r for r in doc["blocks"]}
    assert set(rows) == {(p, i) for p in ("layer", "attn") for i in range(3)}
    assert abs(rows["attn", 1]["loss_increase"]) < 1e-6
    assert min(abs(r["loss_increase"]) for k, r in rows.items() if k != ("attn", 1)) > 1e-4
    at = loaded.model.model.layers[1].self_attn
    assert rows["attn", 1]["macs_saved_per_token"] == sum(getattr(at, n).weight.numel()
                                                          for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert "Block-level candidates" in (tmp_path / "rep" / "skips.md").read_text()
    ap = doc["applied"]
    assert ap["skipped"] == 1 and ap["macs_removed_per_token"] == 2 * 32 - 1
    assert ap["perplexity_after"] == pytest.approx(ap["perplexity_before"], rel=1e-5)
    assert main(["skips", "--stats", str(stats_path), "--apply", "--report", str(tmp_path / "r2")]) == 2
    assert main(["skips", "--stats", str(stats_path), "--blocks", "--report", str(tmp_path / "r3")]) == 2
