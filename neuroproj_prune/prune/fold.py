"""Folds: remove a layer's neurons and fold their work into the kept ones.

MLP output `y = W h + b` (W: d_model × N). Keeping K, removing R, with moments over calibration tokens
(G = E[h hᵀ], μ = E[h]); a *target* cross-moment C = E[y* hᵀ] (one-shot: C = W G, i.e. preserve this
layer's own output). A fold is a function `fold(W, keep, removed, b, f: FoldInputs) -> (W', b')`, an entry
of `FOLDS`:

    none            W' = W_:,K
    representative  w_r += a_j w_j for each removed j folding into r, a_j = E[h_j h_r]/E[h_r²]
                    (centred slope Cov/Var and b += w_j (μ_j − a_j μ_r) when the layer has a bias)
    bias            W' = W_:,K,  b += W_:,R μ_R                                  (FLAP's compensation)
    lstsq           W' = C_:,K (G_KK + λI)⁻¹                 (augmented with a constant 1 when b exists)

To add a fold: write such a function and decorate it with `@FOLDS.register("name")`.
All solves in float64 (Cholesky; ridge λ = 1e-7·mean diag G: on SmolLM2 at 30 %, 1e-4 and 1e-6 gave the same
perplexity and 1e-2 clearly worse; a near-zero ridge lets an exact duplicate fold away exactly).
Cost per layer: O(N·K·d + K³).
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from ..errors import NeuroprojError
from ..model import adapter_for
from ..registry import Registry
from ..stats import ridged

RIDGE = 1e-7


def effective_ridge(ridge: float, tokens: int, N: int, warn: bool = True) -> float:
    """The ridge for a layer of N neurons calibrated on `tokens` tokens. With fewer than 2·N tokens the
    Gram matrix is (nearly) singular and a near-zero ridge lets the refit explode on new text, so it is raised
    to 1e-2 (measured on SmolLM2: worse than 1e-7 with ample data, but safe); use more calibration tokens."""
    if tokens < 2 * N and ridge < 1e-2:
        if warn:
            _warn_few_tokens(tokens, N)
        return 1e-2
    return ridge


@functools.lru_cache(maxsize=None)
def _warn_few_tokens(tokens: int, N: int) -> None:  # once per (tokens, width), not once per layer
    print(f"neuroproj-prune: warning: {tokens} calibration tokens for {N} neurons: ridge raised to 1e-2; give at "
          f"least {2 * N} tokens (--samples x --seqlen) for the full least-squares refit", file=sys.stderr)


def chol_solve(A: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """X with X A = B (A symmetric PSD, ridge-regularised), i.e. B A⁻¹."""
    Ar = ridged(A, ridge)
    L, info = torch.linalg.cholesky_ex(Ar)
    if int(info) != 0:
        return torch.linalg.lstsq(Ar, B.T).solution.T
    return torch.cholesky_solve(B.T, L).T


# ---------------------------------------------------------------------------------------------- folds
@dataclass
class FoldInputs:
    """What a fold may use for one layer (float64, CPU): moments G = E[h hᵀ], mean = E[h]; the target
    moments C = E[y* hᵀ], c = E[y*] (None: the layer's own output, C = W G, c = W μ); each removed
    neuron's representative; the ridge."""

    G: torch.Tensor
    mean: torch.Tensor
    C: torch.Tensor | None = None
    c: torch.Tensor | None = None
    representative: dict | None = None
    ridge: float = RIDGE


FOLDS = Registry("fold", "fold(W, keep, removed, b, f: FoldInputs) -> (W', b')")


@FOLDS.register("none")
def fold_none(W, keep, removed, b, f: FoldInputs):
    return W[:, keep].clone(), b


@FOLDS.register("bias")
def fold_bias(W, keep, removed, b, f: FoldInputs):
    if b is None:
        raise NeuroprojError("fold 'bias' needs an output bias: allow adding one (--add-bias) or use lstsq")
    return W[:, keep].clone(), b + W[:, removed] @ f.mean[removed]


@FOLDS.register("representative")
def fold_representative(W, keep, removed, b, f: FoldInputs):
    Wk = W.clone()
    pos = {int(j): p for p, j in enumerate(keep.tolist())}
    var = (f.G.diagonal() - f.mean**2).clamp(min=0)
    for j, r in (f.representative or {}).items():
        if j not in pos and r in pos:
            if b is not None:
                a = (f.G[j, r] - f.mean[j] * f.mean[r]) / var[r].clamp(min=1e-30)
                b += W[:, j] * (f.mean[j] - a * f.mean[r])
            else:
                a = f.G[j, r] / f.G[r, r].clamp(min=1e-30)
            Wk[:, r] += a * W[:, j]
    return Wk[:, keep], b


@FOLDS.register("lstsq")
def fold_lstsq(W, keep, removed, b, f: FoldInputs):
    C, c = (W @ f.G, W @ f.mean) if f.C is None else (f.C, f.c)
    if c is None:
        raise NeuroprojError("a target cross-moment C needs its mean c")
    if b is None:  # no bias: y ≈ W' h_K
        return chol_solve(f.G[keep][:, keep], C[:, keep], f.ridge), None
    # with a bias: regress on [h_K, 1]; the constant column's moments are μ_K and 1
    K = keep.numel()
    A = torch.empty(K + 1, K + 1, dtype=f.G.dtype)
    A[:K, :K] = f.G[keep][:, keep]
    A[:K, K] = A[K, :K] = f.mean[keep]
    A[K, K] = 1.0
    X = chol_solve(A, torch.cat([C[:, keep], c[:, None]], dim=1), f.ridge)
    return X[:, :K], b + X[:, K]  # targets exclude the bias: the old bias stays, the fitted constant adds


def fold_layer(fold: str, W: torch.Tensor, keep: torch.Tensor, *, G: torch.Tensor, mean: torch.Tensor,
               bias: torch.Tensor | None = None, C: torch.Tensor | None = None, c: torch.Tensor | None = None,
               representative: dict[int, int] | None = None, use_bias: bool = False, ridge: float = RIDGE):
    """New (W', b') for one layer. W: (d, N) float64; `use_bias`: a bias may be written (the layer has one,
    or one is added). Returns (W' (d, K), b' (d,) or None). Keeping every neuron with the layer's own
    output as target returns W unchanged, bit for bit."""
    FOLDS.check(fold)
    keep = torch.as_tensor(keep, dtype=torch.long)
    removed = torch.ones(W.shape[1], dtype=torch.bool)
    removed[keep] = False
    R = removed.nonzero().flatten()
    b = None if bias is None else bias.clone()
    if use_bias and b is None:
        b = torch.zeros(W.shape[0], dtype=W.dtype)
    if R.numel() == 0 and C is None:  # nothing removed: bit-exact identity
        return W[:, keep].clone(), b
    return FOLDS[fold](W, keep, R, b, FoldInputs(G, mean, C, c, representative, ridge))


def fold_and_slice(model, i: int, keep: torch.Tensor, fold: str, f: FoldInputs | None, *, add_bias: bool = False):
    """Prune layer i of `model` in place to the neurons `keep`, folding the removed ones by `fold` (moments
    `f`; None only for fold `none` without an added bias). Returns (W', b') as written."""
    a = adapter_for(model)
    keep = torch.as_tensor(keep, dtype=torch.long)
    if f is None:
        if fold != "none" or add_bias:
            raise NeuroprojError(f"fold {fold!r} needs activation statistics of layer {i}")
        a.select_neurons(model, i, keep)
        return None, None
    W = a.out_weight(model, i).detach().double().cpu()
    bias = a.out_bias(model, i)
    Wn, bn = fold_layer(fold, W, keep, G=f.G, mean=f.mean, bias=None if bias is None else bias.double().cpu(),
                        C=f.C, c=f.c, representative=f.representative,
                        use_bias=bias is not None or add_bias, ridge=f.ridge)
    a.select_neurons(model, i, keep)
    a.set_out_weight(model, i, Wn)
    if bn is not None:
        a.set_out_bias(model, i, bn)
    return Wn, bn


