"""Neuron-level skip connections on SmolLM2-135M: how many neurons are predictable from earlier layers,
and what applying them saves and costs.

    OMP_NUM_THREADS=1 neuroproj-prune collect --model smollm2-135m --data ../shared/data/c4-train-sample-1000.jsonl \
        --samples 64 --seqlen 512 --seed 0 --cross-layer-window 2 --out /tmp/skips/stats_w2.safetensors
    OMP_NUM_THREADS=1 python eval/bench_skips.py --stats /tmp/skips/stats_w2.safetensors \
        --heldout-samples 8 --max-windows 10 --out eval/results/skips.md

Held-out R² on C4 windows drawn with another seed (1); perplexity on wikitext2-test.txt, seqlen 1024, the
first --max-windows windows. Every applied row is a fresh copy of the dense model.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import neuroproj_prune as npp
from neuroproj_prune.analysis.skips import find_skips

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stats", required=True)
    p.add_argument("--heldout-samples", type=int, default=8)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=10)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--thresholds", default="0.9,0.95,0.99")
    p.add_argument("--report", default="/tmp/skips/report")
    p.add_argument("--out", default="eval/results/skips.md")
    a = p.parse_args()
    torch.set_num_threads(1)
    th = [float(t) for t in a.thresholds.split(",")]
    t0 = time.time()
    lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
    stats = npp.load_stats(a.stats)
    rep = find_skips(stats, top_k=a.top_k, model=lm, data=str(DATA / "c4-train-sample-1000.jsonl"),
                     samples=a.heldout_samples, seqlen=512, seed=1, progress=False)
    t_find = time.time() - t0
    rep.save(a.report, min_r2=th[0], thresholds=th)
    wiki = str(DATA / "wikitext2-test.txt")

    def ppl(model):
        return npp.perplexity((model, lm.tokenizer), wiki, seqlen=a.seqlen, max_windows=a.max_windows,
                              progress=False)

    dense = ppl(lm.model)
    rows = []
    for pred in ("single", "topk"):
        for t in th:
            chosen = rep.select(t, pred)
            if not chosen:
                rows.append({"predictor": pred, "min_r2": t, "skipped": 0, "macs_removed_per_token": 0,
                             "ppl": dense["value"], "stored_bytes_per_token": 0})
                continue
            m = copy.deepcopy(lm.model)
            info = npp.apply_skips(m, rep, chosen=chosen, predictor=pred)
            r = ppl(m)
            rows.append({"predictor": pred, "min_r2": t, **info, "ppl": r["value"]})
            print(json.dumps(rows[-1]), flush=True)
    table = rep.summary_table(th)
    doc = {"dense_ppl": dense, "rows": rows, "counts": table, "meta": rep.meta, "seconds_find": round(t_find, 1),
           "seconds_total": round(time.time() - t0, 1)}
    Path(a.report, "bench.json").write_text(json.dumps(doc, indent=1, default=str))
    write_md(a, rep, table, th, dense, rows, t_find)


def write_md(a, rep, table, th, dense, rows, t_find):
    mt = rep.meta
    L = mt["num_layers"]
    b = []
    b.append("# Neuron-level skip connections on SmolLM2-135M\n")
    b.append(f"Statistics: `{mt['stats_data']}`, {mt['stats_tokens']} tokens, cross-layer window {mt['window']} "
             f"(so each neuron (m, j) may be predicted from layers m−{mt['window']}..m−1). R² below is **held-out**: "
             f"measured on {mt.get('heldout_tokens')} other C4 tokens ({mt.get('heldout_data')}). Predictors: "
             f"single = best earlier neuron, `a·h + b`; top-{mt['top_k']} = ridge (λ = {mt['ridge']}·mean source "
             f"variance) on the {mt['top_k']} earlier neurons with the largest |ρ|. Gated MLP (d_model = "
             f"{mt['hidden_size']}): a skipped neuron saves 2·{mt['hidden_size']} = {2 * mt['hidden_size']} MACs/token "
             f"(gate and up rows) minus 1 (single) or {mt['top_k']} (top-k) for the predictor; its output column "
             f"stays. Dense MLP MACs/token: {mt['dense_mlp_macs_per_token']:,} ({L} layers × 3 × 576 × 1536). "
             f"Analysis time {t_find:.0f} s (1 CPU thread).\n")
    b.append("## How many neurons are predictable (per target layer, held-out R²)\n")
    hs = " | ".join(f"{p} ≥{t}" for p in table for t in th)
    b.append(f"| layer | {hs} |\n|---|" + "---|" * (len(th) * len(table)))
    for m in rep.targets:
        vals = [str(v) for p in table for v in table[p]["per_layer"][str(m)]]
        b.append(f"| {m} | " + " | ".join(vals) + " |")
    b.append("| **all** | " + " | ".join(str(v) for p in table for v in table[p]["total"]) + " |")
    total = sum(rep.single[m]["r2"].numel() for m in rep.targets)
    b.append(f"\nOut of {total:,} neurons in {len(rep.targets)} target layers (layer 0 has no earlier layer).\n")
    # R² distribution summary
    qs = torch.tensor([0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    allr = torch.cat([rep.r2(m, "single")[~rep.dead[m]] for m in rep.targets])
    allk = torch.cat([rep.r2(m, "topk")[~rep.dead[m]] for m in rep.targets]) if rep.topk else None
    b.append("Best held-out R² over all neurons, quantiles 50/90/99/100 %: single "
             + " / ".join(f"{v:.3f}" for v in allr.quantile(qs).tolist())
             + ("" if allk is None else "; top-k " + " / ".join(f"{v:.3f}" for v in allk.quantile(qs).tolist())) + "\n")
    b.append(f"## Applied: MACs saved vs perplexity (wikitext2-test.txt, seqlen {a.seqlen}, first "
             f"{dense['windows']} windows = {dense['tokens']:,} predicted tokens)\n")
    b.append(f"Dense perplexity: **{dense['value']:.4f}**.\n")
    b.append("| predictor | R² ≥ | skipped neurons | MLP MACs/token removed | % of MLP MACs | stored bytes/token | "
             "perplexity | Δ ppl |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        pct = r["macs_removed_per_token"] / mt["dense_mlp_macs_per_token"]
        b.append(f"| {r['predictor']} | {r['min_r2']} | {r['skipped']} | {r['macs_removed_per_token']:,} | {pct:.3%} | "
                 f"{r['stored_bytes_per_token']} | {r['ppl']:.4f} | {r['ppl'] - dense['value']:+.4f} |")
    b.append("\nApplied rows use the selection rules of `SkipReport.select` (no skipped neuron is a source, at least "
             "one neuron left per layer); MACs are counted from the rewritten modules (`apply_skips`), not estimated.\n")
    Path(a.out).write_text("\n".join(b) + "\n")
    print("\n".join(b))


if __name__ == "__main__":
    main()
