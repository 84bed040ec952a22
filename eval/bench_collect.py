"""Throughput of `collect` against a plain forward pass over the same tokens (issue 2, "Measure").

    python eval/bench_collect.py --samples 16 --seqlen 256 --repeats 3 --md eval/results/collect.md

Each measurement runs in its own subprocess (so that its peak RSS, `ru_maxrss`, is its own): it loads the
model, draws the calibration windows, warms up on one batch, then times
- `forward`: `model(input_ids=batch, use_cache=False)` on every batch (the full model, LM head included);
- `trunk` (with --trunk): the decoder stack alone, `model.base_model(...)`, no LM head — what collect runs,
  so collect/trunk isolates the cost of the statistics themselves;
- `collect`: `npp.collect(model, ids, ...)` on the same windows and batch size (statistics of every layer,
  site mlp.neurons: float32 Gram products, float64 totals), without writing the file.
The measurements alternate, `--repeats` times each; the table gives the median (and the spread).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4-train-sample-1000.jsonl"


def measure(a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    import neuroproj_prune as npp
    from neuroproj_prune.stats.data import calibration_samples

    if a.threads:
        torch.set_num_threads(a.threads)
    lm = npp.load_model(a.model, dtype="float32", device="cpu")
    ids, _ = calibration_samples(lm.tokenizer, str(a.data), a.samples, a.seqlen, seed=0)
    bs = a.batch_size or max(1, 4096 // a.seqlen)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        lm.model(input_ids=ids[:bs], use_cache=False)          # warm-up
    t0 = time.perf_counter()
    if a.measure in ("forward", "trunk"):
        net = lm.model if a.measure == "forward" else lm.model.base_model   # trunk: no LM head
        with torch.inference_mode():
            for b in range(0, ids.shape[0], bs):
                net(input_ids=ids[b:b + bs], use_cache=False)
    else:
        npp.collect(lm, ids, batch_size=bs, sites=a.sites, cross_layer_window=a.cross_layer_window, progress=False)
    dt = time.perf_counter() - t0
    return {"measure": a.measure, "seconds": dt, "tokens": int(ids.numel()), "batch_size": bs,
            "threads": torch.get_num_threads(), "rss_after_load_mb": rss_loaded / 1024,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_one(a, what: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", what, "--model", a.model, "--data", str(a.data),
           "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--sites", a.sites,
           "--cross-layer-window", str(a.cross_layer_window), "--threads", str(a.threads or 0)]
    if a.batch_size:
        cmd += ["--batch-size", str(a.batch_size)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1",
                                                                       HF_DATASETS_OFFLINE="1"))
    if r.returncode != 0:
        sys.exit(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(C4))
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward (default: collect's, ~4096 tokens)")
    p.add_argument("--sites", default="mlp.neurons")
    p.add_argument("--cross-layer-window", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trunk", action="store_true", help="also time the decoder stack without the LM head")
    p.add_argument("--md", default=None, help="append the result table to this Markdown file")
    p.add_argument("--measure", choices=["forward", "trunk", "collect"], default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.measure:
        print(json.dumps(measure(a)))
        return

    load_before = load_average()
    order = ("forward", "trunk", "collect") if a.trunk else ("forward", "collect")
    runs = {k: [] for k in order}
    for r in range(a.repeats):
        for what in order:
            res = run_one(a, what)
            runs[what].append(res)
            print(f"[{r + 1}/{a.repeats}] {what}: {res['seconds']:.2f} s, {res['tokens'] / res['seconds']:.0f} tok/s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    load_after = load_average()
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    ratios = [c["seconds"] / f["seconds"] for f, c in zip(runs["forward"], runs["collect"])]
    tokens = runs["forward"][0]["tokens"]
    cmd = "python eval/bench_collect.py " + " ".join(sys.argv[1:])
    lines = [
        f"### {time.strftime('%Y-%m-%d %H:%M')} — `{a.model}`, {a.samples}×{a.seqlen} tokens, sites {a.sites}"
        + (f", cross-layer window {a.cross_layer_window}" if a.cross_layer_window else ""),
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU, "
        f"torch {__import__('torch').__version__}, {runs['forward'][0]['threads']} torch threads, "
        f"batch {runs['forward'][0]['batch_size']} windows; load average (1/5/15 min) before {load_before}, "
        f"after {load_after} (the machine is shared with other jobs).",
        "",
        "| measure | seconds (median of {n}) | min–max | tokens/s | peak RSS (MB) | RSS after load (MB) |".format(n=a.repeats),
        "|---|---|---|---|---|---|",
    ]
    for what in order:
        xs = [x["seconds"] for x in runs[what]]
        lines.append(f"| {what} | {med[what]:.2f} | {min(xs):.2f}–{max(xs):.2f} | {tokens / med[what]:.0f} | "
                     f"{max(x['peak_rss_mb'] for x in runs[what]):.0f} | "
                     f"{max(x['rss_after_load_mb'] for x in runs[what]):.0f} |")
    lines += ["", f"Ratio collect/forward: **{med['collect'] / med['forward']:.2f}** (ratio of medians; "
                  f"per-repeat ratios {', '.join(f'{r:.2f}' for r in ratios)}). Target ≤ 1.5."]
    if a.trunk:
        tr = [c["seconds"] / t["seconds"] for t, c in zip(runs["trunk"], runs["collect"])]
        lines += ["", f"Ratio collect/trunk (the statistics' own cost, LM head excluded from both): "
                      f"**{med['collect'] / med['trunk']:.2f}** (per-repeat {', '.join(f'{r:.2f}' for r in tr)})."]
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if a.md:
        with open(a.md, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
