"""`recover` on a pruned checkpoint: perplexity against training tokens and minutes.

Recovers PRUNED_DIR on C4 (the calibration text; the held-out windows `recover` keeps for itself are C4 too)
and, every --eval-tokens training tokens, measures the student's perplexity on the first --windows windows
× 1024 tokens of WikiText-2 and of TinyShakespeare (the protocol of eval/ablate.py `ppl`, through
`npp.perplexity`). The dense teacher and the input are measured once, so each row says how much of the
gap to dense is closed: (ppl_input − ppl) / (ppl_input − ppl_dense). Writes a Markdown table (rewritten after
each row, so a long run can be watched) and the recovered checkpoint.

    neuroproj-prune prune --model smollm2-135m --data ../shared/data/c4-train-sample-1000.jsonl \\
        --sparsity 0.3 --out runs/p30
    OMP_NUM_THREADS=2 python eval/bench_recover.py runs/p30 --out runs/p30-rec --table eval/results/recover.md \\
        --tokens 2000000 --windows 20 --eval-tokens 16384

Every RecoverConfig field is a flag (--lr, --method lora, --seqlen, ...; `neuroproj-prune recover --help`).
`minutes` is recover's own clock (training and its held-out evaluations; not model loading, not this
script's perplexities). Cost: ~8 · parameters FLOPs per training token plus 2 · parameters per evaluated token.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import neuroproj_prune as npp
from neuroproj_prune.io import write_text
from neuroproj_prune.recover import RecoverConfig, recover

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = {"wiki": "wikitext2-test.txt", "shakespeare": "tinyshakespeare.txt"}


def ppls(model, tok, windows: int) -> dict:
    """Perplexity on the first `windows` × 1024 tokens of each text (float32 forward on the model's device)."""
    return {t: npp.perplexity(model, tok, str(DATA / f), seqlen=1024, max_windows=windows, progress=False)["value"]
            for t, f in TEXTS.items()}


def table(rows, dense, head) -> str:
    lines = [head, "", "| tokens | minutes | train loss | ppl wiki | ppl shakespeare | gap closed (wiki) | "
             "gap closed (shakespeare) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    first = rows[0]
    for r in rows:
        gaps = []
        for t in TEXTS:
            g = first[t] - dense[t]
            gaps.append(f"{(first[t] - r[t]) / g:.0%}" if g > 0 else "-")
        loss = f"{r['loss']:.4f}" if r.get("loss") is not None else "-"
        lines.append(f"| {r['tokens']:,} | {r['minutes']:.1f} | {loss} | {r['wiki']:.3f} | {r['shakespeare']:.3f} | "
                     f"{gaps[0]} | {gaps[1]} |")
    lines.append(f"| dense | | | {dense['wiki']:.3f} | {dense['shakespeare']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pruned_dir")
    ap.add_argument("--data", default=str(DATA / "c4-train-sample-1000.jsonl"), help="training text (default C4)")
    ap.add_argument("--out", required=True, help="recovered checkpoint directory")
    ap.add_argument("--table", required=True, help="Markdown table to write")
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows of 1024 tokens per text")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="training tokens between measurements")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--overwrite", action="store_true")
    RecoverConfig.add_arguments(ap)
    a = ap.parse_args()
    cfg = RecoverConfig.from_args(a)   # validated before any model is loaded
    summary = json.loads((Path(a.pruned_dir) / "prune_summary.json").read_text())
    dense_lm = npp.load_model(cfg.teacher or summary["model"], dtype="float32", device=a.device)
    dense = ppls(dense_lm.model, dense_lm.tokenizer, a.windows)
    del dense_lm
    inp = npp.load_model(a.pruned_dir, dtype="float32", device=a.device)
    rows = [{"tokens": 0, "minutes": 0.0, "loss": None, **ppls(inp.model, inp.tokenizer, a.windows)}]
    tok = inp.tokenizer
    del inp
    dev = "cuda " + torch.cuda.get_device_name() if torch.cuda.is_available() and a.device != "cpu" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    head = (f"`recover` of {a.pruned_dir} ({summary.get('sparsity')} sparsity, {summary.get('select')} + "
            f"{summary.get('fold')}) on {Path(a.data).name}, {cfg.method}, lr {cfg.peak_lr}, "
            f"{cfg.seqlen}x{cfg.batch_size}x{cfg.grad_accum} tokens/step, budget {cfg.tokens:,} tokens; perplexity on "
            f"the first {a.windows} x 1024-token windows; {dev}; {time.strftime('%Y-%m-%d')}.\n\n"
            f"    {' '.join(sys.argv)}")
    write_text(a.table, table(rows, dense, head))
    tps = cfg.tokens_per_step
    every = max(1, a.eval_tokens // tps)

    def measure(step, record, model):
        if step % every and step != cfg.steps:
            return
        rows.append({"tokens": record["tokens"], "minutes": record["seconds"] / 60, "loss": record["loss"],
                     **ppls(model, tok, a.windows)})
        write_text(a.table, table(rows, dense, head))
        print(f"[bench] {record['tokens']:,} tokens, {record['seconds'] / 60:.1f} min: wiki {rows[-1]['wiki']:.3f}, "
              f"shakespeare {rows[-1]['shakespeare']:.3f}", flush=True)

    _, rep = recover(a.pruned_dir, a.data, a.out, cfg, device=a.device, overwrite=a.overwrite, callback=measure)
    # the written checkpoint (keep=best may be an earlier step than the last row)
    final = npp.load_model(a.out, dtype="float32", device=a.device)
    kept = ppls(final.model, final.tokenizer, a.windows)
    h = rep["held_out"]
    text = table(rows, dense, head) + (
        f"\nWritten checkpoint ({rep['kept']}, step {rep['kept_step']} of {rep['steps']}): wiki {kept['wiki']:.3f}, "
        f"shakespeare {kept['shakespeare']:.3f}. recover's own held-out C4 windows ({h['windows']} x {h['seqlen']}): "
        f"perplexity {h['ppl_before']:.3f} -> {h['ppl_after']:.3f}, teacher {h['teacher_ppl']:.3f}; "
        f"{rep['passes']} passes over the training text; {rep['seconds'] / 60:.1f} min.\n")
    write_text(a.table, text)
    print(text)


if __name__ == "__main__":
    main()
