"""Width search by measured loss (`--allocation search`, search.py): the supernet's prefix folds equal the
least-squares fold, the measured gradients equal autograd's, and the search keeps the budget and the grid,
never raises the held-out loss it measures, and gives a checkpoint that reloads."""
from __future__ import annotations

import pytest
import torch
from conftest import C4, tiny_model

import neuroproj_prune as npp
from neuroproj_prune.model import LoadedModel, adapter_for, load_pruned, model_fingerprint
from neuroproj_prune.prune import prune
from neuroproj_prune.prune.allocate import width_grids
from neuroproj_prune.prune.fold import chol_solve
from neuroproj_prune.prune.search import Supernet, loss_and_grads, loss_backward, search_widths
from neuroproj_prune.prune.swaps import refine_swaps
from neuroproj_prune.stats.moments import Moments


def _ids(seed=0, n=8, T=48):
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))


def _moments(model, ids):
    a = adapter_for(model)
    mom, grab = {}, {}
    hooks = [a.out_proj(model, i).register_forward_pre_hook(lambda m, args, i=i: grab.__setitem__(i, args[0]))
             for i in range(a.num_layers(model))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i, h in grab.items():
        m = Moments(h.shape[-1], "cpu")
        m.add(h.reshape(-1, h.shape[-1]).double())
        mom[i] = m.finish()
    return mom


def test_supernet_prefix_folds_equal_the_least_squares_fold():
    """W'_k from one Cholesky per layer equals (W G)_{:,K} (G_KK + λI)⁻¹ solved directly, for every width;
    removed columns are zero; the full width is the dense weight; `restore` puts the dense weights back."""
    model = tiny_model("llama")
    a = adapter_for(model)
    mom = _moments(model, _ids())
    orders = {i: torch.randperm(64, generator=torch.Generator().manual_seed(i)) for i in mom}
    net = Supernet(model, a, mom, orders, ridge=1e-6)
    for i, (G, _) in mom.items():
        W = a.out_weight(model, i).detach().double()
        lam = 1e-6 * G.diagonal().mean()
        for k in (1, 17, 40, 63):
            K = orders[i][:k]
            ref = (W @ G)[:, K] @ torch.linalg.inv(G[K][:, K] + lam * torch.eye(k, dtype=G.dtype))
            got = net.weight(i, k).double()
            torch.testing.assert_close(got[:, K], ref, rtol=1e-4, atol=1e-6)
            assert (got[:, orders[i][k:]] == 0).all()
        assert torch.equal(net.weight(i, 64), a.out_weight(model, i))
    dense = {i: a.out_weight(model, i).clone() for i in mom}
    net.apply({0: 10, 1: 20, 2: 30})
    assert not torch.equal(a.out_weight(model, 1), dense[1])
    net.restore()
    assert all(torch.equal(a.out_weight(model, i), dense[i]) for i in mom)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_measured_gradients_equal_autograd(family):
    """∂loss/∂W_i formed from the projection's input and output gradient equals autograd's gradient of the
    down projection (gpt2's Conv1D stores it transposed), and the loss is the mean next-token loss."""
    model = tiny_model(family)
    a = adapter_for(model)
    ids = _ids(3)
    loss, grads = loss_and_grads(model, a, ids, [0, 1, 2], batch_size=3)
    ws = [a.out_proj(model, i).weight for i in range(3)]
    for w in ws:
        w.requires_grad_(True)
    logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    for i, w in enumerate(ws):
        g = w.grad if w.grad.shape == grads[i].shape else w.grad.T
        torch.testing.assert_close(grads[i].float(), g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_chunked_head_loss_equals_the_models_own(family):
    """The loss of the LM head run in chunks of rows (each chunk back-propagated on its own) is the model's own
    summed next-token loss, and the per-token squared gradient at the last layer's output is autograd's — for a
    family with a final-logit soft cap (gemma2) and one with a projection after the final norm (opt)."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg.initializer_range = 0.2
    if family == "opt":
        cfg.word_embed_proj_dim = 16
    if family == "gemma2":
        cfg.final_logit_softcapping = 5.0
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64).eval().requires_grad_(False)
    a = adapter_for(model)
    x = torch.randint(0, 384, (3, 20), generator=torch.Generator().manual_seed(1))
    got = {}
    h = a.layers(model)[-1].register_forward_hook(lambda m, i, o: got.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.enable_grad():
        emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, use_cache=False).logits
        got["x"].retain_grad()
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
        ref.backward()
    h.remove()
    g_ref = got["x"].grad.pow(2).sum(-1).reshape(-1)
    for trunk in (False, True):
        loss, g = loss_backward(model, a, x, None, trunk=trunk, chunk_tokens=7)
        assert abs(loss - ref.item()) < 1e-9 * abs(ref.item()), (loss, ref.item())
        assert torch.allclose(g.double(), g_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cross_entropy_gradient_in_place_is_autograds(dtype):
    """The head's loss and gradient formed in place (softmax − one-hot in one float32 copy) are autograd's
    cross-entropy of the float32 logits, its gradient rounded to the logits' dtype; the logits are not touched."""
    from neuroproj_prune.prune.search import _cross_entropy_grad

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    t = torch.randint(0, 1000, (37,), generator=g)
    before = z.clone()
    zf = z.float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(zf, t, reduction="sum")
    ref.backward()
    loss, dz = _cross_entropy_grad(z, t)
    assert torch.equal(z, before) and dz.dtype == dtype
    assert abs(loss - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(dz.float(), zf.grad.to(dtype).float(), rtol=0, atol=1e-6 if dtype == torch.float32
                               else 2 ** -8)


def test_search_keeps_budget_grid_and_never_raises_the_loss():
    """From a lopsided start the search moves neurons: the total and the grid hold, the accepted loss only
    falls, and the loss it reports is the loss of the widths it returns."""
    model = tiny_model("llama", layers=4)
    a = adapter_for(model)
    mom = _moments(model, _ids(1, n=16))
    orders = {i: torch.argsort(mom[i][0].diagonal(), descending=True) for i in mom}
    net = Supernet(model, a, mom, orders, ridge=1e-6)
    held = _ids(2)
    grids = width_grids({i: 64 for i in range(4)}, 128, 8, 0.5)
    start = {0: 56, 1: 8, 2: 56, 3: 8}
    calls = []

    def measure(w):
        calls.append(dict(w))
        net.apply(w)
        return loss_and_grads(model, a, held, list(w), batch_size=4)
    r = search_widths(net, start, grids, measure, rounds=6, pairs=2, progress=False)
    net.restore()
    assert sum(r.widths.values()) == 128 and all(k in grids[i].tolist() for i, k in r.widths.items())
    assert r.widths != start and r.loss_end < r.loss_start and r.moves
    assert r.rounds == len(calls) <= 6
    net.apply(r.widths)
    assert abs(loss_and_grads(model, a, held, [0, 1, 2, 3], batch_size=4)[0] - r.loss_end) < 1e-6
    net.restore()


def test_prune_with_allocation_search(tokenizer, tmp_path):
    """`prune --allocation search`: the budget is met, the summary records the search, the checkpoint
    reloads to the same logits; one-shot calibration is refused in one line."""
    lm = LoadedModel(tiny_model("llama"), tokenizer, "tiny", None)
    lm.fingerprint = model_fingerprint(lm.model)
    _, p, s = prune(lm, C4, sparsity=0.4, allocation="search", multiple=8, samples=16, seqlen=64,
                    search_samples=4, search_rounds=3, progress=False, out=tmp_path / "s")
    assert s["neurons_after"] == sum(len(p.layers[i]["keep"]) for i in p.layers) == sum(s["kept"])
    assert all(k % 8 == 0 for k in s["kept"]) and abs(sum(s["kept"]) - 3 * 0.6 * 64) <= 8
    meta = p.meta["search"]
    assert meta["held_out_windows"] == 4 and meta["loss_end"] <= meta["loss_start"] and 1 <= meta["rounds"] <= 3
    ids = _ids(7, n=2)
    assert torch.equal(load_pruned(tmp_path / "s")(ids).logits, lm.model(ids).logits)
    with pytest.raises(npp.NeuroprojError, match="allocation search"):
        prune(LoadedModel(tiny_model("llama"), tokenizer, "tiny", None), C4, sparsity=0.4, allocation="search",
              calibration="oneshot", progress=False)


# ------------------------------------------------------------------------------ swap refinement (--swaps)
def _fit_error(W, G, K, ridge):
    A = chol_solve(G[K][:, K], (W @ G)[:, K], ridge)
    U = torch.zeros_like(W)
    U[:, K] = A
    return float(((U - W) @ G * (U - W)).sum())


def _gram(n, N, seed, dup=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, N, generator=g, dtype=torch.float64) * torch.rand(N, generator=g, dtype=torch.float64)
    if dup is not None:   # neuron dup[0] an almost exact copy of dup[1]
        h[:, dup[0]] = h[:, dup[1]] + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
    return h.T @ h / n


def test_swap_predictions_are_exact_single_moves_and_held_error_never_rises():
    """The OBS cost of dropping a kept neuron and the gain of adding a removed one equal brute-force refits
    (each alone); the refinement never raises the held-out error it reports, and that report equals a direct
    evaluation of the returned set."""
    N, d, ridge = 24, 6, 1e-9
    W = torch.randn(d, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    G, Gh = _gram(400, N, 2), _gram(400, N, 3)
    K = torch.arange(0, N, 2)                                      # a poor start: every other neuron
    base = _fit_error(W, G, K, ridge)
    H = G[K][:, K] + ridge * G[K][:, K].diagonal().mean() * torch.eye(len(K), dtype=G.dtype)
    Hinv = torch.linalg.inv(H)
    A = (W @ G)[:, K] @ Hinv
    for j, a in enumerate(K.tolist()):          # cost(a) = ‖W'_:,a‖² / (H⁻¹)_aa
        drop = K[K != a]
        pred = float((A[:, j] ** 2).sum() / Hinv[j, j])
        assert abs(_fit_error(W, G, drop, ridge) - base - pred) < 1e-6 * (1 + abs(pred))
    keep, info = refine_swaps(W, G, Gh, K, trials=40, ridge=ridge)
    assert keep.numel() == K.numel() and keep.unique().numel() == keep.numel() and torch.equal(keep, keep.sort().values)
    assert info["held_after"] <= info["held_before"] and info["swaps"] >= 1 and info["trials"] <= 40
    A2 = chol_solve(G[keep][:, keep], (W @ G)[:, keep], ridge)
    U = torch.zeros_like(W)
    U[:, keep] = A2
    direct = float(((U - W) @ Gh * (U - W)).sum()) / float((W @ Gh * W).sum())
    assert abs(direct - info["held_after"]) < 1e-9


def test_swap_refinement_replaces_a_duplicate_and_respects_held_out_judgement():
    """A kept set holding a neuron and its near-copy, with independent ones removed: a swap drops the copy when
    the held-out windows agree; held-out windows of another kind refuse swaps the fit proposes (the judgement
    is the held-out error, not the fit)."""
    N, d, ridge = 12, 5, 1e-9
    W = torch.randn(d, N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G = _gram(2000, N, 5, dup=(1, 0))
    Gh = _gram(2000, N, 6, dup=(1, 0))
    K = torch.arange(0, 10)                                        # keeps 0 and its copy 1; drops 10, 11
    keep, info = refine_swaps(W, G, Gh, K, trials=8, ridge=ridge)
    assert info["swaps"] >= 1 and not {0, 1} <= set(keep.tolist()) and info["held_after"] < info["held_before"]
    # independent neurons (diagonal Grams): the refit cannot compensate, so a swap changes the error by exactly
    # what the two neurons carry. On the fit text removed neuron 7 is loud and kept neuron 0 quiet; on the
    # held-back text the reverse: the fit proposes 0 → 7, the held-out error refuses it (and every other swap)
    W = torch.ones(d, 8, dtype=torch.float64)
    fit = torch.diag(torch.tensor([0.1, 1, 1, 1, 1, 1, 1, 10], dtype=torch.float64))
    held = torch.diag(torch.tensor([10, 1, 1, 1, 1, 1, 1, 0.01], dtype=torch.float64))
    K = torch.arange(6)
    keep2, info2 = refine_swaps(W, fit, held, K, trials=8, ridge=ridge)
    assert info2["swaps"] == 0 and info2["trials"] >= 1 and torch.equal(keep2, K)
    keep3, info3 = refine_swaps(W, fit, fit, K, trials=8, ridge=ridge)    # held-back text like the fit text
    assert info3["swaps"] >= 1 and 7 in keep3.tolist() and 0 not in keep3.tolist()


def test_prune_with_swaps(tokenizer, tmp_path):
    """`prune --swaps T`: the summary records the swaps (held-out error not raised), the widths are the
    requested ones, the checkpoint reloads to the same logits; --swaps 0 is bit-identical to no option;
    a one-shot calibration with swaps is refused."""
    def run(**kw):
        lm = LoadedModel(tiny_model("llama"), tokenizer, "tiny", None)
        lm.fingerprint = model_fingerprint(lm.model)
        return prune(lm, C4, sparsity=0.4, multiple=1, samples=16, seqlen=64, batch_size=2, progress=False, **kw)
    lm, p, s = run(swaps=6, out=tmp_path / "sw")
    meta = s["swaps"]
    assert meta["trials"] >= 1 and meta["held_out_error_after"] <= meta["held_out_error_before"]
    assert set(meta["layers"]) == {0, 1, 2} and s["kept"] == [38, 38, 38]
    ids = _ids(7, n=2)
    assert torch.equal(load_pruned(tmp_path / "sw")(ids).logits, lm.model(ids).logits)
    lm0, _, _ = run()
    lm1, _, s1 = run(swaps=0)
    assert "swaps" not in s1
    assert all(torch.equal(x, y) for x, y in zip(lm0.model.state_dict().values(), lm1.model.state_dict().values()))
    with pytest.raises(npp.NeuroprojError, match="swap"):
        run(swaps=4, calibration="oneshot")
