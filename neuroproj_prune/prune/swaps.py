"""Swap refinement (`--swaps T`): after a layer's selection, single swaps of a kept neuron for a removed one,
proposed by the least-squares refit's error on the calibration windows and kept only where the error on
held-back windows falls (OSSCAR's local search, judged out of sample).

`Swaps` is a pass hook of the sequential pass: the last `swap_holdout` share of a layer's calibration batches
also feed a held-back sub-total of its moments; after the selection `refine_swaps` runs on (the other batches'
Gram, the held-back Gram). Cost: see `refine_swaps`; memory one more N×N float64 Gram.
"""
from __future__ import annotations

import torch

from ..stats import cholesky, ridge_lambda, ridged
from .fold import RIDGE, chol_solve
from .measure import Batch, PassHook
from .select import Selection, layer_plan


class Swaps(PassHook):
    """The `--swaps` step (see the module docstring): per layer, up to `cfg.swaps` exact trials."""

    name = "swaps"

    def __init__(self, cfg):
        self.cfg, self.done = cfg, {}

    def begin(self, i, layer, moments, n_batches):
        self.i, self.n = i, n_batches
        self.n_held = min(n_batches - 1, max(1, round(self.cfg.swap_holdout * n_batches)))
        self.mo = moments
        self.part = moments.part() if self.n_held > 0 else None   # the held-back batches' sub-total
        self.held = None

    def batch(self, b: Batch):
        if self.part is not None and b.index >= self.n - self.n_held:
            self.part.add(b.h, b.w)

    def all_reduce(self, dist):
        if self.part is not None:
            self.part.all_reduce(dist)

    def measured(self, work):
        if self.part is not None:   # the selection and the final fold use all windows; the swaps fit and judge apart
            self.held = (self.mo.without(self.part).finish()[0], self.part.finish()[0])
        self.part = self.mo = None

    def refine(self, work, plan: dict) -> dict:
        if self.held is None:
            return plan
        keep, self.done[self.i] = refine_swaps(work.moments.W, *self.held, torch.tensor(plan["keep"]), self.cfg.swaps,
                                               work.fold.ridge)
        self.held = None
        return layer_plan(work.moments, Selection(keep))

    def report(self):
        if not self.done:
            return None
        sw = self.done.values()
        return {"accepted": sum(x["swaps"] for x in sw), "trials": sum(x["trials"] for x in sw),
                "held_out_error_before": sum(x["held_before"] for x in sw) / len(sw),
                "held_out_error_after": sum(x["held_after"] for x in sw) / len(sw),
                "layers": self.done}


def refine_swaps(W: torch.Tensor, G: torch.Tensor, Gh: torch.Tensor, keep: torch.Tensor, trials: int,
                 ridge: float = RIDGE) -> tuple[torch.Tensor, dict]:
    """Swap refinement of a kept set K under the least-squares refit (OSSCAR's local search), judged on
    held-out moments: proposals come from the fit moments G, acceptance from the held-back ones Gh.

    With H = G_KK + λI and the refit W'_K = (W G)_:,K H⁻¹, the fit error of one swap (a ∈ K out, b ∉ K in) is
    predicted as cost(a) − gain(b) (their interaction ignored; OBS and its dual):
        cost(a) = ‖W'_:,a‖² / (H⁻¹)_aa                                   (error added by dropping a, refitting)
        gain(b) = ‖(W G)_:,b − W'_K G_K,b‖² / (G_bb + λ − G_b,K H⁻¹ G_K,b)   (error removed by adding b)
    The best predicted pair is refitted exactly and kept only if the held-out error
        E_h(K) = tr((U − W) Gh (U − W)ᵀ),  U = W'_K scattered to full width,
    falls; a rejected b is not proposed again. At most `trials` exact refits; stops when no swap is predicted
    to lower the fit error. Returns (sorted K, {"swaps", "trials", "held_before", "held_after"}) with the
    held-out errors relative to E_h(∅) = tr(W Gh Wᵀ). W (d×N), G, Gh (N×N): float64.
    Cost: O(k³ + k²·(N−k) + d·k·N) per proposal round, O(k³/3 + d·k²) per trial (k = |K|)."""
    C, Ch = W @ G, W @ Gh
    base = abs(float((Ch * W).sum())) or 1.0
    N = G.shape[0]

    def held_error(K, A):     # E_h(K) − tr(W Gh Wᵀ), relative
        return float(((A @ Gh[K][:, K]) * A).sum() - 2 * (A * Ch[:, K]).sum()) / base

    K = keep.sort().values
    A = chol_solve(G[K][:, K], C[:, K], ridge)
    e0 = err = held_error(K, A)
    rejected = torch.zeros(N, dtype=torch.bool)
    swaps = n = 0
    stale = True
    while n < trials:
        if stale:             # the OBS scores of the current K
            inside = torch.zeros(N, dtype=torch.bool)
            inside[K] = True
            R = (~inside).nonzero().flatten()
            if R.numel() == 0:
                break
            H = G[K][:, K]
            lam = ridge_lambda(H, ridge)
            Hinv = torch.cholesky_inverse(cholesky(ridged(H, ridge)))
            cost = (A * A).sum(0) / Hinv.diagonal()
            GKR = G[K][:, R]
            s = (G.diagonal()[R] + lam - (GKR * (Hinv @ GKR)).sum(0)).clamp(min=1e-30)
            gain = (C[:, R] - A @ GKR).pow(2).sum(0) / s
            stale = False
        g = gain.masked_fill(rejected[R], -float("inf"))
        jb, ja = int(torch.argmax(g)), int(torch.argmin(cost))
        if not float(g[jb]) > float(cost[ja]):   # no swap predicted to lower the fit error
            break
        b = int(R[jb])
        K2 = torch.cat([K[:ja], K[ja + 1:], torch.tensor([b])]).sort().values
        A2 = chol_solve(G[K2][:, K2], C[:, K2], ridge)
        e2 = held_error(K2, A2)
        n += 1
        if e2 < err:
            K, A, err, swaps, stale = K2, A2, e2, swaps + 1, True
        else:
            rejected[b] = True
    return K, {"swaps": swaps, "trials": n, "held_before": 1 + e0, "held_after": 1 + err}
