"""Evaluation: perplexity by hand, batch invariance, lm-eval offline on local tasks, the `eval` command."""
from __future__ import annotations

import json
import math
import sys
import time

import pytest
import torch

import neuroproj_prune as npp
from neuroproj_prune import cli
from neuroproj_prune.evaluate.harness import lm_eval_tasks, load_tasks, local_tasks, tasks_dir

from conftest import REPO, SHAKESPEARE, WIKI, tiny_model

SNIPPET = SHAKESPEARE.read_text()[:3000]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_model("llama"), tokenizer


def hand_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """Total NLL and predicted tokens, one window at a time: plain logits, float64 log-softmax."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            total -= logp.gather(1, w[1:, None]).sum().item()
            count += w.numel() - 1
    return total, count


def test_perplexity_matches_hand_computation(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "text.txt"
    path.write_text(SNIPPET)
    seqlen = 64
    ids = torch.tensor(tok(SNIPPET, add_special_tokens=False)["input_ids"])
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = hand_nll(model, windows)
    ref = math.exp(nll / count)

    res = npp.perplexity(model, tok, str(path), seqlen=seqlen, batch_size=3, progress=False)
    assert res["windows"] == n and res["seqlen"] == seqlen and res["tokens"] == n * (seqlen - 1) == count
    assert res["value"] == pytest.approx(ref, rel=1e-6)
    assert res["nll"] == pytest.approx(nll / count, rel=1e-6)
    assert "text.txt" in res["data"] and "max_windows" not in res

    # invariant to the batch size; the call forms agree
    for bs in (1, n):
        assert npp.perplexity((model, tok), str(path), seqlen=seqlen, batch_size=bs,
                              progress=False)["value"] == pytest.approx(ref, rel=1e-6)
    # ready-made windows and max_windows (the first K)
    head = npp.perplexity(model, tok, windows, max_windows=2, progress=False)
    assert head["windows"] == 2 and head["max_windows"] == 2 and head["windows_total"] == n
    assert head["value"] == pytest.approx(math.exp(hand_nll(model, windows[:2])[0] / (2 * (seqlen - 1))), rel=1e-6)


def test_perplexity_errors(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(npp.NeuroprojError, match="not found"):
        npp.perplexity(model, tok, str(tmp_path / "missing.txt"), seqlen=32, progress=False)
    with pytest.raises(npp.NeuroprojError, match="context"):
        npp.perplexity(model, tok, str(SHAKESPEARE), seqlen=4096, progress=False)
    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(npp.NeuroprojError, match="fewer than one window"):
        npp.perplexity(model, tok, str(tmp_path / "short.txt"), seqlen=64, progress=False)


def test_local_tasks_listed():
    names = local_tasks()
    for n in ("local_wikitext2", "local_c4", "local_shakespeare", "local_perplexity"):
        assert n in names
    # the documents of each task join back to exactly the file's text
    sys.path.insert(0, str(tasks_dir()))
    try:
        import utils as task_utils
    finally:
        sys.path.remove(str(tasks_dir()))
    wiki = task_utils.documents("wikitext2")
    assert len(wiki) == 62 and "".join(wiki) == WIKI.read_text()
    assert "".join(task_utils.documents("shakespeare")) == SHAKESPEARE.read_text()
    assert len(task_utils.documents("c4")) == 1000


def test_lm_eval_local_task_agrees_with_own_nll(tiny, tmp_path):
    """lm-eval's rolling NLL on a document = a hand computation over lm-eval's windows; per token it agrees
    with `perplexity` on the same text up to window-boundary effects; word ppl = exp(NLL / words)."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = tiny
    L = 128
    res = lm_eval_tasks((model, tok), tasks=["local_shakespeare"], max_length=L, batch_size=8, limit=1)
    m = res["tasks"]["local_shakespeare"]
    assert m["samples"] == 1 and m["samples_total"] > 100
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(m)
    assert res["protocol"]["max_length"] == L

    sys.path.insert(0, str(tasks_dir()))
    try:
        import utils as task_utils
    finally:
        sys.path.remove(str(tasks_dir()))
    doc = task_utils.documents("shakespeare")[0]
    words, n_bytes = len(doc.split()), len(doc.encode())
    nll_lm = math.log(m["word_perplexity"]) * words
    assert nll_lm == pytest.approx(math.log(m["byte_perplexity"]) * n_bytes, rel=1e-9)
    assert m["bits_per_byte"] == pytest.approx(nll_lm / n_bytes / math.log(2), rel=1e-9)

    # the same quantity by hand: lm-eval's windows, our forward pass, float64 log-softmax
    ids = tok(doc)["input_ids"]
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll_hand, predicted = 0.0, 0
    with torch.no_grad():
        for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, L, 1)):
            inp = torch.tensor(ctx + pred)[:-1]
            logp = torch.log_softmax(model(inp[None]).logits[0].double(), -1)[-len(pred):]
            nll_hand -= logp.gather(1, torch.tensor(pred)[:, None]).sum().item()
            predicted += len(pred)
    assert predicted == len(ids)
    assert nll_lm == pytest.approx(nll_hand, rel=1e-5)

    # the project's token perplexity on the same text (windows of L, first token of each not predicted)
    path = tmp_path / "doc.txt"
    path.write_text(doc)
    own = npp.perplexity(model, tok, str(path), seqlen=L, progress=False)
    per_token_lm = nll_lm / len(ids)
    assert per_token_lm == pytest.approx(own["nll"], rel=0.03)
    # the documented relation: log word ppl = per-token NLL * tokens / words
    assert math.log(m["word_perplexity"]) == pytest.approx(per_token_lm * len(ids) / words, rel=1e-9)


def test_hub_task_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(npp.NeuroprojError) as e:
        load_tasks(["sciq"])
    msg = str(e.value)
    assert "\n" not in msg and "sciq" in msg and "local_wikitext2" in msg
    assert time.perf_counter() - t < 20   # no network retries, no full index of lm-eval's ~14k task YAMLs
    t = time.perf_counter()
    with pytest.raises(npp.NeuroprojError, match="unknown lm-eval task 'no_such_task_xyz'.*local_wikitext2"):
        load_tasks("local_wikitext2,no_such_task_xyz")
    assert time.perf_counter() - t < 20


def test_eval_command_json(tiny_dir, tmp_path, capsys):
    d = tiny_dir("llama")
    out = tmp_path / "res" / "eval.json"
    rc = cli.main(["eval", "--model", str(d), "--data", str(SHAKESPEARE), "--seqlen", "64", "--max-windows", "4",
                   "--tasks", "local_shakespeare", "--limit", "1", "--json", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"perplexity", "lm_eval"}
    p = res["perplexity"]
    assert {"value", "seqlen", "windows", "tokens", "data"} <= set(p)
    assert p["seqlen"] == 64 and p["windows"] == 4 and p["tokens"] == 4 * 63 and p["max_windows"] == 4
    assert math.isfinite(p["value"]) and "tinyshakespeare" in p["data"]
    assert res["lm_eval"]["tasks"]["local_shakespeare"]["word_perplexity"] > 1
    assert not list(out.parent.glob(".*tmp"))
    printed = capsys.readouterr().out
    assert "perplexity:" in printed and "word_perplexity" in printed


def test_eval_command_errors(tiny_dir, tmp_path, capsys):
    d = tiny_dir("llama")
    capsys.readouterr()
    rc = cli.main(["eval", "--model", str(d), "--data", str(tmp_path / "nope.txt"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neuroproj-prune: error:") and "not found" in err
    assert len(err.strip().splitlines()) == 1
    rc = cli.main(["eval", "--model", str(d), "--tasks", "sciq", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("neuroproj-prune: error:") and "local_wikitext2" in err
    assert len(err.strip().splitlines()) == 1


def test_task_yamls_have_no_absolute_paths():
    from neuroproj_prune.evaluate import tasks_dir

    yamls = sorted(tasks_dir().glob("*.yaml"))
    assert len(yamls) == 3
    for y in yamls:
        text = y.read_text()
        assert "/work/" not in text and "data_files" not in text


def test_smollm2_perplexity_plausible(smollm2):
    res = npp.perplexity(smollm2, str(WIKI), seqlen=512, max_windows=8, progress=False)
    assert res["windows"] == 8 and res["tokens"] == 8 * 511 and res["windows_total"] > 500
    print(f"SmolLM2-135M wikitext2 seqlen 512, first 8 windows: {res['value']:.3f}")
    assert 10 < res["value"] < 60
