"""Quick ablations of `prune` on SmolLM2: each config prunes a fresh copy and prints perplexity on the first
windows of WikiText-2 (seqlen 1024). Cheaper than the sweep protocol; only the ranking is meant to be read.

    OMP_NUM_THREADS=1 python eval/ablate.py --samples 32 --windows 10 --multiple 1 \
        --configs 'dense;wanda-sp:lstsq:sequential:layer:0.3:weighting="rms";obs:lstsq:oneshot:layer:0.3'

A config is SELECT:FOLD:CALIBRATION:TARGET:SPARSITY[:key=value...]: the first five and the extra keys are
fields of `neuroproj_prune.PruneConfig` (values parsed as Python literals: weighting="rms", ridge=1e-6,
add_bias=True, output_weighting="norms"); a config is validated before any work.
"""
from __future__ import annotations

import argparse
import ast
import math
import time
from pathlib import Path

import torch

import neuroproj_prune as npp
from neuroproj_prune.stats.data import eval_windows
from neuroproj_prune.prune import PruneConfig, prune

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


TEXTS = {"wiki": "wikitext2-test.txt", "shakespeare": "tinyshakespeare.txt"}


def ppl(model, tok, n, text="wiki"):
    """exp(mean NLL) over the first n windows of 1024 tokens (the sweep's protocol, fewer windows)."""
    w, _ = eval_windows(tok, str(DATA / TEXTS[text]), 1024)
    w, nll, cnt = w[:n], 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(w), 2):
            x = w[i:i + 2]
            logits = model(input_ids=x).logits.double()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None]).squeeze(-1)
            nll -= lp.sum().item()
            cnt += lp.numel()
    return math.exp(nll / cnt)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", required=True, help="';'-separated configs (see above), or 'dense'")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--multiple", type=int, default=1)
    ap.add_argument("--texts", default="wiki", help="comma-separated evaluation texts: " + ", ".join(TEXTS))
    a = ap.parse_args()
    texts = a.texts.split(",")
    if set(texts) - set(TEXTS):
        ap.error(f"unknown text(s) {sorted(set(texts) - set(TEXTS))}: choose from {', '.join(TEXTS)}")

    def ppls(lm):
        return " ".join(f"{t} {ppl(lm.model, lm.tokenizer, a.windows, t):.3f}" for t in texts)
    configs = {}
    for cfg in a.configs.split(";"):  # all validated first: a typo fails before hours of pruning
        if cfg == "dense":
            continue
        sel, fold, cal, tgt, sp, *rest = cfg.split(":")
        extra = {}
        for kv in rest:
            k, v = kv.split("=", 1)
            try:
                extra[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                extra[k] = v
        base = dict(samples=a.samples, seqlen=512, multiple=a.multiple)   # a config's own keys win
        configs[cfg] = PruneConfig.make(select=sel, fold=fold, calibration=cal, target=tgt, sparsity=float(sp),
                                        **{**base, **extra})
    for cfg in a.configs.split(";"):
        if cfg == "dense":
            lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
            print("dense", ppls(lm), flush=True)
            continue
        t = time.time()
        lm, _, s = prune("smollm2-135m", str(DATA / "c4-train-sample-1000.jsonl"), configs[cfg], progress=False)
        took = time.time() - t
        rec = s.get("reconstruct")
        rec = f" held-out error {rec['held_out_error_before']:.4f}->{rec['held_out_error_after']:.4f}" if rec else ""
        if s.get("swaps"):
            sw = s["swaps"]
            rec += (f" swaps {sw['accepted']}/{sw['trials']} held-out error {sw['held_out_error_before']:.4f}->"
                    f"{sw['held_out_error_after']:.4f}")
        if s.get("search"):
            sr = s["search"]
            rec += f" search loss {sr['loss_start']:.4f}->{sr['loss_end']:.4f} in {sr['rounds']} rounds kept {s['kept']}"
        print(cfg, "ppl", ppls(lm), "removed", round(s["actual_sparsity"], 4), "prune s", f"{took:.1f}{rec}",
              flush=True)


if __name__ == "__main__":
    main()
