"""Neuron-level skip connections: MLP neurons that are (near-)linear functions of earlier layers' neurons.

From the cross-layer blocks of a statistics file (`collect --cross-layer-window K`), for every MLP neuron
(m, j) with l < m ≤ l + K:

- **single** predictor: the earlier neuron (l, i) with the largest |ρ|;  h_{m,j} ≈ a·h_{l,i} + b with
  a = Cov(h_{l,i}, h_{m,j}) / Var(h_{l,i}),  b = μ_{m,j} − a·μ_{l,i},  R² = ρ² (on the fitting tokens);
- **top-k** predictor: ridge regression on the k earlier neurons with the largest |ρ| (any source layer in
  the window): β = (Σ_SS + λI)⁻¹ Σ_Sy, λ = ridge·mean diag Σ_SS, b = μ_y − βᵀμ_S.

With `model` and held-out `data` (other tokens than the statistics', e.g. another seed), both predictors'
R² are measured on those tokens: R²_ho = 1 − Σ(y − ŷ)² / Σ(y − ȳ)², and selection uses the held-out
value. Cost: O(K·N²) per target layer for the best single source (one pass over the cross blocks),
O(N·k³) for the ridge solves, and for the held-out pass one forward plus O(tokens·N·k) per layer.

**Saving and cost.** A skipped neuron's input rows go away: `n_in·d_model` MACs per token (gated: gate and
up rows, n_in = 2; plain: the input row, n_in = 1; an input bias is not counted); its output column stays
(it now reads the prediction), and the predictor costs k multiply-adds (1 for single). The source
activations must be kept from layer l until layer m: per token, (#distinct source neurons)·bytes.

**Apply.** Real modules: for target layer m, `model.neuroproj_skips[str(m)]` (a `SkipModule`) holds per
source layer l the index buffer `idx_l`, the positions `pos` (s×k) of each skipped neuron's sources in the
concatenated stored activations z, `coef` (s×k), `intercept` (s) and `weight` (d×s, the skipped neurons'
output columns). A forward pre-hook on layer l's output projection stores z_l = h_l[..., idx_l]; a forward
hook on layer m's MLP module (OPT: fc2) adds `weight @ (Σ_t coef_t · z[pos_t] + intercept)`. The skipped
neurons are removed from layer m with the adapter's `select_neurons`.

Rules: a skipped neuron is never a source of another skip (targets are chosen layer by layer, in order; a
candidate whose source was already skipped is dropped); at least one neuron stays in each layer; source
indices are indices of the model the statistics were collected on (so "skip after prune" needs statistics
of the pruned model — the fingerprint check enforces it). "Prune after skip": `apply_plan` remaps the
source indices (`skip_source_remapper`); a plan that removes a neuron a skip reads is refused. Sequential
pruning (prune.py) slices layers while it runs and is refused by the hook's width check: use oneshot.

Checkpoints: `config.neuroproj_prune.skips` (JSON, see `SkipModule.spec`) plus `widths`; `load_pruned`
calls `attach_skips` to rebuild the modules and hooks, then loads the weights strictly.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..evaluate import perplexity
from ..io import atomic_dir, prepare_out_dir
from ..model import (LoadedModel, adapter_for, linear_macs, load_model, mlp_macs, num_params, save_pruned,
                     update_config)
from ..model.skip_modules import SKIPS_ATTR, SkipModule, detach_skips, get_skips, total_mlp_macs_per_token
from ..registry import Registry
from ..stats import ActivationCapture, batches, calibration_ids, load_stats, parse_layers

DEFAULT_THRESHOLDS = (0.9, 0.95, 0.99)
# The report directory `SkipReport.save` writes (readers import these instead of guessing):
REPORT_JSON, REPORT_CSV = "skips.json", "skips.csv"
#   skips.csv: one row per target neuron; the top-k columns only when the report has top-k predictors
CSV_COLUMNS = ("layer", "neuron", "dead", "single_src_layer", "single_src_index", "single_slope", "single_intercept",
               "single_r2_fit", "single_r2_heldout")
CSV_TOPK_COLUMNS = ("topk_sources", "topk_coef", "topk_intercept", "topk_r2_fit", "topk_r2_heldout")
CSV_PAIR = ("single_src_layer", "layer")            # a row's (source layer, target layer)
CSV_R2 = ("single_r2_heldout", "single_r2_fit")     # the R² a row is ranked by: held-out when measured
#   skips.json: {"meta", "thresholds": [...], "min_r2", "counts": {predictor: {"per_layer": {layer: [count per
#   threshold]}, "total", "selected", "r2_source"}}, "cost_at_min_r2": {predictor: {...}}, "candidates":
#   {predictor: [CANDIDATE_KEYS dicts]}[, "applied": {...}]}
CANDIDATE_KEYS = ("target", "neuron", "r2", "sources", "coef", "intercept", "predictor")
PREDICTORS = Registry("predictor", "a predictor class: `table` (the report's attribute holding its per-target "
                                   "tensors), `k(report)` sources per neuron, `sources(d, j)`, `coef(d, j)`")


@PREDICTORS.register("single")
class Single:
    """The earlier neuron with the largest |ρ|: h_m,j ≈ slope·h_l,i + intercept."""

    table = "single"

    @staticmethod
    def k(report) -> int:
        return 1

    @staticmethod
    def sources(d, j) -> list[tuple[int, int]]:
        return [(int(d["src_layer"][j]), int(d["src_index"][j]))]

    @staticmethod
    def coef(d, j) -> list[float]:
        return [float(d["slope"][j])]


@PREDICTORS.register("topk")
class TopK:
    """Ridge regression on the k earlier neurons with the largest |ρ|."""

    table = "topk"

    @staticmethod
    def k(report) -> int:
        return int(report.meta["top_k"])

    @staticmethod
    def sources(d, j) -> list[tuple[int, int]]:
        return [(int(l), int(i)) for l, i in zip(d["src_layer"][j].tolist(), d["src_index"][j].tolist())]

    @staticmethod
    def coef(d, j) -> list[float]:
        return d["coef"][j].tolist()


# ------------------------------------------------------------------------------------------- analysis
@dataclass
class SkipReport:
    """Per target layer m (tensors of length N_m, CPU):

    `single[m]`: src_layer, src_index, slope, intercept, r2 (= ρ², fitting tokens), r2_heldout (or None);
    `topk[m]`: src_layer (N_m×k), src_index (N_m×k), coef (N_m×k), intercept, r2 (fitting tokens, ridge),
    r2_heldout (or None); `dead[m]`: constant neurons (never candidates: a bias fold removes them for free).
    """

    meta: dict
    single: dict = field(default_factory=dict)
    topk: dict = field(default_factory=dict)
    dead: dict = field(default_factory=dict)

    @property
    def targets(self) -> list[int]:
        return sorted(self.single)

    def r2(self, m: int, predictor: str = "single") -> torch.Tensor:
        """The R² used for selection: held-out when measured, else on the fitting tokens; dead → −inf."""
        d = self._pred(predictor)[m]
        r = d["r2_heldout"] if d.get("r2_heldout") is not None else d["r2"]
        return r.masked_fill(self.dead[m], -math.inf)

    def _pred(self, predictor):
        table = getattr(self, PREDICTORS[predictor].table)
        if not table:
            raise NeuroprojError(f"the report has no {predictor} predictors (top_k < 2)")
        return table

    def k(self, predictor: str) -> int:
        return PREDICTORS[predictor].k(self)

    def macs_saved_per_neuron(self, predictor: str) -> int:
        return int(self.meta["n_in"]) * int(self.meta["hidden_size"]) - self.k(predictor)

    def sources(self, m: int, j: int, predictor: str) -> list[tuple[int, int]]:
        return PREDICTORS[predictor].sources(self._pred(predictor)[m], j)

    def counts(self, thresholds=DEFAULT_THRESHOLDS, predictor: str = "single") -> dict[int, list[int]]:
        """Per target layer: how many neurons reach each R² threshold (before the selection rules)."""
        return {m: [int((self.r2(m, predictor) >= t).sum()) for t in thresholds] for m in self.targets}

    def select(self, min_r2: float = 0.95, predictor: str = "single", max_per_layer: int | None = None) -> list[dict]:
        """The skips to apply: per target layer (in order) the neurons with R² ≥ min_r2, best first (ties by
        saving), at most `max_per_layer`, none whose source is itself skipped, at least one neuron left."""
        if self.macs_saved_per_neuron(predictor) <= 0:
            return []
        out, skipped = [], set()
        for m in self.targets:
            r2 = self.r2(m, predictor)
            order = torch.argsort(r2, descending=True, stable=True).tolist()
            width = r2.numel()
            n = 0
            for j in order:
                if r2[j] < min_r2 or (max_per_layer is not None and n >= max_per_layer) or n >= width - 1:
                    break
                src = self.sources(m, j, predictor)
                if any(s in skipped for s in src):
                    continue
                d = self._pred(predictor)[m]
                out.append({"target": m, "neuron": j, "r2": float(r2[j]), "sources": src,
                            "coef": PREDICTORS[predictor].coef(d, j),
                            "intercept": float(d["intercept"][j]), "predictor": predictor})
                n += 1
            skipped.update((c["target"], c["neuron"]) for c in out if c["target"] == m)
        return out

    def plan_cost(self, chosen: list[dict], bytes_per_value: int = 4) -> dict:
        """MACs saved per token and stored source activations for a selection."""
        per = {}
        for c in chosen:
            per.setdefault(c["target"], set()).update(map(tuple, c["sources"]))
        stored = sum(len(v) for v in per.values())
        saved = sum(int(self.meta["n_in"]) * int(self.meta["hidden_size"]) - len(c["sources"]) for c in chosen)
        return {"skipped": len(chosen), "macs_saved_per_token": saved, "stored_values_per_token": stored,
                "stored_bytes_per_token": stored * bytes_per_value,
                "dense_mlp_macs_per_token": int(self.meta["dense_mlp_macs_per_token"])}

    # -- output
    def rows(self):
        """One row per target neuron: best single and top-k predictors."""
        for m in self.targets:
            s, t = self.single[m], self.topk.get(m)
            for j in range(s["r2"].numel()):
                row = {"layer": m, "neuron": j, "dead": bool(self.dead[m][j]),
                       "single_src_layer": int(s["src_layer"][j]), "single_src_index": int(s["src_index"][j]),
                       "single_slope": float(s["slope"][j]), "single_intercept": float(s["intercept"][j]),
                       "single_r2_fit": float(s["r2"][j]),
                       "single_r2_heldout": None if s.get("r2_heldout") is None else float(s["r2_heldout"][j])}
                if t is not None:
                    row.update({"topk_sources": " ".join(f"{l}:{i}" for l, i in zip(t["src_layer"][j].tolist(),
                                                                                   t["src_index"][j].tolist())),
                                "topk_coef": " ".join(f"{c:.6g}" for c in t["coef"][j].tolist()),
                                "topk_intercept": float(t["intercept"][j]), "topk_r2_fit": float(t["r2"][j]),
                                "topk_r2_heldout": None if t.get("r2_heldout") is None else float(t["r2_heldout"][j])})
                yield row

    def summary_table(self, thresholds=DEFAULT_THRESHOLDS) -> dict:
        out = {}
        for p in PREDICTORS:
            if p == "topk" and not self.topk:
                continue
            c = self.counts(thresholds, p)
            out[p] = {"per_layer": {str(m): v for m, v in c.items()},
                      "total": [sum(v[i] for v in c.values()) for i in range(len(thresholds))],
                      "selected": [len(self.select(t, p)) for t in thresholds],
                      "r2_source": "heldout" if self._pred(p)[self.targets[0]].get("r2_heldout") is not None else "fit"}
        return out

    def save(self, out_dir, *, min_r2: float = 0.95, thresholds=DEFAULT_THRESHOLDS, extra: dict | None = None) -> Path:
        """skips.json (meta, per-layer counts per threshold, selected candidates at min_r2), skips.csv (every
        neuron), skips.md, skips.png (layer×layer candidate counts, histogram of best R² per layer)."""
        table = self.summary_table(thresholds)
        cands = {p: self.select(min_r2, p) for p in table}
        doc = {"meta": self.meta, "thresholds": list(thresholds), "min_r2": min_r2, "counts": table,
               "cost_at_min_r2": {p: self.plan_cost(c) for p, c in cands.items()},
               "candidates": cands, **(extra or {})}
        rows = list(self.rows())
        with atomic_dir(out_dir, overwrite=True) as out:  # a report directory is replaced as a whole
            (out / "skips.json").write_text(json.dumps(doc, indent=1, default=_json_default))
            with open(out / "skips.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["layer"])
                w.writeheader()
                w.writerows(rows)
            (out / "skips.md").write_text(self.markdown(table, thresholds, cands, min_r2, extra))
            try:
                self.plot(out / "skips.png", min_r2)
            except ImportError:  # matplotlib missing: the tables are complete without the picture
                pass
        out = Path(out_dir)
        return out

    def markdown(self, table, thresholds, cands, min_r2, extra=None) -> str:
        b = io.StringIO()
        mt = self.meta
        b.write(f"# Skip candidates: {mt.get('model')}\n\n")
        b.write(f"Statistics: {mt.get('stats_tokens')} tokens ({mt.get('stats_data')}), cross-layer window "
                f"{mt.get('window')}; R² {'held-out on ' + str(mt.get('heldout_tokens')) + ' tokens (' + str(mt.get('heldout_data')) + ')' if mt.get('heldout_tokens') else 'on the fitting tokens'}; "
                f"top-k = {mt.get('top_k')}, ridge {mt.get('ridge')}.\n\n")
        hs = " | ".join(f"R²≥{t}" for t in thresholds)
        for p, t in table.items():
            b.write(f"## {p} predictor (R² {t['r2_source']})\n\n| layer | {hs} |\n|---|" + "---|" * len(thresholds) + "\n")
            for m, v in t["per_layer"].items():
                b.write(f"| {m} | " + " | ".join(str(x) for x in v) + " |\n")
            b.write("| **all** | " + " | ".join(str(x) for x in t["total"]) + " |\n")
            b.write("| selectable* | " + " | ".join(str(x) for x in t["selected"]) + " |\n\n")
        b.write("*selectable: after the rules (no skipped source, ≥ 1 neuron left per layer).\n\n")
        for p, c in cands.items():
            cost = self.plan_cost(c)
            b.write(f"At R² ≥ {min_r2}, {p} predictor: {cost['skipped']} neurons, {cost['macs_saved_per_token']:,} "
                    f"MACs/token saved of {cost['dense_mlp_macs_per_token']:,} "
                    f"({cost['macs_saved_per_token'] / max(1, cost['dense_mlp_macs_per_token']):.3%}); stored "
                    f"{cost['stored_bytes_per_token']} bytes/token.\n\n")
        if extra and extra.get("blocks"):   # whole layers and attention sub-layers, measured (`--blocks`)
            b.write(f"## Block-level candidates\n\nRemoved alone, nothing refitted: the loss increase on "
                    f"{extra.get('blocks_data')} (nats/token, and as a perplexity factor) and the multiply-accumulates "
                    f"per token of the linear maps it saves (of {self.meta.get('dense_linear_macs_per_token', '?')} "
                    f"in the decoder layers); the neuron-level skips above save "
                    f"{max((self.plan_cost(c)['macs_saved_per_token'] for c in cands.values()), default=0):,} "
                    f"at R² ≥ "
                    f"{min_r2}. Cheapest per MAC first.\n\n| part | layer | loss increase | × perplexity | MACs/token "
                    f"saved | loss per million MACs |\n|---|---|---|---|---|---|\n")
            for r in sorted(extra["blocks"], key=lambda r: r["loss_increase"] / max(1, r["macs_saved_per_token"])):
                b.write(f"| {r['part']} | {r['layer']} | {r['loss_increase']:.4f} | {r['ppl_factor']:.3f} | "
                        f"{r['macs_saved_per_token']:,} | "
                        f"{1e6 * r['loss_increase'] / max(1, r['macs_saved_per_token']):.4f} |\n")
            b.write("\n")
        if extra and extra.get("applied"):
            ap = extra["applied"]
            b.write("## Applied\n\n```\n" + json.dumps(ap, indent=1, default=_json_default) + "\n```\n")
        return b.getvalue()

    def plot(self, path, threshold: float) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        L = int(self.meta["num_layers"])
        M = torch.zeros(L, L)
        for m in self.targets:
            ok = self.r2(m, "single") >= threshold
            src = self.single[m]["src_layer"][ok]
            for l in src.tolist():
                M[l, m] += 1
        fig, ax = plt.subplots(1, 2, figsize=(12, 5))
        im = ax[0].imshow(M.numpy(), origin="lower", cmap="viridis")
        ax[0].set_xlabel("target layer m")
        ax[0].set_ylabel("source layer l")
        ax[0].set_title(f"single-source candidates with R² ≥ {threshold}")
        fig.colorbar(im, ax=ax[0])
        data = [self.r2(m, "single")[~self.dead[m]].clamp(min=0).numpy() for m in self.targets]
        ax[1].boxplot(data, positions=self.targets, widths=0.6, showfliers=True, flierprops={"markersize": 2})
        ax[1].set_xlabel("target layer m")
        ax[1].set_ylabel("best single-source R² per neuron")
        ax[1].axhline(threshold, color="r", lw=0.8, ls="--")
        ax[1].set_title("distribution of best R² per layer")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def read_report(directory) -> dict:
    """skips.json of a report directory, its schema checked (see REPORT_JSON above); a one-line error otherwise."""
    path = Path(directory) / REPORT_JSON
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(doc, dict) and isinstance(doc.get("candidates"), dict) and isinstance(doc.get("counts"), dict)
              and isinstance(doc.get("thresholds"), list)
              and all(isinstance(v, (int, float)) for v in doc["thresholds"])
              and all(isinstance(rows, list) and all(isinstance(c, dict) and set(CANDIDATE_KEYS) <= set(c)
                                                     and isinstance(c["sources"], list) for c in rows)
                      for rows in doc["candidates"].values())
              and all(isinstance(c, dict) and isinstance(c.get("per_layer"), dict) for c in doc["counts"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise NeuroprojError(f"{path} is not a skips report (damaged or edited): run `neuroproj-prune skips` again")
    return doc


def candidate_pairs(candidate: dict) -> list[tuple[int, int]]:
    """The (source layer, target layer) pairs of one skips.json candidate."""
    return [(int(s[0]), int(candidate["target"])) for s in candidate["sources"]]


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _full_source_cov(stats, srcs):
    """Covariance of the concatenated activations of source layers `srcs` (block matrix)."""
    sizes = [stats.width(l) for l in srcs]
    off = [0]
    for s in sizes:
        off.append(off[-1] + s)
    C = torch.zeros(off[-1], off[-1], dtype=torch.float64)
    for a, l in enumerate(srcs):
        C[off[a]:off[a + 1], off[a]:off[a + 1]] = stats.covariance(l)
        for b in range(a + 1, len(srcs)):
            x = stats.cross_covariance(l, srcs[b])
            C[off[a]:off[a + 1], off[b]:off[b + 1]] = x
            C[off[b]:off[b + 1], off[a]:off[a + 1]] = x.T
    return C


def find_skips(stats, *, min_r2: float = 0.95, top_k: int = 4, ridge: float = 1e-3, model=None, data=None,
               samples: int = 16, seqlen: int = 512, seed: int = 1, layers=None, progress: bool = True) -> SkipReport:
    """Best single earlier predictor and the top-k ridge predictor of every MLP neuron (see the module
    docstring). `stats`: a Stats with cross-layer blocks (or a path). `model` + `data`: held-out R² on
    `samples`×`seqlen` tokens drawn with `seed` (must differ from the statistics' tokens; refused when the
    data and seed are the same). `layers`: target layers (default: all with a cross block).
    `min_r2` is only recorded (selection happens in `SkipReport.select` / `apply_skips`).

    Cost: O(Σ_l N_l·N_m) per target layer for ρ and the best source; O(N_m·k³) for the ridge solves;
    memory: the concatenated source covariance, (K·N)² float64 per target layer (K = window)."""

    if not hasattr(stats, "cross_pairs"):
        stats = load_stats(stats)
    pairs = stats.cross_pairs
    if not pairs:
        raise NeuroprojError("the statistics have no cross-layer blocks: collect with --cross-layer-window K (K >= 1)")
    if top_k < 1:
        raise NeuroprojError("top_k must be >= 1")
    meta_s = stats.meta
    targets = sorted({m for _, m in pairs})
    if layers is not None:
        want = set(parse_layers(layers, int(meta_s["num_layers"])))
        targets = [m for m in targets if m in want]
    by_target = {m: sorted(l for l, mm in pairs if mm == m) for m in targets}
    model_type = meta_s.get("model_type")
    # input row blocks per neuron, recorded by collect (older files: from the architecture's adapter)
    n_in = int(meta_s.get("mlp_in_blocks") or adapter_for(model_type).in_blocks())
    gated = n_in == 2
    d = int(meta_s["hidden_size"])
    widths = list(meta_s["widths"])
    rep = SkipReport(meta={
        "model": meta_s.get("model"), "model_type": model_type, "fingerprint": meta_s.get("fingerprint"),
        "num_layers": int(meta_s["num_layers"]), "hidden_size": d, "widths": widths, "gated": gated, "n_in": n_in,
        "window": int(meta_s.get("cross_layer_window") or max(m - l for l, m in pairs)),
        "stats_tokens": meta_s.get("tokens"), "stats_data": meta_s.get("data"), "stats_seed": meta_s.get("seed"),
        "top_k": int(top_k), "ridge": ridge, "min_r2": min_r2,
        "dense_mlp_macs_per_token": mlp_macs(n_in, d, widths),
    })
    t0 = time.time()
    for m in targets:
        srcs = by_target[m]
        var_m, mu_m, dead_m = stats.variance(m), stats.mean(m), stats.dead(m)
        rep.dead[m] = dead_m
        C = torch.cat([stats.cross_covariance(l, m) for l in srcs], 0)            # (S, N_m)
        var_s = torch.cat([stats.variance(l) for l in srcs])
        mu_s = torch.cat([stats.mean(l) for l in srcs])
        dead_s = torch.cat([stats.dead(l) for l in srcs])
        layer_of = torch.cat([torch.full((stats.width(l),), l, dtype=torch.long) for l in srcs])
        index_of = torch.cat([torch.arange(stats.width(l)) for l in srcs])
        rho = C / torch.sqrt(torch.outer(var_s, var_m)).clamp(min=1e-300)
        rho[dead_s] = 0
        rho[:, dead_m] = 0
        rho = rho.clamp(-1, 1)
        best = rho.abs().argmax(0)                                                  # (N_m,)
        j = torch.arange(rho.shape[1])
        slope = C[best, j] / var_s[best].clamp(min=1e-300)
        slope[dead_m] = 0
        rep.single[m] = {"src_layer": layer_of[best], "src_index": index_of[best], "slope": slope,
                         "intercept": mu_m - slope * mu_s[best], "r2": rho[best, j] ** 2, "r2_heldout": None,
                         "_gidx": best}
        if top_k >= 2:
            k = min(top_k, rho.shape[0])
            top = rho.abs().topk(k, dim=0).indices.T                                # (N_m, k)
            S = _full_source_cov(stats, srcs)
            A = S[top[:, :, None], top[:, None, :]]                                  # (N_m, k, k)
            B = C[top, j[:, None]]                                                   # (N_m, k)
            lam = ridge * A.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
            A = A + lam[:, None, None] * torch.eye(k, dtype=A.dtype)
            beta = torch.linalg.solve(A, B.unsqueeze(-1)).squeeze(-1)               # (N_m, k)
            beta[dead_m] = 0
            Araw = S[top[:, :, None], top[:, None, :]]
            resid = var_m - 2 * (beta * B).sum(1) + torch.einsum("nk,nkl,nl->n", beta, Araw, beta)
            r2 = (1 - resid / var_m.clamp(min=1e-300)).masked_fill(dead_m, 0)
            rep.topk[m] = {"src_layer": layer_of[top], "src_index": index_of[top], "coef": beta,
                           "intercept": mu_m - (beta * mu_s[top]).sum(1), "r2": r2, "r2_heldout": None,
                           "_gidx": top}
    rep.meta["fit_seconds"] = round(time.time() - t0, 2)
    if model is not None and data is not None:
        _heldout(rep, stats, by_target, model, data, samples, seqlen, seed, progress)
    elif model is not None or data is not None:
        raise NeuroprojError("held-out R² needs both a model and held-out data")
    return rep


@torch.inference_mode()
def _heldout(rep, stats, by_target, model, data, samples, seqlen, seed, progress):
    """Stream held-out tokens and measure R² = 1 − SSE/SST of both predictors per neuron."""

    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype="float32", device="cpu")
    stats.check_model(lm)
    m_ = lm.model
    if isinstance(data, torch.Tensor):
        ids, desc = data, f"in-memory token ids ({len(data)} sequences)"
    else:
        ids, desc = calibration_ids(lm, data, samples, seqlen, seed)
        if desc == stats.meta.get("data") and seed == stats.meta.get("seed"):
            raise NeuroprojError(f"held-out tokens are the fitting tokens ({desc}, seed {seed}): use another --seed "
                                 f"or other --data")
    targets = sorted(by_target)
    need = sorted({l for m in targets for l in by_target[m]} | set(targets))
    acc = {m: {p: torch.zeros(len(rep.single[m]["r2"]), dtype=torch.float64) for p in ("sse1", "ssek", "sy", "syy")}
           for m in targets}
    cnt = {"n": 0}
    recent: dict[int, torch.Tensor] = {}
    dev = next(m_.parameters()).device
    prm = {}
    for m in targets:
        s = rep.single[m]
        prm[m] = {"g1": s["_gidx"].to(dev), "a": s["slope"].to(dev, torch.float32), "b": s["intercept"].to(dev, torch.float32)}
        if m in rep.topk:
            t = rep.topk[m]
            prm[m].update({"gk": t["_gidx"].to(dev), "c": t["coef"].to(dev, torch.float32),
                           "bk": t["intercept"].to(dev, torch.float32)})

    def on(i, site, h):
        h = h.float()
        recent[i] = h
        if i in by_target:
            z = torch.cat([recent[l] for l in by_target[i]], dim=1)
            p = prm[i]
            y = h
            e1 = z[:, p["g1"]] * p["a"] + p["b"] - y
            acc[i]["sse1"] += (e1.double() ** 2).sum(0).cpu()
            if "gk" in p:
                ek = (z[:, p["gk"]] * p["c"]).sum(-1) + p["bk"] - y
                acc[i]["ssek"] += (ek.double() ** 2).sum(0).cpu()
            acc[i]["sy"] += y.double().sum(0).cpu()
            acc[i]["syy"] += (y.double() ** 2).sum(0).cpu()
        for l in [l for l in recent if l < i - rep.meta["window"]]:
            del recent[l]

    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None and lm.tokenizer.pad_token_id is not None else 0
    longest = ids.shape[1] if isinstance(ids, torch.Tensor) else max(len(s) for s in ids)
    with ActivationCapture(m_, need, ["mlp.neurons"], on) as cap:
        for x, mask in batches(ids, max(1, 2048 // max(1, longest)), pad):
            cap.run(x, mask)
            recent.clear()
            cnt["n"] += int(mask.sum())
    n = cnt["n"]
    for m in targets:
        a = acc[m]
        sst = (a["syy"] - a["sy"] ** 2 / n).clamp(min=0)
        ok = sst > 1e-12 * sst.max().clamp(min=1e-300)
        rep.single[m]["r2_heldout"] = torch.where(ok, 1 - a["sse1"] / sst.clamp(min=1e-300), torch.zeros_like(sst))
        if m in rep.topk:
            rep.topk[m]["r2_heldout"] = torch.where(ok, 1 - a["ssek"] / sst.clamp(min=1e-300), torch.zeros_like(sst))
    rep.meta.update({"heldout_tokens": n, "heldout_data": desc, "heldout_seed": seed})


# ---------------------------------------------------------------------------------------------- apply
def apply_skips(model, report: SkipReport | None = None, *, chosen: list[dict] | None = None, min_r2: float = 0.95,
                predictor: str = "single", max_per_layer: int | None = None) -> dict:
    """Rewrite `model` in place: remove the chosen neurons' input rows (and output columns from the MLP),
    and feed their output columns from the stored predictor (see the module docstring). `chosen` defaults
    to `report.select(min_r2, predictor, max_per_layer)`. Returns a summary with the MLP MACs per token
    before and after (counted from the modules) and the stored activations per token."""

    if isinstance(model, LoadedModel):
        if report is not None and report.meta.get("fingerprint") and model.fingerprint \
                and report.meta["fingerprint"] != model.fingerprint:
            raise NeuroprojError("the skip report was computed on other weights: collect statistics on this model")
        lm, model = model, model.model
        lm.fingerprint = None  # the weights change
    if get_skips(model):
        raise NeuroprojError("the model already has skip connections: apply all skips in one call")
    a = adapter_for(model)
    L = a.num_layers(model)
    if report is not None:
        widths = report.meta.get("widths")
        now = [a.width(model, i) for i in range(L)]
        if widths is not None and list(widths) != now:
            raise NeuroprojError(f"the model's MLP widths differ from the statistics' ({now} vs {widths}): "
                                 f"collect statistics on this model")
    if chosen is None:
        if report is None:
            raise NeuroprojError("give a report or the chosen skips")
        chosen = report.select(min_r2, predictor, max_per_layer)
    skipped = {(c["target"], c["neuron"]) for c in chosen}
    for c in chosen:
        for s in c["sources"]:
            if tuple(s) in skipped:
                raise NeuroprojError(f"neuron {tuple(s)} is skipped and also the source of a skip")
    before = total_mlp_macs_per_token(model)
    d = a.hidden_size(model)
    dtype = next(model.parameters()).dtype
    dev = next(model.parameters()).device
    mods = nn.ModuleDict()
    by_t: dict[int, list[dict]] = {}
    for c in chosen:
        by_t.setdefault(int(c["target"]), []).append(c)
    # a target layer can be another skip's source layer: its kept neurons are renumbered after slicing, so
    # sources are stored with their post-slicing indices and widths
    keeps, renum = {}, {}
    for m, cs in by_t.items():
        drop = torch.zeros(a.width(model, m), dtype=torch.bool)
        drop[[c["neuron"] for c in cs]] = True
        keeps[m] = (~drop).nonzero().flatten()
        renum[m] = {int(o): n for n, o in enumerate(keeps[m].tolist())}
    chosen = [dict(c, sources=[(int(l), renum[int(l)][int(i)] if int(l) in renum else int(i))
                               for l, i in c["sources"]]) for c in chosen]
    by_t = {}
    for c in chosen:
        by_t.setdefault(int(c["target"]), []).append(c)
    for m, cs in sorted(by_t.items()):
        cs = sorted(cs, key=lambda c: c["neuron"])
        k = max(len(c["sources"]) for c in cs)
        src_layers = sorted({int(l) for c in cs for l, _ in c["sources"]})
        if any(not 0 <= l < m for l in src_layers):
            raise NeuroprojError(f"skip sources of layer {m} must be earlier layers (got {src_layers})")
        idx = {l: sorted({int(i) for c in cs for ll, i in c["sources"] if int(ll) == l}) for l in src_layers}
        off, start = {}, 0
        for l in src_layers:
            off[l] = start
            start += len(idx[l])
        sources = [[l, len(idx[l]), len(keeps[l]) if l in keeps else a.width(model, l)] for l in src_layers]
        mod = SkipModule(m, sources, len(cs), k, d, dtype=torch.float64)
        pos = torch.zeros(len(cs), k, dtype=torch.long)
        coef = torch.zeros(len(cs), k, dtype=torch.float64)
        for r, c in enumerate(cs):
            for t, ((l, i), w) in enumerate(zip(c["sources"], c["coef"])):
                pos[r, t] = off[int(l)] + idx[int(l)].index(int(i))
                coef[r, t] = w
        js = torch.tensor([c["neuron"] for c in cs], dtype=torch.long)
        with torch.no_grad():
            for l in src_layers:
                getattr(mod, f"idx_{l}").copy_(torch.tensor(idx[l], dtype=torch.long))
            mod.pos.copy_(pos)
            mod.coef.copy_(coef)
            mod.intercept.copy_(torch.tensor([c["intercept"] for c in cs], dtype=torch.float64))
            mod.weight.copy_(a.out_weight(model, m).detach().double().cpu()[:, js])
        mods[str(m)] = mod.to(dev, dtype)
    # slice only after every module read its columns (targets are never sources, so order is free)
    for m, keep in keeps.items():
        a.select_neurons(model, m, keep)
    if mods:
        setattr(model, SKIPS_ATTR, mods)
        for mod in mods.values():
            mod.attach(model)
    update_config(model)   # widths and the skips section
    after = total_mlp_macs_per_token(model)
    mods = get_skips(model) or {}
    return {"skipped": len(chosen), "layers": sorted(by_t), "predictor": predictor if chosen else None,
            "mlp_macs_per_token_before": before, "mlp_macs_per_token_after": after,
            "macs_removed_per_token": before - after,
            "stored_values_per_token": sum(x.stored_per_token() for x in mods.values()),
            "stored_bytes_per_token": sum(x.stored_per_token() for x in mods.values()) * torch.finfo(dtype).bits // 8}


# ------------------------------------------------------------------------------------------------ the stage
@dataclass
class SkipsConfig(Config):
    """Every setting of `skips` (CLI flags, the recipe's `skips` section, keywords of `run_skips()`)."""

    what = "skips"

    min_r2: float = opt(0.95, "R² threshold of the candidates and of --apply", ge=0.0, le=1.0)
    top_k: int = opt(4, "sources of the ridge predictor (1: the single predictor only)", ge=1)
    ridge: float = opt(1e-3, "ridge of the top-k predictor, relative to the mean source variance", ge=0.0)
    predictor: str = opt("single", "the predictor --apply uses", lambda: PREDICTORS)
    max_per_layer: int | None = opt(None, "at most this many skipped neurons per target layer", kind=int, ge=1)
    layers: str | None = opt(None, "target layer SPEC (default: every layer with a cross block)", kind=str)
    thresholds: tuple = opt(DEFAULT_THRESHOLDS, "R² thresholds of the report table", item=float, ge=0.0, le=1.0)
    samples: int = opt(16, "held-out windows for R² (with --data)", ge=1)
    seqlen: int = opt(512, "tokens per held-out window", ge=2)
    seed: int = opt(1, "held-out window seed (the statistics' seed is refused)", ge=0)
    apply: bool = opt(False, "rewrite the model with the selected skips (real modules, restored by load_pruned)")
    eval_seqlen: int | None = opt(None, "perplexity window before/after --apply (default min(2048, context))",
                                  kind=int, ge=2)
    max_windows: int | None = opt(None, "score only the first K perplexity windows", kind=int, ge=1)

    def check(self) -> None:
        if self.predictor == "topk" and self.top_k < 2:
            raise ConfigError("predictor", "--predictor topk needs --top-k >= 2")


def run_skips(stats, model, config: SkipsConfig | None = None, *, report, data=None, apply_out=None,
              overwrite: bool = False, eval_data=None, progress: bool = True, blocks: list | None = None,
              blocks_data: str | None = None, **settings) -> tuple[SkipReport, dict]:
    """The `skips` stage: find the skips (held-out R² with `data`), with `apply` apply them to a copy of the model
    and save it to `apply_out` (perplexity before/after on `eval_data`), and write the report directory. `config`
    (or the `SkipsConfig` fields as keywords) says how. `blocks`: block-level candidates measured on `blocks_data`
    (`prune.layers.block_candidates`), shown beside the neuron-level ones. Returns (report, applied summary or
    {})."""
    cfg = config.replace(**settings) if config is not None else SkipsConfig.make(**settings)
    min_r2, top_k, ridge, predictor, max_per_layer = cfg.min_r2, cfg.top_k, cfg.ridge, cfg.predictor, cfg.max_per_layer
    thresholds, layers, samples, seqlen, seed = cfg.thresholds, cfg.layers, cfg.samples, cfg.seqlen, cfg.seed
    eval_seqlen, max_windows = cfg.eval_seqlen, cfg.max_windows
    if cfg.apply and apply_out is None:
        raise NeuroprojError("--apply writes the skipped model: give its directory (--out)")
    if apply_out is not None and not cfg.apply:
        raise NeuroprojError("--out names the checkpoint --apply writes: add --apply, or drop --out")
    if apply_out is not None:
        if model is None:
            raise NeuroprojError("applying skips needs --model")
        prepare_out_dir(Path(apply_out), overwrite)
    if eval_data is not None and apply_out is None:
        raise NeuroprojError("--eval-data measures an applied model: add --apply")
    stats = load_stats(stats) if not hasattr(stats, "cross_pairs") else stats
    lm = None
    if model is not None:
        lm = model if isinstance(model, LoadedModel) else load_model(model)
        stats.check_model(lm)
    elif data is not None:
        raise NeuroprojError("held-out --data needs --model")
    rep = find_skips(stats, min_r2=min_r2, top_k=top_k, ridge=ridge, model=lm if data is not None else None,
                     data=data, samples=samples, seqlen=seqlen, seed=seed, layers=layers, progress=progress)
    info = {}
    if apply_out is not None:
        work = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, lm.fingerprint)

        def ppl():
            return perplexity(work, eval_data, seqlen=eval_seqlen, max_windows=max_windows, progress=progress)

        before = ppl() if eval_data is not None else None
        t0 = time.time()
        info = apply_skips(work, rep, min_r2=min_r2, predictor=predictor, max_per_layer=max_per_layer)
        info["apply_seconds"] = round(time.time() - t0, 2)
        if eval_data is not None:
            after = ppl()
            info.update({"perplexity_before": before["value"], "perplexity_after": after["value"],
                         "perplexity_seqlen": after["seqlen"], "perplexity_windows": after["windows"],
                         "perplexity_tokens": after["tokens"], "perplexity_data": after["data"]})
        info.update({"min_r2": min_r2, "max_per_layer": max_per_layer, "top_k": top_k})
        save_pruned(work.model, work.tokenizer, apply_out, overwrite=overwrite,
                    summary={"model": lm.spec, "skips": info, "params_after": num_params(work.model),
                             "mlp_macs_per_token_before": info["mlp_macs_per_token_before"],
                             "mlp_macs_per_token_after": info["mlp_macs_per_token_after"]})
    extra = {"applied": info} if info else {}
    if blocks:
        extra.update(blocks=blocks, blocks_data=blocks_data)
        if lm is not None:
            rep.meta["dense_linear_macs_per_token"] = linear_macs(lm.adapter.layers(lm.model))
    rep.save(report, min_r2=min_r2, thresholds=thresholds, extra=extra)
    return rep, info


