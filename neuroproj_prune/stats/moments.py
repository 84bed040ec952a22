"""The maths every stage shares: Gram products, weighted moments, correlation, activation energy.

For activations h (tokens × N) and token weights w_t (1 when unweighted):
    n = Σ w_t,   s = Σ w_t h_t,   G = Σ w_t h_t h_tᵀ   →   E[h] = s/n,  E[h hᵀ] = G/n,
    Σ = E[h hᵀ] − E[h] E[h]ᵀ,   ρ_ij = Σ_ij / sqrt(Σ_ii Σ_jj)   (dead neurons: row and column 0).
Products run in the activations' dtype on their device; totals are float64.
"""
from __future__ import annotations

import torch

GRAM_BLOCK = 384


def ridge_lambda(A: torch.Tensor, ridge: float) -> torch.Tensor:
    """λ = ridge · mean(diag A): the relative ridge every least-squares solve adds to a Gram A (A + λI)."""
    return ridge * A.diagonal().mean().clamp(min=1e-30)


def ridged(A: torch.Tensor, ridge: float) -> torch.Tensor:
    """A + λI with λ = `ridge_lambda(A, ridge)`."""
    return A + ridge_lambda(A, ridge) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)


def gram_lower_(G: torch.Tensor, x: torch.Tensor, block: int = GRAM_BLOCK) -> None:
    """G += xᵀx on the lower block triangle only (column blocks of `block`): (nb+1)/(2nb) of the full
    product's multiply-adds. Products in x's dtype, totals in G's dtype. Call `mirror_lower_` once at the end."""
    N = x.shape[1]
    if N <= block:
        G += (x.T @ x).to(G.dtype)
        return
    for i in range(0, N, block):
        xi = x[:, i:i + block]
        G[i:i + block, :i + block] += (xi.T @ x[:, :i + block]).to(G.dtype)


def mirror_lower_(G: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """Complete a Gram accumulated by `gram_lower_`: copy the lower block triangle to the upper one."""
    N = G.shape[0]
    if N > block:
        for i in range(0, N, block):
            G[i:i + block, i + block:] = G[i + block:, i:i + block].T
    return G


class Moments:
    """Running moments of one layer's activations h (tokens, N): the one accumulator of the package.

    Uncentred and optionally token-weighted (the sequential pass, the allocation): `add(h, w)` with w (tokens, 1)
    or None; weights are divided by the first batch's mean weight (one scale for all batches; it cancels in E[·]);
    `finish()` → (E[h hᵀ], E[h]) as float64 on the CPU.
    Centred (`collect`): `add(centre(h))` subtracts the first batch's mean c before the products, so that
    S = Σ (h − c) and G = Σ (h − c)(h − c)ᵀ hold the covariance without cancellation (`recentre` moves them to
    another shift exactly).
    Products in h's dtype on its device, totals float64; N may be left for the first batch to say.
    Cost per batch: one lower-triangle Gram, tokens·N²/2 multiply-adds; memory 8·N² bytes."""

    def __init__(self, N: int | None = None, device=None):
        self.G = self.s = self.shift = None
        self.n = 0.0          # Σ w (scaled); the token count when unweighted
        self.tokens = 0       # rows seen
        self.scale = None     # the first batch's mean weight
        if N is not None:
            self._alloc(N, device)

    def _alloc(self, N: int, device) -> None:
        self.G = torch.zeros(N, N, dtype=torch.float64, device=device)
        self.s = torch.zeros(N, dtype=torch.float64, device=device)

    def add(self, h: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor | None:
        """Accumulate one batch; returns the scaled weights it used (None when unweighted)."""
        if self.G is None:
            self._alloc(h.shape[1], h.device)
        self.tokens += h.shape[0]
        if w is None:
            gram_lower_(self.G, h)
            self.s += h.sum(0, dtype=torch.float64)
            self.n += h.shape[0]
            return None
        if self.scale is None:
            self.scale = float(w.mean())
        w = w / self.scale
        gram_lower_(self.G, h * w.sqrt())
        self.s += (h * w).sum(0, dtype=torch.float64)
        self.n += float(w.sum())
        return w

    def centre(self, h: torch.Tensor) -> torch.Tensor:
        """h − c in h's dtype, c the mean of the first batch centred (float64; kept as `shift`)."""
        if self.shift is None:
            self.shift = h.double().mean(0)
        return h - self.shift.to(h.dtype)

    def complete(self) -> "Moments":
        """Mirror the Gram's lower block triangle into the upper one (after the last `add`)."""
        mirror_lower_(self.G)
        return self

    def recentre(self, new_shift: torch.Tensor) -> torch.Tensor:
        """Move centred totals to another shift c' exactly: with d = c − c', S' = S + n d,
        G' = G + S dᵀ + d Sᵀ + n d dᵀ (a complete Gram). Returns d."""
        d = self.shift - new_shift
        self.G += torch.outer(self.s, d) + torch.outer(d, self.s) + self.n * torch.outer(d, d)
        self.s += self.n * d
        self.shift = new_shift.clone()
        return d

    def share_scale(self, w: torch.Tensor, dist) -> None:
        """Under several processes (torch.distributed `dist`), before the first `add`: every process takes rank 0's
        first-batch mean weight as its scale, so that their totals are in one unit and add up (`all_reduce`).
        Rank 0 holds the first calibration batch, so the scale is the one a single process would use."""
        t = torch.tensor([float(w.mean())], dtype=torch.float64, device=self.G.device)
        dist.broadcast(t, src=0)
        self.scale = float(t)

    def all_reduce(self, dist) -> None:
        """Sum the totals of every process (torch.distributed `dist`; one shared scale): afterwards each holds the
        moments of all processes' tokens. Cost: one N×N all-reduce."""
        dist.all_reduce(self.G)
        dist.all_reduce(self.s)
        t = torch.tensor([self.n, float(self.tokens)], dtype=torch.float64, device=self.G.device)
        dist.all_reduce(t)
        self.n, self.tokens = float(t[0]), int(t[1])

    def part(self) -> "Moments":
        """An empty sub-total in this one's unit: feed it some of the batches with the weights this one's `add`
        returned (already scaled), then `without(part)` gives the moments of the other batches."""
        p = Moments(self.G.shape[0], self.G.device)
        p.scale = 1.0
        return p

    def without(self, part: "Moments") -> "Moments":
        """The moments of the tokens not in `part` (see `part`). Float64 differences of totals."""
        rest = Moments()
        rest.G, rest.s = self.G - part.G, self.s - part.s
        rest.n, rest.tokens, rest.scale = self.n - part.n, self.tokens - part.tokens, self.scale
        return rest

    @property
    def weight(self) -> float:
        """Σ w in the weights' own unit (undoing the scale)."""
        return self.n * (self.scale or 1.0)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[h hᵀ], E[h]) of uncentred totals, float64 on the CPU."""
        return (mirror_lower_(self.G) / self.n).cpu(), (self.s / self.n).cpu()


def correlation(cov: torch.Tensor, var_rows: torch.Tensor | None = None, var_cols: torch.Tensor | None = None,
                dead_rows: torch.Tensor | None = None, dead_cols: torch.Tensor | None = None) -> torch.Tensor:
    """ρ = Σ / sqrt(var_rows ⊗ var_cols), clamped to [−1, 1]; dead rows and columns are 0. For a square
    covariance (variances from its diagonal by default) the diagonal is 1 for live neurons, 0 for dead."""
    square = var_rows is None and var_cols is None
    if square:
        var_rows = var_cols = cov.diagonal()
        if dead_rows is None:
            dead_rows = dead_neurons(var_rows)
        dead_cols = dead_rows
    var_rows = var_rows.clamp(min=0)
    var_cols = var_rows if var_cols is None else var_cols.clamp(min=0)
    rho = (cov / torch.sqrt(torch.outer(var_rows, var_cols)).clamp(min=1e-300)).clamp(-1, 1)
    if dead_rows is not None:
        rho[dead_rows] = 0
    if dead_cols is not None:
        rho[:, dead_cols] = 0
    if square:
        idx = torch.arange(rho.shape[0])
        rho[idx, idx] = (~dead_rows).to(rho.dtype)
    return rho


def dead_neurons(var: torch.Tensor) -> torch.Tensor:
    """Neurons whose variance is zero, or negligible next to the layer's largest (≤ 1e-12 of it)."""
    var = var.clamp(min=0)
    return (var <= 0) | (var <= 1e-12 * var.max())


def energy(second_moment: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Activation energy of each neuron, E[h_j²]·‖w_out,j‖²: the mean squared size of its contribution to
    the layer output. `second_moment`: E[h²] (N,) or E[h hᵀ] (N, N); W: the output map (d, N)."""
    e2 = second_moment.diagonal() if second_moment.dim() == 2 else second_moment
    return e2.clamp(min=0) * W.pow(2).sum(0)
