"""Issue 28's table: SmolLM2-135M at the same count of removed decoder-layer parameters, by axis.

For each budget P (fraction of the decoder layers' parameters) and method, prune a fresh copy (128 × 512 C4
calibration windows unless --samples), save the checkpoint under --runs, and measure: perplexity on WikiText-2 and
TinyShakespeare (first --windows windows of 1024 tokens), LAMBADA (lm-eval's lambada_openai on the first --limit
documents: accuracy and perplexity), the prune time, the parameters actually removed. One JSON line per result is
appended to --json (a re-run skips what it holds), then the markdown table is printed.

    OMP_NUM_THREADS=2 python eval/blocks.py --budgets 0.2,0.35,0.5 --json eval/results/blocks.jsonl

Methods (all sequential wanda-sp + lstsq; the MLP widths prune's default gives a budget — per-layer, `global` — unless
--allocation or said; rows before 2026-12-07 late were measured with uniform widths, then the budget's default):
    mlp        --target-params P --axes mlp                   MLP neurons only
    heads      --target-params P --axes mlp,heads             heads (one level in every layer) + MLP
    attn       --target-params P --axes mlp,attn              attention sub-layers + MLP
    layers     --target-params P --axes mlp,layers            whole layers + MLP
    joint      --target-params P                              all four, split by measured loss
    speed      --target-params P --target-speedup S --latency F   the joint allocation that also reaches S by the
               latency file F (`neuroproj-prune latency`; eval/results/latency_q8_0.md): --speedup S --latency F
    shortgpt   the round(P·T / layer) layers of lowest block influence removed, nothing refitted (ShortGPT)
    flap       FLAP one-shot (select flap, fold bias) on the MLP at the same parameter count: FLAP's head pruning
               does not run on grouped-query attention (SmolLM2: 9 query heads in 3 groups), so only its MLP part
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import neuroproj_prune as npp
from neuroproj_prune.prune import prune
from neuroproj_prune.prune.budget import neuron_params
from neuroproj_prune.prune.speed import trunk_params

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
C4 = DATA / "c4-train-sample-1000.jsonl"
METHODS = ("mlp", "heads", "attn", "layers", "joint", "speed", "shortgpt", "flap")


def settings(method: str, P: float, model, speed: dict | None = None) -> dict:
    a = npp.adapter_for(model)
    if method == "speed":
        return {"target_params": P, **speed}
    if method in ("mlp", "heads", "attn", "layers", "joint"):
        axes = {"mlp": "mlp", "heads": "mlp,heads", "attn": "mlp,attn", "layers": "mlp,layers",
                "joint": "mlp,heads,attn,layers"}[method]
        return {"target_params": P, "axes": axes}
    T = trunk_params(model, a)
    if method == "shortgpt":
        per_layer = T / a.num_layers(model)
        return {"drop_layers": max(1, round(P * T / per_layer)), "layer_select": "influence", "fold": "none"}
    neurons = sum(a.width(model, i) for i in range(a.num_layers(model)))
    return {"sparsity": P * T / (neuron_params(model, a, 0) * neurons), "select": "flap", "fold": "bias",
            "calibration": "oneshot"}


def perplexity(model, tok, n: int, path: Path) -> float:
    """exp(mean NLL) over the first n windows of 1024 tokens (the sweep's protocol)."""
    from neuroproj_prune.stats.data import eval_windows

    w, _ = eval_windows(tok, str(path), 1024)
    w, nll, cnt = w[:n], 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(w), 2):
            x = w[i:i + 2]
            lp = torch.log_softmax(model(input_ids=x).logits.double()[:, :-1], -1).gather(-1, x[:, 1:, None])
            nll -= lp.sum().item()
            cnt += lp.numel()
    return math.exp(nll / cnt)


def lambada(ckpt: Path, limit: int) -> dict:
    r = npp.evaluate(str(ckpt), tasks="lambada_openai", limit=limit, device="cpu", progress=False)
    t = r["lm_eval"]["tasks"]["lambada_openai"]
    return {"lambada_acc": round(t["acc"], 4), "lambada_ppl": round(t["perplexity"], 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="0.2,0.35,0.5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--limit", type=int, default=500, help="LAMBADA documents (0: skip LAMBADA)")
    ap.add_argument("--runs", default=str(HERE.parent / "runs" / "blocks"))
    ap.add_argument("--json", default=str(HERE / "results" / "blocks.jsonl"))
    ap.add_argument("--speedup", type=float, default=None, help="method speed: the decode speed-up to reach")
    ap.add_argument("--latency", default=None, help="method speed: the latency file that prices it")
    ap.add_argument("--allocation", default=None, choices=("uniform", "global", "search"),
                    help="the MLP widths of every method that budgets (mlp … speed; default: prune's, global "
                         "under a budget)")
    a = ap.parse_args()
    if "speed" in a.methods.split(",") and (a.speedup is None or a.latency is None):
        ap.error("method speed needs --speedup S and --latency FILE")
    speed = {"target_speedup": a.speedup, "latency": a.latency}
    done = set()
    out = Path(a.json)
    if out.exists():
        done = {(r["method"], r["budget"]) for r in map(json.loads, out.read_text().splitlines()) if r}
    budgets = [float(x) for x in a.budgets.split(",")]
    methods = a.methods.split(",")
    bad = set(methods) - set(METHODS)
    if bad:
        ap.error(f"unknown method(s) {sorted(bad)}: choose from {', '.join(METHODS)}")
    jobs = [(None, "dense")] + [(P, m) for P in budgets for m in methods]
    for P, m in jobs:
        key = (m, P)
        if key in done:
            continue
        lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
        row = {"method": m, "budget": P, "samples": a.samples, "windows": a.windows,
               "date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime())}
        ckpt = Path(a.runs) / (m if P is None else f"{m}-{P}")
        if P is None:
            ckpt = None
        else:
            kw = settings(m, P, lm.model, speed)
            if a.allocation and "target_params" in kw:
                kw["allocation"] = a.allocation
            row["settings"] = kw
            t = time.time()
            lm, plan, s = prune(lm, str(C4), samples=a.samples, out=ckpt, overwrite=True, progress=False, **kw)
            row.update(prune_s=round(time.time() - t, 1), removed=round(s["removed_trunk_fraction"], 4),
                       heads=s["heads"][0] if s["heads"] else None, dropped=s["dropped_layers"],
                       attn_removed=s.get("removed_attention"),
                       mlp_neurons=s["neurons_after"], budget_choice=(s.get("budget") or {}).get("chosen"),
                       budget_finalists=(s.get("budget") or {}).get("finalists"))
        for text, f in (("wiki", "wikitext2-test.txt"), ("shakespeare", "tinyshakespeare.txt")):
            row[f"ppl_{text}"] = round(perplexity(lm.model, lm.tokenizer, a.windows, DATA / f), 3)
        if a.limit:
            row.update(lambada(ckpt or "smollm2-135m", a.limit))
        print(json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    rows = [json.loads(l) for l in out.read_text().splitlines() if l]
    print("| budget | method | removed | heads | layers dropped | attention removed | WikiText-2 | TinyShakespeare | "
          "LAMBADA acc | LAMBADA ppl | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["budget"] or 0, METHODS.index(r["method"]) if r["method"] in METHODS else -1)):
        print(f"| {r['budget'] or 0:.0%} | {r['method']} | {r.get('removed', 0):.1%} | {r.get('heads')} | "
              f"{r.get('dropped')} | {r.get('attn_removed')} | {r['ppl_wiki']:.2f} | {r['ppl_shakespeare']:.2f} | "
              f"{r.get('lambada_acc')} | "
              f"{r.get('lambada_ppl')} | {r.get('prune_s')} |")


if __name__ == "__main__":
    main()
