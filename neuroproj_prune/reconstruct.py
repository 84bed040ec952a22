"""Block reconstruction: after the closed-form fold, train the kept weights of a whole block — its
nonlinearity inside — against the block's target on the calibration tokens.

The least-squares fold changes only the output projection: W' = C_:,K G_KK⁻¹ is optimal for fixed kept
activations h_K, but the gate/up rows that make h_K stay as they were. Here every parameter θ of the
block f (gate, up and down of the pruned MLP, or the whole decoder layer) is fitted by Adam to

    L(θ) = Σ_t w_t ‖f_θ(x_t) − y*_t‖² / Σ_t w_t ‖y*_t‖²

(relative, token-weighted error; w_t the calibration's token weights, y*_t the dense block's output on the
same input) starting from the fold's solution, on random batches of the fit tokens, with a cosine learning
rate. Early stopping: every `eval_every` steps the same loss on calibration windows held back from the fit
(`holdout`) is measured; the best weights seen on those windows are kept — the fold's own weights when no
step beats them, so reconstruction never makes the held-out error worse. As "A Free Lunch in LLM
Compression" (arXiv 2510.14444) and Wanda++ find, this recovers much of what refitting one matrix misses.

Master weights are float32 (copies; the block's own parameters are written once at the end, in their
dtype), matmuls under bfloat16 autocast when `compute` says so. Cost per step: 3 × (forward + backward) of
the block on `tokens` tokens, ≈ 6·tokens·(params of the block) FLOPs, plus one held-out evaluation every
`eval_every` steps; memory: inputs and targets of all calibration tokens (2·T·d·4 bytes), one batch's
activations and Adam's two moments per parameter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map


@dataclass
class ReconstructResult:
    steps: int            # optimiser steps taken (early stopping may end before the budget)
    best_step: int        # step of the kept weights (0: the fold's weights were kept)
    loss_before: float    # held-out relative error of the fold's weights
    loss_after: float     # held-out relative error of the kept weights


def _loss(block, params, x, y, w, extra, compute):
    with torch.autocast(x.device.type, dtype=compute or torch.bfloat16, enabled=compute is not None):
        out = functional_call(block, params, (x, *extra[0]), extra[1])
    out = out[0] if isinstance(out, tuple) else out
    err = (out.float() - y).pow(2).sum(-1)
    den = y.pow(2).sum(-1)
    if w is not None:
        err, den = err * w, den * w
    return err.sum(), den.sum()


def reconstruct(block: torch.nn.Module, fit, held, *, steps: int, lr: float, batch: int, eval_every: int = 0,
                patience: int = 3, compute=None, seed: int = 0) -> ReconstructResult:
    """Fit `block`'s parameters in place. `fit`, `held`: lists of (x, y, w, args, kwargs) batches — block
    input, target output (float32, same shape), token weights (x's shape without the last dim, or None) and the
    extra call arguments (a decoder layer's attention mask / position embeddings; empty for an MLP). A step
    draws `batch` rows (tokens, or whole windows when the batch carries extra arguments) at random."""
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(block, fit, held, steps, lr, batch, eval_every, patience, compute, seed)


def _normal(t):
    # tensors made under inference_mode cannot be saved for backward; a copy made outside it can
    return t.clone() if torch.is_tensor(t) and t.is_inference() else t


def _fit(block, fit, held, steps, lr, batch, eval_every, patience, compute, seed):
    names = [n for n, p in block.named_parameters()]
    own = dict(block.named_parameters())
    master = {n: own[n].detach().float().clone().requires_grad_(True) for n in names}
    opt = torch.optim.Adam(master.values(), lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    eval_every = eval_every or max(steps // 8, 1)
    token_level = all(not b[3] and not b[4] for b in fit)
    if token_level:  # an MLP acts per token: pool the fit tokens and draw rows from all of them
        d = fit[0][0].shape[-1]
        X = torch.cat([b[0].reshape(-1, d) for b in fit])
        Y = torch.cat([b[1].reshape(-1, d) for b in fit])
        Wt = None if fit[0][2] is None else torch.cat([b[2].reshape(-1) for b in fit])
    else:
        fit = [tree_map(_normal, b) for b in fit]

    def held_loss(params):
        with torch.no_grad():
            num = den = 0.0
            for x, y, w, args, kw in held:
                a, b = _loss(block, params, x, y, w, (args, kw), compute)
                num, den = num + float(a), den + float(b)
        return num / max(den, 1e-30)

    best = held_loss(master)
    before, best_step, best_state, bad, step = best, 0, None, 0, 0
    for step in range(1, steps + 1):
        if token_level:
            idx = torch.randint(0, X.shape[0], (batch,), generator=gen).to(X.device)
            x, y, w, extra = X[idx], Y[idx], None if Wt is None else Wt[idx], ((), {})
        else:
            x, y, w, args, kw = fit[int(torch.randint(0, len(fit), (1,), generator=gen))]
            extra = (args, kw)
        num, den = _loss(block, master, x, y, w, extra, compute)
        opt.zero_grad(set_to_none=True)
        (num / den.clamp(min=1e-30)).backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            cur = held_loss(master)
            if cur < best:
                best, best_step, bad = cur, step, 0
                best_state = {n: t.detach().clone() for n, t in master.items()}
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        with torch.no_grad():
            for n in names:
                own[n].copy_(best_state[n].to(own[n].dtype))
    return ReconstructResult(step, best_step, before, best)
