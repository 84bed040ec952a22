"""The whole block: attention heads (GQA both ways), whole layers, the one parameter budget (issue 28)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.model import LoadedModel, adapter_for, load_pruned, model_fingerprint
from neuroproj_prune.prune import Plan, prune
from neuroproj_prune.prune.heads import HEAD_SELECTORS, channels, refit_error, select_obs
from neuroproj_prune.prune.layers import layer_loss, mean_loss
from neuroproj_prune.prune.select import LayerMoments

from conftest import C4, tiny_model


def gqa_model(family="llama", layers=4, seed=0):
    """A tiny model with 6 query heads in 2 key/value groups (head_dim 8)."""
    torch.manual_seed(seed)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig,
           "gemma2": tf.Gemma2Config}[family]
    cfg = cls(vocab_size=384, hidden_size=48, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    cfg.initializer_range = 0.2
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    m.requires_grad_(False)
    return m


def _lm(model, tokenizer):
    return LoadedModel(model, tokenizer, "tiny", model_fingerprint(model))


def _ids(seed=0, n=16, T=48):
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))


SEQ = dict(multiple=1, batch_size=8, compute_dtype="float32", progress=False)


def test_keeping_every_head_is_bit_exact():
    m = gqa_model()
    ids = _ids()
    ref = m(ids).logits
    a = adapter_for(m)
    for i in range(a.num_layers(m)):
        a.select_heads(m, i, list(range(6)), [0, 1])
    assert torch.equal(m(ids).logits, ref)


def test_bfloat16_forwards_keep_the_head_refit(tokenizer):
    """Heads whose outputs are nearly dependent (two of each group's three copy the first's queries, up to 1 %) make
    o_proj's Gram nearly singular: with bfloat16-rounded Gram products the refit amplified the rounding (here o_proj
    came out 8–15× its own norm away from the float32 run's, weights up to 18 against 0.9; on SmolLM2, 30 % MLP + a
    third of the heads: WikiText-2 401.9 against 50.9). Under bfloat16 forwards the heads' Gram keeps float32
    products, so the refitted o_proj differs from the float32 run's only by the forwards' rounding of heads that
    differ by 1 % — bfloat16 resolves that with two or three bits: a relative difference up to 0.25 on an AMD EPYC,
    0.38 on an Intel Xeon whose bfloat16 matmuls are native (AVX-512 BF16), far from the 8–15× of the regression."""
    W = {}
    for cd in ("float32", "bfloat16"):
        m = gqa_model(layers=2)
        g = torch.Generator().manual_seed(1)
        for layer in m.model.layers:
            q = layer.self_attn.q_proj.weight.view(6, 8, 48)
            for h in (1, 2, 4, 5):
                src = 0 if h < 3 else 3
                q[h] = q[src] * (1 + 0.01 * torch.randn(q[src].shape, generator=g))
        lm = _lm(m, tokenizer)
        prune(lm, C4, head_sparsity=1 / 3, sparsity=0.25, samples=16, seqlen=64, **{**SEQ, "compute_dtype": cd})
        W[cd] = [layer.self_attn.o_proj.weight.clone() for layer in lm.model.model.layers]
    for a, b in zip(W["float32"], W["bfloat16"]):
        assert float((a - b).norm() / a.norm()) < 1.0


def test_obs_downdates_equal_the_refit_errors():
    """select_obs's greedy steps (inverse downdates) against recomputing every candidate's refit error."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(2000, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    G = X.T @ X / X.shape[0]
    m = LayerMoments(0, G, X.mean(0), torch.randn(10, 24, generator=g, dtype=torch.float64), torch.ones(24), ridge=1e-7)
    units = [[h] for h in range(6)]   # 6 heads of 4 channels
    alive, brute = list(range(6)), []
    for _ in range(4):
        cost = {u: refit_error(m, channels([h for v in alive if v != u for h in units[v]], 4)) for u in alive}
        best = min(cost, key=cost.get)
        alive.remove(best)
        brute.append(best)
    assert select_obs(m, units, 4, 4) == sorted(brute)


def _duplicate_head_model():
    """Head 1 computes exactly what head 0 does, head 4 what head 3 does (same groups, same query rows): removing
    them and refitting o_proj must give the dense output back."""
    m = gqa_model(layers=2)
    at = m.model.layers[0].self_attn
    at.q_proj.weight[8:16] = at.q_proj.weight[0:8]
    at.q_proj.weight[32:40] = at.q_proj.weight[24:32]
    return m


def test_refit_absorbs_a_duplicate_head(tokenizer, tmp_path):
    """Removing heads 1 and 4 (copies) of layer 0 alone: the least-squares refit of o_proj gives the dense output
    back; slicing without a refit (fold none) does not."""
    ids = _ids(n=8)
    dense = _duplicate_head_model()
    ref = dense(ids).logits
    Plan(heads={0: {"heads": 6, "kv_heads": 2, "keep": [0, 2, 3, 5], "keep_kv": [0, 1]}}).save(tmp_path / "p.json")
    for fold, exact in (("lstsq", True), ("none", False)):
        lm = _lm(copy.deepcopy(dense), tokenizer)
        prune(lm, ids, plan_file=tmp_path / "p.json", fold=fold, weighting="none", **SEQ)
        err = (lm.model(ids).logits - ref).abs().max().item()
        assert (err < 1e-3) == exact, (fold, err)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("mode,sparsity,expect", [("query", 1 / 3, (4, 2)), ("kv", 0.5, (3, 1))])
def test_heads_checkpoint_is_standard(family, mode, sparsity, expect, tokenizer, tmp_path):
    """Uniform head counts: config counts changed, plain from_pretrained loads identical logits."""
    lm = _lm(gqa_model(family), tokenizer)
    ids = _ids()
    _, plan, s = prune(lm, ids, head_sparsity=sparsity, head_groups=mode, sparsity=0.25, out=tmp_path / "o", **SEQ)
    a = lm.adapter
    assert all((a.num_heads(lm.model, i), a.num_kv_heads(lm.model, i)) == expect for i in range(4))
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == expect and "neuroproj_prune" not in cfg
    re = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert torch.equal(re(ids).logits, lm.model(ids).logits)
    saved = Plan.load(tmp_path / "o" / "plan.json")
    assert saved.heads == plan.heads and len(saved.heads) == 4


def test_per_layer_heads_reload_exactly(tokenizer, tmp_path):
    """A plan with different head counts per layer: the section's `heads`, rebuilt by load_pruned."""
    lm = _lm(gqa_model(), tokenizer)
    ids = _ids()
    plan = Plan(heads={1: {"heads": 6, "kv_heads": 2, "keep": [0, 2, 4, 5], "keep_kv": [0, 1]},
                       2: {"heads": 6, "kv_heads": 2, "keep": [3, 4, 5], "keep_kv": [1]}})
    for i in range(4):
        plan.layers[i] = {"width": 96, "keep": list(range(96)), "representative": {}}
    plan.save(tmp_path / "plan.json")
    prune(lm, ids, plan_file=tmp_path / "plan.json", out=tmp_path / "o", **SEQ)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["neuroproj_prune"]["heads"] == [[6, 2], [4, 2], [3, 1], [6, 2]]
    re = load_pruned(tmp_path / "o")
    assert torch.equal(re(ids).logits, lm.model(ids).logits)
    # formats that cannot hold per-layer head counts refuse in one line, before writing anything
    from neuroproj_prune.cli import main
    for to, out in (("gguf", tmp_path / "x.gguf"), ("nemotron-nas", tmp_path / "nas")):
        assert main(["export", str(tmp_path / "o"), "--to", to, "--out", str(out)]) == 2
        assert not out.exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_dropped_layers_give_a_standard_checkpoint(family, tokenizer, tmp_path):
    lm = _lm(gqa_model(family, layers=5), tokenizer)
    types = list(getattr(lm.model.config, "layer_types", None) or [])
    ids = _ids()
    _, plan, s = prune(lm, ids, drop_layers=2, sparsity=0.0, out=tmp_path / "o", **SEQ)
    assert len(plan.drop) == 2 and s["dropped_layers"] == plan.drop
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and "neuroproj_prune" not in cfg
    if types:
        assert cfg["layer_types"] == [t for i, t in enumerate(types) if i not in plan.drop]
    re = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert torch.equal(re(ids).logits, lm.model(ids).logits)
    # the key/value cache slots were renumbered: generation with a cache equals generation without
    prompt = ids[:1, :8]
    with_cache = re.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = re.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)


def test_layer_loss_is_the_loss_without_the_layer(tokenizer):
    """layer_loss's cached re-runs against the model with the layer really removed."""
    m = gqa_model(layers=3)
    lm = _lm(m, tokenizer)
    ids = _ids(n=4)
    cost = layer_loss(lm, ids, None, 2)
    base = mean_loss(lm, ids)
    for i in range(3):
        cut = copy.deepcopy(m)
        adapter_for(cut).drop_layers(cut, [i])
        ref = torch.nn.functional.cross_entropy(cut(ids).logits[:, :-1].reshape(-1, 384).float(),
                                                ids[:, 1:].reshape(-1)).item()
        assert abs(cost[i] - (ref - base)) < 1e-4, (i, cost[i], ref - base)


def test_refit_after_a_dropped_layer_beats_no_refit(tokenizer):
    """The layers behind a removed one are refitted against the dense model's stream (drop_target residual):
    lower loss on the calibration text than the same layer removed with the rest untouched."""
    ids = _ids(n=16, T=64)
    dense = gqa_model(layers=4, seed=1)
    plain = copy.deepcopy(dense)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    _, plan, _ = prune(lm, ids, drop_layers=1, sparsity=0.0, drop_target="residual", **SEQ)
    adapter_for(plain).drop_layers(plain, plan.drop)
    assert mean_loss(lm, ids) < mean_loss(_lm(plain, tokenizer), ids)


def test_dropped_layer_folded_into_the_mlp_before_it(tokenizer):
    """drop_fold previous: the MLP before a removed layer is refitted to its own output plus what the removed layer
    added, so the stream leaving it is closer to the dense stream after the removed layer than the dense stream
    before it is (the least-squares fit can only lower that error; drop_fold none leaves it)."""
    ids = _ids(n=16, T=64)
    dense = gqa_model(layers=4, seed=2)   # (the seed whose removed layer has a kept MLP before it)
    with torch.no_grad():
        hs = dense(ids, output_hidden_states=True).hidden_states   # hs[k]: the stream entering layer k
    runs = {}
    for fold in ("none", "previous"):
        lm = _lm(copy.deepcopy(dense), tokenizer)
        _, plan, _ = prune(lm, ids, drop_layers=1, sparsity=0.0, drop_fold=fold, **SEQ)
        j = plan.drop[0]
        assert 0 < j < 3, plan.drop   # a layer with a kept MLP before it, and not the last
        with torch.no_grad():
            after = lm.model(ids, output_hidden_states=True).hidden_states[j]   # leaving the MLP before j
        runs[fold] = ((after - hs[j + 1]).norm() / (hs[j] - hs[j + 1]).norm()).item()
    assert runs["none"] == pytest.approx(1.0, abs=0.02)
    assert runs["previous"] < 0.9, runs
    for bad in ({"fold": "none"}, {"reconstruct": 5}):   # no least-squares fold to carry the removed layer's work
        with pytest.raises(NeuroprojError, match="drop-fold"):
            prune(_lm(copy.deepcopy(dense), tokenizer), ids, drop_layers=1, drop_fold="previous", **bad, **SEQ)


def test_a_budget_takes_per_layer_widths_by_default():
    """allocation auto: global under a parameter or speed budget (its pass measures the error curves anyway),
    uniform for a sparsity; an explicit allocation is kept, and the repeat command names only an explicit one."""
    from neuroproj_prune.prune.config import PruneConfig

    assert PruneConfig.make(target_params=0.3).allocation == "global"
    assert PruneConfig.make(target_speedup=1.2).allocation == "global"
    assert PruneConfig.make(sparsity=0.3).allocation == "uniform"
    assert PruneConfig.make(target_params=0.3, allocation="uniform").allocation == "uniform"
    assert "allocation" not in PruneConfig.make(target_params=0.3).changed()
    assert PruneConfig.make(target_params=0.3, allocation="uniform").changed()["allocation"] == "uniform"


@pytest.mark.parametrize("axes", ["mlp", "mlp,heads", "mlp,heads,layers", "layers"])
def test_target_params_removes_that_share(axes, tokenizer):
    lm = _lm(gqa_model(layers=4), tokenizer)
    T = sum(p.numel() for l in lm.model.model.layers for p in l.parameters())
    _, plan, s = prune(lm, _ids(n=16, T=64), target_params=0.3, axes=axes, search_samples=4, **SEQ)
    after = sum(p.numel() for l in lm.model.model.layers for p in l.parameters())
    assert s["removed_trunk_fraction"] == pytest.approx(1 - after / T)
    if "mlp" in axes:
        assert abs(s["removed_trunk_fraction"] - 0.3) < 0.01
    else:
        assert s["removed_trunk_fraction"] >= 0.3 and plan.drop
    chosen = s["budget"]["chosen"]
    if "heads" not in axes:
        assert chosen["head_sparsity"] == 0 and not plan.heads
    if "layers" not in axes:
        assert not plan.drop
    finalists = s["budget"]["finalists"]
    if len(finalists) > 1:   # the measured best won
        assert chosen["held_out_loss"] == min(f["held_out_loss"] for f in finalists)


def test_sequential_judge_measures_the_pruned_model(tokenizer):
    """Each finalist's held-back loss under the sequential judge is that of the model the sequential pass makes of
    that shape on the first judge_samples windows (the same shape pruned here by its per-axis settings), and the
    judge leaves the model it copies untouched (the run's own pruning then starts from the dense weights)."""
    ids, n = _ids(n=16, T=64), 8
    dense = gqa_model(layers=4)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    _, _, s = prune(lm, ids, target_params=0.3, axes="mlp,heads", search_samples=4, judge_samples=n,
                    allocation="uniform", **SEQ)
    b = s["budget"]
    assert b["judge"] == "sequential" and len(b["finalists"]) > 1
    for f in b["finalists"]:
        again = _lm(copy.deepcopy(dense), tokenizer)
        widths = f["mlp_neurons"] // 4
        prune(again, ids[:n], keep=widths, head_sparsity=f["head_sparsity"], allocation="uniform", **SEQ)
        assert mean_loss(again, ids[-4:]) == pytest.approx(f["held_out_loss"], rel=1e-5)
    c = b["chosen"]
    again = _lm(copy.deepcopy(dense), tokenizer)
    prune(again, ids, keep=c["mlp_neurons"] // 4, head_sparsity=c["head_sparsity"], allocation="uniform", **SEQ)
    assert all(torch.equal(p, q) for p, q in zip(lm.model.parameters(), again.model.parameters()))
    _, _, s1 = prune(_lm(copy.deepcopy(dense), tokenizer), ids, target_params=0.3, axes="mlp,heads",
                     search_samples=4, budget_judge="oneshot", allocation="uniform", **SEQ)
    assert s1["budget"]["judge"] == "oneshot"


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_heads_refused_where_the_family_cannot(family, tokenizer):
    lm = _lm(tiny_model(family), tokenizer)
    with pytest.raises(NeuroprojError, match="heads"):
        prune(lm, _ids(), head_sparsity=0.5, **SEQ)


@pytest.mark.parametrize("args,msg", [
    (["--head-sparsity", "0.1"], "removes no head"),
    (["--head-sparsity", "1.5"], "head_sparsity must be"),
    (["--target-params", "0.3", "--head-sparsity", "0.5"], "give it alone"),
    (["--target-params", "0.3", "--calibration", "oneshot"], "sequential"),
    (["--drop-layers", "4"], "remove at most 3"),
    (["--drop-attn", "5"], "remove at most 4"),
    (["--drop-attn", "1", "--calibration", "oneshot"], "sequential"),
    (["--target-params", "0.3", "--axes", "mlp,wings"], "axes"),
    (["--target-speedup", "50"], "speed-up"),
])
def test_block_settings_refused_in_one_line(args, msg, tiny_dir, tmp_path, capsys):
    d = tiny_dir("llama", layers=4)
    capsys.readouterr()
    try:
        rc = main(["prune", "--model", str(d), "--data", str(C4), "--samples", "4", "--seqlen", "32",
                   "--out", str(tmp_path / "o"), *args])
    except SystemExit as e:   # argparse's own errors
        rc = e.code
    assert rc == 2
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d["heads"]["0"].update(keep=[0, 1, 2, 3]), "invalid"),         # group 1 loses all its heads
    (lambda d: d["heads"]["0"].update(keep=[0, 9]), "invalid"),
    (lambda d: d["heads"]["0"].update(keep=["0"]), "whole numbers"),
    (lambda d: d.update(drop_layers=[0, 1, 2, 3]), "at least one kept"),
    (lambda d: d.update(drop_layers=[1, 1]), "no repeats"),
    (lambda d: d.update(drop_layers=[0]), "not both"),
    (lambda d: d["heads"]["0"].update(heads=8), "another model"),
    (lambda d: d.update(drop_attn=[4]), "no repeats"),
    (lambda d: d.update(drop_attn=[1, 1]), "no repeats"),
    (lambda d: d.update(drop_attn=[2]), "not both"),          # layer 2 is removed whole
    (lambda d: d.update(drop_attn=[0]), "heads of layer 0"),  # and its heads pruned
    (lambda d: d.update(drop_attn=["1"]), "layer numbers"),
])
def test_hostile_block_plans_refused(edit, msg, tokenizer, tmp_path):
    lm = _lm(gqa_model(), tokenizer)
    p = Plan(heads={0: {"heads": 6, "kv_heads": 2, "keep": [0, 1, 3, 4], "keep_kv": [0, 1]}}, drop=[2])
    doc = json.loads(p.to_json())
    edit(doc)
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(NeuroprojError, match=msg):
        prune(lm, _ids(), plan_file=tmp_path / "plan.json", **SEQ)


# ------------------------------------------------------------------------------------ attention sub-layers
def _without_attention(model, layers, ids):
    """The logits of `model` with the attention of `layers` adding nothing (their output zeroed by hooks)."""
    from contextlib import ExitStack

    from neuroproj_prune.prune.layers import attention_off
    with ExitStack() as stack:
        for i in layers:
            stack.enter_context(attention_off(model, adapter_for(model), i))
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_removed_attention_reloads_exactly_and_generates_with_a_cache(family, tokenizer, tmp_path):
    """--drop-attn with nothing else removed (fold none): the pruned model is the dense one with those attention
    outputs zeroed, bit for bit; the checkpoint's section lists them and load_pruned rebuilds the same logits; with
    layer 0's attention gone too (a plan), generation with a key/value cache equals generation without."""
    dense = gqa_model(family, layers=4)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    ids = _ids()
    _, plan, s = prune(lm, ids, drop_attn=2, sparsity=0.0, fold="none", out=tmp_path / "o", **SEQ)
    assert len(plan.no_attn) == 2 and s["removed_attention"] == plan.no_attn
    assert [s["heads"][i] == [0, 0] for i in range(4)] == [i in plan.no_attn for i in range(4)]
    ref = _without_attention(dense, plan.no_attn, ids)
    assert torch.equal(lm.model(ids).logits, ref)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["neuroproj_prune"]["no_attn"] == plan.no_attn
    from neuroproj_prune.model.weights import stored_shapes
    keys = stored_shapes(tmp_path / "o")
    for i in range(4):   # no weight of a removed attention (nor its norm) is stored
        has = {any(k.startswith(f"model.layers.{i}.{part}") for k in keys) for part in ("self_attn.", "input_layernorm")}
        assert has == {i not in plan.no_attn}
    assert torch.equal(load_pruned(tmp_path / "o")(ids).logits, ref)
    assert Plan.load(tmp_path / "o" / "plan.json").no_attn == plan.no_attn
    # layer 0's slot is the one transformers counts the cached tokens by
    p = Plan(no_attn=[0, 2], layers={i: {"width": 96, "keep": list(range(96)), "representative": {}} for i in range(4)})
    p.save(tmp_path / "plan.json")
    prune(_lm(copy.deepcopy(dense), tokenizer), ids, plan_file=tmp_path / "plan.json", out=tmp_path / "p",
          fold="none", **SEQ)
    re = load_pruned(tmp_path / "p")
    assert torch.equal(re(ids).logits, _without_attention(dense, [0, 2], ids))
    prompt = ids[:2, :8]
    assert torch.equal(re.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True),
                       re.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))


def test_attention_loss_is_the_loss_without_it(tokenizer):
    """layer_loss(part="attn")'s re-runs against mean_loss with that attention left out, and against the logits of
    the model with it zeroed."""
    m = gqa_model(layers=3)
    lm = _lm(m, tokenizer)
    ids = _ids(n=4)
    cost = layer_loss(lm, ids, None, 2, part="attn")
    base = mean_loss(lm, ids)
    for i in range(3):
        ref = torch.nn.functional.cross_entropy(_without_attention(m, [i], ids)[:, :-1].reshape(-1, 384).float(),
                                                ids[:, 1:].reshape(-1)).item()
        assert abs(cost[i] - (ref - base)) < 1e-4, (i, cost[i], ref - base)
        assert mean_loss(lm, ids, no_attn={i}) == pytest.approx(ref, abs=1e-5)


def test_refit_after_a_removed_attention_tracks_the_dense_stream(tokenizer):
    """The MLPs from a removed attention on are refitted against the dense model's stream (what the refit
    minimises): the last hidden states end closer to the dense model's than with the MLPs left as they were."""
    ids = _ids(n=16, T=64)
    dense = gqa_model(layers=4, seed=1)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    _, plan, _ = prune(lm, ids, drop_attn=1, sparsity=0.0, drop_target="residual", **SEQ)
    plain = copy.deepcopy(dense)
    adapter_for(plain).remove_attention(plain, plan.no_attn[0])
    target = dense.model(ids).last_hidden_state
    refit, left = ((m.model(ids).last_hidden_state - target).pow(2).mean() for m in (lm.model, plain))
    assert refit < 0.9 * left, (refit, left)


def test_budget_with_attention_sublayers(tokenizer):
    """--axes mlp,attn: the share is removed, the chosen finalist's attention sub-layers are the plan's, and the
    finalists include one that removes attention."""
    lm = _lm(gqa_model(layers=4), tokenizer)
    _, plan, s = prune(lm, _ids(n=16, T=64), target_params=0.3, axes="mlp,attn", search_samples=4, **SEQ)
    assert abs(s["removed_trunk_fraction"] - 0.3) < 0.01
    b = s["budget"]
    assert b["chosen"]["drop_attn"] == plan.no_attn and not plan.drop and not plan.heads
    assert any(f["drop_attn"] for f in b["finalists"]) and any(not f["drop_attn"] for f in b["finalists"])
    assert b["chosen"]["held_out_loss"] == min(f["held_out_loss"] for f in b["finalists"])


@pytest.mark.parametrize("edit,msg", [
    (lambda s: s.update(no_attn=[7]), "no_attn must list"),
    (lambda s: s.update(no_attn=[1, 1]), "no_attn must list"),
    (lambda s: s.update(no_attn=[2]), "weights"),    # the stored attention of the layer the section now lists
    (lambda s: s.update(no_attn=[]), "weights lack"),    # the removed attention's weights missing
])
def test_hostile_no_attn_sections_refused(edit, msg, tokenizer, tmp_path):
    lm = _lm(gqa_model(), tokenizer)
    prune(lm, _ids(), drop_attn=1, sparsity=0.0, out=tmp_path / "o", layer_select="influence", **SEQ)
    f = tmp_path / "o" / "config.json"
    cfg = json.loads(f.read_text())
    gone = cfg["neuroproj_prune"]["no_attn"]
    edit(cfg["neuroproj_prune"])
    if cfg["neuroproj_prune"].get("no_attn") == [2] and gone == [2]:
        cfg["neuroproj_prune"]["no_attn"] = [3]
    f.write_text(json.dumps(cfg))
    with pytest.raises(NeuroprojError, match=msg):
        load_pruned(tmp_path / "o")


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_attention_removal_refused_where_the_family_cannot(family, tokenizer):
    lm = _lm(gqa_model(family) if family == "gemma2" else tiny_model(family), tokenizer)
    with pytest.raises(NeuroprojError, match="attention sub-layers"):
        prune(lm, _ids(), drop_attn=1, **SEQ)


def _latency_file(model, path, **costs):
    """A latency file for `model` with the given costs (ms), as `neuroproj-prune latency` writes it."""
    from neuroproj_prune.prune.speed import Latency, model_shape

    lat = Latency(**costs, model=model_shape(model, adapter_for(model)), meta={"type": "f32"})
    path.write_text(json.dumps(lat.to_json()))
    return lat


def _predicted_ms(lat, model):
    a = adapter_for(model)
    L = a.num_layers(model)
    return lat.ms(sum(a.has_attention(model, i) for i in range(L)), L,
                  sum(p.numel() for l in a.layers(model) for p in l.parameters()))


def test_target_speedup_by_a_latency_file(tokenizer, tmp_path):
    """Where a latency file says an attention sub-layer costs much more than its weights, --target-speedup 1.3
    cannot be met by MLP neurons alone: the chosen shape removes attention or layers, and the pruned model's
    predicted time (the file's model on its actual counts) is the dense one's / 1.3 or less; with the bytes proxy
    (no file) the MLP-only shape removes the parameters (T + E)(1 − 1/S) of T."""
    dense = gqa_model(layers=4)
    lat = _latency_file(dense, tmp_path / "lat.json", fixed=0.5, attn=1.0, mlp=0.01, per_param=10.0)
    before = _predicted_ms(lat, dense)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    _, plan, s = prune(lm, _ids(n=16, T=64), target_speedup=1.3, latency=str(tmp_path / "lat.json"),
                       axes="mlp,attn,layers", search_samples=4, out=tmp_path / "o", **SEQ)
    b = s["budget"]
    card = (tmp_path / "o" / "README.md").read_text()
    assert "1.3x decode speed by a latency file measured in llama.cpp f32" in card
    assert b["speed_model"]["source"] == "measured" and b["target_speedup"] == 1.3
    assert plan.no_attn or plan.drop
    after = _predicted_ms(lat, lm.model)
    assert before / after >= 1.3 - 1e-3
    assert b["chosen"]["predicted_speedup"] == pytest.approx(before / after, rel=1e-3)
    assert all(f["predicted_speedup"] >= 1.3 - 1e-3 for f in b["finalists"])

    lm = _lm(copy.deepcopy(dense), tokenizer)
    T = sum(p.numel() for l in dense.model.layers for p in l.parameters())
    E = dense.lm_head.weight.numel()
    _, _, s = prune(lm, _ids(n=16, T=64), target_speedup=1.3, axes="mlp", search_samples=4, **SEQ)
    assert s["budget"]["speed_model"]["source"] == "bytes proxy"
    assert s["removed_trunk_fraction"] == pytest.approx((T + E) * (1 - 1 / 1.3) / T, abs=0.01)


def test_target_params_and_speedup_together(tokenizer, tmp_path):
    """Both targets: the shape removes at least the share and reaches at least the speed-up (each finalist)."""
    dense = gqa_model(layers=4)
    lat = _latency_file(dense, tmp_path / "lat.json", fixed=0.5, attn=1.0, mlp=0.01, per_param=10.0)
    before = _predicted_ms(lat, dense)
    lm = _lm(copy.deepcopy(dense), tokenizer)
    _, _, s = prune(lm, _ids(n=16, T=64), target_params=0.4, target_speedup=1.3, latency=str(tmp_path / "lat.json"),
                    axes="mlp,attn", search_samples=4, **SEQ)
    assert s["removed_trunk_fraction"] >= 0.4 - 0.01
    assert before / _predicted_ms(lat, lm.model) >= 1.3 - 1e-3


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(format="other"), "not a readable"),
    (lambda d: d.update(attn=-0.1), "'attn' must be"),
    (lambda d: d.update(per_param=0), "'per_param' must be"),
    (lambda d: d.update(mlp="0.1"), "'mlp' must be"),
    (lambda d: d.update(fixed=True), "'fixed' must be"),
    (lambda d: d["model"].update(layers=2.5), "whole numbers"),
    (lambda d: d.pop("model"), "whole numbers"),
    (lambda d: d["model"].update(layers=7), "measured on a model with layers 7"),
    (lambda d: d["model"].update(width=7), "measured on a model with width 7"),
    (None, "give --target-speedup"),
])
def test_hostile_latency_files_refused(edit, msg, tiny_dir, tmp_path, capsys):
    from neuroproj_prune.model import load_model

    d = tiny_dir("llama", layers=4)
    _latency_file(load_model(str(d), dtype="float32", device="cpu").model, tmp_path / "lat.json", fixed=1.0, attn=0.1,
                  mlp=0.1, per_param=1.0)
    doc = json.loads((tmp_path / "lat.json").read_text())
    if edit is not None:
        edit(doc)
    (tmp_path / "lat.json").write_text(json.dumps(doc))
    capsys.readouterr()
    rc = main(["prune", "--model", str(d), "--data", str(C4), "--samples", "4", "--seqlen", "32", "--out",
               str(tmp_path / "o"), "--latency", str(tmp_path / "lat.json"),
               *(["--sparsity", "0.3"] if edit is None else ["--target-speedup", "1.2"])])
    assert rc == 2
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o").exists()
