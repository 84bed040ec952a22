"""Projection: each neuron of a layer as a point p_i in R^n, with ‖p_i − p_j‖_q ≈ δ_ij = 1 − ρ_ij.

The stress minimized is  S(P) = Σ_{i<j} (‖p_i − p_j‖_q − δ_ij)²; we report the normalised stress
sqrt(S / Σ_{i<j} δ_ij²).  ρ is clamped to [−1, 1], so δ ∈ [0, 2].  *Dead* neurons (zero variance: their
correlation row is 0, diagonal included) are treated as uncorrelated with everything: δ = 1 to every
other neuron, δ = 0 to themselves.  They carry full weight in the stress (they end up roughly at distance 1
from the rest); pruning code may drop them separately.

Two modes:

* `exact` (ours) — fit to one whole-dataset ρ (from a stats file).  Initialisation: classical MDS, the top-n
  eigenvectors of B = −½ J δ⁽²⁾ J (J the centring matrix), found by blocked subspace iteration with
  implicit centring (only products δ⁽²⁾ V, never B itself).  Refinement:
    - q = 2: SMACOF (Guttman transform X ← (1/N) B(X) X with B(X)_ij = −δ_ij/d_ij): matmuls only, the
      stress is monotonically non-increasing;
    - q ≠ 2: L-BFGS (strong Wolfe) or Adam on the same stress, gradients accumulated over row blocks
      (torch.cdist with p = q).
  Stopping rule: stop when the relative decrease of the stress over one iteration is below `tol`
  (default 1e-5) or after `max_iter` iterations (default 300); the returned points are the best evaluated.
  Memory: the δ matrix (float32 N×N, one copy) plus row blocks of b×N float32 temporaries, with b chosen so
  that the temporaries together stay under ~N²/2 floats; never an N×N×n tensor.  Distances come from
  ‖a‖² + ‖b‖² − 2a·b (points are centred, so the cancellation is small); sums are float64.
* `minibatch` — faithful to the seed method: for every calibration batch the per-batch correlation of each
  (layer, site) across its non-padding tokens, the stress summed over layers and sites, one Adam step.
  Init `single_point` | `rand` | `randn` (random ones scaled by 1/√N so all points start within O(1/√N)
  of the origin; `single_point` puts every point at the origin plus a 1e-4/√N jitter, because a zero
  distance has a zero gradient and the points would never separate).  Checkpoints every K steps are
  safetensors files `step-{step:07d}.safetensors` in `checkpoint_dir` (points, Adam moments, losses, RNG
  state as uint8 tensors; step and Adam hyper-parameters in the JSON metadata; no pickle, so a checkpoint
  cannot run code), written atomically; `resume=True` continues from the latest (old `.pt` pickle
  checkpoints are refused, not read).  Under `accelerate launch` / torch.distributed each process takes every W-th batch, gradients are
  averaged with all_reduce before each step, and rank 0 writes.

File format (safetensors): one float32 tensor `layer.{i}.{site}` of shape (N, n) per layer and site,
metadata key `neuroproj_prune` holding JSON (see `FORMAT` and `project`). The site `attn.heads` (points = the
channels of the attention output projection's input) adds the heads' layout of the statistics file's schema
(`stats.HEAD_KEYS`: head_dim, heads and kv_heads per layer), so that readers group channels into heads
(`Projections.head_layout`, `Projections.head_of`).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..io import TensorFile, load_tensors, save_tensors
from ..model import LoadedModel, adapter_for, load_model
from ..stats import (HEAD_KEYS, HEAD_SITE, SITES, ActivationCapture, Stats, batches, calibration_ids, distributed,
                     head_layout, head_meta, join_processes, load_stats, parse_layers, parse_sites, site_width)

FORMAT = "neuroproj-prune/projection/1"
INITS = ("cmds", "single_point", "rand", "randn")
REFINES = ("smacof", "lbfgs", "adam")
MODES = ("exact", "minibatch")
DEFAULT_SITE = "mlp.neurons"


# ------------------------------------------------------------------------------------------- helpers
def _device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _block_rows(n: int, temporaries: int, budget: int | None = None) -> int:
    """Rows per block so that `temporaries` b×n float32 buffers hold at most `budget` elements
    (default n²/2, i.e. the temporaries stay under half an N×N float32 matrix)."""
    budget = budget if budget is not None else max(n * n // 2, 1 << 20)
    return max(1, min(n, budget // max(1, temporaries * n)))


def dissimilarity(rho: torch.Tensor, dtype=torch.float32, device=None, block: int | None = None) -> torch.Tensor:
    """δ = 1 − clamp(ρ, −1, 1) as a new (N, N) matrix of `dtype`; diagonal 0.  Dead neurons (ρ row 0,
    diagonal included) get δ = 1 to every other neuron.  Converted in row blocks, so a float64 ρ never
    costs a second float64 copy."""
    if rho.ndim != 2 or rho.shape[0] != rho.shape[1]:
        raise NeuroprojError(f"a correlation matrix must be square, got shape {tuple(rho.shape)}")
    N = rho.shape[0]
    dev = device if device is not None else rho.device
    out = torch.empty(N, N, dtype=dtype, device=dev)
    b = block or _block_rows(N, 2)
    for s in range(0, N, b):
        blk = rho[s:s + b].to(device=dev, dtype=dtype)
        torch.sub(1.0, blk.clamp_(-1.0, 1.0), out=out[s:s + b])
    out.diagonal().zero_()
    if not torch.isfinite(out).all():
        raise NeuroprojError("the correlation matrix holds non-finite values")
    return out


def _pair_sum_sq(delta: torch.Tensor, block: int) -> float:
    """Σ_{i≠j} δ_ij² (ordered pairs; the diagonal is 0) in float64."""
    return float(sum(delta[s:s + block].square().sum(dtype=torch.float64) for s in range(0, delta.shape[0], block)))


# --------------------------------------------------------------------------------------- classical MDS
def classical_mds(delta: torch.Tensor, dims: int, *, iters: int = 60, seed: int = 0, block: int | None = None,
                  tol: float = 1e-6) -> torch.Tensor:
    """Top-`dims` eigenpairs of B = −½ J δ⁽²⁾ J by subspace iteration (block size dims + 8, Rayleigh–Ritz,
    at most `iters` rounds, stop when the Ritz values change by < tol relative); returns the centred
    (N, dims) coordinates V √λ₊ (float32, on δ's device)."""
    N, dev = delta.shape[0], delta.device
    k = min(N, dims + 8)
    b = block or _block_rows(N, 1)
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(N, k, generator=g, dtype=torch.float64).to(dev)

    def apply(V):
        Vc = (V - V.mean(0)).to(delta.dtype)
        W = torch.empty(N, k, dtype=torch.float64, device=dev)
        for s in range(0, N, b):
            W[s:s + b] = (delta[s:s + b].square() @ Vc).double()
        W -= W.mean(0)
        return -0.5 * W

    V, _ = torch.linalg.qr(V)
    prev = None
    for _ in range(iters):
        W = apply(V)
        H = V.T @ W
        lam = torch.linalg.eigvalsh((H + H.T) / 2)
        V, _ = torch.linalg.qr(W)
        if prev is not None and float((lam - prev).abs().max()) <= tol * float(lam.abs().max().clamp(min=1e-30)):
            break
        prev = lam
    W = apply(V)
    H = V.T @ W
    lam, U = torch.linalg.eigh((H + H.T) / 2)
    order = lam.argsort(descending=True)[:dims]
    lam, U = lam[order], U[:, order]
    X = (V @ U) * lam.clamp(min=0).sqrt()
    if float(lam.clamp(min=0).max()) <= 0:  # degenerate (e.g. all δ equal): a small random start
        X = torch.randn(N, dims, generator=g, dtype=torch.float64).to(dev) * 1e-2
    X -= X.mean(0)
    return X.to(torch.float32)


# --------------------------------------------------------------------------------------------- SMACOF
def _smacof(delta, X, *, max_iter, tol, block, sum_delta2, callback=None):
    """Guttman iterations (q = 2).  Returns (X_best, raw stress over ordered pairs, history)."""
    N = delta.shape[0]
    X = X.to(delta.dtype)
    d = torch.empty(min(block, N), N, dtype=delta.dtype, device=delta.device)
    tmp = torch.empty_like(d)
    hist = []
    best_X, best = X, math.inf
    ones = torch.ones(N, 1, dtype=X.dtype, device=X.device)
    for it in range(max_iter + 1):
        sq = (X * X).sum(1, keepdim=True)
        # d² = ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j as one matmul of (N, n+2) factors
        left, right = torch.cat([X, sq, ones], 1), torch.cat([-2 * X, ones, sq], 1)
        Xn = torch.empty_like(X)
        stress = 0.0
        for s in range(0, N, block):
            e = min(N, s + block)
            db, tb = d[:e - s], tmp[:e - s]
            torch.mm(left[s:e], right.T, out=db)
            db.clamp_(min=0).sqrt_()
            db.diagonal(offset=s).zero_()
            torch.sub(db, delta[s:e], out=tb)
            stress += float(torch.linalg.vector_norm(tb, dtype=torch.float64)) ** 2
            if it < max_iter:
                torch.div(delta[s:e], db, out=db)          # δ/d; 0/0 (diagonal) and δ/0 (coincident) → 0
                db.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                Xn[s:e] = db.sum(1, keepdim=True) * X[s:e] - db @ X
        hist.append(math.sqrt(stress / sum_delta2) if sum_delta2 > 0 else 0.0)
        if callback:
            callback(it, hist[-1])
        if stress < best:
            best_X, prev_best, best = X, best, stress
        else:
            break   # SMACOF is monotone: no decrease means converged (rounding level)
        if it == max_iter or (prev_best < math.inf and (prev_best - stress) <= tol * prev_best) or stress == 0:
            break
        X = Xn / N
    return best_X, best, hist


# ---------------------------------------------------------------------------------- gradient refinement
def _stress_and_grad(P, delta, q, block):
    """Raw stress over ordered pairs and its gradient, accumulated over row blocks (cdist with p = q)."""
    P = P.detach().requires_grad_(True)
    total = 0.0
    N = delta.shape[0]
    for s in range(0, N, block):
        d = torch.cdist(P[s:s + block], P, p=q)
        loss = (d - delta[s:s + block]).square().sum()
        loss.backward()
        total += loss.item()
    return total, P.grad


def _gradient_refine(delta, X, *, q, method, max_iter, tol, block, sum_delta2, lr=None, callback=None):
    X = X.detach().clone().to(delta.dtype)
    hist = []
    if method == "lbfgs":
        P = X.requires_grad_(True)
        opt = torch.optim.LBFGS([P], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=0.0,
                                history_size=20, line_search_fn="strong_wolfe")
        state = {"best": math.inf, "X": X.detach().clone(), "stop": False}

        def closure():
            val, g = _stress_and_grad(P.detach(), delta, q, block)
            n = val / sum_delta2
            opt.zero_grad()
            P.grad = g / sum_delta2
            if val < state["best"]:
                rel = (state["best"] - val) / state["best"] if state["best"] < math.inf else 1.0
                state["best"], state["X"] = val, P.detach().clone()
                hist.append(math.sqrt(n))
                if callback:
                    callback(len(hist) - 1, hist[-1])
                if rel <= tol:
                    state["stop"] = True
            return torch.tensor(n, dtype=P.dtype)

        # LBFGS's own tolerance_change is absolute; our relative rule is checked between outer calls
        evals = 0
        while evals < max_iter and not state["stop"]:
            opt.param_groups[0]["max_iter"] = min(20, max_iter - evals)
            before = state["best"]
            opt.step(closure)
            evals += 20
            if state["best"] >= before * (1 - tol):
                break
        return state["X"], state["best"], hist
    # Adam, full batch
    P = X.requires_grad_(True)
    opt = torch.optim.Adam([P], lr=lr or 1e-2)
    best, best_X = math.inf, X.detach().clone()
    for it in range(max_iter):
        val, g = _stress_and_grad(P.detach(), delta, q, block)
        hist.append(math.sqrt(val / sum_delta2))
        if callback:
            callback(it, hist[-1])
        if val < best:
            rel = (best - val) / best if best < math.inf else 1.0
            best, best_X = val, P.detach().clone()
            if rel <= tol and it > 10:
                break
        opt.zero_grad()
        P.grad = g / sum_delta2
        opt.step()
    return best_X, best, hist


# ------------------------------------------------------------------------------------------ fit_exact
def _initial_points(kind, N, dims, generator, device):
    s = 1.0 / math.sqrt(N)
    if kind == "single_point":
        return torch.randn(N, dims, generator=generator).to(device) * (1e-4 * s)
    if kind == "rand":
        return torch.rand(N, dims, generator=generator).to(device) * s
    if kind == "randn":
        return torch.randn(N, dims, generator=generator).to(device) * s
    raise NeuroprojError(f"unknown init {kind!r}: choose from {', '.join(INITS)}")


def fit_exact(rho: torch.Tensor, dims: int = 3, *, norm_order: float = 2.0, init="cmds", refine: str | None = None,
              max_iter: int = 300, tol: float = 1e-5, device=None, seed: int = 0, block: int | None = None,
              lr: float | None = None, return_history: bool = False, callback=None):
    """Fit points to one correlation matrix.  `rho`: (N, N) correlation (any float dtype, dead rows 0).
    Returns (P (N, dims) float32 on the CPU, normalised stress) — plus the per-iteration normalised stress
    history when `return_history`.  `init`: 'cmds' (default), 'single_point', 'rand', 'randn' or an (N, dims)
    tensor.  `refine`: 'smacof' (q = 2 only; default for q = 2), 'lbfgs' (default otherwise) or 'adam'.
    See the module docstring for the stopping rule and memory use."""
    dims, q = int(dims), float(norm_order)
    if dims < 1:
        raise NeuroprojError("--dims must be >= 1")
    if not q >= 1:
        raise NeuroprojError(f"--norm-order must be >= 1 (got {norm_order})")
    refine = refine or ("smacof" if q == 2 else "lbfgs")
    if refine not in ("smacof", "lbfgs", "adam"):
        raise NeuroprojError(f"unknown refinement {refine!r}: choose smacof, lbfgs or adam")
    if refine == "smacof" and q != 2:
        raise NeuroprojError("SMACOF needs --norm-order 2; use lbfgs or adam for other norms")
    dev = _device(device)
    N = rho.shape[0]
    delta = dissimilarity(rho, torch.float32, dev)
    if N == 1:
        P = torch.zeros(1, dims)
        return (P, 0.0, [0.0]) if return_history else (P, 0.0)
    b = block or _block_rows(N, 2 if refine == "smacof" else 6)
    sum_d2 = _pair_sum_sq(delta, b)
    g = torch.Generator().manual_seed(seed)
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (N, dims):
            raise NeuroprojError(f"init points have shape {tuple(init.shape)}, expected {(N, dims)}")
        X = init.to(dev, torch.float32)
    elif init in (None, "cmds"):
        X = classical_mds(delta, dims, seed=seed, block=_block_rows(N, 1))
    else:
        X = _initial_points(init, N, dims, g, dev)
    X = X - X.mean(0)
    if refine == "smacof":
        P, raw, hist = _smacof(delta, X, max_iter=max_iter, tol=tol, block=b, sum_delta2=sum_d2, callback=callback)
    else:
        P, raw, hist = _gradient_refine(delta, X, q=q, method=refine, max_iter=max_iter, tol=tol, block=b,
                                        sum_delta2=sum_d2, lr=lr, callback=callback)
    del delta
    s = math.sqrt(raw / sum_d2) if sum_d2 > 0 else 0.0
    P = P.detach().to("cpu", torch.float32)
    return (P, s, hist) if return_history else (P, s)


def normalised_stress(P: torch.Tensor, rho: torch.Tensor, norm_order: float = 2.0, block: int | None = None) -> float:
    """sqrt(Σ_{i<j}(‖p_i − p_j‖_q − δ_ij)² / Σ_{i<j} δ_ij²) with δ = 1 − ρ (dead neurons: δ = 1)."""
    N = rho.shape[0]
    b = block or _block_rows(N, 3)
    P = P.to(torch.float64)
    num = den = 0.0
    for s in range(0, N, b):
        blk = rho[s:s + b].to(torch.float64).clamp(-1, 1)
        dl = 1.0 - blk
        dl[torch.arange(dl.shape[0]), torch.arange(s, s + dl.shape[0])] = 0
        d = torch.cdist(P[s:s + b], P, p=norm_order)
        num += float(((d - dl) ** 2).sum())
        den += float((dl ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


# --------------------------------------------------------------------------------------- projections
class Projections(TensorFile):
    """Points per (layer, site): `get(layer, site)` → (N, n) float32 tensor, `stress(layer, site)` →
    normalised stress, `layers`, `sites`, `meta` (the file's JSON metadata), `path`."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, path: str | None = None):
        super().__init__({k: v.to(torch.float32) for k, v in tensors.items()}, meta, path)

    @property
    def dims(self) -> int:
        return int(self.meta["dims"])

    def get(self, layer: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        key = f"layer.{int(layer)}.{site}"
        if key not in self._t:
            raise NeuroprojError(f"the projections have no layer {layer}, site {site} "
                                 f"(layers {self.layers}, sites {self.sites})")
        return self._t[key]

    @property
    def head_layout(self) -> dict | None:
        """The heads' layout of site attn.heads (`stats.head_layout`: head_dim, heads and kv_heads per layer);
        None when the file has no such site."""
        return head_layout(self.meta, self.path or "projections")

    def head_of(self, layer: int) -> torch.Tensor:
        """The query head of every point of (layer, attn.heads): channel c belongs to head c // head_dim."""
        P, lay = self.get(layer, HEAD_SITE), self.head_layout
        if lay is None or P.shape[0] != lay["heads"][int(layer)] * lay["head_dim"]:
            raise NeuroprojError(f"the projections of layer {layer} {HEAD_SITE} do not fit their heads' layout "
                                 f"({lay}): re-run project")
        return torch.arange(P.shape[0]) // lay["head_dim"]

    def stress(self, layer: int, site: str = DEFAULT_SITE) -> float:
        self.get(layer, site)
        return float(self.meta["stress"][f"{int(layer)}/{site}"])

    def validate(self) -> None:
        """The header (dims, layers, sites) against the tensors: one (N, dims) matrix of finite points per listed
        (layer, site), N ≥ 1. Cost: one pass over the points."""
        where = self.path or "projections"
        damaged = "the file is damaged or edited; re-run project"
        try:
            dims, layers, sites = int(self.meta["dims"]), [int(i) for i in self.layers], [str(x) for x in self.sites]
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{where}: the header lacks dims/layers/sites: re-run project") from None
        for i in layers:
            for site in sites:
                P = self._t.get(f"layer.{i}.{site}")
                if P is None or P.ndim != 2 or P.shape[0] < 1 or P.shape[1] != dims:
                    raise NeuroprojError(f"{where}: the header lists layer {i} {site} with {dims} dims, the file holds "
                                         f"{None if P is None else tuple(P.shape)}: {damaged}")
                if not torch.isfinite(P).all():
                    raise NeuroprojError(f"{where}: layer {i} {site} holds NaN/inf points: {damaged}")

    def order(self, layer: int, site: str = DEFAULT_SITE) -> torch.Tensor:
        """argsort of a 1-D projection (the seed's linear ordering); an error for n > 1."""
        P = self.get(layer, site)
        if P.shape[1] != 1:
            raise NeuroprojError(f"an ordering needs 1-D projections (these have dims {P.shape[1]}): project --dims 1")
        return P[:, 0].argsort()

    def __repr__(self):
        return (f"Projections(mode={self.meta.get('mode')}, dims={self.meta.get('dims')}, "
                f"layers={len(self.layers)}, sites={self.sites})")


def load_projections(path) -> Projections:
    """Read a projection file; a one-line NeuroprojError for a missing, corrupt or foreign file, and for one whose
    tensors do not fit its header (`Projections.validate`)."""
    tensors, meta = load_tensors(path, FORMAT, "projection", "project")
    proj = Projections(tensors, meta, str(path))
    proj.validate()
    return proj


# ------------------------------------------------------------------------------------------ minibatch
def batch_correlation(h: torch.Tensor) -> torch.Tensor:
    """Correlation across the rows (tokens) of h (tokens, N), float32; neurons constant within the batch
    get ρ = 0 off the diagonal and on it (treated as dead: δ = 1 to everything)."""
    x = h.float()
    x = x - x.mean(0)
    ss = (x * x).sum(0)
    live = ss > 1e-12 * ss.max().clamp(min=1e-30)
    inv = torch.where(live, ss.clamp(min=1e-30).rsqrt(), torch.zeros_like(ss))
    x = x * inv
    rho = (x.T @ x).clamp_(-1, 1)
    rho.diagonal().copy_(live.float())
    return rho


class MinibatchFitter:
    """The seed's optimisation: points per key (layer, site), Adam on the stress summed over keys, one step
    per batch of correlations.  Works alone (synthetic batches) and inside `project(mode='minibatch')`."""

    def __init__(self, widths: dict, dims=3, *, init="randn", norm_order=2.0, lr=1e-2, seed=0, device="cpu"):
        if init == "cmds":
            raise NeuroprojError("minibatch mode starts from single_point, rand or randn (cmds needs the whole ρ: use --mode exact)")
        if not float(norm_order) >= 1:
            raise NeuroprojError(f"--norm-order must be >= 1 (got {norm_order})")
        self.q, self.device = float(norm_order), torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.keys = list(widths)
        self.points = {k: _initial_points(init, widths[k], dims, g, self.device).requires_grad_(True)
                       for k in self.keys}
        self.opt = torch.optim.Adam(list(self.points.values()), lr=lr)
        self.step_count = 0
        self.losses: list[float] = []

    def loss_backward(self, key, rho) -> float:
        """Stress of one key on one batch correlation; backward accumulates into its points' gradient."""
        P = self.points[key]
        delta = 1.0 - rho.to(self.device, torch.float32).clamp(-1, 1)
        delta.diagonal().zero_()
        d = torch.cdist(P, P, p=self.q)
        loss = (d - delta).square().triu(1).sum()
        loss.backward()
        return loss.item()

    def step(self, rhos: dict, dist=None) -> float:
        self.opt.zero_grad(set_to_none=False)
        for P in self.points.values():
            if P.grad is None:
                P.grad = torch.zeros_like(P)
        total = sum(self.loss_backward(k, r) for k, r in rhos.items())
        if dist is not None:
            world = dist.get_world_size()
            t = torch.tensor([total], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            total = float(t) / world
            for P in self.points.values():
                dist.all_reduce(P.grad)
                P.grad /= world
        self.opt.step()
        self.step_count += 1
        self.losses.append(total)
        return total

    # ---- checkpoint state: tensors (safetensors) + JSON, never pickle
    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, meta) that restore this fit exactly: points `points.{layer}/{site}`, Adam moments
        `adam.{j}.{name}` (j = the key's index; `step` included, a 0-d tensor), the losses as one float64
        tensor, the CPU RNG state as a uint8 tensor (the loop draws no CUDA random numbers: the points'
        init uses its own CPU generator, the model runs in eval mode); Adam's hyper-parameters and the step
        count go to the JSON.  Cost: one copy of the points and of the two moments."""
        tensors = {f"points.{k[0]}/{k[1]}": P.detach() for k, P in self.points.items()}
        osd = self.opt.state_dict()
        state_meta = {}
        for j, st in osd["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"adam.{j}.{name}"] = v
                else:
                    state_meta[f"{j}.{name}"] = v
        tensors["losses"] = torch.tensor(self.losses, dtype=torch.float64)
        tensors["rng.cpu"] = torch.get_rng_state()
        meta = {"step": self.step_count, "keys": [f"{k[0]}/{k[1]}" for k in self.keys],
                "adam_param_groups": osd["param_groups"], "adam_state": state_meta}
        return tensors, meta

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict, where: str = "checkpoint"):
        """Inverse of `checkpoint_state`; a one-line NeuroprojError when the checkpoint is for other keys or
        shapes."""
        with torch.no_grad():
            for k, P in self.points.items():
                t = tensors.get(f"points.{k[0]}/{k[1]}")
                if t is None or tuple(t.shape) != tuple(P.shape):
                    raise NeuroprojError(f"{where} was written for other layers/sites/widths/dims")
                P.copy_(t)
        state: dict = {}
        for name, t in tensors.items():
            if name.startswith("adam."):
                _, j, field = name.split(".", 2)
                state.setdefault(int(j), {})[field] = t
        for name, v in meta.get("adam_state", {}).items():
            j, field = name.split(".", 1)
            state.setdefault(int(j), {})[field] = v
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["adam_param_groups"]]
        try:
            self.opt.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as e:
            raise NeuroprojError(f"{where} holds an optimizer state that does not fit this fit ({e})") from None
        self.step_count = int(meta["step"])
        self.losses = tensors["losses"].tolist()
        torch.set_rng_state(tensors["rng.cpu"])


CHECKPOINT_FORMAT = "neuroproj-prune/minibatch-checkpoint/1"


def _save_checkpoint(fitter: MinibatchFitter, ckdir: Path, extra: dict):
    """`step-{step:07d}.safetensors` in `ckdir`: the fitter's tensors, JSON metadata (format tag, step,
    Adam hyper-parameters, `extra`), written atomically (temporary file, then rename)."""
    tensors, meta = fitter.checkpoint_state()
    path = ckdir / f"step-{fitter.step_count:07d}.safetensors"
    save_tensors(path, tensors, {"format": CHECKPOINT_FORMAT, **meta, **extra})
    return path


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split(".")[0].split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _latest_checkpoint(ckdir: Path):
    """The newest `step-*.safetensors` in `ckdir` (None when there is none).  An old pickle checkpoint
    (`step-*.pt`, from versions that used torch.save) as the newest is refused, never read: unpickling a
    file can run arbitrary code."""
    if not ckdir.is_dir():
        return None
    cks = [p for p in ckdir.iterdir() if p.name.startswith("step-") and p.suffix in (".safetensors", ".pt")]
    if not cks:
        return None
    latest = max(cks, key=lambda p: (_step_of(p), p.suffix == ".pt"))
    if latest.suffix == ".pt":
        raise NeuroprojError(f"{latest} is an old pickle checkpoint, which is never loaded (unpickling can run code): "
                             f"delete the .pt files in {ckdir} or restart without --resume")
    return latest


def _load_checkpoint(fitter: MinibatchFitter, path: Path, dims: int, keys):
    """Restore `fitter` from a checkpoint written by `_save_checkpoint` (safetensors only)."""
    tensors, meta = load_tensors(path, CHECKPOINT_FORMAT, "minibatch checkpoint",
                                 "project without --resume (or delete the checkpoint directory)")
    if sorted(meta.get("keys", [])) != sorted(f"{i}/{s}" for i, s in keys) or meta.get("dims") != dims:
        raise NeuroprojError(f"checkpoint {path} was written for other layers/sites/dims")
    fitter.load_checkpoint_state(tensors, meta, where=f"checkpoint {path}")


def _minibatch(lm, data, keys, *, dims, init, norm_order, lr, steps, epochs, samples, seqlen, seed, batch_size,
               checkpoint_every, checkpoint_dir, resume, progress, log_dir, device):
    m = lm.model
    adapter = adapter_for(m)
    join_processes(str(device))
    dist, rank, world = distributed()
    if isinstance(data, (str, os.PathLike)):
        ids, desc = calibration_ids(lm, data, samples, seqlen, seed)
    elif data is None:
        raise NeuroprojError("minibatch mode needs --model and --data")
    else:
        ids, desc = data, f"in-memory token ids ({len(data)} sequences)"
    if batch_size is None:
        longest = ids.shape[1] if isinstance(ids, torch.Tensor) else max(len(s) for s in ids)
        batch_size = max(1, 2048 // max(1, longest))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None and lm.tokenizer.pad_token_id is not None else 0
    windows = list(batches(ids, batch_size, pad))
    per_epoch = len(windows) // world
    if per_epoch < 1:
        raise NeuroprojError(f"{len(windows)} batch(es) for {world} processes: use more --samples or a smaller --batch-size")
    total_steps = int(steps) if steps is not None else per_epoch * int(epochs)
    widths = {(i, s): site_width(m, i, s) for i, s in keys}
    pdev = _device(device) if device not in (None, "auto") else next(m.parameters()).device
    fitter = MinibatchFitter(widths, dims, init=init, norm_order=norm_order, lr=lr, seed=seed, device=pdev)
    ckdir = Path(checkpoint_dir) if checkpoint_dir else None
    if resume:
        if ckdir is None:
            raise NeuroprojError("--resume needs --checkpoint-dir")
        ck = _latest_checkpoint(ckdir)
        if ck is not None:
            _load_checkpoint(fitter, ck, dims, keys)
    writer = None
    logf = None
    if log_dir and rank == 0:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        logf = open(Path(log_dir) / "loss.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(log_dir))
        except Exception:   # tensorboard not installed: the JSONL log is enough
            writer = None
    layers = sorted({i for i, _ in keys})
    sites = sorted({s for _, s in keys})
    mean_rho = {k: None for k in keys}   # running mean of the per-batch ρ (the stress reference without stats)
    n_mean = 0
    rhos: dict = {}

    def on_act(i, site, h):
        if (i, site) in widths:
            rhos[(i, site)] = batch_correlation(h)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=fitter.step_count, desc="project", disable=not progress or rank != 0,
               dynamic_ncols=True)
    with ActivationCapture(m, layers, sites, on_act) as cap:
        while fitter.step_count < total_steps:
            t = fitter.step_count
            b = (t % per_epoch) * world + rank
            if t % per_epoch == 0 and t > 0:
                pass
            x, mask = windows[b]
            rhos.clear()
            cap.run(x, mask)
            batch = {k: r.clone() for k, r in rhos.items()}   # out of inference mode
            loss = fitter.step(batch, dist)
            if t >= total_steps - per_epoch:   # the last epoch's batches form the reference
                for k, r in batch.items():
                    mean_rho[k] = r.cpu().double() if mean_rho[k] is None else mean_rho[k].add_(r.cpu().double())
                n_mean += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            if logf:
                logf.write(json.dumps({"step": fitter.step_count, "loss": loss}) + "\n")
                logf.flush()
            if writer:
                writer.add_scalar("stress/sum", loss, fitter.step_count)
            if ckdir is not None and checkpoint_every and fitter.step_count % checkpoint_every == 0 and rank == 0:
                _save_checkpoint(fitter, ckdir, {"dims": dims, "keys": [f"{i}/{s}" for i, s in keys]})
    bar.close()
    if logf:
        logf.close()
    if writer:
        writer.close()
    if ckdir is not None and checkpoint_every and rank == 0 and fitter.step_count % checkpoint_every:
        _save_checkpoint(fitter, ckdir, {"dims": dims, "keys": [f"{i}/{s}" for i, s in keys]})
    if n_mean:
        mean_rho = {k: v / n_mean for k, v in mean_rho.items()}
        if dist is not None:   # average the reference over processes too
            for k in keys:
                t = mean_rho[k].to(pdev)
                dist.all_reduce(t)
                mean_rho[k] = (t / world).cpu()
    points = {k: P.detach().cpu().float() for k, P in fitter.points.items()}
    return points, mean_rho if n_mean else None, fitter, desc, total_steps


# ------------------------------------------------------------------------------------------------ API
@dataclass
class ProjectConfig(Config):
    """Every setting of `project` (CLI flags, the recipe's `projection` section, keywords of `project()`)."""

    what = "project"

    mode: str = opt("exact", "exact: fit a statistics file's whole-dataset correlation (classical MDS, then SMACOF, "
                    "L-BFGS or Adam); minibatch: the seed method, per-batch correlations and Adam steps on --model "
                    "and --data", MODES)
    dims: int = opt(3, "dimension n of the points (1 gives an ordering)", ge=1)
    site: tuple | None = opt(None, "comma list of sites (default: every site of the statistics in exact mode, "
                             "mlp.neurons in minibatch mode)", SITES, kind=list, item=str)
    layers: str | None = opt(None, "layer SPEC such as 0-3,7 (default: every layer of the statistics)", kind=str)
    norm_order: float = opt(2.0, "q of the distance ||p_i - p_j||_q", ge=1.0)
    init: str | None = opt(None, "initial points (default: cmds in exact mode, randn in minibatch mode)", INITS,
                           kind=str)
    refine: str | None = opt(None, "exact mode: smacof, lbfgs or adam (default smacof for q = 2, else lbfgs)",
                             REFINES, kind=str)
    max_iter: int = opt(300, "exact mode: iteration limit", ge=1)
    tol: float = opt(1e-5, "exact mode: stop at a relative stress decrease below this", gt=0.0)
    samples: int = opt(128, "minibatch mode: calibration windows", ge=1)
    seqlen: int = opt(512, "minibatch mode: tokens per window", ge=2)
    seed: int = opt(0, "windows drawn, initial points", ge=0)
    batch_size: int | None = opt(None, "minibatch mode: windows per batch (default ~2048 tokens)", kind=int, ge=1)
    lr: float = opt(1e-2, "minibatch mode: Adam learning rate", gt=0.0)
    steps: int | None = opt(None, "minibatch mode: Adam steps (default: --epochs passes)", kind=int, ge=1)
    epochs: int = opt(1, "minibatch mode: passes over the batches", ge=1)
    checkpoint_every: int = opt(0, "minibatch mode: write a resumable checkpoint every K steps (0: none)", ge=0)
    checkpoint_dir: str | None = opt(None, "minibatch mode: where the checkpoints go", kind=str)
    resume: bool = opt(False, "minibatch mode: continue from the latest checkpoint in --checkpoint-dir")
    log_dir: str | None = opt(None, "minibatch mode: loss.jsonl (and TensorBoard events if installed)", kind=str)

    def check(self) -> None:
        if self.refine == "smacof" and self.norm_order != 2:
            raise ConfigError("refine", "SMACOF needs --norm-order 2; use --refine lbfgs or adam for other norms")
        if self.init == "cmds" and self.mode == "minibatch":
            raise ConfigError("init", "init cmds needs the whole correlation (exact mode): use --init "
                              "single_point, rand or randn in minibatch mode")
        if (self.checkpoint_every or self.resume) and not self.checkpoint_dir:
            raise ConfigError("checkpoint_dir", "--checkpoint-every and --resume need --checkpoint-dir")


def _check_dims(dims: int, widths: dict) -> None:
    """Refuse `dims` at or above a (layer, site)'s number of points: N points span at most N − 1 dimensions, so the
    extra coordinates would be noise the fit cannot determine (checked before any fit)."""
    (i, s), N = min(widths.items(), key=lambda kv: kv[1], default=((None, None), None))
    if N is not None and dims >= N:
        raise NeuroprojError(f"--dims {dims}: layer {i} {s} has {N} neurons (points), which span at most {N - 1} "
                             f"dimensions: give --dims {N - 1} or less")


def project(stats_or_path=None, config: ProjectConfig | None = None, *, out=None, model=None, data=None,
            dtype="auto", device="auto", progress: bool = True, **settings) -> Projections:
    """Project the neurons of each (layer, site) to R^dims and (with `out`) save the points. `config` (or the
    `ProjectConfig` fields as keywords) says how.

    `mode='exact'`: fit to the whole-dataset correlation of a stats file (`stats_or_path`: a Stats or a path),
    classical-MDS init (`init='cmds'`) then SMACOF (q = 2) / L-BFGS or Adam (`refine`), stopping on a
    relative stress decrease < `tol` or `max_iter` iterations.
    `mode='minibatch'`: the seed method on `model` (LoadedModel or spec) and `data` (spec or token ids): per-batch
    correlations, Adam (`lr`), `steps` (default `epochs` passes over the batches), init
    single_point|rand|randn (default randn), checkpoints every `checkpoint_every` steps in `checkpoint_dir`
    (`resume=True` continues).  With a stats file too, layers default to its layers and the reported stress
    is against its whole-dataset ρ; without, against the mean per-batch ρ of the last epoch.
    Cost: exact — O(N²) memory and O(N²·dims) per iteration per layer; minibatch — one forward pass per batch plus
    a per-batch correlation (B·T·N²) and an Adam step per layer.
    """
    cfg = config.replace(**settings) if config is not None else ProjectConfig.make(**settings)
    mode, dims, layers, norm_order, init, refine = cfg.mode, cfg.dims, cfg.layers, cfg.norm_order, cfg.init, cfg.refine
    max_iter, tol, seed = cfg.max_iter, cfg.tol, cfg.seed
    stats = None
    if stats_or_path is not None:
        stats = stats_or_path if isinstance(stats_or_path, Stats) else load_stats(stats_or_path)
    default = stats.sites if stats is not None and mode == "exact" else [DEFAULT_SITE]
    sites = parse_sites(cfg.site) if cfg.site else default
    t0 = time.time()
    tensors, stress, extra = {}, {}, {}
    if mode == "exact":
        if stats is None:
            raise NeuroprojError("exact mode needs a statistics file (from `neuroproj-prune collect`)")
        init = init or "cmds"
        missing = [s for s in sites if s not in stats.sites]
        if missing:
            raise NeuroprojError(f"the statistics have no site(s) {missing} (sites {stats.sites}): re-run collect with --sites")
        # default: every layer the statistics hold (a file collected with --layers holds a subset)
        lay = stats.layers if layers is None else parse_layers(layers, stats.meta.get("num_layers", max(stats.layers) + 1))
        absent = [i for i in lay if i not in stats.layers]
        if absent:
            raise NeuroprojError(f"the statistics have no layers {absent} (layers {stats.layers})")
        from tqdm.auto import tqdm

        keys = [(i, s) for i in lay for s in sites]
        _check_dims(dims, {k: stats.width(*k) for k in keys})
        iters = {}
        for i, s in tqdm(keys, desc="project", disable=not progress, dynamic_ncols=True):
            P, st, hist = fit_exact(stats.correlation(i, s), dims, norm_order=norm_order, init=init, refine=refine,
                                    max_iter=max_iter, tol=tol, device=device, seed=seed, return_history=True)
            tensors[f"layer.{i}.{s}"] = P
            stress[f"{i}/{s}"] = st
            iters[f"{i}/{s}"] = len(hist) - 1
        extra = {"refine": refine or ("smacof" if float(norm_order) == 2 else "lbfgs"), "max_iter": max_iter,
                 "tol": tol, "iterations": iters, "stress_reference": "stats correlation"}
    else:
        if model is None or data is None:
            raise NeuroprojError("minibatch mode needs --model and --data")
        init = init or "randn"
        lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
        if stats is not None:
            stats.check_model(lm)
        L = adapter_for(lm.model).num_layers(lm.model)
        lay = parse_layers(layers if layers is not None else (stats.layers if stats is not None else None), L)
        keys = [(i, s) for i in lay for s in sites]
        a = adapter_for(lm.model)
        _check_dims(dims, {(i, s): a.width(lm.model, i) if s == "mlp.neurons" else a.hidden_size(lm.model)
                           for i, s in keys})
        points, mean_rho, fitter, desc, total = _minibatch(
            lm, data, keys, dims=dims, init=init, norm_order=norm_order, lr=cfg.lr, steps=cfg.steps,
            epochs=cfg.epochs, samples=cfg.samples, seqlen=cfg.seqlen, seed=seed, batch_size=cfg.batch_size,
            checkpoint_every=cfg.checkpoint_every, checkpoint_dir=cfg.checkpoint_dir, resume=cfg.resume,
            progress=progress, log_dir=cfg.log_dir, device=device)
        for (i, s), P in points.items():
            tensors[f"layer.{i}.{s}"] = P
            ref = stats.correlation(i, s) if stats is not None and s in stats.sites and i in stats.layers else mean_rho[(i, s)]
            stress[f"{i}/{s}"] = normalised_stress(P, ref, norm_order)
        extra = {"lr": cfg.lr, "steps": total, "losses": fitter.losses, "data": desc,
                 "stress_reference": "stats correlation" if stats is not None else "mean per-batch correlation (last epoch)"}
    meta = {
        "format": FORMAT, "mode": mode, "method": "stress minimization, δ = 1 − ρ (dead neurons: δ = 1)",
        "dims": int(dims), "norm_order": float(norm_order), "init": init, "layers": sorted({int(k.split(".")[1]) for k in tensors}),
        "sites": sites, "stress": stress,
        "stats_file": stats.path if stats is not None else None,
        "stats_sha256": stats.file_hash() if stats is not None else None,
        "model": stats.meta.get("model") if stats is not None else getattr(model, "spec", model),
        "fingerprint": stats.meta.get("fingerprint") if stats is not None else getattr(lm, "fingerprint", None),
        "seed": seed, "seconds": round(time.time() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    if HEAD_SITE in sites:   # the heads' layout, as the statistics file's schema writes it
        layout = stats.head_layout if stats is not None and mode == "exact" else head_meta(lm.model)
        meta.update({k: layout[k] for k in HEAD_KEYS})
    proj = Projections(tensors, meta)
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        proj.save(out)
    return proj
