"""The maths every stage shares: Gram products, weighted moments, correlation, activation energy.

For activations h (tokens × N) and token weights w_t (1 when unweighted):
    n = Σ w_t,   s = Σ w_t h_t,   G = Σ w_t h_t h_tᵀ   →   E[h] = s/n,  E[h hᵀ] = G/n,
    Σ = E[h hᵀ] − E[h] E[h]ᵀ,   ρ_ij = Σ_ij / sqrt(Σ_ii Σ_jj)   (dead neurons: row and column 0).
Products run on the activations' device; totals are float64. The Gram is the costly part (tokens·N²/2 multiply-
adds): column blocks of the lower triangle by torch's own products, in `product_dtype` — bfloat16 where the forward
computes in bfloat16 (the sequential pass, `collect`) — else float32 (the allocation's error curves: with bfloat16
products the global widths moved WikiText-2 at 30 % by +1.4 %, with float32 +0.3 %). CUDA has bfloat16 inputs with
float32 outputs (`out_dtype`); a CPU has no such product, so there each block of ≤ `GRAM_ROWS` tokens is rounded to bfloat16
(relative 2⁻⁹ per entry) before it joins the float64 total — on SmolLM2's real activations (rms-weighted,
128 × 512 tokens, layers 0/5/15/29) that moved ‖G‖ by 4–6·10⁻⁴ relative and the least-squares refit's true
output error by ≤ 4·10⁻⁵ relative at 20/30/50 % (`eval/gram_precision.py`); one 4096 × 1536 batch took 0.035 s
against 0.081 s in float32 (a micro-benchmark, 5 repetitions each on this 2-core AVX512-BF16 VM, not interleaved;
the prune's ratios from interleaved pairs and the perplexity are in eval/results/prune_speed.md).
Not scipy's BLAS `syrk`, though it does half of xᵀx's work and was 1.4× faster alone: its thread pool and
torch's alternate on the same cores, each spinning after its call, and in a prune on 2 cores the layer forwards
took 86.2 s beside it and 62.5 s without it, the Gram no faster (36.9 s vs 36.3 s; one
`python eval/bench_prune.py --profile` run each: prune 140.2 s vs 113.9 s).
"""
from __future__ import annotations

import torch

GRAM_BLOCK = 384
GRAM_ROWS = 4096   # tokens per rounded partial Gram when low-precision products round their outputs (CPU)


def gram_(G: torch.Tensor, x: torch.Tensor, product_dtype: torch.dtype | None = None,
          block: int = GRAM_BLOCK) -> None:
    """G += the lower triangle of xᵀx (G: N×N, totals in its dtype); `symmetrize_` completes it after the last batch.
    Column blocks of `block`: (nb+1)/(2nb) of the full product's multiply-adds for nb blocks, products in
    `product_dtype` (see the module docstring: float32 outputs on CUDA, outputs rounded per GRAM_ROWS tokens on a
    CPU) or x's dtype."""
    if product_dtype is not None:
        x = x.to(product_dtype)
    if x.dtype in (torch.float32, torch.float64):
        return _gram_blocks(G, x, torch.mm, block)
    if x.device.type == "cuda":
        return _gram_blocks(G, x, _mm_float32_out, block)
    for r in range(0, x.shape[0], GRAM_ROWS):   # a CPU rounds each product's output to x's 16-bit dtype
        _gram_blocks(G, x[r:r + GRAM_ROWS], torch.mm, block)


def _gram_blocks(G, x, mm, block) -> None:
    N = x.shape[1]
    for i in range(0, N, block):
        G[i:i + block, :i + block] += mm(x[:, i:i + block].T, x[:, :i + block]).to(G.dtype)


def _mm_float32_out(a, b):
    """torch.mm of low-precision inputs with float32 outputs (CUDA's `out_dtype`; float32 products without it)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return torch.mm(a.float(), b.float())


LOW_PRECISION_SITES = ("mlp.neurons",)   # the sites whose Grams may take the forward's 16-bit products


def products_for(site: str, compute: torch.dtype | None) -> torch.dtype | None:
    """The Gram products of `site` under forwards in `compute`: the forward's own dtype for the MLP neurons (measured
    safe, the module docstring), float32 (None) for every other site. The heads' outputs are nearly dependent (SmolLM2:
    9 query heads mix 3 value heads) and bfloat16-rounded partial Grams made the o_proj refit blow up (30 % MLP + a
    third of the heads, 16 windows: WikiText-2 401.9 against 50.9); `tests/test_blocks.py` holds the case."""
    return compute if site in LOW_PRECISION_SITES else None


def column_sums(h: torch.Tensor) -> torch.Tensor:
    """Σ_t h_t as float64 (N,). One batch's partial sum in float32 unless h is float64 (the totals stay float64):
    torch's float64-accumulating column sum of a 4096 × 1536 batch took 17.4 ms against 1.7 ms for the float32 one, at
    a relative difference of 1.9·10⁻⁷ (`python eval/bench_gram_blocks.py --sums`, a micro-benchmark; prune_speed.md)."""
    return h.sum(0) if h.dtype == torch.float64 else h.sum(0, dtype=torch.float32).double()


def compute_autocast(device, compute: torch.dtype | None):
    """The forward's context: matmuls under autocast with `compute` (e.g. torch.bfloat16), none when it is None."""
    return torch.autocast(torch.device(device).type, dtype=compute or torch.bfloat16, enabled=compute is not None)


def no_autocast(device):
    """A context without autocast on `device`: the totals' products run in the dtype their code names (`gram_`'s
    rounding per GRAM_ROWS tokens, float32 elsewhere), also when the hook that feeds them fires inside a
    bfloat16-autocast forward."""
    return torch.autocast(torch.device(device).type, enabled=False)


def symmetrize_(G: torch.Tensor) -> torch.Tensor:
    """Complete a Gram accumulated by `gram_`: the lower triangle copied to the upper one, in place."""
    G.copy_(torch.tril(G) + torch.tril(G, -1).T)
    return G


def ridge_lambda(A: torch.Tensor, ridge: float) -> torch.Tensor:
    """λ = ridge · mean(diag A): the relative ridge every least-squares solve adds to a Gram A (A + λI)."""
    return ridge * A.diagonal().mean().clamp(min=1e-30)


def ridged(A: torch.Tensor, ridge: float) -> torch.Tensor:
    """A + λI with λ = `ridge_lambda(A, ridge)`."""
    return A + ridge_lambda(A, ridge) * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)


def cholesky(A: torch.Tensor) -> torch.Tensor:
    """The lower Cholesky factor of a symmetric PSD A (a ridged Gram). A Gram summed from rounded products
    (bfloat16 outputs, float32 totals) can miss positive definiteness by its rounding in directions where the
    activations are (nearly) dependent; then 10⁻⁸, 10⁻⁷, … of mean(diag A) is added until the factor exists
    — the least ridge that makes it one — instead of failing the run."""
    L, info = torch.linalg.cholesky_ex(A)
    jitter = 1e-8
    while int(info) != 0 and jitter <= 1.0:
        L, info = torch.linalg.cholesky_ex(ridged(A, jitter))
        jitter *= 10
    if int(info) != 0:
        raise torch.linalg.LinAlgError("matrix is not positive semi-definite (non-finite entries?)")
    return L


class Moments:
    """Running moments of one layer's activations h (tokens, N): the one accumulator of the package.

    Uncentred and optionally token-weighted (the sequential pass, the allocation): `add(h, w)` with w (tokens, 1)
    or None; weights are divided by the first batch's mean weight (one scale for all batches; it cancels in E[·]);
    `finish()` → (E[h hᵀ], E[h]) as float64 on the CPU.
    Centred (`collect`): `add(centre(h))` subtracts the first batch's mean c before the products, so that
    S = Σ (h − c) and G = Σ (h − c)(h − c)ᵀ hold the covariance without cancellation (`recentre` moves them to
    another shift exactly).
    Products on h's device (see `gram_`; `product_dtype`: their precision), totals float64 (the Gram's in
    `gram_dtype`: float32 halves the memory of many layers' Grams held at once); N may be left for the first batch
    to say. Cost per batch: one lower-triangle Gram, tokens·N²/2 multiply-adds, and one pass
    over h for the weights and the sum; memory 8·N² bytes."""

    def __init__(self, N: int | None = None, device=None, product_dtype: torch.dtype | None = None,
                 gram_dtype: torch.dtype = torch.float64):
        self.product_dtype, self.gram_dtype = product_dtype, gram_dtype
        self.G = self.s = self.shift = None
        self.n = 0.0          # Σ w (scaled); the token count when unweighted
        self.tokens = 0       # rows seen
        self.scale = None     # the first batch's mean weight
        if N is not None:
            self._alloc(N, device)

    def _alloc(self, N: int, device) -> None:
        self.G = torch.zeros(N, N, dtype=self.gram_dtype, device=device)
        self.s = torch.zeros(N, dtype=torch.float64, device=device)

    def add(self, h: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor | None:
        """Accumulate one batch of h (tokens, N; any float dtype: products as `gram_` says) with weights w (tokens,
        1; float32/64) or None; returns the scaled weights it used (None when unweighted)."""
        with no_autocast(h.device):   # called from hooks inside the forward's autocast: products stay as said
            return self._add(h, w)

    def _add(self, h: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor | None:
        if self.G is None:
            self._alloc(h.shape[1], h.device)
        self.tokens += h.shape[0]
        if self.product_dtype is None and h.dtype not in (torch.float32, torch.float64):
            h = h.float() if w is None else h   # the CPU's products are float32 (×√w below converts on the way)
        if w is None:
            gram_(self.G, h, self.product_dtype)
            self.s += column_sums(h)
            self.n += h.shape[0]
            return None
        if self.scale is None:
            self.scale = float(w.mean())
        w = w / self.scale
        r = w.sqrt()
        x = h * r                                       # √w_t h_t: G = Σ x_t x_tᵀ, s = Σ √w_t x_t
        gram_(self.G, x, self.product_dtype)
        self.s += (r.T @ x).reshape(-1).double()
        self.n += float(w.sum())
        return w

    def centre(self, h: torch.Tensor) -> torch.Tensor:
        """h − c in h's dtype, c the mean of the first batch centred (float64; kept as `shift`)."""
        if self.shift is None:
            self.shift = h.double().mean(0)
        return h - self.shift.to(h.dtype)

    def complete(self) -> "Moments":
        """Mirror the Gram's lower triangle into the upper one (after the last `add`)."""
        symmetrize_(self.G)
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
        p = Moments(self.G.shape[0], self.G.device, self.product_dtype)
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
        return (symmetrize_(self.G).double() / self.n).cpu(), (self.s / self.n).cpu()


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
