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

In the sequential pass this is the `Reconstruction` pass hook: while layer i's calibration batches run it keeps
each batch's block input and target (`RECONSTRUCT_SCOPES`: the MLP alone, or the whole decoder layer), and after
the fold it trains the block, the last `reconstruct_holdout` share of the windows held back for early stopping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.utils._pytree import tree_map

from ..errors import NeuroprojError
from ..registry import Registry
from ..stats import compute_autocast, hooked
from .measure import Batch, PassHook


@dataclass
class ReconstructResult:
    steps: int            # optimiser steps taken (early stopping may end before the budget)
    best_step: int        # step of the kept weights (0: the fold's weights were kept)
    loss_before: float    # held-out relative error of the fold's weights
    loss_after: float     # held-out relative error of the kept weights


def _loss(block, params, x, y, w, extra, compute):
    with compute_autocast(x.device, compute):
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


# ------------------------------------------------------------------------------------- in the sequential pass
RECONSTRUCT_SCOPES = Registry("reconstruct scope", "Scope(lm, i, layer): the block trained (`block`), what to "
                                                   "capture (`points`), one batch's data (`data`)")


@RECONSTRUCT_SCOPES.register("mlp")
class MLPScope:
    """gate, up and down of the pruned MLP on the MLP's own input; a step draws `reconstruct_tokens` tokens from
    all fit windows (an MLP acts per token)."""

    def __init__(self, lm, i, layer, cfg):
        a, m = lm.adapter, lm.model
        self.block = a.mlp(m, i)
        if self.block is a.out_proj(m, i):
            raise NeuroprojError(f"{m.config.model_type} has no MLP module to reconstruct (its MLP projections sit on "
                                 f"the decoder layer): use --reconstruct-scope layer")
        self.points, self.step_rows = [("x", self.block, "in"), ("y", self.block, "out")], cfg.reconstruct_tokens
        self.whole_windows = False

    def data(self, b: Batch, grab: dict, tw):
        return grab["x"].float().clone(), grab["y"].float().clone(), tw, (), {}

    def change(self, blocks: list, compute) -> list[torch.Tensor]:
        """Per batch, what the trained MLP adds to the layer's output beyond the one it was measured with:
        MLP'(x) − y, on the inputs it kept (emptied as it goes). The pass adds it to the layer output it stored,
        so only the MLP runs again, at its kept width, not the attention before it."""
        out = []
        with torch.inference_mode(), compute_autocast(blocks[0][0].device, compute):
            while blocks:
                x, y, *_ = blocks.pop(0)
                out.append(self.block(x).float() - y)
        return out


@RECONSTRUCT_SCOPES.register("layer")
class LayerScope:
    """The whole decoder layer (attention included) on its input; a step takes one batch of windows (they carry
    per-batch call arguments)."""

    def __init__(self, lm, i, layer, cfg):
        self.block, self.points, self.step_rows, self.whole_windows = layer, [], 1, True

    def change(self, blocks: list, compute):
        return None   # attention changed too: the pass runs the layer again

    def data(self, b: Batch, grab: dict, tw):
        return b.x, b.out.float(), tw, b.args, b.kwargs


class Reconstruction(PassHook):
    """`--reconstruct STEPS`: block reconstruction of every layer after its fold (see the module docstring)."""

    name = "reconstruct"

    def __init__(self, cfg, lm, compute):
        self.cfg, self.lm, self.compute, self.done = cfg, lm, compute, {}
        RECONSTRUCT_SCOPES[cfg.reconstruct_scope](lm, 0, lm.adapter.layers(lm.model)[0], cfg)   # refuse early

    def begin(self, i, layer, moments, n_batches):
        self.i, self.blocks, self.grab = i, [], {}
        self.scope = RECONSTRUCT_SCOPES[self.cfg.reconstruct_scope](self.lm, i, layer, self.cfg)
        self._hooks = hooked(self.scope.points, self.grab.__setitem__)
        self._hooks.__enter__()

    def batch(self, b: Batch):
        tw = None if b.w is None else b.w.reshape(b.out.shape[:-1]).float()   # (its scale cancels)
        self.blocks.append(self.scope.data(b, self.grab, tw))

    def end(self):
        self._hooks.__exit__(None, None, None)
        self.grab = {}

    def folded(self, work, layer):
        """Train the block. Gate/up changed too, so the closed-form carry no longer holds: returns the MLP's change
        of each batch's output (scope mlp), else True (run the layer again)."""
        cfg, blocks = self.cfg, self.blocks
        n = sum(b[0].shape[0] for b in blocks)                   # windows
        k = min(max(1, round(cfg.reconstruct_holdout * n)), n - 1) if n > 1 else 0
        fit, held, seen = [], [], 0
        for b in blocks:                                          # split at a window boundary
            cut = min(max(n - k - seen, 0), b[0].shape[0])
            if cut > 0:
                fit.append(tuple(t[:cut] if torch.is_tensor(t) else t for t in b[:3]) + b[3:])
            if cut < b[0].shape[0]:
                held.append(tuple(t[cut:] if torch.is_tensor(t) else t for t in b[:3]) + b[3:])
            seen += b[0].shape[0]
        if self.scope.whole_windows and k and any(b[0].shape[0] != len(blocks[0][0]) for b in fit + held):
            fit, held = blocks, blocks  # windows carry per-batch arguments: no split inside a batch
        held = held or fit
        self.done[self.i] = reconstruct(self.scope.block, fit, held, steps=cfg.reconstruct, lr=cfg.reconstruct_lr,
                                        batch=self.scope.step_rows, compute=self.compute, seed=cfg.seed + self.i)
        fit = held = None   # their views of the captured batches go; `change` frees each batch as it goes
        change = self.scope.change(self.blocks, self.compute)
        self.blocks = []
        return True if change is None else change

    def report(self):
        if not self.done:
            return None
        r = self.done.values()
        return {"held_out_error_before": sum(x.loss_before for x in r) / len(r),
                "held_out_error_after": sum(x.loss_after for x in r) / len(r),
                "layers": {i: vars(x) for i, x in self.done.items()}}
