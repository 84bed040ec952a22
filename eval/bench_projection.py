"""Benchmark of `project`: fit time and normalised stress against N, exact vs minibatch.

    python eval/bench_projection.py --stats /tmp/s.safetensors --parts real,synthetic,minibatch,seed-step

* real       — exact mode on every layer of a SmolLM2-135M stats file (N = 1536): total and per-layer time,
               iterations, stress (cMDS init and after SMACOF).
* synthetic  — exact mode on synthetic low-rank correlations (clustered factors, rank 64) of size --sizes.
* minibatch  — the seed's minibatch mode at the same sizes: per-batch correlations of Gaussian "activations"
               drawn with the target ρ (--tokens per batch), Adam lr 1e-2, --mb-steps steps; stress against
               the whole ρ, time per step.
* seed-step  — one step of the original formulation (N×N×3 difference tensor, Frobenius loss, Adam).
Prints Markdown table rows; --threads sets torch's intra-op threads.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def synthetic_rho(N, rank=64, clusters=None, seed=0):
    """A valid correlation: clustered low-rank factors plus noise (float32, built in row blocks)."""
    g = torch.Generator().manual_seed(seed)
    clusters = clusters or max(8, N // 64)
    centre = torch.randn(clusters, rank, generator=g)
    lab = torch.randint(clusters, (N,), generator=g)
    W = centre[lab] + 0.8 * torch.randn(N, rank, generator=g)
    W = W / W.norm(dim=1, keepdim=True) * 0.9          # 81% shared variance, 19% private noise
    rho = W @ W.T
    rho.diagonal().fill_(1.0)
    return rho, W


def gaussian_batches(W, tokens, seed=0):
    """Activations with correlation W Wᵀ + diag(1 − ‖w‖²): h = z Wᵀ + e."""
    g = torch.Generator().manual_seed(seed)
    noise = (1 - (W * W).sum(1)).clamp(min=0).sqrt()
    while True:
        z = torch.randn(tokens, W.shape[1], generator=g)
        yield z @ W.T + torch.randn(tokens, W.shape[0], generator=g) * noise


def factor_of(rho, rank=None):
    vals, vecs = torch.linalg.eigh(rho.double())
    vals = vals.clamp(min=0)
    if rank:
        vals, vecs = vals[-rank:], vecs[:, -rank:]
    return (vecs * vals.sqrt()).float()


def exact_row(name, rho, max_iter, tol):
    from neuroproj_prune.analysis.projection import fit_exact

    t = time.perf_counter()
    P, s, hist = fit_exact(rho, 3, max_iter=max_iter, tol=tol, return_history=True)
    dt = time.perf_counter() - t
    return dt, s, hist


def minibatch_row(W, rho, steps, tokens, lr=1e-2):
    from neuroproj_prune.analysis.projection import MinibatchFitter, batch_correlation, normalised_stress

    N = W.shape[0]
    f = MinibatchFitter({(0, "x"): N}, 3, init="randn", lr=lr)
    gen = gaussian_batches(W, tokens)
    t = time.perf_counter()
    for _ in range(steps):
        f.step({(0, "x"): batch_correlation(next(gen))})
    dt = time.perf_counter() - t
    return dt / steps, normalised_stress(f.points[(0, "x")].detach(), rho), f.losses


def seed_step(N, steps=3):
    """The original formulation: D = P[:, None] − P[None] (N×N×3), distances, Frobenius loss, Adam."""
    g = torch.Generator().manual_seed(0)
    P = (torch.randn(N, 3, generator=g) / math.sqrt(N)).requires_grad_(True)
    target = torch.rand(N, N, generator=g)
    opt = torch.optim.Adam([P], lr=1e-2)
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad()
        D = P[:, None, :] - P[None, :, :]
        d = torch.sqrt((D * D).sum(-1) + 1e-12)
        loss = torch.linalg.norm(d - target)
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", default=None)
    ap.add_argument("--parts", default="real,synthetic,minibatch,seed-step")
    ap.add_argument("--sizes", default="4864,14336")
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--big-max-iter", type=int, default=300, help="iteration cap for N > 8192")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--mb-steps", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--mb-layer", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    parts = a.parts.split(",")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu (no GPU in this session)", flush=True)
    if "real" in parts:
        from neuroproj_prune.stats import load_stats

        st = load_stats(a.stats)
        t0 = time.perf_counter()
        rows = []
        for i in st.layers:
            tc = time.perf_counter()
            rho = st.correlation(i)
            tc = time.perf_counter() - tc
            dt, s, hist = exact_row(f"layer {i}", rho, a.max_iter, a.tol)
            rows.append((i, tc, dt, len(hist) - 1, hist[0], s))
            print(f"| {i} | {tc:.2f} | {dt:.2f} | {len(hist) - 1} | {hist[0]:.4f} | {s:.4f} |", flush=True)
        total = time.perf_counter() - t0
        n = len(rows)
        print(f"REAL all {n} layers: {total:.1f} s total (corr {sum(r[1] for r in rows):.1f} s, fit "
              f"{sum(r[2] for r in rows):.1f} s), mean iters {sum(r[3] for r in rows) / n:.0f}, "
              f"stress cMDS {sum(r[4] for r in rows) / n:.4f} -> {sum(r[5] for r in rows) / n:.4f} "
              f"(min {min(r[5] for r in rows):.4f}, max {max(r[5] for r in rows):.4f})", flush=True)
    if "synthetic" in parts:
        for N in [int(x) for x in a.sizes.split(",")]:
            rho, _ = synthetic_rho(N)
            cap = a.big_max_iter if N > 8192 else a.max_iter
            dt, s, hist = exact_row(f"N={N}", rho, cap, a.tol)
            it = len(hist) - 1
            print(f"EXACT synthetic N={N}: {dt:.1f} s, {it} iterations (cap {cap}), stress cMDS {hist[0]:.4f} -> {s:.4f}, "
                  f"{'converged' if it < cap else 'hit the cap'}", flush=True)
            del rho
    if "minibatch" in parts:
        sizes = [1536] + [int(x) for x in a.sizes.split(",")]
        for N in sizes:
            if N == 1536 and a.stats:
                from neuroproj_prune.stats import load_stats

                rho = load_stats(a.stats).correlation(a.mb_layer).float()
                W = factor_of(rho, rank=None)
                label = f"real layer {a.mb_layer}"
            elif N == 1536:
                continue
            else:
                rho, W = synthetic_rho(N)
                label = "synthetic"
            steps = a.mb_steps if N <= 5000 else max(2, a.mb_steps // 50)
            per, s, losses = minibatch_row(W, rho, steps, a.tokens)
            print(f"MINIBATCH {label} N={N}: {steps} steps, {per * 1000:.0f} ms/step, stress after {steps} steps "
                  f"{s:.4f} (loss {losses[0]:.4g} -> {losses[-1]:.4g})", flush=True)
            del rho, W
    if "seed-step" in parts:
        for N in [1536, 4864]:
            print(f"SEED-STEP N={N}: {seed_step(N) * 1000:.0f} ms/step (N×N×3 difference tensor, CPU)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
