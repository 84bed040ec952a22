"""Decode speed of dense and pruned checkpoints in llama.cpp at several thread counts, interleaved (issue 28).

    OMP_NUM_THREADS=2 python eval/latency_threads.py --model mlp35=runs/blocks/mlp-0.35 --types q8_0,f32 \
        --threads 1,2 --rounds 9 --out eval/results/latency_threads.md

On a small model a decoded token is mostly per-op work and the synchronisation of llama.cpp's threads between ops
(`time_split_smollm2.md`: ≈ 19 µs per op at 2 threads), so fewer threads can be faster and the speed-up of a pruned
model depends on the count. Per type, every round times each (thread count, model) once — `latency`'s own protocol
(`export.latency.decode_ms`: a fresh in-process llama.cpp, 16-token prompt, 128 greedy tokens, n_ctx 4096) — in an
order reversed every other round; the table gives per thread count the median ms per token (min–max) and the median
of the per-round ratios dense / checkpoint, and for dense the per-round ratio to the first thread count. It leaves
OMP_WAIT_POLICY as the environment has it: with PASSIVE, llama.cpp's two-thread decode took about twice as long here
(eval/results/latency_threads_passive.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.export.gguf import export_gguf  # noqa: E402
from neuroproj_prune.export.latency import LatencyConfig, decode_ms, machine, prompt_ids  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default="smollm2-135m")
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR of a pruned checkpoint")
    ap.add_argument("--types", default="q8_0,f32")
    ap.add_argument("--threads", default="1,2", help="comma list of llama.cpp thread counts")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", required=True, help="markdown table")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    models = {"dense": npp.load_model(a.dense, dtype="float32", device="cpu"),
              **{n: npp.load_model(s, dtype="float32", device="cpu") for n, s in (m.split("=", 1) for m in a.model)}}
    work = Path(tempfile.mkdtemp(prefix="latency-threads-"))
    t0 = time.time()
    lines = [f"# Decode speed by llama.cpp thread count ({', '.join(models)})", "",
             f"Command: `{' '.join(['python', *sys.argv])}`", "",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {a.rounds} interleaved "
             "rounds per type; ms per decoded token, median (min–max); speed-up: median (min–max) of the per-round "
             f"ratios dense / model at the same thread count; dense vs {threads[0]}: the median (min–max) of the "
             f"per-round ratios dense at {threads[0]} threads / dense at this count (above 1: this count is faster).",
             "", "| type | threads | dense vs " + str(threads[0]) + " | " + " | ".join(f"{n} ms" for n in models)
             + " | " + " | ".join(f"{n} ×" for n in models if n != "dense") + " |",
             "|---|---|---|" + "---|" * (2 * len(models) - 1)]
    for typ in a.types.split(","):
        cfg = LatencyConfig.make(type=typ, rounds=a.rounds)
        ids = prompt_ids(models["dense"].tokenizer, cfg.prompt)
        paths = {n: work / f"{n}-{typ}.gguf" for n in models}
        for n, lm in models.items():
            export_gguf(lm, paths[n], type=typ)
        runs = [(th, n) for th in threads for n in models]
        ms = {r: [] for r in runs}
        for k in range(a.rounds):
            for r in (runs if k % 2 == 0 else runs[::-1]):
                ms[r].append(decode_ms(paths[r[1]], ids, cfg, r[0]))
            print(f"{typ} round {k + 1}: " + ", ".join(f"{n}@{th} {v[-1]:.2f}" for (th, n), v in ms.items()), flush=True)
        def ratio(num, den):   # median (min–max) of the per-round ratios num / den
            q = [x / y for x, y in zip(num, den)]
            return f"{statistics.median(q):.2f} ({min(q):.2f}–{max(q):.2f})"

        for th in threads:
            cells = [ratio(ms[(threads[0], "dense")], ms[(th, "dense")])]
            cells += [f"{statistics.median(ms[(th, n)]):.2f} ({min(ms[(th, n)]):.2f}–{max(ms[(th, n)]):.2f})"
                      for n in models]
            cells += [ratio(ms[(th, "dense")], ms[(th, n)]) for n in models if n != "dense"]
            lines.append(f"| {typ} | {th} | " + " | ".join(cells) + " |")
    lines += ["", f"{time.time() - t0:.0f} s in all."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
