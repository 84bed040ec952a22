"""Deploy as users do: checkpoints in the dtype of the model's own files (`--save-dtype`), and a model card
(README.md with Hugging Face front matter) in every checkpoint `prune` and `recover` write."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import neuroproj_prune as npp
from neuroproj_prune.cli import main
from neuroproj_prune.model import source_dtype
from neuroproj_prune.model.card import read_front_matter

from conftest import C4, SHAKESPEARE, tiny_model

SMALL = dict(samples=8, seqlen=64, multiple=8, device="cpu", progress=False)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory, tokenizer):
    """A tiny llama whose own files are bfloat16 (hidden 64, MLP 256: the MLP is most of its weights)."""
    d = tmp_path_factory.mktemp("bf16") / "dense"
    tiny_model("llama", dtype=torch.bfloat16, hidden=64, inter=256).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def _dtypes(d) -> set:
    out = set()
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def _bytes(d) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _card(d) -> dict:
    front = read_front_matter(d / "README.md")
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation", front
    assert {"neuroproj-prune", "pruned"} <= set(front["tags"]), front
    return front


def test_bfloat16_model_is_saved_in_bfloat16(bf16_dir, tmp_path):
    """Pruned in float32 on the CPU, written in bfloat16 (its files' dtype): every tensor bfloat16, half the bytes
    of the float32 checkpoint of the same prune, and the written weights are the pruned model's rounded to
    bfloat16 (not re-pruned, not cast before the fold: the float32 save holds the same weights unrounded)."""
    assert source_dtype(str(bf16_dir)) == torch.bfloat16
    lm, _, s = npp.prune(str(bf16_dir), str(C4), sparsity=0.5, out=tmp_path / "bf16", **SMALL)
    assert next(lm.model.parameters()).dtype == torch.float32          # computed in float32
    assert (s["source_dtype"], s["save_dtype"]) == ("bfloat16", "bfloat16")
    assert _dtypes(tmp_path / "bf16") == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, _, s32 = npp.prune(str(bf16_dir), str(C4), sparsity=0.5, out=tmp_path / "f32", save_dtype="float32", **SMALL)
    assert s32["save_dtype"] == "float32" and _dtypes(tmp_path / "f32") == {"F32"}
    ratio = _bytes(tmp_path / "bf16") / _bytes(tmp_path / "f32")
    assert 0.49 < ratio < 0.52, ratio
    back = npp.load_model(str(tmp_path / "bf16"), dtype="float32", device="cpu").model.state_dict()
    full = npp.load_model(str(tmp_path / "f32"), dtype="float32", device="cpu").model.state_dict()
    mem = lm.model.state_dict()
    assert any(not torch.equal(full[k], back[k]) for k in back)        # the float32 save is not already bf16
    for k in back:
        assert torch.equal(back[k], mem[k].to(torch.bfloat16).float()), k
        assert torch.equal(full[k], mem[k]), k


def test_float32_model_stays_float32(tiny_dir, tmp_path):
    d = tiny_dir("llama")
    _, _, s = npp.prune(str(d), str(C4), sparsity=0.5, out=tmp_path / "p", **SMALL)
    assert (s["source_dtype"], s["save_dtype"]) == ("float32", "float32") and _dtypes(tmp_path / "p") == {"F32"}
    _, _, s = npp.prune(str(d), str(C4), sparsity=0.5, out=tmp_path / "h", save_dtype="bfloat16", **SMALL)
    assert s["save_dtype"] == "bfloat16" and _dtypes(tmp_path / "h") == {"BF16"}


def test_prune_cli_writes_a_card_naming_its_command(bf16_dir, tmp_path, capsys):
    argv = ["prune", "--model", str(bf16_dir), "--data", str(C4), "--sparsity", "0.5", "--samples", "8", "--seqlen",
            "64", "--multiple", "8", "--allocation", "global", "--alloc-samples", "4", "--device", "cpu",
            "--out", str(tmp_path / "p")]
    assert main(argv) == 0
    out = tmp_path / "p"
    front = _card(out)
    assert front["base_model"] == str(bf16_dir)
    card = (out / "README.md").read_text()
    summary = json.loads((out / "prune_summary.json").read_text())
    assert summary["command"] == "neuroproj-prune " + " ".join(argv) and summary["command"] in card
    assert ", ".join(map(str, summary["kept"])) in card            # per-layer widths
    assert "load_pruned" in card and "wanda-sp" in card and "c4-train-sample-1000.jsonl" in card
    assert "bfloat16" in card


def test_recover_card_has_the_held_out_perplexities_and_keeps_bfloat16(bf16_dir, tmp_path):
    pruned = tmp_path / "p"
    npp.prune(str(bf16_dir), str(C4), sparsity=0.5, out=pruned, **SMALL)
    _, rep = npp.recover(pruned, str(SHAKESPEARE), tmp_path / "r", tokens=4 * 256, seqlen=64, batch_size=4,
                         grad_accum=1, eval_windows=4, eval_every=0, progress=False, device="cpu")
    out = tmp_path / "r"
    assert rep["save_dtype"] == "bfloat16" and _dtypes(out) == {"BF16"}
    assert _card(out)["base_model"] == str(bf16_dir)     # the dense model, not the pruned input
    card = (out / "README.md").read_text()
    h = rep["held_out"]
    assert f"{h['ppl_before']:.3f}" in card and f"{h['ppl_after']:.3f}" in card and f"{h['teacher_ppl']:.3f}" in card
    assert rep["command"].startswith("npp.recover(") and rep["command"] in card
    assert json.loads((pruned / "prune_summary.json").read_text())["command"] in card   # the prune's too


def test_streamed_prune_writes_the_same_bfloat16_checkpoint(bf16_dir, tmp_path):
    """--offload disk writes the layers as it goes (in the compute dtype) and casts them when it assembles the
    checkpoint: the same files, byte for byte, as the unstreamed prune's bfloat16 save."""
    for off in ("none", "disk"):
        npp.prune(str(bf16_dir), str(C4), sparsity=0.5, out=tmp_path / off, offload=off, **SMALL)
    files = sorted(p.name for p in (tmp_path / "none").iterdir())
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == files and _dtypes(tmp_path / "disk") == {"BF16"}
    for f in files:
        if f not in ("prune_summary.json", "README.md"):   # they record the offload
            assert (tmp_path / "disk" / f).read_bytes() == (tmp_path / "none" / f).read_bytes(), f
