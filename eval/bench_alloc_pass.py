"""What one batch of `--allocation global`'s dense pass costs, by the token weights it measures (issue 25): the
trunk forward alone (`rms` and `layer-grad`'s later batches), the forward with the LM head's loss and its gradient
at the last layer (`head`), and the forward, the head and the backward through the trunk to every layer's output
(`grad`, and `layer-grad`'s first quarter). The pass's time is about windows/batch × the matching row, plus the
curves' Grams and Choleskys (`bench_prune.py --profile --set allocation=global`).

    OMP_NUM_THREADS=2 python eval/bench_alloc_pass.py --windows 4 --rounds 3
    OMP_NUM_THREADS=2 python eval/bench_alloc_pass.py --geometry qwen2.5-0.5b     # random weights, 152k vocabulary
    OMP_NUM_THREADS=2 python eval/bench_alloc_pass.py --geometry qwen2.5-0.5b --ab   # the head's gradient A/B

Rounds interleave the three (one call of each per round) after one warm-up call of each; printed per kind: median
and min–max seconds and the ratio of the medians to the forward's. `--geometry` (one of `bench_gpu.py`'s) builds a
float32 model of that shape with random weights and random token ids: the seconds depend on the shapes, not on the
weights. `--ab` times instead the head's loss gradient as the pass forms it (`search._cross_entropy_grad`, in
place) against autograd's cross-entropy of the float32 logits (what the pass did before, but for where the float32
copy of the logits is made), interleaved per round for the `head` and `grad` kinds, and prints the per-round
ratios in place / autograd.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_gpu import GEOMETRIES, build_model   # eval/ is the script's directory

import neuroproj_prune as npp
from neuroproj_prune.prune import search
from neuroproj_prune.prune.allocate import _trunk_forward
from neuroproj_prune.prune.search import activations_only, loss_backward
from neuroproj_prune.stats import calibration_ids, compute_dtype_for

C4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4-train-sample-1000.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), help="a random-weight model of this shape instead")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows in the batch (the pass's batch: 4)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ab", action="store_true", help="the head's gradient in place against autograd's")
    a = ap.parse_args()
    if a.geometry:
        lm = build_model(a.geometry, torch.device("cpu"), torch.float32, None, 0)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, lm.model.config.vocab_size, (a.windows, a.seqlen), generator=g)
    else:
        lm = npp.load_model(a.model, device="cpu")
        ids, _ = calibration_ids(lm, str(C4), a.windows, a.seqlen, 0)
    compute = compute_dtype_for("auto", lm.model)
    m, ad = lm.model, lm.adapter

    def forward():
        _trunk_forward(m, ad, ids, compute)

    def head():
        loss_backward(m, ad, ids, compute, trunk=False)

    def backward():
        with activations_only(m):
            loss_backward(m, ad, ids, compute)

    if a.ab:
        return ab(a, head, backward)
    kinds = {"forward (rms)": forward, "forward + head (head)": head,
             "forward + head + trunk backward (grad)": backward}
    times = {k: [] for k in kinds}
    for f in kinds.values():
        f()
    for _ in range(a.rounds):
        for k, f in kinds.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["forward (rms)"])
    print(f"{lm.spec}, {a.windows} x {a.seqlen} tokens, {a.rounds} interleaved rounds")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"  {k:42s} {med:7.3f} s ({min(v):.3f}-{max(v):.3f})  {med / base:5.2f}x the forward")


def _autograd_cross_entropy(z, targets):
    """The reference: autograd's summed cross-entropy of the float32 logits, its gradient in z's dtype."""
    with torch.enable_grad():
        zf = z.detach().float().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(zf, targets, reduction="sum")
        loss.backward()
    return float(loss), zf.grad.to(z.dtype)


def ab(a, head, backward):
    fused = search._cross_entropy_grad
    times = {}
    try:
        for r in range(a.rounds + 1):   # round 0 warms up
            for kind, f in (("head", head), ("grad", backward)):
                for name, grad in (("autograd", _autograd_cross_entropy), ("in place", fused)):
                    search._cross_entropy_grad = grad
                    t = time.perf_counter()
                    f()
                    if r:
                        times.setdefault(kind, {}).setdefault(name, []).append(time.perf_counter() - t)
    finally:
        search._cross_entropy_grad = fused
    print(f"{a.windows} x {a.seqlen} tokens, {a.rounds} interleaved rounds")
    for kind, t in times.items():
        ratios = [n / o for o, n in zip(t["autograd"], t["in place"])]
        print(f"  {kind}: autograd {statistics.median(t['autograd']):.3f} s, in place "
              f"{statistics.median(t['in place']):.3f} s; in place / autograd per round "
              f"{' '.join(f'{x:.3f}' for x in ratios)}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
