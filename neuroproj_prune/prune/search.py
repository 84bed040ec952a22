"""Per-layer widths by measured loss (`--allocation search`): the summed error curves of `global` propose an
allocation, the pruned model's loss on held-back calibration windows decides.

The error curves e_i(k) (`calibrate.error_curves`) predict each layer's cost alone and assume the costs add up;
on SmolLM2 the allocation they give moves with the windows that measure them (39.10 from 32 windows, 40.60
from 128, 30 %). Here candidate allocations are scored by what they do to the whole model, as Týr-the-Pruner
and OSSCAR do, on a *supernet*:

    layer i at width k = the top-k neurons of the selection (from the dense moments), its down projection
    refitted by least squares, W'_k = (W G)_{:,K} G_KK⁻¹, written into the full-width weight with zero
    columns for the removed neurons

so one model evaluates any allocation (`Supernet.apply`). With π the selection's order, L = chol(G_ππ + λI)
and Z = L⁻¹ (W G)_{:,π}ᵀ computed once per layer, every prefix solve is one triangular solve:
W'_kᵀ = L_{:k,:k}⁻ᵀ Z_{:k} (the leading block of a Cholesky factor is the factor of the leading block).

The search is a first-order coordinate descent on the measured loss. One forward and backward pass over the
held-back windows gives the loss ℒ of the current allocation and, per layer, the gradient of ℒ with respect to
its down projection, ∂ℒ/∂W_i = Σ_t g_t h_tᵀ (g: the gradient at the projection's output, h: its input); moving
layer i to width k' changes ℒ by ≈ ⟨∂ℒ/∂W_i, W'_k' − W'_k⟩. Every pair "layer i gains `step` neurons, layer j
gives them" is predicted that way, the best `pairs` disjoint pairs that predict a gain are applied at once, and
the next pass measures the result: kept if ℒ fell, else undone and retried with half as many pairs. Widths stay
on the multiple's grid and within `max_shift` of the mean sparsity, the total is unchanged.

Cost: the supernet O(L·N³) (one Cholesky and triangular solves per layer) and O(L·N²) memory (L = layers);
each round one forward and one backward of the dense-size model over the held-back windows (≈ 3 forwards of
`windows × seqlen` tokens) plus a d×N×tokens product per layer.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import NeuroprojError
from ..stats import compute_autocast, hooked, ridged


class Supernet:
    """Every layer's MLP at any width, from one set of dense moments (see the module docstring).

    `moments`: {layer: (G, mean)} float64 E[h hᵀ] of the dense layer's neurons; `orders`: {layer: the
    neurons in the selection's order, most important first}; `ridge`: relative, as the fold's."""

    def __init__(self, model, adapter, moments: dict, orders: dict, ridge: float):
        self.model, self.a = model, adapter
        self.dense = {i: adapter.out_weight(model, i).detach().clone() for i in moments}
        self.orders = orders
        self._L, self._Z, self._cache = {}, {}, {}
        for i, (G, _) in moments.items():
            p = orders[i]
            W = self.dense[i].double().cpu()
            L, info = torch.linalg.cholesky_ex(ridged(G[p][:, p], ridge))
            if int(info) != 0:
                raise NeuroprojError(f"layer {i}: the calibration Gram is not positive definite; use more "
                                     f"calibration tokens or a larger --ridge")
            self._L[i] = L
            self._Z[i] = torch.linalg.solve_triangular(L, (W @ G)[:, p].T, upper=False)   # N × d

    def weight(self, i: int, k: int) -> torch.Tensor:
        """Layer i's down projection (d, N) at width k, removed columns zero, in the model's dtype."""
        if (i, k) not in self._cache:
            W = self.dense[i]
            if k >= W.shape[1]:
                return W
            L = self._L[i][:k, :k]
            Wk = torch.linalg.solve_triangular(L.T, self._Z[i][:k], upper=True).T       # d × k
            full = torch.zeros_like(W)
            full[:, self.orders[i][:k].to(W.device)] = Wk.to(W.device, W.dtype)
            if len(self._cache) > 8 * len(self.dense):   # bounded: the search visits a few widths per layer
                self._cache.clear()
            self._cache[(i, k)] = full
        return self._cache[(i, k)]

    def apply(self, widths: dict[int, int]) -> None:
        for i, k in widths.items():
            self.a.set_out_weight(self.model, i, self.weight(i, k))

    def restore(self) -> None:
        for i, W in self.dense.items():
            self.a.set_out_weight(self.model, i, W)


@contextlib.contextmanager
def activations_only(model):
    """Inside: the parameters need no gradient (gradients flow to activations only); their flags are restored."""
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)


class _Stop(Exception):
    pass


@torch.no_grad()
def _cross_entropy_grad(z: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(Σ_t −log softmax(z_t)[y_t], ∂/∂z = softmax(z) − onehot(y)) for logits z (rows, vocabulary), the
    gradient in z's dtype. Formed in one float32 copy (float64 for float64 logits; the softmax never in 16 bits), in place:
    autograd's log-softmax kept its output, a zero-filled gradient and its float32 result, each rows × vocabulary —
    on a 151,936-token head about half of the head's time went to those passes (eval/results/prune_speed.md)."""
    p = z.detach().to(torch.float64 if z.dtype == torch.float64 else torch.float32, copy=True)
    lse = torch.logsumexp(p, -1, keepdim=True)
    rows = torch.arange(p.shape[0], device=p.device)
    loss = float((lse.squeeze(1) - p[rows, targets]).sum())
    p.sub_(lse).exp_()
    p[rows, targets] -= 1
    return loss, p.to(z.dtype)


def loss_backward(model, adapter, x: torch.Tensor, compute=None, *, trunk: bool = True,
                  chunk_tokens: int = 2048) -> tuple[float, torch.Tensor]:
    """The summed next-token cross-entropy of token ids x (batch, T), and g_t = ‖∂loss/∂x_L,t‖² per token (batch·T,;
    x_L the last decoder layer's output). The LM head runs on `chunk_tokens` rows at a time, each chunk's loss
    back-propagated to x_L on its own, so the logits held never exceed chunk_tokens × vocabulary whatever the
    vocabulary (a 151k-token head on 2048 tokens was 1.2 GB of float32 logits plus their gradient at once); the
    chunk's gradient softmax − one-hot is formed in place (`_cross_entropy_grad`).
    `trunk=True`: x_L's gradient then flows back through the decoder layers to the activations (the embeddings'
    output is the leaf; use inside `activations_only`); False: the trunk runs without a graph and only g is made.
    The forward under autocast with `compute`. Cost: one forward (+ one backward of the trunk with `trunk`) and
    the head's forward and backward (2·tokens·d·vocabulary multiply-adds each)."""
    last = adapter.layers(model)[-1]
    got = {}

    def stop(key, out):
        got["x"] = out
        raise _Stop

    ctx = torch.enable_grad() if trunk else torch.no_grad()
    with ctx, compute_autocast(x.device, compute), \
            hooked([(0, last, "out")], stop):
        emb = model.get_input_embeddings()(x).detach().requires_grad_(trunk)
        try:
            model(inputs_embeds=emb, use_cache=False)
        except _Stop:
            pass
    xL = got["x"]
    xs = xL.detach().requires_grad_(True)
    d = xs.shape[-1]
    rows, targets = xs[:, :-1].reshape(-1, d), x[:, 1:].reshape(-1)
    total = 0.0
    with torch.enable_grad(), compute_autocast(x.device, compute):
        for c in range(0, rows.shape[0], chunk_tokens):
            z = adapter.logits(model, adapter.head_input(model, rows[c:c + chunk_tokens]))
            loss, dz = _cross_entropy_grad(z, targets[c:c + chunk_tokens])
            z.backward(dz)
            total += loss
    g = xs.grad
    if trunk:
        xL.backward(g.to(xL.dtype))
    return total, g.float().pow(2).sum(-1).reshape(-1)


def loss_and_grads(model, adapter, ids: torch.Tensor, layers, *, batch_size: int = 4, compute=None):
    """(mean next-token loss on `ids`, {layer: ∂loss/∂W_i (d, N) float64}) with W_i the down projections.
    One forward and one backward per batch; no parameter gradient is stored (the gradient is formed from the
    projection's input and output gradient)."""
    dev = next(model.parameters()).device
    grads, inputs = {i: None for i in layers}, {}

    def on(key, t):
        where, i = key
        if where == "in":
            inputs[i] = t.detach()
            return
        h = inputs.pop(i)

        def on_grad(g):
            gw = g.reshape(-1, g.shape[-1]).double().T @ h.reshape(-1, h.shape[-1]).double()
            grads[i] = gw if grads[i] is None else grads[i] + gw
        if t.requires_grad:
            t.register_hook(on_grad)

    points = [((where, i), adapter.out_proj(model, i), where) for i in layers for where in ("in", "out")]
    total, count = 0.0, 0
    with hooked(points, on):
        with activations_only(model):
            for b in range(0, ids.shape[0], batch_size):
                x = ids[b:b + batch_size].to(dev)
                total += loss_backward(model, adapter, x, compute)[0]
                count += x[:, 1:].numel()
    return total / count, {i: g / count for i, g in grads.items()}


@dataclass
class SearchResult:
    widths: dict[int, int]
    loss_start: float                 # held-out loss of the proposed (error-curve) allocation
    loss_end: float                   # held-out loss of the returned allocation
    rounds: int                       # forward + backward passes made
    moves: list = field(default_factory=list)   # accepted moves: (gaining layer, giving layer, neurons)


def search_widths(net: Supernet, start: dict[int, int], grids: dict[int, torch.Tensor], measure, *,
                  rounds: int = 6, pairs: int = 4, stride: int = 1, progress: bool = True) -> SearchResult:
    """First-order coordinate descent on the measured loss from `start` (see the module docstring).
    `grids`: each layer's allowed widths (ascending); a move takes `stride` grid steps up in one layer and as
    many down in another, the same number of neurons. `measure(widths) -> (loss, grads)`: `loss_and_grads` on
    the held-back windows, the supernet applied."""
    cur = dict(start)
    pos = {i: int((grids[i] == k).nonzero()[0]) for i, k in cur.items()}
    loss, g = measure(cur)
    first, accepted, m, n = loss, [], pairs, 1
    bar = tqdm(total=rounds, desc="search widths", unit="round", disable=not progress, dynamic_ncols=True)
    bar.update(1)
    try:
        while n < rounds and m > 0:
            here = {i: net.weight(i, cur[i]) for i in cur}
            up, down = {}, {}       # predicted loss change and neurons moved, one grid step up / down
            for i, k in cur.items():
                gi = g[i].to(here[i].device, here[i].dtype)
                if pos[i] + stride < len(grids[i]):
                    k2 = int(grids[i][pos[i] + stride])
                    up[i] = (float((gi * (net.weight(i, k2) - here[i])).sum()), k2 - k)
                if pos[i] - stride >= 0:
                    k2 = int(grids[i][pos[i] - stride])
                    down[i] = (float((gi * (net.weight(i, k2) - here[i])).sum()), k - k2)
            cands = sorted((up[i][0] + down[j][0], i, j) for i in up for j in down
                           if i != j and up[i][1] == down[j][1])
            chosen, used = [], set()
            for pred, i, j in cands:
                if pred >= 0 or len(chosen) == m:
                    break
                if i not in used and j not in used:
                    chosen.append((i, j, up[i][1]))
                    used |= {i, j}
            if not chosen:
                break
            new, npos = dict(cur), dict(pos)
            for i, j, s in chosen:
                npos[i], npos[j] = pos[i] + stride, pos[j] - stride
                new[i], new[j] = int(grids[i][npos[i]]), int(grids[j][npos[j]])
            new_loss, new_g = measure(new)
            n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{min(loss, new_loss):.4f}")
            if new_loss < loss:
                cur, pos, loss, g = new, npos, new_loss, new_g
                accepted += chosen
            else:
                m //= 2
    finally:
        bar.close()
    return SearchResult(cur, first, loss, n, accepted)
