"""Block reconstruction (`--reconstruct STEPS`): the kept gate/up/down trained against the dense block."""
from __future__ import annotations

import json

import pytest
import torch

from neuroproj_prune.cli import main
from neuroproj_prune.model import LoadedModel, adapter_for, model_fingerprint
from neuroproj_prune.prune import prune

from conftest import SHAKESPEARE, WIKI, tiny_model


def _mlp_error(model, dense, ids, layer=0):
    """Relative error ‖mlp(x) − mlp_dense(x)‖²/‖mlp_dense(x)‖² of layer `layer` on the MLP inputs x of `ids`
    (layer 0's inputs do not depend on any pruning: embeddings and an unpruned attention)."""
    a = adapter_for(model)
    got = {}
    h = a.mlp(model, layer).register_forward_hook(lambda m, args, out: got.update(x=args[0], y=out))
    with torch.no_grad():
        model(ids)
    h.remove()
    y_dense = a.mlp(dense, layer)(got["x"])
    return float((got["y"] - y_dense).pow(2).sum() / y_dense.pow(2).sum())


def _held_ids(tokenizer, n=8, T=64):
    ids = tokenizer(WIKI.read_text()[:200_000], return_tensors="pt").input_ids[0]
    return ids[: n * T].view(n, T)  # another text than the calibration's


@pytest.mark.parametrize("scope", ["mlp", "layer"])
def test_reconstruction_lowers_the_error_on_other_text(scope, tokenizer):
    dense = tiny_model("llama", hidden=32, inter=128)
    runs = {}
    for steps in (0, 150):
        lm = LoadedModel(tiny_model("llama", hidden=32, inter=128), tokenizer, "tiny", None)
        _, _, s = prune(lm, str(SHAKESPEARE), sparsity=0.5, samples=32, seqlen=64, multiple=1, reconstruct=steps,
                        reconstruct_lr=1e-2, reconstruct_scope=scope, progress=False)
        runs[steps] = (lm.model, s)
    rec = runs[150][1]["reconstruct"]
    assert set(map(int, rec["layers"])) == {0, 1, 2}
    for r in rec["layers"].values():  # early stopping keeps the best held-out weights, the fold's at worst
        assert r["loss_after"] <= r["loss_before"]
    assert rec["held_out_error_after"] < 0.95 * rec["held_out_error_before"]
    assert "reconstruct" not in runs[0][1]
    if scope == "mlp":  # on text neither the fit nor the early stopping saw
        held = _held_ids(tokenizer)
        assert _mlp_error(runs[150][0], dense, held) < 0.95 * _mlp_error(runs[0][0], dense, held)


def test_reconstructed_checkpoint_is_standard_and_reloads_identically(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = LoadedModel(tiny_model("llama"), tokenizer, "tiny", None)
    prune(lm, str(SHAKESPEARE), sparsity=0.25, samples=8, seqlen=64, multiple=8, reconstruct=10, out=tmp_path / "r",
          progress=False)
    ids = _held_ids(tokenizer, n=2)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert torch.equal(again(ids).logits, lm.model(ids).logits)
    summary = json.loads((tmp_path / "r" / "prune_summary.json").read_text())
    assert summary["config"]["reconstruct"] == 10 and "held_out_error_after" in summary["reconstruct"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_carry_by_the_mlps_change_equals_running_the_layer_again(family, tokenizer, monkeypatch):
    """After reconstruction (scope mlp) the pass carries out' = out + (MLP'(x) − MLP(x)) instead of running the
    whole layer again: the same plan and, up to float32 rounding of the addition (none here: the next layers'
    products round both to the same bfloat16 or float32 values), the same weights and logits."""
    from neuroproj_prune.prune import reconstruct

    def pruned():
        lm = LoadedModel(tiny_model(family, hidden=32, inter=128), tokenizer, "tiny", None)
        _, plan, _ = prune(lm, str(SHAKESPEARE), sparsity=0.5, samples=16, seqlen=64, multiple=1, reconstruct=20,
                           reconstruct_lr=1e-2, progress=False)
        return lm.model, plan

    calls = []
    change = reconstruct.MLPScope.change
    monkeypatch.setattr(reconstruct.MLPScope, "change", lambda self, *a: calls.append(1) or change(self, *a))
    carried, plan = pruned()
    assert len(calls) == 3   # every layer carried by its MLP's change
    monkeypatch.setattr(reconstruct.MLPScope, "change", lambda self, *a: None)   # the pass runs each layer again
    rerun, plan_rerun = pruned()
    assert plan.layers == plan_rerun.layers
    a, b = dict(carried.named_parameters()), dict(rerun.named_parameters())
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=1e-3, atol=1e-5), n
    ids = _held_ids(tokenizer, n=2)
    with torch.no_grad():
        assert torch.allclose(carried(ids).logits, rerun(ids).logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("flags", [["--reconstruct", "10", "--calibration", "oneshot"], ["--reconstruct", "-1"],
                                   ["--reconstruct", "5", "--reconstruct-lr", "0"],
                                   ["--reconstruct", "5", "--reconstruct-holdout", "1.0"],
                                   ["--reconstruct", "5", "--reconstruct-scope", "attention"]])
def test_bad_reconstruct_settings(flags, tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_dir()), "--data", str(SHAKESPEARE), "--samples", "4", "--seqlen", "32",
                 "--sparsity", "0.3", *flags, "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "reconstruct" in err[0], err
    assert not out.exists()
