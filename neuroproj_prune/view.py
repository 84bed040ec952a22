"""The report: one self-contained HTML page that explores a run directory (`neuroproj-prune view RUN_DIR`).

The page needs no server and no network: plotly.js (from the `plotly` pip package) and the data are
embedded. What it shows depends on what the run directory holds (every file is optional; a section whose
files are absent is left out):

- `projections.safetensors` — per layer (slider) and site (selector) a rotatable 3D scatter of the
  neurons (2D when n = 2, a strip when n = 1). With `clusters.json` points are coloured by cluster; with
  `plan.json` (or `pruned/plan.json`) kept, removed and representative neurons have different symbols
  (without a plan, the clustering's thinning is shown: cluster representatives and noise kept, the rest
  removed). Hover: neuron index, cluster, activation energy — E[h²]·‖w_out‖² when the model's weights
  are known (`model=`, or the model the statistics name when it loads locally), else E[h²] from
  `stats.safetensors` — and for removed neurons the representative they are folded into.
- `trace.safetensors` (from `neuroproj_prune.trace`) — a token slider over prompt and generated tokens,
  the text with the current token highlighted, points sized by |activation| and coloured by sign on a
  scale centred at zero.
- `heatmaps/*.png` — the ordering heatmaps (original, projection and spectral order) of the layer shown.
- `pruned/prune_summary.json`, `eval.json` / `eval_dense.json`, `sweep/` (tradeoff plot + sortable table),
  `skips/` (layer × layer map of skip candidates + sortable table + its PNGs).

Size: coordinates are float16, per-neuron data int16/int32/float32 and trace activations float16 (int8
with a per-token scale when the page would exceed `max_mb`; then every k-th layer of the trace if still
needed), all base64. The page says so whenever it reduced anything. `load_page_data(html)` decodes the
embedded data back into numpy arrays (tests and scripts use it).
"""
from __future__ import annotations

import base64
import csv
import html as _html
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from .clustering import load_clusters
from .errors import NeuroprojError
from .io import write_text
from .models import LoadedModel, load_model
from .plan import Plan
from .projection import load_projections
from .stats import load_stats
from .trace import load_trace

ASSETS = Path(__file__).resolve().parent / "assets"
SITE_ORDER = ("mlp.neurons", "mlp.out", "attn.out")
DATA_ID = "npp-data"


# ------------------------------------------------------------------------------------------ encoding
def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _enc(a, dtype: str) -> dict:
    """A typed array as {"dtype", "shape", "b64"}; little-endian, C order."""
    arr = np.asarray(a)
    if dtype == "f2":
        arr = np.clip(arr.astype(np.float64), -65000, 65000)
    arr = np.ascontiguousarray(arr.astype("<" + dtype if dtype not in ("u1", "i1") else dtype))
    return {"dtype": dtype, "shape": list(arr.shape), "b64": _b64(arr)}


def _dec(d: dict) -> np.ndarray:
    dt = d["dtype"]
    arr = np.frombuffer(base64.b64decode(d["b64"]), dtype=("<" + dt) if dt not in ("u1", "i1") else dt)
    return arr.reshape(d["shape"])


def _decode_tree(x):
    if isinstance(x, dict):
        if set(x) == {"dtype", "shape", "b64"}:
            return _dec(x)
        return {k: _decode_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode_tree(v) for v in x]
    return x


def load_page_data(html_or_path) -> dict:
    """The data embedded in a report page, with every typed array decoded to numpy.

    Trace activations: `data["trace"]["acts"]["{layer}/{site}"]` → {"values": (T, M) array in the page's
    encoding, "scale": per-token scale or None, ...}; `trace_activations(data, key)` gives float32 values."""
    text = Path(html_or_path).read_text() if not str(html_or_path).lstrip().startswith("<") else str(html_or_path)
    m = re.search(r'<script type="application/json" id="%s">(.*?)</script>' % DATA_ID, text, re.S)
    if not m:
        raise NeuroprojError("no neuroproj-prune report data in this page")
    return _decode_tree(json.loads(m.group(1)))


def trace_activations(data: dict, key: str) -> np.ndarray:
    """(T, M) float32 activations of one `layer/site` key of decoded page data (int8 rows rescaled)."""
    a = data["trace"]["acts"][key]
    v = a["values"].astype(np.float32)
    if a.get("scale") is not None:
        v = v * a["scale"].astype(np.float32)[:, None]
    return v


# ------------------------------------------------------------------------------------------- reading
def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _read_csv(path: Path) -> tuple[list[str], list[dict]] | None:
    try:
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            rows = [dict(x) for x in r]
            return list(r.fieldnames or []), rows
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def _num(v):
    """CSV cell → int/float when it looks like one (so tables sort numerically), else the string."""
    if isinstance(v, (int, float)) or v is None:
        return v
    s = str(v).strip()
    if s == "":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
        return f if math.isfinite(f) else s
    except ValueError:
        return s


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


# ------------------------------------------------------------------------------------------ sections
def _energy_weights(model, stats, notes):
    """‖w_out,j‖² per layer from a model (LoadedModel/spec), or None. `model="auto"`: the model the stats
    name, only when it is a local directory or the offline alias and its fingerprint matches."""
    if model is None or model is False or stats is None:
        return None

    try:
        if isinstance(model, LoadedModel):
            lm = model
        elif model == "auto":
            spec = stats.meta.get("model")
            if not spec or not (Path(str(spec)).is_dir() or str(spec) == "smollm2-135m"):
                return None
            lm = load_model(str(spec), dtype="float32", device="cpu")
            if stats.meta.get("fingerprint") and lm.fingerprint != stats.meta.get("fingerprint"):
                notes.append(f"the model {spec} no longer matches the statistics: energy shown is E[h²]")
                return None
        else:
            lm = load_model(str(model), dtype="float32", device="cpu")
        a = lm.adapter
        out = {}
        for i in range(a.num_layers(lm.model)):
            W = a.out_weight(lm.model, i).detach().double().cpu()
            out[i] = (W * W).sum(0).numpy()
        return out
    except Exception as e:  # noqa: BLE001 - a model that does not load only costs the weights
        if model != "auto":
            raise
        notes.append(f"could not load the model for ‖w_out‖² ({type(e).__name__}): energy shown is E[h²]")
        return None


def _points_section(run: Path, model, max_points: int, notes: list[str]):
    pf = run / "projections.safetensors"
    if not pf.is_file():
        return None, {}
    proj = load_projections(pf)
    stats = None
    if (run / "stats.safetensors").is_file():
        try:
            stats = load_stats(run / "stats.safetensors")
        except NeuroprojError as e:
            notes.append(f"stats.safetensors not readable ({e}): no activation energy")
    clusters = None
    if (run / "clusters.json").is_file():
        try:
            clusters = load_clusters(run / "clusters.json")
        except NeuroprojError as e:
            notes.append(str(e))
    plan, plan_src = None, None
    for cand in (run / "plan.json", run / "pruned" / "plan.json"):
        if cand.is_file():
            try:
                plan, plan_src = Plan.load(cand), str(cand.relative_to(run))
                break
            except NeuroprojError as e:
                notes.append(str(e))
    wout = _energy_weights(model, stats, notes)
    cl_site = (clusters.meta.get("site") or "mlp.neurons") if clusters is not None else None
    sites = [s for s in SITE_ORDER if s in proj.sites] + [s for s in proj.sites if s not in SITE_ORDER]
    pts, idx_of = {}, {}
    role_src = set()
    for i in proj.layers:
        for s in sites:
            key = f"{i}/{s}"
            try:
                P = proj.get(i, s).float().numpy()
            except Exception:  # noqa: BLE001 - a (layer, site) the file lacks
                continue
            N, n = P.shape
            idx = None
            if N > max_points:
                idx = np.unique(np.linspace(0, N - 1, max_points).round().astype(np.int64))
                notes.append(f"layer {i} {s}: {len(idx)} of {N} neurons shown (evenly spaced indices)")
            sel = (lambda a: a) if idx is None else (lambda a: a[idx])
            entry = {"N": N, "M": N if idx is None else len(idx), "n": n, "xyz": _enc(sel(P), "f2"),
                     "idx": None if idx is None else _enc(idx, "i4")}
            try:
                entry["stress"] = proj.stress(i, s)
            except Exception:  # noqa: BLE001
                entry["stress"] = None
            if clusters is not None and s == cl_site and i in clusters and clusters[i].n_neurons == N:
                lc = clusters[i]
                entry["cluster"] = _enc(sel(lc.labels), "i2" if N < 32000 else "i4")
                entry["n_clusters"] = lc.n_clusters
            if stats is not None and s in stats.sites and i in stats.layers:
                try:
                    e2 = (stats.variance(i, s) + stats.mean(i, s) ** 2).double().numpy()
                    if e2.shape[0] == N:
                        if s == "mlp.neurons" and wout is not None and i in wout and wout[i].shape[0] == N:
                            e2 = e2 * wout[i]
                        entry["energy"] = _enc(sel(e2), "f4")
                except Exception:  # noqa: BLE001
                    pass
            role = rep = None
            if s == "mlp.neurons" and plan is not None and i in plan.layers and plan.layers[i]["width"] == N:
                d = plan.layers[i]
                role = np.ones(N, dtype=np.uint8)          # 1 removed
                role[np.asarray(d["keep"], dtype=np.int64)] = 0  # 0 kept
                rep = np.full(N, -1, dtype=np.int64)
                for j, r in d["representative"].items():
                    if 0 <= j < N and role[j] == 1:
                        rep[j] = r
                        role[r] = 2                        # 2 kept, with removed neurons folded into it
                role_src.add(f"plan ({plan_src})")
            elif s == cl_site and "cluster" in entry:
                lc = clusters[i]
                keep = lc.keep()
                role = np.ones(N, dtype=np.uint8)
                role[keep] = 0
                rep = lc.representative_of()
                rep[keep] = -1
                for r in np.unique(rep[rep >= 0]):
                    role[r] = 2
                role_src.add("clustering (thinning each cluster to its representative; no plan found)")
            if role is not None:
                entry["role"] = _enc(sel(role), "u1")
                entry["rep"] = _enc(sel(rep), "i2" if N < 32000 else "i4")
            pts[key] = entry
            idx_of[key] = idx
    energy_kind = ("E[h²]·‖w_out‖² (mlp.neurons), E[h²] (other sites)" if wout is not None else "E[h²]")
    sec = {"sites": sites, "layers": proj.layers, "dims": proj.dims, "points": pts, "energy_kind": energy_kind,
           "role_source": sorted(role_src), "cluster_site": cl_site,
           "clusters_meta": _jsonable({k: v for k, v in (clusters.meta if clusters is not None else {}).items()
                                       if isinstance(v, (str, int, float, bool, type(None)))}),
           "projection_meta": _jsonable({k: proj.meta.get(k) for k in ("mode", "dims", "norm_order", "init", "model")})}
    return sec, idx_of


def _trace_section(run: Path, idx_of: dict, budget: int, notes: list[str], trace_file=None, encoding="auto"):
    tf = Path(trace_file) if trace_file else run / "trace.safetensors"
    if not tf.is_file():
        return None
    tr = load_trace(tf)
    keys = [(i, s) for i in tr.layers for s in tr.sites if tr.has(i, s) and f"{i}/{s}" in idx_of]
    if not keys:
        notes.append(f"{tf.name}: no layer/site in common with the projections; trace not shown")
        return None
    T = len(tr.tokens)

    def cols(i, s):
        idx = idx_of[f"{i}/{s}"]
        h = tr.get(i, s).float().numpy()
        return h if idx is None else h[:, idx]

    widths = {k: (cols(*k).shape[1]) for k in keys}
    b64 = 4 / 3
    f16_bytes = sum(T * w * 2 for w in widths.values()) * b64
    i8_bytes = sum(T * w + T * 4 for w in widths.values()) * b64
    if encoding not in ("auto", "f2", "i1"):
        raise NeuroprojError(f"unknown trace encoding {encoding!r}: auto, f2 or i1")
    enc = "f2" if encoding == "f2" else "i1" if encoding == "i1" else ("f2" if f16_bytes <= budget else "i1")
    step = 1
    if enc == "i1":
        if encoding == "auto" and i8_bytes > budget:
            step = math.ceil(i8_bytes / max(budget, 1))
            layers = sorted({i for i, _ in keys})
            kept_layers = set(layers[::step])
            keys = [k for k in keys if k[0] in kept_layers]
            notes.append(f"trace: activations kept for one layer in every {step} ({len(kept_layers)} of "
                         f"{len(layers)}) to keep the page under its size limit")
        notes.append("trace: activations stored as 8-bit integers with a per-token scale"
                     + (" (page size limit)" if encoding == "auto" else "")
                     + "; precision is 1/127 of each token's largest |activation|")
    acts = {}
    for i, s in keys:
        h = cols(i, s).astype(np.float32)
        entry = {"T": T, "W": int(h.shape[1]), "absmax": float(np.abs(h).max()) if h.size else 0.0}
        if enc == "f2":
            entry["values"], entry["scale"] = _enc(h, "f2"), None
        else:
            sc = np.abs(h).max(1) / 127.0
            sc[sc == 0] = 1.0
            entry["values"] = _enc(np.clip(np.round(h / sc[:, None]), -127, 127).astype(np.int8), "i1")
            entry["scale"] = _enc(sc.astype(np.float32), "f4")
        acts[f"{i}/{s}"] = entry
    m = tr.meta
    return {"tokens": tr.tokens, "raw_tokens": m.get("raw_tokens"), "n_prompt": tr.n_prompt,
            "input_ids": [int(x) for x in tr.input_ids.tolist()], "encoding": enc, "layer_step": step,
            "acts": acts, "file": tf.name,
            "meta": _jsonable({k: m.get(k) for k in ("model", "prompt", "sample", "seed", "temperature",
                                                       "max_new_tokens", "alignment", "created")})}


def _heatmap_section(run: Path, budget: int, notes: list[str]):
    d = run / "heatmaps"
    if not d.is_dir():
        return None
    files = sorted(d.glob("*.png"))
    if not files:
        return None
    items = []
    for f in files:
        m = re.fullmatch(r"layer(\d+)-(.+)\.png", f.name)
        items.append({"key": f"{m.group(1)}/{m.group(2)}" if m else f.stem, "name": f.name,
                      "layer": int(m.group(1)) if m else None, "site": m.group(2) if m else None, "path": f})
    total = sum(it["path"].stat().st_size for it in items) * 4 / 3
    if total > budget:
        step = math.ceil(total / budget)
        notes.append(f"heatmaps: {len(items[::step])} of {len(items)} pictures embedded (page size limit)")
        items = items[::step]
    return [{"key": it["key"], "name": it["name"], "layer": it["layer"], "site": it["site"],
             "src": _png_uri(it["path"])} for it in items]


def _summary_section(run: Path):
    for cand in (run / "pruned" / "prune_summary.json", run / "prune_summary.json"):
        if cand.is_file():
            s = _read_json(cand)
            if isinstance(s, dict):
                widths = None
                pj = _read_json(cand.parent / "plan.json") or _read_json(run / "plan.json")
                if isinstance(pj, dict) and isinstance(pj.get("layers"), dict):
                    widths = [pj["layers"][k].get("width") for k in sorted(pj["layers"], key=int)]
                return {"file": str(cand.relative_to(run)), "summary": _jsonable(s), "widths": widths}
    return None


def _eval_section(run: Path):
    out = []
    for name, label in (("eval_dense.json", "dense"), ("eval.json", "pruned")):
        d = _read_json(run / name)
        if isinstance(d, dict):
            out.append({"file": name, "label": label, "perplexity": _jsonable(d.get("perplexity")),
                        "lm_eval": _jsonable(d.get("lm_eval")), "model": _jsonable(d.get("model"))})
    return out or None


def _sweep_section(run: Path):
    d = run / "sweep"
    if not d.is_dir():
        return None
    rows, cols = None, None
    got = _read_csv(d / "results.csv") if (d / "results.csv").is_file() else None
    if got:
        cols, raw = got
        rows = [{k: _num(v) for k, v in r.items()} for r in raw]
    elif (d / "cells.jsonl").is_file():
        rows = []
        for line in (d / "cells.jsonl").read_text().splitlines():
            try:
                c = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows.append({k: v for k, v in c.items() if not isinstance(v, (dict, list))})
        cols = list(dict.fromkeys(k for r in rows for k in r))
    png = _png_uri(d / "tradeoff.png") if (d / "tradeoff.png").is_file() else None
    md = (d / "results.md").read_text() if (d / "results.md").is_file() else None
    if rows is None and png is None and md is None:
        return None
    return {"columns": cols or [], "rows": _jsonable(rows or []), "png": png, "markdown": md}


_SRC = ("src_layer", "source_layer", "single_src_layer", "from_layer", "layer_from", "l", "src", "source",
        "layer_l", "earlier_layer")
_DST = ("target", "dst_layer", "target_layer", "to_layer", "layer_to", "m", "dst", "layer_m", "later_layer", "layer")


def _as_int(v):
    v = _num(v)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _layer_pairs(row: dict) -> list[tuple[int, int]]:
    """(source layer, target layer) pairs of one skip candidate row, tolerant of the schema: a `sources`
    list of [layer, index] (skips.json candidates), "l:i l:i" strings, or source/target layer columns."""
    low = {str(k).lower(): v for k, v in row.items()}
    t = next((_as_int(low[k]) for k in _DST if k in low and _as_int(low[k]) is not None), None)
    if t is None:
        return []
    src = low.get("sources")
    if isinstance(src, list) and src and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in src):
        return [(int(x[0]), t) for x in src]
    if isinstance(src, str) and re.fullmatch(r"\s*\d+:\d+(\s+\d+:\d+)*\s*", src):
        return [(int(x.split(":")[0]), t) for x in src.split()]
    s = next((_as_int(low[k]) for k in _SRC if k in low and _as_int(low[k]) is not None), None)
    return [] if s is None else [(s, t)]


def _table_from_json(obj):
    """Rows (list of flat dicts) from a JSON skip report: a list of dicts, or the largest such list in a dict."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return obj
    if isinstance(obj, dict):
        best = None
        for v in obj.values():
            r = _table_from_json(v)
            if r and (best is None or len(r) > len(best)):
                best = r
        return best
    return None


def _cell(v):
    if isinstance(v, list):
        if all(isinstance(x, (list, tuple)) and len(x) == 2 for x in v):
            return " ".join(f"{a}:{b}" for a, b in v)
        if all(not isinstance(x, (dict, list)) for x in v):
            return " ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v)
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        return json.dumps(v)[:200]
    return v


def _flat_scalars(obj, prefix="", depth=3) -> dict:
    out = {}
    if not isinstance(obj, dict) or depth < 0:
        return out
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, name + ".", depth - 1))
        elif not isinstance(v, list):
            out[name] = v
    return out


def _limit_rows(t: dict, max_rows: int, notes: list[str], where: str):
    t["total"] = len(t["rows"])
    if len(t["rows"]) > max_rows:
        r2 = next((c for c in t["columns"] if "r2" in c.lower() and "heldout" in c.lower()
                   and any(isinstance(r.get(c), float) for r in t["rows"])), None) or \
            next((c for c in t["columns"] if "r2" in c.lower()), None)
        if r2:
            t["rows"] = sorted(t["rows"], key=lambda r: -r[r2] if isinstance(r.get(r2), (int, float)) else math.inf)
            notes.append(f"{where}: the {max_rows} rows with the highest {r2} of {t['total']} in the table")
        else:
            notes.append(f"{where}: first {max_rows} of {t['total']} rows in the table")
        t["rows"] = t["rows"][:max_rows]
    t["rows"] = _jsonable(t["rows"])


def _skips_section(run: Path, max_rows: int, notes: list[str]):
    """skips/: candidate tables (skips.json `candidates` per predictor; otherwise any list of rows in a JSON
    file), the per-neuron CSV (best rows by R² when long), per-layer counts, a layer × layer map of the
    candidates' (source layer, target layer) pairs, and every PNG."""
    d = run / "skips"
    if not d.is_dir():
        return None
    tables, pngs, summary, pairs_from = [], [], None, None
    pairs: list[tuple[int, int]] = []
    for f in sorted(d.rglob("*.json")):
        obj = _read_json(f)
        name = str(f.relative_to(d))
        if isinstance(obj, dict) and isinstance(obj.get("candidates"), dict):
            for pred, rows in obj["candidates"].items():
                if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                    flat = [{k: _cell(v) for k, v in r.items()} for r in rows]
                    cols = list(dict.fromkeys(k for r in flat for k in r))
                    tables.append({"name": f"{name}: candidates ({pred} predictor)", "columns": cols, "rows": flat})
                    if pairs_from is None:
                        pairs = [p for r in rows for p in _layer_pairs(r)]
                        pairs_from = f"{name} ({pred} predictor)"
            counts, th = obj.get("counts"), obj.get("thresholds")
            if isinstance(counts, dict) and isinstance(th, list):
                for pred, c in counts.items():
                    per = c.get("per_layer") if isinstance(c, dict) else None
                    if isinstance(per, dict):
                        cols = ["layer"] + [f"R²≥{t}" for t in th]
                        rows = [{"layer": _num(m), **{cols[i + 1]: v[i] for i in range(min(len(th), len(v)))}}
                                for m, v in per.items() if isinstance(v, list)]
                        tables.append({"name": f"{name}: neurons per layer above each R² ({pred} predictor)",
                                       "columns": cols, "rows": rows})
            scal = _flat_scalars({k: v for k, v in obj.items() if k not in ("candidates", "counts")})
            if scal and summary is None:
                summary = {"file": name, "values": scal}
        else:
            rows = _table_from_json(obj)
            if rows:
                flat = [{k: _cell(v) for k, v in r.items()} for r in rows]
                tables.append({"name": name, "columns": list(dict.fromkeys(k for r in flat for k in r)), "rows": flat})
                if pairs_from is None:
                    pairs = [p for r in rows for p in _layer_pairs(r)]
                    pairs_from = name if pairs else None
            if isinstance(obj, dict) and summary is None:
                scal = _flat_scalars(obj)
                if scal:
                    summary = {"file": name, "values": scal}
    for f in sorted(d.rglob("*.csv")):
        got = _read_csv(f)
        if got and got[1]:
            cols, raw = got
            rows = [{k: _num(v) for k, v in r.items()} for r in raw]
            tables.append({"name": str(f.relative_to(d)), "columns": cols, "rows": rows})
            if pairs_from is None:
                pairs = [p for r in rows for p in _layer_pairs(r)]
                pairs_from = str(f.relative_to(d)) + " (every row)" if pairs else None
    for f in sorted(d.rglob("*.png")):
        pngs.append({"name": str(f.relative_to(d)), "src": _png_uri(f)})
    if not tables and not pngs and summary is None:
        return None
    layer_map = None
    if pairs:
        Ls = sorted({x for p in pairs for x in p})
        lo, hi = min(Ls), max(Ls)
        z = [[0] * (hi - lo + 1) for _ in range(hi - lo + 1)]
        for s_, m in pairs:
            z[m - lo][s_ - lo] += 1
        layer_map = {"from": pairs_from, "layers": list(range(lo, hi + 1)), "z": z, "count": len(pairs)}
    for t in tables:
        _limit_rows(t, max_rows, notes, "skips/" + t["name"])
    return {"tables": tables, "pngs": pngs, "map": layer_map, "summary": _jsonable(summary)}


# ------------------------------------------------------------------------------------------------ API
def build_data(run_dir, *, model="auto", max_points: int = 20000, max_mb: float = 20.0, trace_file=None,
               max_table_rows: int = 2000, trace_encoding: str = "auto") -> dict:
    """Everything the page shows, as one JSON-able dict (typed arrays base64-encoded)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise NeuroprojError(f"run directory {run} not found")
    notes: list[str] = []
    budget = int(max_mb * 2**20)
    plotly_bytes = len(_plotly_js())
    points, idx_of = _points_section(run, model, max_points, notes)
    used = plotly_bytes + len(json.dumps(points or {}))
    heat = _heatmap_section(run, max(budget // 5, 1), notes)
    used += sum(len(h["src"]) for h in heat or [])
    summary, ev, sw = _summary_section(run), _eval_section(run), _sweep_section(run)
    sk = _skips_section(run, max_table_rows, notes)
    used += len(json.dumps([summary, ev, sw, sk]))
    tr = (_trace_section(run, idx_of, max(budget - used - 2**16, 0), notes, trace_file, trace_encoding)
          if points else None)
    if points is None and (run / "trace.safetensors").is_file():
        notes.append("trace.safetensors present but no projections.safetensors: the trace is not shown")
    data = {"format": "neuroproj-prune/report/1", "run_dir": str(run.resolve()), "title": run.resolve().name,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "notes": notes, "projections": points,
            "trace": tr, "heatmaps": heat, "summary": summary, "eval": ev, "sweep": sw, "skips": sk,
            "files": sorted(str(p.relative_to(run)) for p in run.iterdir())}
    return data


_PLOTLY_JS: str | None = None


def _plotly_js() -> str:
    global _PLOTLY_JS
    if _PLOTLY_JS is None:
        try:
            from plotly.offline import get_plotlyjs
        except ImportError:
            raise NeuroprojError("the report needs the plotly package: pip install plotly") from None
        _PLOTLY_JS = get_plotlyjs()
    return _PLOTLY_JS


def render(data: dict) -> str:
    """The HTML page for `build_data`'s dict."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    css = (ASSETS / "view.css").read_text()
    js = (ASSETS / "view.js").read_text()
    title = _html.escape(f"neuroproj-prune report: {data.get('title', '')}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<style>\n{css}\n</style>\n"
            f"<script type=\"text/javascript\">{_plotly_js()}</script>\n</head>\n<body>\n"
            f"<div id=\"app\"><p id=\"loading\">loading report…</p></div>\n"
            f"<script type=\"application/json\" id=\"{DATA_ID}\">{payload}</script>\n"
            f"<script type=\"text/javascript\">\n{js}\n</script>\n</body>\n</html>\n")


def view(run_dir, out="report.html", *, model="auto", max_points: int = 20000, max_mb: float = 20.0,
         trace_file=None, trace_encoding: str = "auto") -> Path:
    """Write the self-contained report page for a run directory; returns its path.

    `model`: where ‖w_out‖² comes from for the activation energy — a LoadedModel or spec, "auto" (the model
    the statistics name, when it loads locally and still matches) or None (E[h²] only). `max_points`: neurons
    per (layer, site) beyond which the scatter shows an evenly spaced subset. `max_mb`: size the page aims at;
    trace activations are quantized / thinned to fit, and the page says so. `trace_encoding`: auto (float16,
    or int8 with a per-token scale when over the limit), f2 or i1 (forced)."""
    data = build_data(run_dir, model=model, max_points=max_points, max_mb=max_mb, trace_file=trace_file,
                      trace_encoding=trace_encoding)
    page = render(data)
    return write_text(out, page)
