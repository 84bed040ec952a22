"""Measurement in the sequential pass: what a layer's forward over the calibration batches accumulates.

Per batch the pass hands the measurement the layer's neuron activations h (tokens × N, in the totals'
precision) and its output; the measurement adds them to the layer's moments:

    token weights   w_t = WEIGHTINGS[cfg.weighting](out)      rms: 1/mean(out_t²) (the next norm divides token t
                                                              by its rms, so an error there is seen as ‖δ_t‖²·w_t);
                                                              none: w_t = 1
    moments         G = Σ w_t h_t h_tᵀ / Σ w_t,  μ = Σ w_t h_t / Σ w_t                  (stats.Moments)
    fold target     y*_t = TARGETS[cfg.target](...)           layer: the layer's own output W h̃ (no cross-moments
                                                              needed: C = W G); dense: the dense model's MLP output
                                                              on the dense stream, W h_dense; residual: W h̃ plus
                                                              the gap between the dense and the pruned streams
                    C = Σ w_t y*_t h_tᵀ / Σ w_t,  c = Σ w_t y*_t / Σ w_t                (`TargetMoments`)

Optional steps of the pass (swaps, block reconstruction) are `PassHook`s: they see every `Batch` of a layer,
may refine its selection and act after its fold.
Cost per batch: one lower-triangle Gram (tokens·N²/2 multiply-adds), with a dense target a second forward of the
layer and a d×N×tokens product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import Registry


def rms_token_weights(x: torch.Tensor) -> torch.Tensor:
    """w_t = 1/mean(x_t²) for residual-stream rows x_t (last dim d): the next norm divides token t by its rms,
    so an error δ_t there is seen as ‖δ_t‖²·w_t. Shape: x's without the last dim."""
    return 1.0 / (x.pow(2).mean(-1) + 1e-6)


# -------------------------------------------------------------------------------------------- token weights
WEIGHTINGS = Registry("weighting", "weigh(out: Tensor (tokens, d)) -> Tensor (tokens, 1) | None")


@WEIGHTINGS.register("rms")
def weigh_rms(out: torch.Tensor) -> torch.Tensor:
    """As the next norm sees an error: 1/mean(out_t²)."""
    return rms_token_weights(out).unsqueeze(1)


@WEIGHTINGS.register("none")
def weigh_none(out: torch.Tensor) -> None:
    """Every token alike."""
    return None


# ---------------------------------------------------------------------------------------------- fold targets
@dataclass
class TargetInputs:
    """What a fold target may read for one batch: the pruned stream's neuron activations `h` and layer output
    `out`, the dense stream's `h_dense` and `dense_out` (the layer run on the dense model's hidden states), and the
    layer's output projection W (d × N), all in the totals' precision except the outputs (the model's dtype)."""

    h: torch.Tensor
    h_dense: torch.Tensor
    out: torch.Tensor
    dense_out: torch.Tensor
    W: torch.Tensor


TARGETS = Registry("target", "target(t: TargetInputs) -> y* (tokens, d); dense_stream: whether it needs the dense "
                             "model's hidden states carried beside the pruned ones; additive: whether it needs an MLP "
                             "whose output is added to the residual as is")


@TARGETS.register("layer", dense_stream=False, additive=False)
def target_layer(t: TargetInputs) -> None:
    """The layer's own output on the pruned inputs (C = W G: no cross-moments are accumulated)."""
    return None


@TARGETS.register("dense", dense_stream=True, additive=False)
def target_dense(t: TargetInputs) -> torch.Tensor:
    """The dense model's MLP output on the dense stream."""
    return t.h_dense @ t.W.T


@TARGETS.register("residual", dense_stream=True, additive=True)
def target_residual(t: TargetInputs) -> torch.Tensor:
    """The layer's own output plus the gap between the dense and the pruned residual streams."""
    d = t.W.shape[0]
    return t.h @ t.W.T + (t.dense_out - t.out).reshape(-1, d).to(t.h.dtype)


class TargetMoments:
    """C = Σ w_t y*_t h_tᵀ and c = Σ w_t y*_t (float64 totals) of one layer; `finish(n)` divides by Σ w."""

    def __init__(self, d: int, N: int, device):
        self.C = torch.zeros(d, N, dtype=torch.float64, device=device)
        self.c = torch.zeros(d, dtype=torch.float64, device=device)

    def add(self, y: torch.Tensor, h: torch.Tensor, w: torch.Tensor | None) -> None:
        self.C += (y.T @ (h if w is None else h * w)).double()
        self.c += (y if w is None else y * w).sum(0, dtype=torch.float64)

    def all_reduce(self, dist) -> None:
        dist.all_reduce(self.C)
        dist.all_reduce(self.c)

    def finish(self, n: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.C / n).cpu(), (self.c / n).cpu()


# ------------------------------------------------------------------------------------------------ pass hooks
@dataclass
class Batch:
    """One calibration batch inside layer i's forward, as a `PassHook` sees it."""

    index: int
    x: torch.Tensor                 # the layer's input (hidden states, on the device)
    out: torch.Tensor               # its output (the model's dtype)
    h: torch.Tensor                 # the MLP neurons' activations (tokens, N), in the totals' precision
    w: torch.Tensor | None          # the token weights as accumulated (scaled; (tokens, 1)), None unweighted
    args: tuple                     # the layer's other call arguments (attention mask, position embeddings)
    kwargs: dict


class PassHook:
    """An optional step of the sequential pass (swaps: swaps.py; block reconstruction: reconstruct.py). For each
    layer: `begin` before its batches, `batch` for each, `end` after them, `measured` once its moments are
    complete; `refine` may change the layer's plan after the selection; `folded` runs after the fold and says
    whether the layer now computes more than its output projection changed: False (the closed-form carry holds),
    True (the carry runs the layer again) or, when only the MLP changed, each batch's change of the MLP output
    (the carry adds it to the stored layer output); `report` sums up what it did, for the plan's metadata."""

    name = ""

    def begin(self, i: int, layer, moments, n_batches: int) -> None:
        pass

    def batch(self, b: Batch) -> None:
        pass

    def end(self) -> None:
        pass

    def all_reduce(self, dist) -> None:
        pass

    def measured(self, work) -> None:
        pass

    def refine(self, work, layer_plan: dict) -> dict:
        return layer_plan

    def folded(self, work, layer) -> bool | list:
        return False

    def report(self) -> dict | None:
        return None
