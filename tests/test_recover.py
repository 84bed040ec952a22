"""`recover`: distillation from the dense teacher into a pruned checkpoint, in the input's format, resumable."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from neuroproj_prune.model import SECTION, load_pruned
from neuroproj_prune.cli import build_parser, main
from neuroproj_prune.errors import NeuroprojError
from neuroproj_prune.prune import prune
from neuroproj_prune.recover import RecoverConfig, recover
from neuroproj_prune.recover.distill import STATE_DIR
from neuroproj_prune.run import DEFAULTS, run

from conftest import C4, SHAKESPEARE, WIKI, tiny_model

# tiny-model settings: 64-token windows, 4 per step; a high learning rate for a random model
FAST = dict(seqlen=64, batch_size=4, grad_accum=1, eval_windows=4, lr=3e-3)


@pytest.fixture(scope="module")
def dense(tiny_dir):
    return tiny_dir("llama", inter=128)


@pytest.fixture(scope="module")
def pruned(dense, tmp_path_factory):
    """A uniform-width (standard) checkpoint pruned at 50 % from the dense tiny llama."""
    out = tmp_path_factory.mktemp("rec") / "pruned"
    prune(str(dense), str(C4), sparsity=0.5, samples=8, seqlen=64, multiple=1, out=out, progress=False)
    assert SECTION not in json.loads((out / "config.json").read_text())
    return out


@pytest.fixture(scope="module")
def pruned_per_layer(dense, tmp_path_factory):
    """A per-layer-width checkpoint (global allocation): the config has a neuroproj_prune section."""
    out = tmp_path_factory.mktemp("rec") / "pruned-pl"
    prune(str(dense), str(C4), sparsity=0.5, samples=8, seqlen=64, multiple=1, allocation="global",
          alloc_samples=4, out=out, progress=False)
    assert "widths" in json.loads((out / "config.json").read_text())[SECTION]
    return out


def _windows(tokenizer, path, n=4, T=64):
    ids = tokenizer(Path(path).read_text()[:100_000], return_tensors="pt").input_ids[0]
    return ids[: n * T].view(n, T)


@torch.no_grad()
def _kl(model, teacher, ids) -> float:
    s, t = model(ids).logits, teacher(ids).logits
    return float(F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1), log_target=True,
                          reduction="batchmean"))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


# ------------------------------------------------------------------------------------- (a) it recovers
def test_recovery_lowers_the_kl_to_the_teacher_on_other_text(dense, pruned, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, rep = recover(pruned, str(SHAKESPEARE), tmp_path / "r", tokens=60 * 256, eval_every=20, progress=False,
                      **FAST)
    teacher = AutoModelForCausalLM.from_pretrained(dense).eval()
    before = AutoModelForCausalLM.from_pretrained(pruned).eval()
    wiki = _windows(tokenizer, WIKI)  # neither trained on nor held out: another text
    kl_before, kl_after = _kl(before, teacher, wiki), _kl(lm.model, teacher, wiki)
    assert kl_after < 0.8 * kl_before, (kl_before, kl_after)
    h = rep["held_out"]
    assert h["kl_after"] < h["kl_before"] and rep["steps"] == 60 and rep["tokens_seen"] == 60 * 256
    assert [e["step"] for e in rep["evals"]] == [0, 20, 40, 60]
    assert rep["kept"] == "best" and rep["kept_step"] == min(rep["evals"], key=lambda e: e["loss"])["step"]
    assert len(rep["loss_curve"]["loss"]) == 60
    # the input's summary and plan are carried over; nothing of the resumable state is left
    s_in = json.loads((pruned / "prune_summary.json").read_text())
    s_out = json.loads((tmp_path / "r" / "prune_summary.json").read_text())
    assert {k: v for k, v in s_out.items() if k != "recover"} == s_in and s_out["recover"]["teacher"] == str(dense)
    assert (tmp_path / "r" / "plan.json").read_text() == (pruned / "plan.json").read_text()
    assert not (tmp_path / "r" / STATE_DIR).exists()


def test_keep_last_writes_the_final_weights(pruned, tmp_path):
    """keep=best with an evaluation that is worse than the input keeps the input's weights; keep=last not."""
    from transformers import AutoModelForCausalLM

    bad = dict(FAST, lr=1.0)   # a learning rate that wrecks the model
    _, best = recover(pruned, str(SHAKESPEARE), tmp_path / "b", tokens=4 * 256, progress=False, **bad)
    _, last = recover(pruned, str(SHAKESPEARE), tmp_path / "l", tokens=4 * 256, keep="last", progress=False, **bad)
    assert best["kept_step"] == 0 and last["kept_step"] == 4
    assert last["held_out"]["ppl_after"] > last["held_out"]["ppl_before"]
    ids = torch.arange(64)[None] % 300
    ref = _logits(AutoModelForCausalLM.from_pretrained(pruned), ids)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b"), ids), ref)
    assert not torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "l"), ids), ref)


# ------------------------------------------------------------------------------ (b) the input's format
def test_uniform_output_is_a_standard_checkpoint(pruned, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, _ = recover(pruned, str(SHAKESPEARE), tmp_path / "r", tokens=5 * 256, keep="last", progress=False, **FAST)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert SECTION not in cfg and cfg["intermediate_size"] == 64
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    ids = _windows(tokenizer, WIKI, n=2)
    assert torch.equal(_logits(again, ids), _logits(lm.model, ids))
    assert not torch.equal(_logits(again, ids), _logits(AutoModelForCausalLM.from_pretrained(pruned), ids))


def test_per_layer_output_stays_per_layer(pruned_per_layer, tokenizer, tmp_path):
    from neuroproj_prune.model import adapter_for

    lm, _ = recover(pruned_per_layer, str(SHAKESPEARE), tmp_path / "r", tokens=5 * 256, keep="last",
                    progress=False, **FAST)
    section = json.loads((tmp_path / "r" / "config.json").read_text())[SECTION]
    assert section["widths"] == json.loads((pruned_per_layer / "config.json").read_text())[SECTION]["widths"]
    again = load_pruned(tmp_path / "r")
    a = adapter_for(again)
    assert [a.width(again, i) for i in range(a.num_layers(again))] == section["widths"]
    ids = _windows(tokenizer, WIKI, n=2)
    assert torch.equal(_logits(again, ids), _logits(lm.model, ids))
    assert not torch.equal(_logits(again, ids), _logits(load_pruned(pruned_per_layer), ids))


# -------------------------------------------------------------------------------------- (c) resume
class Killed(KeyboardInterrupt):
    pass


def _kill_at(step):
    def cb(s, record, model):
        if s == step:
            raise Killed
    return cb


@pytest.fixture(scope="module")
def pruned_tied(tokenizer, tmp_path_factory):
    """A pruned tiny llama whose head is tied to the embeddings (as SmolLM2's): stored once, in every state."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("tied")
    c = tiny_config("llama", inter=128)
    c.tie_word_embeddings, c.initializer_range = True, 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(c).save_pretrained(d / "dense")
    tokenizer.save_pretrained(d / "dense")
    prune(str(d / "dense"), str(C4), sparsity=0.5, samples=8, seqlen=64, multiple=1, out=d / "pruned", progress=False)
    assert json.loads((d / "pruned" / "config.json").read_text())["tie_word_embeddings"]
    return d / "pruned"


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_interrupted_and_resumed_equals_uninterrupted(which, pruned, pruned_tied, tmp_path, capsys):
    from safetensors.torch import load_file

    pruned = {"untied": pruned, "tied": pruned_tied}[which]
    cfg = RecoverConfig.make(tokens=8 * 256, eval_every=2, save_every=3, **FAST)
    _, ref = recover(pruned, str(SHAKESPEARE), tmp_path / "a", cfg, progress=False)
    with pytest.raises(Killed):
        recover(pruned, str(SHAKESPEARE), tmp_path / "b", cfg, progress=False, callback=_kill_at(4))
    # killed after step 4: the state of step 3 is there, and nothing else
    assert [p.name for p in (tmp_path / "b").iterdir()] == [STATE_DIR]
    assert json.loads((tmp_path / "b" / STATE_DIR / "progress.json").read_text())["step"] == 3
    # other settings do not resume it: refused, the state kept
    assert main(["recover", str(pruned), "--data", str(SHAKESPEARE), "--out", str(tmp_path / "b"), "--tokens",
                 str(8 * 256), "--seqlen", "64", "--batch-size", "4", "--grad-accum", "1", "--eval-windows", "4",
                 "--eval-every", "2", "--save-every", "3", "--lr", "1e-3"]) == 2
    assert "lr 0.003 -> 0.001" in capsys.readouterr().err
    assert (tmp_path / "b" / STATE_DIR / "progress.json").is_file()
    logs = []
    _, got = recover(pruned, str(SHAKESPEARE), tmp_path / "b", cfg, progress=False, log=logs.append)
    assert any("resuming" in m and "step 3" in m for m in logs), logs
    assert got["loss_curve"] == ref["loss_curve"] and got["evals"] == ref["evals"]
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    assert not (tmp_path / "b" / STATE_DIR).exists()


# ------------------------------------------------------------------------------------------ (d) LoRA
def test_lora_adapts_the_mlp_and_merges_into_a_plain_checkpoint(dense, pruned, tokenizer, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lm, rep = recover(pruned, str(SHAKESPEARE), tmp_path / "r", tokens=30 * 256, method="lora", lora_rank=4,
                      progress=False, **dict(FAST, lr=1e-2))
    w_in, w_out = load_file(str(pruned / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert w_in.keys() == w_out.keys()   # no lora_A / lora_B / base_layer: merged and unloaded
    changed = {k for k in w_in if not torch.equal(w_in[k], w_out[k])}
    assert changed and all(".mlp." in k for k in changed), changed   # the default targets: MLP projections only
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert not any("lora" in n for n, _ in again.named_modules())
    ids = _windows(tokenizer, WIKI, n=2)
    assert torch.equal(_logits(again, ids), _logits(lm.model, ids))
    teacher = AutoModelForCausalLM.from_pretrained(dense).eval()
    assert _kl(again, teacher, ids) < _kl(AutoModelForCausalLM.from_pretrained(pruned).eval(), teacher, ids)
    assert rep["method"] == "lora" and rep["held_out"]["kl_after"] < rep["held_out"]["kl_before"]


# ------------------------------------------------------------------------------------ (e) bad inputs
@pytest.fixture(scope="module")
def other_teachers(tmp_path_factory, tokenizer):
    """Teachers that are not the pruned model's dense one: another family, another vocabulary, other weights."""
    made = {}
    for name, family, kw in (("gpt2", "gpt2", {}), ("vocab", "llama", {"vocab": 500}), ("seed", "llama", {"seed": 1})):
        d = tmp_path_factory.mktemp(f"teacher-{name}")
        if "vocab" in kw:
            from conftest import tiny_config
            from transformers import AutoModelForCausalLM

            c = tiny_config("llama", inter=128)
            c.vocab_size = kw["vocab"]
            AutoModelForCausalLM.from_config(c).save_pretrained(d)
        else:
            tiny_model(family, inter=128, seed=kw.get("seed", 0)).save_pretrained(d)
        tokenizer.save_pretrained(d)
        made[name] = d
    return made


def _bad_cases(pruned, tmp, teachers):
    empty, binary, file_ = tmp / "empty.txt", tmp / "binary.txt", tmp / "a-file"
    empty.write_text("")
    binary.write_bytes(b"\x00\x01\x02 text\x00" * 100)
    file_.write_text("x")
    (tmp / "not-a-checkpoint").mkdir()
    return {
        "not a checkpoint": ([str(tmp / "not-a-checkpoint")], "not a checkpoint"),
        "missing dir": ([str(tmp / "nowhere")], "not a checkpoint"),
        "teacher family": ([str(pruned), "--teacher", str(teachers["gpt2"])], "another model"),
        "teacher vocab": ([str(pruned), "--teacher", str(teachers["vocab"])], "another vocabulary"),
        "teacher weights": ([str(pruned), "--teacher", str(teachers["seed"])], "not the dense model"),
        "tokens 0": ([str(pruned), "--tokens", "0"], "tokens must be at least 1"),
        "tokens < a step": ([str(pruned), "--tokens", "100"], "less than one step"),
        "lr 0": ([str(pruned), "--lr", "0"], "lr must be > 0"),
        "lr < 0": ([str(pruned), "--lr=-1e-4"], "lr must be > 0"),
        "method": ([str(pruned), "--method", "qlora"], "unknown method"),
        "empty data": ([str(pruned), "--data", str(empty)], "holds no text"),
        "binary data": ([str(pruned), "--data", str(binary)], "not UTF-8"),
        "missing data": ([str(pruned), "--data", str(tmp / "none.jsonl")], "not found"),
        "lora targets": ([str(pruned), "--method", "lora", "--lora-targets", "c_attn"], "match no module"),
        "out under a file": ([str(pruned), "--out", str(file_ / "out")], "is a file"),
        "out = input": ([str(pruned), "--out", str(pruned)], "must differ"),
    }


@pytest.mark.parametrize("case", ["not a checkpoint", "missing dir", "teacher family", "teacher vocab",
                                  "teacher weights", "tokens 0", "tokens < a step", "lr 0", "lr < 0", "method",
                                  "empty data", "binary data", "missing data", "lora targets", "out under a file",
                                  "out = input"])
def test_bad_input_one_line_exit_2_nothing_written(case, pruned, other_teachers, tmp_path, capsys):
    argv, match = _bad_cases(pruned, tmp_path, other_teachers)[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in pruned.iterdir())
    args = ["recover", *argv[:1], "--data", str(SHAKESPEARE), "--out", str(out), "--seqlen", "64", "--batch-size",
            "4", "--grad-accum", "1", "--tokens", "1024", "--eval-windows", "4", "--quiet", *argv[1:]]
    code = main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in pruned.iterdir()) == before


def test_existing_out_is_refused_without_overwrite(pruned, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    common = ["recover", str(pruned), "--data", str(SHAKESPEARE), "--out", str(out), "--seqlen", "64",
              "--batch-size", "4", "--grad-accum", "1", "--tokens", "512", "--eval-windows", "4", "--quiet"]
    assert main(common) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main([*common, "--overwrite"]) == 0
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_checkpoint_without_summary_needs_a_teacher(dense, tmp_path, capsys):
    assert main(["recover", str(dense), "--data", str(SHAKESPEARE), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "--teacher" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- config, CLI and recipe
def test_one_config_makes_cli_recipe_and_api():
    names = {f.name for f in dataclasses.fields(RecoverConfig)}
    sub = build_parser()._subparsers._group_actions[0].choices["recover"]
    assert names <= {a.dest for a in sub._actions}
    assert set(DEFAULTS["recover"]) == (names - {"teacher"}) | {"enabled", "data"}
    for f in dataclasses.fields(RecoverConfig):
        if f.name != "teacher":
            assert DEFAULTS["recover"][f.name] == f.default, f.name
    with pytest.raises(NeuroprojError, match="warmup"):
        RecoverConfig.make(warmup=1.0)
    with pytest.raises(NeuroprojError, match="unknown recover setting"):
        RecoverConfig.make(learning_rate=1e-3)


def test_recipe_stage_recovers_and_eval_reads_the_recovered_model(dense, tmp_path):
    r = {
        "model": str(dense), "output_dir": str(tmp_path / "run"),
        "calibration": {"data": str(C4), "samples": 8, "seqlen": 64},
        "stats": {"enabled": False}, "report": {"enabled": False},
        "prune": {"sparsity": 0.5, "multiple": 8},
        "recover": {"enabled": True, "data": str(SHAKESPEARE), "tokens": 4 * 256, "seqlen": 64, "batch_size": 4,
                    "grad_accum": 1, "eval_windows": 4, "lr": 3e-3, "keep": "last"},
        "eval": {"data": str(WIKI), "seqlen": 64, "max_windows": 4, "dense": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    quiet = dict(progress=False, log=lambda *a: None)
    res = run(path, **quiet)
    out = Path(res["output_dir"])
    assert res["ran"] == ["prune", "recover", "eval"], res
    ev = json.loads((out / "eval.json").read_text())
    assert ev["model"]["spec"] == str(out / "recovered")
    assert json.loads((out / "recovered" / "prune_summary.json").read_text())["recover"]["steps"] == 4
    assert run(path, **quiet)["ran"] == []                                  # nothing changed
    assert run(path, ["recover.lr=0.001"], **quiet)["ran"] == ["recover", "eval"]
    assert run(path, ["recover.enabled=false"], **quiet)["ran"] == ["eval"]  # eval now reads pruned/ again
    assert json.loads((out / "eval.json").read_text())["model"]["spec"] == str(out / "pruned")
    with pytest.raises(NeuroprojError, match="recover.lr"):
        run(path, ["recover.lr=0"], **quiet)
