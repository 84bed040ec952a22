"""Does a latency file predict the decode speed-up of pruned checkpoints? Measure the file, then time dense and pruned
checkpoints with the file's own protocol (llama.cpp, same type, threads, prompt, tokens and context), interleaved,
and put the predicted speed-up beside the measured one.

    OMP_NUM_THREADS=2 python eval/check_latency.py --type q8_0 --model mlp35=runs/blocks/mlp-0.35 \
        --model joint35=runs/blocks/joint-0.35 --rounds 7 --out eval/results/latency_q8_0.md

Per round: the latency file's five probes are measured first (`neuroproj-prune latency`'s code, its --rounds) once at
the start; then each round times dense and every checkpoint back to back, so each checkpoint has one ratio dense /
pruned per round (median, min–max). The table's header gives the wall time it took. OMP_WAIT_POLICY is left as
the environment has it (recorded in the header): PASSIVE made llama.cpp's two-thread decode about twice as slow here
(eval/results/latency_threads_passive.md), and the latency files before 2026-12-07 night were measured under it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.export.gguf import export_gguf  # noqa: E402
from neuroproj_prune.export.latency import (LatencyConfig, counts, decode_ms, describe, measure_latency,  # noqa: E402
                                            prompt_ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR of a pruned checkpoint")
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--latency-out", default=None, help="where the measured latency file goes (default: beside --out)")
    ap.add_argument("--out", required=True, help="markdown table")
    a = ap.parse_args()
    cfg = LatencyConfig.make(type=a.type, threads=a.threads, rounds=a.rounds)
    lat_path = Path(a.latency_out or Path(a.out).with_suffix(".json"))
    dense = npp.load_model(a.dense, dtype="float32", device="cpu")
    t0 = time.time()
    lat = measure_latency(dense, lat_path, cfg, overwrite=True)
    print(describe(lat), flush=True)
    models = {"dense": dense, **{n: npp.load_model(s, dtype="float32", device="cpu")
                                 for n, s in (m.split("=", 1) for m in a.model)}}
    threads = lat.meta["threads"]
    ids = prompt_ids(dense.tokenizer, cfg.prompt)
    work = Path(tempfile.mkdtemp(prefix="check-latency-"))
    paths = {}
    for n, lm in models.items():
        paths[n] = work / f"{n}.gguf"
        export_gguf(lm, paths[n], type=cfg.type)
    times = {n: [] for n in models}
    for r in range(a.rounds):
        for n, p in paths.items():
            times[n].append(decode_ms(p, ids, cfg, threads))
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in times.items()), flush=True)
    pred = {n: lat.ms(*counts(lm)) for n, lm in models.items()}
    lines = [f"# Latency model check: {lat.meta['type']}, {threads} threads",
             "", f"Command: `{' '.join(['python', *sys.argv])}`", "",
             f"Machine: {lat.meta['machine']}; {lat.meta['date']}; {a.rounds} interleaved rounds ({time.time() - t0:.0f} s "
             f"in all), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}. The latency file (`{lat_path.name}`, measured first by the same code as `neuroproj-prune "
             f"latency`): {describe(lat).splitlines()[0]}", "",
             "Its probes (median (min–max) ms per token over its rounds, and the fit):", "", "```",
             *describe(lat).splitlines()[1:], "```", "",
             "The checkpoints, timed by the same protocol (prompt "
             f"{cfg.prompt} tokens, {cfg.tokens} greedy tokens, n_ctx {cfg.context}), dense and each checkpoint back "
             "to back in every round; speed-up: median (min–max) of the per-round ratios dense / checkpoint.", "",
             "| model | attention sub-layers | layers | decoder params | predicted ms | measured ms | predicted × | "
             "measured × |", "|---|---|---|---|---|---|---|---|"]
    for n, lm in models.items():
        na, nm, P = counts(lm)
        v = times[n]
        ratios = [d / x for d, x in zip(times["dense"], v)]
        lines.append(f"| {n} | {na} | {nm} | {P / 1e6:.1f} M | {pred[n]:.2f} | {statistics.median(v):.2f} "
                     f"({min(v):.2f}–{max(v):.2f}) | {pred['dense'] / pred[n]:.2f} | {statistics.median(ratios):.2f} "
                     f"({min(ratios):.2f}–{max(ratios):.2f}) |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({n: statistics.median(v) for n, v in times.items()}))


if __name__ == "__main__":
    main()
