"""The statistics file `collect` writes and every reader reads: one safetensors file, format
`neuroproj-prune/stats/1`.

Per (layer, site): `layer.{i}.{site}.count` (int64, 1), `.shift` c (N), `.sum` S = Σ (h − c) (N), `.gram`
G = Σ (h − c)(h − c)ᵀ (N, N), float64; per collected cross-layer pair `cross.{l}.{m}.gram` (N_l, N_m). The JSON
metadata says the model (fingerprint, widths, hidden size), layers, sites, the data and the settings. `Stats`
derives every moment from them (float64, CPU); `load_stats` checks a file against this schema.

With the site `attn.heads` the metadata also holds the heads' layout (`HEAD_KEYS`): `head_dim` and, per layer of
the model, `heads` (query heads H_i) and `kv_heads` (key/value heads KV_i); channel c of layer i belongs to query
head c // head_dim, which reads key/value head (c // head_dim) // (H_i / KV_i). `head_meta(model)` writes them,
`head_layout(meta)` reads them (the projection file carries the same keys; the viewer reads them there).
"""
from __future__ import annotations

import torch

from ..errors import NeuroprojError
from ..io import LazyTensorFile, TensorFile, file_sha256, load_tensors
from ..model import LoadedModel, adapter_for
from .moments import correlation, dead_neurons

FORMAT = "neuroproj-prune/stats/1"
HEAD_KEYS = ("head_dim", "heads", "kv_heads")


def head_meta(model) -> dict:
    """The header fields that group the channels of site `attn.heads` into heads (see the module docstring)."""
    a = adapter_for(model)
    L = a.num_layers(model)
    return {"head_dim": int(a.head_dim(model)), "heads": [int(a.num_heads(model, i)) for i in range(L)],
            "kv_heads": [int(a.num_kv_heads(model, i)) for i in range(L)]}


def head_layout(meta: dict, where: str = "the file") -> dict | None:
    """`{"head_dim": hd, "heads": [H_i], "kv_heads": [KV_i]}` from a statistics or projection header; None when
    the header has none (no site attn.heads); one error when it is malformed (H_i not a multiple of KV_i, ...)."""
    if not isinstance(meta, dict) or all(k not in meta for k in HEAD_KEYS):
        return None
    hd, H, KV = (meta.get(k) for k in HEAD_KEYS)
    ok = (_count(hd) and isinstance(H, list) and isinstance(KV, list) and len(H) == len(KV)
          and all(_count(h) and _count(k) and h % k == 0 for h, k in zip(H, KV)))
    if not ok:
        raise NeuroprojError(f"{where}: the heads' layout in the header (head_dim, heads, kv_heads) is damaged: "
                             f"re-run collect")
    return {"head_dim": int(hd), "heads": [int(h) for h in H], "kv_heads": [int(k) for k in KV]}


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def site_width_of(meta: dict, layer: int, site: str, where: str = "the file") -> int:
    """Channels of (layer, site) as a statistics header says: widths[i] (`mlp.neurons`), heads[i]·head_dim
    (`attn.heads`), else hidden_size."""
    if site == "mlp.neurons":
        return int(meta["widths"][layer])
    if site == "attn.heads":
        lay = head_layout(meta, where)
        if lay is None:
            raise NeuroprojError(f"{where}: site attn.heads without the heads' layout (head_dim, heads, kv_heads) in "
                                 f"the header: re-run collect")
        return lay["heads"][layer] * lay["head_dim"]
    return int(meta["hidden_size"])


class Stats(TensorFile):
    """Statistics of one collection: raw shifted totals plus derived moments, per (layer, site).

    All derived quantities are float64 on the CPU:
    `mean` μ, `second_moment` E[h hᵀ], `covariance` Σ, `variance` diag Σ, `correlation` ρ (dead rows 0,
    unit diagonal for live neurons), `dead` (variance ≤ 1e-12·max variance of the layer, or exactly 0),
    `cross_covariance(l, m)` / `cross_correlation(l, m)` for collected cross-layer blocks.
    """

    # -- construction
    @classmethod
    def _from_totals(cls, totals, cross, meta):
        t = {}
        for (i, s), tot in totals.items():
            t[f"layer.{i}.{s}.count"] = torch.tensor([tot.tokens], dtype=torch.int64)
            t[f"layer.{i}.{s}.shift"] = tot.shift.cpu()
            t[f"layer.{i}.{s}.sum"] = tot.s.cpu()
            t[f"layer.{i}.{s}.gram"] = tot.G.cpu()
        for (l, m), blk in cross.items():
            t[f"cross.{l}.{m}.gram"] = blk.cpu()
        return cls(t, meta)

    # -- description
    @property
    def cross_pairs(self) -> list[tuple[int, int]]:
        return sorted(tuple(int(x) for x in k.split(".")[1:3]) for k in self._t if k.startswith("cross."))

    def _get(self, layer, site, what) -> torch.Tensor:
        key = f"layer.{layer}.{site}.{what}"
        if key not in self._t:
            raise NeuroprojError(
                f"the statistics have no layer {layer}, site {site} (layers {self.layers}, sites {self.sites}): "
                f"re-run collect with those --layers/--sites"
            )
        return self._t[key]

    @property
    def head_layout(self) -> dict | None:
        """The heads' layout of site attn.heads (`head_layout`), None without that site."""
        return head_layout(self.meta, self.path or "statistics")

    def count(self, layer, site="mlp.neurons") -> int:
        return int(self._get(layer, site, "count")[0])

    def width(self, layer, site="mlp.neurons") -> int:
        return self._get(layer, site, "shift").numel()

    # -- moments
    def mean(self, layer, site="mlp.neurons") -> torch.Tensor:
        return self._get(layer, site, "shift") + self._get(layer, site, "sum") / self.count(layer, site)

    def covariance(self, layer, site="mlp.neurons") -> torch.Tensor:
        n = self.count(layer, site)
        m = self._get(layer, site, "sum") / n
        cov = self._get(layer, site, "gram") / n - torch.outer(m, m)
        return (cov + cov.T) / 2

    def second_moment(self, layer, site="mlp.neurons") -> torch.Tensor:
        """E[h hᵀ] = Σ + μ μᵀ (uncentred; what least-squares folds need)."""
        mu = self.mean(layer, site)
        return self.covariance(layer, site) + torch.outer(mu, mu)

    def variance(self, layer, site="mlp.neurons") -> torch.Tensor:
        return self.covariance(layer, site).diagonal().clamp(min=0)

    def dead(self, layer, site="mlp.neurons") -> torch.Tensor:
        return dead_neurons(self.variance(layer, site))

    def correlation(self, layer, site="mlp.neurons") -> torch.Tensor:
        return correlation(self.covariance(layer, site))

    def cross_covariance(self, l, m) -> torch.Tensor:
        """Cov(h_l, h_m), shape (N_l, N_m), from the cross block and both layers' totals."""
        key = f"cross.{l}.{m}.gram"
        if key not in self._t:
            raise NeuroprojError(f"no cross-layer block ({l}, {m}): collect with --cross-layer-window >= {m - l}")
        n = self.count(l)
        return self._t[key] / n - torch.outer(self._get(l, "mlp.neurons", "sum") / n,
                                              self._get(m, "mlp.neurons", "sum") / n)

    def cross_correlation(self, l, m) -> torch.Tensor:
        return correlation(self.cross_covariance(l, m), self.variance(l), self.variance(m), self.dead(l), self.dead(m))

    # -- checks
    def validate(self) -> None:
        """The file against its schema and physics. The header: layers (distinct, within `num_layers`), sites (at least
        one), one width per layer, the hidden size. Every listed (layer, site): count ≥ 1, shift and sum (N,), a Gram
        (N, N), all finite, N as the header says; and what activations can give: E[(h − c)²] (the Gram's diagonal,
        a sum of squares) ≥ 0, and a covariance whose correlations lie in [−1, 1] within rounding (`_physical`).
        Every cross block (N_l, N_m), finite, its correlations within [−1, 1] too. Cost: one pass over the tensors
        (O(N²) per layer, in row blocks)."""
        where = self.path or "statistics"
        damaged = "the file is damaged or edited; re-run collect"
        try:
            widths, d = [int(w) for w in self.meta["widths"]], int(self.meta["hidden_size"])
            L = int(self.meta.get("num_layers", len(widths)))
            layers, sites = [int(i) for i in self.layers], [str(x) for x in self.sites]
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{where}: the header lacks widths/hidden_size/layers/sites: re-run collect") from None
        if len(widths) != L or len(set(layers)) != len(layers) or any(not 0 <= i < L for i in layers) or \
                not layers or not sites:
            raise NeuroprojError(f"{where}: the header's layers {layers} / sites {sites} do not fit its {L} layers and "
                                 f"{len(widths)} widths: {damaged}")
        try:
            width = {(i, s): site_width_of(self.meta, i, s, where) for i in layers for s in sites}
        except (KeyError, TypeError, ValueError, IndexError):
            raise NeuroprojError(f"{where}: the header's widths do not give every site's width: {damaged}") from None
        for i in layers:
            for s in sites:
                N = width[(i, s)]
                shapes = {"count": (1,), "shift": (N,), "sum": (N,), "gram": (N, N)}
                for what, shape in shapes.items():
                    x = self._t.get(f"layer.{i}.{s}.{what}")
                    if x is None:
                        raise NeuroprojError(f"{where}: the header lists layer {i} {s}, the file holds no {what} of "
                                             f"it: {damaged}")
                    if tuple(x.shape) != shape:
                        raise NeuroprojError(f"{where}: layer {i} {s} {what} has shape {tuple(x.shape)}, expected "
                                             f"{shape}: {damaged}")
                    if not torch.isfinite(x.double()).all():
                        raise NeuroprojError(f"{where}: layer {i} {s} {what} holds NaN/inf: re-run collect "
                                             f"(with --dtype float32 if the model overflows)")
                if int(self._t[f"layer.{i}.{s}.count"]) < 1:
                    raise NeuroprojError(f"{where}: layer {i} {s} counts no tokens: re-run collect")
                _physical(where, f"layer {i} {s}", self._t[f"layer.{i}.{s}.gram"], self._t[f"layer.{i}.{s}.sum"],
                          self.count(i, s))
        for l, m in self.cross_pairs:
            x = self._t[f"cross.{l}.{m}.gram"]
            if l not in layers or m not in layers or "mlp.neurons" not in sites or \
                    tuple(x.shape) != (widths[l], widths[m]) or not torch.isfinite(x).all():
                raise NeuroprojError(f"{where}: cross block ({l}, {m}) is damaged: re-run collect")
            n, Sl, Sm = self.count(l), self._get(l, "mlp.neurons", "sum"), self._get(m, "mlp.neurons", "sum")
            _bounded(where, f"cross block ({l}, {m})",
                     lambda r0, r1: x[r0:r1].double() / n - torch.outer(Sl[r0:r1] / n, Sm / n), x.shape[0],
                     self._get(l, "mlp.neurons", "gram").diagonal() / n - (Sl / n) ** 2,
                     self._get(m, "mlp.neurons", "gram").diagonal() / n - (Sm / n) ** 2)

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse statistics that were collected on other weights."""
        if self.meta.get("fingerprint") != lm.fingerprint:
            raise NeuroprojError(
                f"statistics {self.path or ''} were collected on {self.meta.get('model')!r} "
                f"(fingerprint {self.meta.get('fingerprint')}), not on {lm.spec!r} ({lm.fingerprint}): "
                f"re-run collect on this model"
            )

    def file_hash(self) -> str | None:
        return file_sha256(self.path) if self.path else None


# rounding allowed in the physical checks: float64 totals of float32 (or bfloat16-input) products
_REL, _ABS = 1e-3, 1e-6


def _physical(where: str, what: str, G: torch.Tensor, S: torch.Tensor, n: int) -> None:
    """Refuse moments no activations can give: a negative E[(h − c)²] (the shifted Gram's diagonal, a sum of squares),
    a variance below zero beyond rounding, correlations outside [−1, 1] (`_bounded`): a Gram that is not positive
    semi-definite by what an O(N²) look can tell (an eigen-decomposition would cost O(N³))."""
    gd = G.diagonal()
    if (gd < 0).any():
        j = int((gd < 0).nonzero()[0])
        raise NeuroprojError(f"{where}: {what}: neuron {j} has a negative E[h²] (its Gram diagonal {float(gd[j]):.3g}), "
                             f"which no activations give: the file is damaged or edited; re-run collect")
    m = S.double() / n
    v = gd.double() / n - m * m
    scale = float(v.abs().max()) if v.numel() else 0.0
    if (v < -_ABS * scale).any():
        j = int((v < -_ABS * scale).nonzero()[0])
        raise NeuroprojError(f"{where}: {what}: neuron {j} has a negative variance ({float(v[j]):.3g}), which no "
                             f"activations give: the file is damaged or edited; re-run collect")
    _bounded(where, what, lambda r0, r1: G[r0:r1].double() / n - torch.outer(m[r0:r1], m), G.shape[0], v, v)


def _bounded(where: str, what: str, rows, N: int, var_a: torch.Tensor, var_b: torch.Tensor, block: int = 1024) -> None:
    """Refuse |Cov_ij| > sqrt(Var_i Var_j) beyond rounding (a correlation outside [−1, 1]). `rows(r0, r1)` gives
    rows r0:r1 of the covariance; they are looked at in blocks, so the extra memory is block × N."""
    sa, sb = var_a.clamp(min=0).sqrt(), var_b.clamp(min=0).sqrt()
    scale = max(float(var_a.abs().max()) if var_a.numel() else 0.0, float(var_b.abs().max()) if var_b.numel() else 0.0)
    for r in range(0, N, block):
        c = rows(r, min(N, r + block))
        bad = c.abs() > torch.outer(sa[r:r + block], sb) * (1 + _REL) + _ABS * scale
        if bad.any():
            i, j = (int(x) for x in bad.nonzero()[0])
            den = float(sa[r + i] * sb[j])
            rho = f"{float(c[i, j]) / den:.4g}" if den > 0 else "undefined (zero variance, nonzero covariance)"
            raise NeuroprojError(f"{where}: {what}: neurons {r + i} and {j} have a correlation of {rho}, outside "
                                 f"[-1, 1]: the Gram is not positive semi-definite; the file is damaged or edited; "
                                 f"re-run collect")


def load_stats(path) -> Stats:
    """Read a statistics file written by `collect`; a one-line error for a missing or corrupt file, and for
    one whose tensors do not fit its header (shapes, counts, non-finite values)."""
    tensors, meta = load_tensors(path, FORMAT, "statistics", "collect")
    st = Stats(tensors, meta, str(path))
    st.validate()
    return st


def second_moment_diagonals(path, layers=None, sites=None) -> tuple[dict, dict[tuple[int, str], "np.ndarray"]]:
    """(header, {(layer, site): E[h_j²] per neuron, float64}) read from a statistics file without loading it:
    per (layer, site) only count, shift, sum and the Gram's diagonal are read (E[h²] = max(Var, 0) + μ², as
    `Stats.variance(...) + Stats.mean(...)**2` gives). `layers`/`sites`: the subset to read (default all).
    Cost: O(N) memory and N strided page reads per (layer, site) — an 8B model's 53 GB file reads ~3 MB —
    where `load_stats` reads every N×N Gram. Shapes and finiteness of what is read are checked."""
    import numpy as np

    with LazyTensorFile(path, FORMAT, "statistics", "collect") as f:
        meta = f.meta
        try:
            file_layers, file_sites = [int(i) for i in meta["layers"]], [str(s) for s in meta["sites"]]
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{path}: the header lacks layers/sites: re-run collect") from None
        out = {}
        for i in file_layers if layers is None else [i for i in layers if i in file_layers]:
            for s in file_sites if sites is None else [s for s in sites if s in file_sites]:
                k = f"layer.{i}.{s}."
                if any(k + w not in f for w in ("count", "shift", "sum", "gram")):
                    raise NeuroprojError(f"{path}: layer {i} {s} is incomplete: the file is damaged; re-run collect")
                N = f.shape(k + "shift")[0] if len(f.shape(k + "shift")) == 1 else -1
                if N < 1 or f.shape(k + "sum") != (N,) or f.shape(k + "gram") != (N, N) or f.shape(k + "count") != (1,):
                    raise NeuroprojError(f"{path}: layer {i} {s} has inconsistent shapes: the file is damaged; "
                                         f"re-run collect")
                n = int(f.read(k + "count")[0])
                c, S, g = (f.read(k + "shift").astype(np.float64), f.read(k + "sum").astype(np.float64),
                           f.diagonal(k + "gram").astype(np.float64))
                if n < 1 or not (np.isfinite(c).all() and np.isfinite(S).all() and np.isfinite(g).all()):
                    raise NeuroprojError(f"{path}: layer {i} {s} counts no tokens or holds NaN/inf: re-run collect")
                if (g < 0).any():
                    raise NeuroprojError(f"{path}: layer {i} {s} has a negative E[h²] (a Gram diagonal below zero), "
                                         f"which no activations give: the file is damaged or edited; re-run collect")
                m = S / n
                out[(i, s)] = np.maximum(g / n - m * m, 0.0) + (c + m) ** 2
    return meta, out
