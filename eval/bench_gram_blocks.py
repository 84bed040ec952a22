"""The Gram's column-block size (issue 25): the lower triangle of xᵀx in column blocks of b takes (nb+1)/(2nb) of
the full product's multiply-adds for nb = N/b blocks — 10/16 at b = 384 for N = 1536, 36/64 at 192 — but smaller
blocks are thinner products. Times `stats.moments.gram_` (the whole call: the rounded bfloat16 partials per
GRAM_ROWS tokens on a CPU, their float64 total) for each block size on one batch of SmolLM2's MLP width.

    OMP_NUM_THREADS=2 python eval/bench_gram_blocks.py --rows 4096 --width 1536 --blocks 384,256,192,128 --reps 9
    OMP_NUM_THREADS=2 python eval/bench_gram_blocks.py --sums      # one batch's column sums: float64 vs float32

Rounds interleave the block sizes (one call of each per round), so the machine's drift hits all alike; printed per
size: median and min–max milliseconds, the ratio of the medians to the first size, and the largest relative
difference of its Gram from the first size's (the products of a block are the same sums either way).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from neuroproj_prune.stats.moments import gram_


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096, help="tokens in the batch")
    ap.add_argument("--width", type=int, default=1536, help="N, the MLP width")
    ap.add_argument("--blocks", default="384,256,192,128")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--sums", action="store_true", help="time the column sums of `Moments.add` instead")
    a = ap.parse_args()
    if a.sums:
        return sums(a)
    blocks = [int(b) for b in a.blocks.split(",")]
    torch.manual_seed(0)
    x = torch.randn(a.rows, a.width).to(getattr(torch, a.dtype))
    times = {b: [] for b in blocks}
    grams = {}
    for _ in range(a.reps):
        for b in blocks:
            G = torch.zeros(a.width, a.width, dtype=torch.float64)
            t = time.perf_counter()
            gram_(G, x, block=b)
            times[b].append(time.perf_counter() - t)
            grams[b] = torch.tril(G)
    base = statistics.median(times[blocks[0]])
    ref = grams[blocks[0]]
    print(f"rows {a.rows}, width {a.width}, {a.dtype}, {torch.get_num_threads()} threads, {a.reps} rounds")
    print("| block | share of xᵀx | ms median (min–max) | × first | max rel. diff |")
    print("|---|---|---|---|---|")
    for b in blocks:
        nb = -(-a.width // b)
        v = sorted(times[b])
        diff = float(((grams[b] - ref).abs() / ref.abs().clamp(min=1e-30)).max())
        print(f"| {b} | {(nb + 1) / (2 * nb):.3f} | {statistics.median(v) * 1e3:.1f} ({v[0] * 1e3:.1f}–{v[-1] * 1e3:.1f}) "
              f"| {statistics.median(v) / base:.3f} | {diff:.1e} |")


def sums(a) -> None:
    """One batch's column sums: torch's float64-accumulating sum (before) against `stats.moments.column_sums`."""
    from neuroproj_prune.stats.moments import column_sums

    torch.manual_seed(0)
    h = (torch.randn(a.rows, a.width) * 0.3 + 0.1).float()
    ways = {"h.sum(0, dtype=float64)": lambda: h.sum(0, dtype=torch.float64), "column_sums(h)": lambda: column_sums(h)}
    times = {k: [] for k in ways}
    for _ in range(a.reps):
        for k, f in ways.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ref = ways["h.sum(0, dtype=float64)"]()
    for k, f in ways.items():
        v = sorted(times[k])
        diff = float((f() - ref).abs().max() / ref.abs().max())
        print(f"{k:24s} {statistics.median(v) * 1e3:.2f} ms median ({v[0] * 1e3:.2f}–{v[-1] * 1e3:.2f}), "
              f"max rel. diff {diff:.1e}")


if __name__ == "__main__":
    main()
