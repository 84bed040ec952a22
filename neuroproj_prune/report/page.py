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
  The site `attn.heads` (the channels of o_proj's input) is grouped by head with the layout the projection
  file carries (`stats.head_layout`): one legend entry and colour per head, kept and removed heads from a
  plan/2's `heads`, a per-head table (key/value group, status, energy Σ_c E[z_c²]·‖W_o[:, c]‖² over the head's
  channels, Σ_c E[z_c²] without the model's weights) and a layers × heads map beside the scatter; the layers a
  plan removes whole (`drop_layers`) are struck through in the layer list, and their neurons and heads shown as
  removed; so are the heads of a layer whose attention sub-layer the plan removes (`drop_attn`). The prune summary adds the plan's heads per layer and the layers it removes.
- `trace.safetensors` (from `neuroproj_prune.trace`) — a token slider over prompt and generated tokens,
  the text with the current token highlighted, points sized by |activation| and coloured by sign on a
  scale centred at zero.
- `heatmaps/*.png` — the ordering heatmaps (original, projection and spectral order) of the layer shown.
- `pruned/prune_summary.json`, `eval.json` / `eval_dense.json`, `sweep/` (tradeoff plot + sortable table),
  `skips/` (layer × layer map of skip candidates + sortable table + its PNGs).

Size budget: the page is at most `max_mb` MiB (default 20) whatever the run's size — an 8B model's run
(32 layers × 14336 neurons × 3 sites) holds ~700k points, a trace of T × 700k activations and dozens of
pictures. After plotly.js and the page's code (~4.7 MB), the room left is shared by weight (points 5,
trace 3, pictures 2, tables 1; a share a section does not need goes to the others). To fit its share:
the points of every (layer, site) are thinned to the same number M of evenly spaced neurons (and, below
256 a set, every k-th layer is shown instead); the trace goes float16 → int8 with a per-token scale → every
k-th layer → left out; heatmaps every k-th picture; tables their best rows by R². The page lists each
reduction, in the notes and above the scatter, with how to see everything (`--max-mb` of the unreduced
page, or fewer `--layers`). Points are stored compactly (float16 coordinates, int16 indices) and decoded
only when their layer and site are selected.

Reading is bounded by what is shown, not by the run: the statistics' N×N Gram matrices (53 GB for an 8B
model) are never loaded, only their diagonals (`stats.second_moment_diagonals`); the trace is mapped and
read one (layer, site) at a time; long CSV tables are streamed. `load_page_data(html)` decodes the embedded
data back into numpy arrays (tests and scripts use it).
"""
from __future__ import annotations

import base64
import csv
import heapq
import html as _html
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis.clustering import load_clusters
from ..analysis.skips import (CANDIDATE_KEYS, CSV_COLUMNS, CSV_PAIR, CSV_R2, REPORT_CSV, REPORT_JSON, candidate_pairs,
                              read_report)
from ..analysis.projection import load_projections
from ..analysis.trace import FORMAT as TRACE_FORMAT
from ..config import Config, opt
from ..errors import NeuroprojError
from ..io import LazyTensorFile, check_same_weights, write_text
from ..model import LoadedModel, load_model
from ..evaluate.api import read_eval
from ..prune.api import SUMMARY_FILE, read_summary
from ..prune.plan_file import Plan
from ..stats import HEAD_SITE, head_layout, parse_layers, second_moment_diagonals
from ..sweep import RESULTS_CSV, read_results

ASSETS = Path(__file__).resolve().parent / "assets"
SITE_ORDER = ("mlp.neurons", "attn.heads", "mlp.out", "attn.out")
DATA_ID = "npp-data"

# The size budget (see the module docstring). 20 MB: a page Chromium parses and draws in a few seconds, and
# what SmolLM2-135M's complete run needs (12 MB) with room to spare, so small runs are never reduced.
DEFAULT_MAX_MB = 20.0
SHARES = {"points": 5.0, "trace": 3.0, "pictures": 2.0, "tables": 1.0}   # relative weights
MIN_POINTS = 256            # per (layer, site): below this, every k-th layer is shown instead
MIN_DATA = 64 * 1024        # the least room for data a --max-mb must leave (notes and header included)
NOTES_RESERVE = 16 * 1024   # the notes and the header fields, written last
AUTO_MODEL_MAX_BYTES = 2 * 2**30   # model="auto" loads at most this much weights for ‖w_out‖²


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
def _weights_bytes(spec) -> int | None:
    """Bytes of weight files in a local model directory (None when `spec` is not one)."""
    p = Path(str(spec))
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))


def _energy_weights(model, stats_meta, layers, notes):
    """{(layer, site): squared norms of the output map's columns}: ‖w_out,j‖² of the MLP (`mlp.neurons`) and,
    where the family has heads, ‖W_o[:, c]‖² of the attention output projection (`attn.heads`), from a model
    (LoadedModel/spec), or None. `model="auto"`: the model the stats name, only when it is a local directory (of
    at most AUTO_MODEL_MAX_BYTES of weights: the report does not load an 8B model on its own) or the offline
    alias, and its fingerprint matches."""
    if model is None or model is False or stats_meta is None:
        return None

    try:
        if isinstance(model, LoadedModel):
            lm = model
        elif model == "auto":
            spec = stats_meta.get("model")
            if not spec or not (Path(str(spec)).is_dir() or str(spec) == "smollm2-135m"):
                return None
            size = _weights_bytes(spec)
            if size is not None and size > AUTO_MODEL_MAX_BYTES:
                notes.append(f"‖w_out‖² not read: {spec} holds {size / 2**30:.1f} GB of weights, more than the "
                             f"report loads on its own ({AUTO_MODEL_MAX_BYTES / 2**30:.0f} GB); pass --model {spec} "
                             f"to use it: energy shown is E[h²]")
                return None
            lm = load_model(str(spec), dtype="float32", device="cpu")
            if stats_meta.get("fingerprint") and lm.fingerprint != stats_meta.get("fingerprint"):
                notes.append(f"the model {spec} no longer matches the statistics: energy shown is E[h²]")
                return None
        else:
            lm = load_model(str(model), dtype="float32", device="cpu")
        a = lm.adapter
        heads = a.heads_refusal(lm.model) is None
        out = {}
        for i in range(a.num_layers(lm.model)):
            if i in layers:
                W = a.out_weight(lm.model, i).detach().double().cpu()
                out[(i, "mlp.neurons")] = (W * W).sum(0).numpy()
                if heads:   # nn.Linear: y = W_o z, W_o (d, H·hd)
                    W = a.attn_out_proj(lm.model, i).weight.detach().double().cpu()
                    out[(i, HEAD_SITE)] = (W * W).sum(0).numpy()
        return out
    except Exception as e:  # noqa: BLE001 - a model that does not load only costs the weights
        if model != "auto":
            raise
        notes.append(f"could not load the model for ‖w_out‖² ({type(e).__name__}): energy shown is E[h²]")
        return None


def _layer_selection(spec, available: list[int], num_layers: int) -> list[int]:
    """`--layers` of the report: the chosen layers among those the projections hold (an error when none)."""
    if spec is None:
        return list(available)
    want = parse_layers(spec, num_layers)
    got = [i for i in available if i in want]
    if not got:
        raise NeuroprojError(f"--layers {spec}: the projections hold layers {_span(available)}, none of those")
    return got


def _span(layers) -> str:
    layers = list(layers)
    return "none" if not layers else f"{layers[0]}–{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def _gather_points(run: Path, model, layers_spec, notes: list[str]):
    """Everything the scatter shows, per (layer, site), as full-resolution numpy arrays (nothing encoded yet).
    Cost: the projections file (N·n floats per set), E[h²] from the statistics' diagonals only, clusters and
    plan JSON; memory O(Σ N)."""
    pf = run / "projections.safetensors"
    if not pf.is_file():
        if layers_spec is not None:
            raise NeuroprojError(f"--layers {layers_spec}: {run} has no projections.safetensors to select from")
        return None
    proj = load_projections(pf)
    stats_meta, e2 = None, {}
    sf = run / "stats.safetensors"
    sites = [s for s in SITE_ORDER if s in proj.sites] + [s for s in proj.sites if s not in SITE_ORDER]
    # a damaged file of the run is one error (its reader's), never a section quietly left out
    if sf.is_file():
        stats_meta, _ = second_moment_diagonals(sf, layers=[], sites=[])
    num_layers = int((stats_meta or {}).get("num_layers") or (max(proj.layers) + 1 if proj.layers else 0))
    layers = _layer_selection(layers_spec, proj.layers, num_layers)
    if stats_meta is not None:
        want = sites + ([HEAD_SITE] if HEAD_SITE in (stats_meta.get("sites") or []) and HEAD_SITE not in sites else [])
        _, e2 = second_moment_diagonals(sf, layers=layers, sites=want)
    clusters = None
    if (run / "clusters.json").is_file():
        clusters = load_clusters(run / "clusters.json")
    plan, plan_src = None, None
    for cand in (run / "plan.json", run / "pruned" / "plan.json"):
        if cand.is_file():
            plan, plan_src = Plan.load(cand), str(cand.relative_to(run))
            break
    check_same_weights(projections=proj.meta.get("fingerprint"), statistics=(stats_meta or {}).get("fingerprint"),
                       clusters=clusters.meta.get("fingerprint") if clusters is not None else None,
                       plan=plan.meta.get("fingerprint") if plan is not None else None)
    wout = _energy_weights(model, stats_meta, set(layers), notes)
    layout, bad = None, []  # the heads' layout: the projection file's, else the statistics' (the same schema)
    for meta, where in ((proj.meta, "projections.safetensors"), (stats_meta, "stats.safetensors")):
        try:
            layout = layout or head_layout(meta or {}, where)
        except NeuroprojError as e:
            bad.append(str(e))
    if layout is None and bad:
        notes.append(f"{bad[0]}: points of {HEAD_SITE} not grouped into heads")
    dropped = set(plan.drop) if plan is not None else set()
    cl_site = (clusters.meta.get("site") or "mlp.neurons") if clusters is not None else None
    sets, role_src = [], set()
    for i in layers:
        for s in sites:
            try:
                P = proj.get(i, s).float().numpy()
            except Exception:  # noqa: BLE001 - a (layer, site) the file lacks
                continue
            N, n = P.shape
            wide = "i2" if N < 32000 else "i4"
            ps = {"key": f"{i}/{s}", "layer": i, "site": s, "N": N, "n": n, "P": P, "fields": [],
                  "idx_dtype": wide}
            try:
                ps["stress"] = proj.stress(i, s)
            except Exception:  # noqa: BLE001
                ps["stress"] = None
            if clusters is not None and s == cl_site and i in clusters and clusters[i].n_neurons == N:
                lc = clusters[i]
                ps["fields"].append(("cluster", lc.labels, wide))
                ps["n_clusters"] = lc.n_clusters
            e = e2.get((i, s))
            if e is not None and e.shape[0] == N:
                w = (wout or {}).get((i, s))
                if w is not None and w.shape[0] == N:
                    e = e * w
                ps["fields"].append(("energy", e, "f4"))
            role = rep = None
            if s in ("mlp.neurons", HEAD_SITE) and i in dropped:   # the whole layer goes
                role, rep = np.ones(N, dtype=np.uint8), np.full(N, -1, dtype=np.int64)
                ps["dropped"] = True
                role_src.add(f"plan ({plan_src}): layers removed whole")
            elif s == HEAD_SITE and plan is not None and i in plan.no_attn:   # its attention goes: every head
                role, rep = np.ones(N, dtype=np.uint8), np.full(N, -1, dtype=np.int64)
                role_src.add(f"plan ({plan_src}): attention sub-layers removed")
            elif s == HEAD_SITE and plan is not None and (plan.heads or dropped):
                role, rep = _head_roles(plan.heads.get(i), layout, i, N)
                if role is not None:
                    role_src.add(f"plan ({plan_src}): heads")
            elif s == "mlp.neurons" and plan is not None and i in plan.layers and plan.layers[i]["width"] == N:
                d = plan.layers[i]
                role = np.ones(N, dtype=np.uint8)          # 1 removed
                role[np.asarray(d["keep"], dtype=np.int64)] = 0  # 0 kept
                rep = np.full(N, -1, dtype=np.int64)
                for j, r in d["representative"].items():
                    if 0 <= j < N and role[j] == 1:
                        rep[j] = r
                        role[r] = 2                        # 2 kept, with removed neurons folded into it
                role_src.add(f"plan ({plan_src})")
            elif s == cl_site and "n_clusters" in ps:
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
                ps["fields"] += [("role", role, "u1"), ("rep", rep, wide)]
            sets.append(ps)
    energy_kind = ("E[h²]·‖w_out‖² (mlp.neurons), E[z²]·‖W_o[:, c]‖² (attn.heads), E[h²] (other sites)"
                   if wout is not None else "E[h²]")
    head = {"sites": sites, "dims": proj.dims, "energy_kind": energy_kind, "role_source": sorted(role_src),
            "heads": _heads_summary(layers, layout, e2, wout, plan, plan_src, notes),
            "dropped": sorted(dropped), "plan_source": plan_src,
            "cluster_site": cl_site,
            "clusters_meta": _jsonable({k: v for k, v in (clusters.meta if clusters is not None else {}).items()
                                        if isinstance(v, (str, int, float, bool, type(None)))}),
            "projection_meta": _jsonable({k: proj.meta.get(k) for k in ("mode", "dims", "norm_order", "init", "model")}),
            "all_layers": proj.layers}
    return {"head": head, "sets": sets, "layers": layers}


def _head_roles(entry, layout, i, N):
    """(role, rep) of the N channels of (layer i, attn.heads) from a plan/2 heads entry: 0 kept, 1 removed (a
    head has no representative: rep −1); channel c is head c // head_dim. A layer the plan leaves alone keeps every
    head; an entry (or a layout) that does not fit the projected channels gives no roles (`_heads_summary` notes
    a plan of other head counts)."""
    if layout is None or i >= len(layout["heads"]) or layout["heads"][i] * layout["head_dim"] != N:
        return None, None
    hd = layout["head_dim"]
    role = np.zeros(N, dtype=np.uint8)
    if entry is not None:
        if entry["heads"] * hd != N or any(not 0 <= h < entry["heads"] for h in entry["keep"]):
            return None, None
        role[:] = 1
        for h in entry["keep"]:
            role[h * hd:(h + 1) * hd] = 0
    return role, np.full(N, -1, dtype=np.int64)


def _heads_summary(layers, layout, e2, wout, plan, plan_src, notes):
    """The per-head view of every shown layer: heads H, key/value heads KV, each head's energy Σ_c E[z_c²]
    (·‖W_o[:, c]‖² with the model's weights) over its head_dim channels, and its role (0 kept, 1 removed) from
    the plan; a layer the plan removes whole has every head removed. From the heads' layout of the files, else
    from the plan's heads entries (no energy then). None when neither says anything about heads."""
    heads = plan.heads if plan is not None else {}
    drop = set(plan.drop) if plan is not None else set()
    no_attn = set(plan.no_attn) if plan is not None else set()   # attention sub-layers removed: every head goes
    if layout is None and not heads:
        return None
    rows = []
    for i in layers:
        if layout is not None and i < len(layout["heads"]):
            H, KV, hd = layout["heads"][i], layout["kv_heads"][i], layout["head_dim"]
        elif i in heads:
            H, KV, hd = heads[i]["heads"], heads[i]["kv_heads"], None
        else:
            continue
        row = {"layer": i, "H": H, "KV": KV, "energy": None, "role": None, "dropped": i in drop,
               "attention_removed": i in no_attn}
        z = e2.get((i, HEAD_SITE))
        if hd is not None and z is not None and z.shape[0] == H * hd:
            w = (wout or {}).get((i, HEAD_SITE))
            row["energy"] = [float(x) for x in (z * w if w is not None and w.shape == z.shape else z)
                             .reshape(H, hd).sum(1)]
        entry = heads.get(i)
        if i in drop or i in no_attn:
            row["role"] = [1] * H
        elif entry is not None and entry["heads"] == H:
            keep = set(entry["keep"])
            row["role"] = [0 if h in keep else 1 for h in range(H)]
        elif entry is not None:
            notes.append(f"plan: layer {i} has {entry['heads']} heads in the plan, {H} in the statistics: its heads "
                         f"are not marked")
        elif heads or drop or no_attn:
            row["role"] = [0] * H
        rows.append(row)
    if not rows:
        return None
    kind = ("Σ E[z²]·‖W_o[:, c]‖² over the head's channels" if wout is not None
            else "Σ E[z²] over the head's channels")
    return {"head_dim": layout["head_dim"] if layout else None, "rows": rows, "energy_kind": kind,
            "source": f"plan ({plan_src})" if heads or drop or no_attn else None}


_ITEM = {"f2": 2, "f4": 4, "i4": 4, "i2": 2, "i1": 1, "u1": 1}


def _b64len(nbytes: int) -> int:
    return 4 * ((nbytes + 2) // 3)


def _set_bytes(ps, M: int) -> int:
    """Bytes one point set takes in the page with M of its N points (exact but for a few digits)."""
    if M <= 0:
        return 0
    b = 160 + _b64len(M * ps["n"] * 2) + sum(40 + _b64len(M * _ITEM[dt]) for _, _, dt in ps["fields"])
    return b + (40 + _b64len(M * _ITEM[ps["idx_dtype"]]) if M < ps["N"] else 0)


def _plan_points(sets, cap: int, max_points: int) -> tuple[int, int, list]:
    """(M, layer step, chosen sets): every kept set shows at most M evenly spaced points, M the largest that
    fits `cap` bytes; when that leaves fewer than MIN_POINTS per set, every k-th layer is kept instead (the
    smallest k that gives MIN_POINTS). M = 0: nothing fits. Cost: a binary search per layer step."""
    layers = sorted({ps["layer"] for ps in sets})
    hi = min(max_points, max(ps["N"] for ps in sets))
    best = (0, len(layers), [])
    for step in range(1, len(layers) + 1):
        kept = set(layers[::step])
        chosen = [ps for ps in sets if ps["layer"] in kept]

        def size(M):
            return sum(_set_bytes(ps, min(ps["N"], M)) for ps in chosen)

        if size(hi) <= cap:
            return hi, step, chosen
        lo, up = 0, hi                  # size(lo) <= cap < size(up)
        while up - lo > 1:
            mid = (lo + up) // 2
            lo, up = (mid, up) if size(mid) <= cap else (lo, mid)
        if lo >= min(MIN_POINTS, hi) or step == len(layers):
            return lo, step, chosen
        if lo > best[0]:
            best = (lo, step, chosen)
    return best


def _encode_set(ps, M: int) -> dict:
    N = ps["N"]
    idx = None if M >= N else np.unique(np.linspace(0, N - 1, M).round().astype(np.int64))
    sel = (lambda a: a) if idx is None else (lambda a: a[idx])
    e = {"N": N, "M": N if idx is None else len(idx), "n": ps["n"], "xyz": _enc(sel(ps["P"]), "f2"),
         "idx": None if idx is None else _enc(idx, ps["idx_dtype"]), "stress": ps["stress"]}
    if ps.get("dropped"):
        e["dropped"] = True
    for name, a, dt in ps["fields"]:
        e[name] = _enc(sel(a), dt)
    if "n_clusters" in ps:
        e["n_clusters"] = ps["n_clusters"]
    return e, idx


def _trace_header(run: Path, trace_file, points):
    """What the trace section needs to plan its size, read from the file's header only (no activations)."""
    tf = Path(trace_file) if trace_file else run / "trace.safetensors"
    if not tf.is_file():
        return None
    with LazyTensorFile(tf, TRACE_FORMAT, "trace", "trace") as f:
        m = f.meta
        try:
            tokens, n_prompt = list(m["tokens"]), int(m["n_prompt"])
            layers, sites = [int(i) for i in m["layers"]], list(m["sites"])
        except (KeyError, TypeError, ValueError):
            raise NeuroprojError(f"{tf}: the trace header lacks tokens/n_prompt/layers/sites: re-run trace") from None
        T = len(tokens)
        width = {ps["key"]: ps["N"] for ps in points["sets"]} if points else {}
        keys, bad = [], []
        for i in layers:
            for s in sites:
                k = f"layer.{i}.{s}"
                if k in f and f"{i}/{s}" in width:
                    (keys if f.shape(k) == (T, width[f"{i}/{s}"]) else bad).append((i, s))
        ids = [int(x) for x in f.read("input_ids").tolist()] if "input_ids" in f else []
    return {"file": tf, "tokens": tokens, "n_prompt": n_prompt, "T": T, "keys": keys, "mismatched": bad,
            "input_ids": ids, "meta": m}


def _trace_key_bytes(T: int, W: int, enc: str) -> int:
    return 90 + (_b64len(T * W * 2) if enc == "f2" else _b64len(T * W) + 40 + _b64len(T * 4))


def _trace_section(th, idx_of: dict, room: int, notes: list[str], encoding: str, how_to_all: str):
    """The trace: float16 when it fits `room` bytes, else int8 with a per-token scale, else int8 for every
    k-th layer (the smallest k that fits), else not shown; the page says which. Reads only the kept keys'
    columns of the file (one (T, W) matrix at a time)."""
    if th["mismatched"]:
        notes.append(f"{th['file'].name}: {len(th['mismatched'])} layer/site(s) have another width than the "
                     f"projections (a trace of another model?): not shown")
    keys = [k for k in th["keys"] if f"{k[0]}/{k[1]}" in idx_of]
    if not keys:
        notes.append(f"{th['file'].name}: no layer/site in common with the projections shown; trace not shown")
        return None
    T, m = th["T"], th["meta"]
    out = {"tokens": th["tokens"], "raw_tokens": m.get("raw_tokens"), "n_prompt": th["n_prompt"],
           "input_ids": th["input_ids"], "encoding": None, "layer_step": 1, "acts": {}, "file": th["file"].name,
           "meta": _jsonable({k: m.get(k) for k in ("model", "prompt", "sample", "seed", "temperature",
                                                     "max_new_tokens", "alignment", "created")})}
    room -= _size(out)
    sel = {k: idx_of[f"{k[0]}/{k[1]}"] for k in keys}          # the columns the scatter shows (None: all)
    width = {k: len(sel[k]) if sel[k] is not None else th["width_of"][f"{k[0]}/{k[1]}"] for k in keys}
    layers = sorted({i for i, _ in keys})
    tries = ([(1, "f2")] + [(s, "i1") for s in range(1, len(layers) + 1)] if encoding == "auto"
             else [(s, encoding) for s in range(1, len(layers) + 1)])
    choice = None
    for step, enc in tries:
        kept = set(layers[::step])
        if sum(_trace_key_bytes(T, width[k], enc) for k in keys if k[0] in kept) <= room:
            choice = step, enc, [k for k in keys if k[0] in kept]
            break
    if choice is None:
        need = min(sum(_trace_key_bytes(T, width[k], "i1") for k in keys if k[0] == i) for i in layers) / 2**20
        notes.append(f"trace: not shown: even one layer's activations ({need:.1f} MB as 8-bit integers) exceed "
                     f"the room left in the page; {how_to_all}")
        return None
    step, enc, keys = choice
    if step > 1:
        notes.append(f"trace: activations kept for one layer in every {step} ({len(layers[::step])} of "
                     f"{len(layers)}) to keep the page under its size limit; {how_to_all}")
    if enc == "i1":
        notes.append("trace: activations stored as 8-bit integers with a per-token scale"
                     + (" (page size limit)" if encoding == "auto" else "")
                     + "; precision is 1/127 of each token's largest |activation|")
    with LazyTensorFile(th["file"], TRACE_FORMAT, "trace", "trace") as f:
        for i, s in keys:
            idx = idx_of[f"{i}/{s}"]
            h = f.read(f"layer.{i}.{s}", cols=idx).astype(np.float32)
            entry = {"T": T, "W": int(h.shape[1]), "absmax": float(np.abs(h).max()) if h.size else 0.0}
            if enc == "f2":
                entry["values"], entry["scale"] = _enc(h, "f2"), None
            else:
                sc = np.abs(h).max(1) / 127.0
                sc[sc == 0] = 1.0
                entry["values"] = _enc(np.clip(np.round(h / sc[:, None]), -127, 127).astype(np.int8), "i1")
                entry["scale"] = _enc(sc.astype(np.float32), "f4")
            out["acts"][f"{i}/{s}"] = entry
    out["encoding"], out["layer_step"] = enc, step
    return out


def _heatmap_items(run: Path, layers):
    d = run / "heatmaps"
    if not d.is_dir():
        return []
    items = []
    for f in sorted(d.glob("*.png"), key=lambda p: (_layer_of(p.name), p.name)):
        m = re.fullmatch(r"layer(\d+)-(.+)\.png", f.name)
        layer = int(m.group(1)) if m else None
        if layers is not None and layer is not None and layer not in layers:
            continue
        items.append({"key": f"{m.group(1)}/{m.group(2)}" if m else f.stem, "name": f.name, "layer": layer,
                      "site": m.group(2) if m else None, "path": f, "bytes": _png_bytes(f)})
    return items


def _layer_of(name: str) -> int:
    m = re.match(r"layer(\d+)-", name)
    return int(m.group(1)) if m else -1


def _png_bytes(path: Path) -> int:
    return 120 + len(path.name) + len("data:image/png;base64,") + _b64len(path.stat().st_size)


def _summary_section(run: Path):
    """The prune summary (prune/api.py's schema) and, from the plan of the run's checkpoint, its widths before, the
    dense indices of the kept layers (`layers`, when the plan names every one), the layers removed whole and the
    heads before and kept per layer."""
    for d in (run / "pruned", run):
        if (d / SUMMARY_FILE).is_file():
            s = read_summary(d)
            plan = d / "plan.json" if (d / "plan.json").is_file() else run / "plan.json"
            widths = None
            if plan.is_file():
                p = Plan.load(plan)
                widths = [p.layers[i]["width"] for i in sorted(p.layers)]
                layers = sorted(p.layers) if len(p.layers) == len(s["kept"]) else None
                heads = [{"layer": i, "before": e["heads"], "kept": len(e["keep"]), "kv_before": e["kv_heads"],
                          "kv_kept": len(e["keep_kv"])} for i, e in sorted(p.heads.items())]
            else:
                layers, heads, p = None, [], None
            return {"file": str((d / SUMMARY_FILE).relative_to(run)), "summary": _jsonable(s), "widths": widths,
                    "layers": layers, "dropped": sorted(p.drop) if p is not None else [], "heads": heads}
    return None


def _eval_section(run: Path):
    """eval_dense.json and eval.json (evaluate's schema)."""
    out = []
    for name, label in (("eval_dense.json", "dense"), ("eval.json", "pruned")):
        if (run / name).is_file():
            d = read_eval(run / name)
            out.append({"file": name, "label": label, "perplexity": _jsonable(d.get("perplexity")),
                        "lm_eval": _jsonable(d.get("lm_eval")), "model": _jsonable(d.get("model"))})
    return out or None


def _sweep_section(run: Path):
    """sweep/: results.csv (sweep.py's schema), the tradeoff plot and the Markdown table."""
    d = run / "sweep"
    if not d.is_dir():
        return None
    cols, rows = read_results(d) if (d / RESULTS_CSV).is_file() else (None, None)
    png = d / "tradeoff.png" if (d / "tradeoff.png").is_file() else None
    md = (d / "results.md").read_text() if (d / "results.md").is_file() else None
    if rows is None and png is None and md is None:
        return None
    return {"columns": cols or [], "rows": _jsonable(rows or []), "png_path": png, "markdown": md}


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


def _rank_key(v) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else -math.inf


def _fast_rank(cell: str) -> float:
    """`_rank_key(_num(cell))` for one CSV cell, without trying int first (the streamed tables' hot loop)."""
    try:
        v = float(cell)
    except ValueError:
        return -math.inf
    return v if math.isfinite(v) else -math.inf


def _top_rows(t: dict, rows: list[dict], max_rows: int, rank_by: str | None = None) -> None:
    """t["rows"]: the `max_rows` rows with the highest `rank_by` (ties and rows without one in file order), or the
    first `max_rows` rows; t["total"], t["ranked_by"] record the choice."""
    t["total"] = len(rows)
    col = rank_by if len(rows) > max_rows else None
    t["ranked_by"] = col
    if col:
        rows = heapq.nlargest(max_rows, rows, key=lambda r: _rank_key(r.get(col)))  # stable, like sorted()
    t["rows"] = _jsonable(rows[:max_rows])


def _stream_csv_table(path: Path, max_rows: int, want_pairs: bool):
    """skips.csv (analysis/skips.py's schema) read row by row, holding at most 2·`max_rows` rows: the best by R²
    (held-out when measured, else on the fitting tokens), the row count and, with `want_pairs`, the (source layer,
    target layer) pairs of every row. A per-neuron skips.csv of an 8B model has ~440k rows; reading them all into
    dicts would take gigabytes."""
    bad = NeuroprojError(f"{path} is not a skips table (damaged or edited): run `neuroproj-prune skips` again")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            r = csv.reader(f)
            cols = next(r, None)
            if cols is None or cols[:len(CSV_COLUMNS)] != list(CSV_COLUMNS):
                raise bad
            ci = {c: cols.index(c) for c in CSV_R2}
            src, dst = (cols.index(c) for c in CSV_PAIR)
            heaps: dict[str, list] = {c: [] for c in ci}
            first, pairs, n, held_numbers = [], [], 0, False
            for n, row in enumerate(r, 1):
                if len(row) != len(cols):
                    raise bad
                if len(first) < max_rows:
                    first.append(row)
                for c, j in ci.items():
                    v = _fast_rank(row[j])
                    if c == CSV_R2[0] and v != -math.inf:
                        held_numbers = True
                    h = heaps[c]
                    if len(h) < max_rows:
                        heapq.heappush(h, (v, -n, row))
                    elif v > h[0][0]:               # a later row never beats an equal value: file order
                        heapq.heapreplace(h, (v, -n, row))
                if want_pairs:
                    try:
                        pairs.append((int(row[src]), int(row[dst])))
                    except ValueError:
                        raise bad from None
    except (OSError, csv.Error, UnicodeDecodeError):
        raise bad from None
    if n == 0:
        return None
    col = CSV_R2[0] if held_numbers else CSV_R2[1]
    if n > max_rows:
        chosen = [x[2] for x in sorted(heaps[col], key=lambda x: x[:2], reverse=True)]
    else:
        chosen, col = first, None
    rows = [{c: _num(v) for c, v in zip(cols, row)} for row in chosen]
    return {"columns": cols, "rows": _jsonable(rows), "total": n, "ranked_by": col}, pairs


def _skips_section(run: Path, max_rows: int, notes: list[str]):
    """skips/ (analysis/skips.py's schema): the candidate table of each predictor and the per-layer counts
    (skips.json), the per-neuron table (skips.csv, best rows by R² when long, streamed), a layer × layer map of
    the candidates' (source layer, target layer) pairs, and skips.png (as a path: embedded within the page's
    picture budget later)."""
    d = run / "skips"
    if not d.is_dir():
        return None
    tables, pngs, summary, pairs_from = [], [], None, None
    pairs: list[tuple[int, int]] = []
    if (d / REPORT_JSON).is_file():
        doc = read_report(d)
        for pred, rows in doc["candidates"].items():
            flat = [{k: _cell(v) for k, v in r.items()} for r in rows]
            t = {"name": f"{REPORT_JSON}: candidates ({pred} predictor)",
                 "columns": list(dict.fromkeys(k for r in flat for k in r)) or list(CANDIDATE_KEYS)}
            _top_rows(t, flat, max_rows, rank_by="r2")
            tables.append(t)
            if pairs_from is None and rows:
                pairs = [p for c in rows for p in candidate_pairs(c)]
                pairs_from = f"{REPORT_JSON} ({pred} predictor)"
        th = doc["thresholds"]
        for pred, c in doc["counts"].items():
            cols = ["layer"] + [f"R²≥{t}" for t in th]
            rows = [{"layer": _num(m), **{cols[i + 1]: v[i] for i in range(min(len(th), len(v)))}}
                    for m, v in c["per_layer"].items() if isinstance(v, list)]
            t = {"name": f"{REPORT_JSON}: neurons per layer above each R² ({pred} predictor)", "columns": cols}
            _top_rows(t, rows, max_rows)
            tables.append(t)
        scal = _flat_scalars({k: v for k, v in doc.items() if k not in ("candidates", "counts")})
        if scal:
            summary = {"file": REPORT_JSON, "values": scal}
    if (d / REPORT_CSV).is_file():
        got = _stream_csv_table(d / REPORT_CSV, max_rows, want_pairs=pairs_from is None)
        if got:
            t, csv_pairs = got
            tables.append({"name": REPORT_CSV, **t})
            if pairs_from is None and csv_pairs:
                pairs, pairs_from = csv_pairs, REPORT_CSV + " (every row)"
    if (d / "skips.png").is_file():
        pngs.append({"name": "skips.png", "path": d / "skips.png", "bytes": _png_bytes(d / "skips.png")})
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
    return {"tables": tables, "pngs": pngs, "map": layer_map, "summary": _jsonable(summary)}


def _table_notes(sk, notes: list[str]) -> None:
    for t in (sk or {}).get("tables", []):
        if len(t["rows"]) < t["total"]:
            where = "skips/" + t["name"]
            if t.get("ranked_by"):
                notes.append(f"{where}: the {len(t['rows'])} rows with the highest {t['ranked_by']} of "
                             f"{t['total']} in the table")
            else:
                notes.append(f"{where}: first {len(t['rows'])} of {t['total']} rows in the table")


# ------------------------------------------------------------------------------------------------ API
def _dumps(obj) -> str:
    """The page's JSON: compact, strict, '<' escaped so that no string can close the <script> element."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def _size(obj) -> int:
    return len(_dumps(obj))  # ensure_ascii: one byte per character


def _share_out(room: int, needs: dict[str, int]) -> dict[str, int]:
    """Split `room` bytes between parts by SHARES: a part gets its whole need when that fits its share of
    what is left, and the share it does not need goes to the others (water-filling). O(parts²)."""
    caps = {k: 0 for k in needs}
    left, open_ = max(room, 0), {k for k, n in needs.items() if n > 0}
    while open_:
        w = sum(SHARES[k] for k in open_)
        fits = [k for k in open_ if needs[k] <= left * SHARES[k] / w]
        if not fits:
            for k in open_:
                caps[k] = int(left * SHARES[k] / w)
            break
        for k in fits:
            caps[k] = needs[k]
            left -= needs[k]
            open_.discard(k)
    return caps


def _pictures(items, cap: int):
    """The pictures that fit `cap` bytes, in order, and those left out."""
    kept, out, used = [], [], 0
    for it in items:
        if used + it["bytes"] <= cap:
            kept.append(it)
            used += it["bytes"]
        else:
            out.append(it)
    return kept, out, used


def _heatmap_step(items, cap: int) -> int:
    """The smallest k with every k-th picture fitting `cap` bytes; 0 when not even one fits."""
    for step in range(1, len(items) + 1):
        if sum(it["bytes"] for it in items[::step]) <= cap:
            return step
    return 0


def build_data(run_dir, *, model="auto", max_points: int = 20000, max_mb: float = DEFAULT_MAX_MB, trace_file=None,
               max_table_rows: int = 2000, trace_encoding: str = "auto", layers=None) -> dict:
    """Everything the page shows, as one JSON-able dict (typed arrays base64-encoded), sized so that the
    page `render` makes is at most `max_mb` MiB (see the module docstring for how sections share it).

    Cost: bounded by what is shown, not by the run: the statistics' N×N Grams are never loaded (diagonals
    only), the trace is read one (layer, site) at a time, long CSV tables are streamed; memory O(Σ N) for
    the points plus one trace matrix. An 8B run (32 layers × 14336 neurons × 3 sites) takes seconds."""
    run = Path(run_dir)
    if not run.is_dir():
        raise NeuroprojError(f"run directory {run} not found")
    if isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not math.isfinite(max_mb) or max_mb <= 0:
        raise NeuroprojError(f"--max-mb must be a positive number of MB (got {max_mb!r})")
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise NeuroprojError(f"--max-points must be a positive whole number (got {max_points!r})")
    if trace_encoding not in ("auto", "f2", "i1"):
        raise NeuroprojError(f"unknown trace encoding {trace_encoding!r}: auto, f2 or i1")
    budget = int(max_mb * 2**20)
    # the page without its data; the title (200 characters at most) escaped takes at most 6 bytes a character
    code = len(_shell("").encode("utf-8")) + 6 * 200
    if budget < code + MIN_DATA:
        raise NeuroprojError(f"--max-mb {max_mb:g} leaves no room for data: plotly.js and the page's code take "
                             f"{code / 2**20:.2f} MB; give --max-mb {math.ceil((code + MIN_DATA) / 2**20 * 10) / 10:g} "
                             f"or more")
    g = _gather(run, model, max_points, trace_file, max_table_rows, trace_encoding, layers)
    room = budget - code
    for _ in range(4):   # estimates are exact but for a few digits per array; re-plan in the rare miss
        data = _assemble(g, room, max_mb, max_points, trace_encoding, code)
        over = code + _size(data) - budget
        if over <= 0:
            return data
        room -= over + 4096
    raise NeuroprojError(f"could not fit the report into --max-mb {max_mb:g}: give a larger --max-mb")


def _gather(run, model, max_points, trace_file, max_table_rows, trace_encoding, layers) -> dict:
    """Read the run directory once: every section at full size (pictures and trace as paths and headers)."""
    notes: list[str] = []
    points = _gather_points(run, model, layers, notes)
    sel = set(points["layers"]) if points else None
    th = _trace_header(run, trace_file, points) if points else None
    if th is not None:
        th["width_of"] = {ps["key"]: ps["N"] for ps in points["sets"]}
    if points is None and (run / "trace.safetensors").is_file():
        notes.append("trace.safetensors present but no projections.safetensors: the trace is not shown")
    sw = _sweep_section(run)
    g = {"run": run, "notes": notes, "points": points, "trace": th,
         "heat": _heatmap_items(run, sel if layers is not None else None),
         "summary": _summary_section(run), "eval": _eval_section(run), "sweep": sw,
         "skips": _skips_section(run, max_table_rows, notes)}
    if not any(g[k] for k in ("points", "heat", "summary", "eval", "sweep", "skips")):
        raise NeuroprojError(f"{run} holds nothing the report shows (projections.safetensors, heatmaps/, "
                             f"pruned/prune_summary.json, eval.json, sweep/, skips/): give a run directory, e.g. the "
                             f"output_dir of `neuroproj-prune run`")
    return {**g,
            "layers_spec": None if layers is None else str(layers),
            "skeleton": {"format": "neuroproj-prune/report/1", "run_dir": str(run.resolve()),
                         "title": run.resolve().name, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "files": sorted(str(p.relative_to(run)) for p in run.iterdir())}}


def _nth(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _assemble(g, room: int, max_mb: float, max_points: int, trace_encoding: str, code: int) -> dict:
    """Plan the sizes (SHARES of `room` bytes), then encode what fits; every reduction is noted. Order: the
    points against every section's need; then pictures and the trace against what is left (the tables'
    share held back); the tables take the rest."""
    notes = list(g["notes"])
    skeleton = {**g["skeleton"], "notes": [], "budget": {"max_mb": max_mb}}
    room -= _size(skeleton) + NOTES_RESERVE
    sk = None
    if g["skips"] is not None:
        sk = {**g["skips"], "tables": [dict(t) for t in g["skips"]["tables"]], "pngs": []}
    summary, ev, sw = g["summary"], g["eval"], _public_sweep(g["sweep"])
    # pictures: the sweep's and the skip report's first (a few), then the heatmaps
    other_pics = ([{"name": "tradeoff.png", "path": g["sweep"]["png_path"], "where": "sweep",
                    "bytes": _png_bytes(g["sweep"]["png_path"])}] if sw and g["sweep"].get("png_path") else []) + \
                 [{**p, "where": "skips"} for p in (g["skips"] or {}).get("pngs", [])]
    heat = g["heat"]
    P, th = g["points"], g["trace"]
    sets = P["sets"] if P else []

    def tables_size():
        return _size([summary, sw, ev, sk])

    tables_full = tables_size()
    hi = min(max_points, max((ps["N"] for ps in sets), default=0))
    head_bytes = _size(P["head"]) + 400 if P else 0          # the section's fields besides its point sets
    points_full = sum(_set_bytes(ps, min(ps["N"], hi)) for ps in sets) + head_bytes
    trace_enc = "i1" if trace_encoding == "i1" else "f2"
    trace_full = (sum(_trace_key_bytes(th["T"], min(th["width_of"][f"{i}/{s}"], hi), trace_enc)
                      for i, s in th["keys"]) + _trace_head_bytes(th) if th else 0)
    pics_full = sum(p["bytes"] for p in other_pics + heat)
    full_mb = (code + _size(skeleton) + NOTES_RESERVE + tables_full + points_full + trace_full + pics_full) / 2**20
    how = (f"to see all of it: --max-mb {math.ceil(full_mb)} (the page with nothing reduced), or a few layers "
           f"with --layers")
    # 1. the points, against every section's need
    caps = _share_out(room, {"tables": tables_full, "points": points_full, "trace": trace_full,
                             "pictures": pics_full})
    pts, idx_of = None, {}
    if P and not sets:
        pts = {**{k: v for k, v in P["head"].items() if k != "all_layers"}, "layers": P["layers"], "points": {},
               "decimation": None, "shown": None}
    elif P:
        M, step, chosen = _plan_points(sets, max(caps["points"] - head_bytes, 0), max_points)
        if M == 0:
            notes.append(f"projections: not shown: not even one point per layer fits the page's size limit; {how}")
        else:
            encoded = {}
            for ps in chosen:
                encoded[ps["key"]], idx_of[ps["key"]] = _encode_set(ps, min(ps["N"], M))
            all_layers = sorted({ps["layer"] for ps in sets})
            shown_layers = sorted({ps["layer"] for ps in chosen})
            thinned = [ps for ps in chosen if M < ps["N"]]
            text = []
            if step > 1:
                text.append(f"every {_nth(step)} layer shown ({len(shown_layers)} of {len(all_layers)}: "
                            f"{_span(shown_layers)}) to keep the page within --max-mb {max_mb:g}")
            if thinned:
                n_all = sum(ps["N"] for ps in chosen)
                n_shown = sum(min(ps["N"], M) for ps in chosen)
                why = (f"--max-points {max_points}" if M == max_points else f"to keep the page within --max-mb {max_mb:g}")
                text.append(f"{len(thinned)} of {len(chosen)} (layer, site) point sets thinned to {M} evenly spaced "
                            f"neurons each (of up to {max(ps['N'] for ps in chosen)}; {n_shown:,} of {n_all:,} "
                            f"neurons shown), {why}")
            dec = None
            if text:
                dec = "Decimated: " + "; ".join(text) + f"; {how}" + (
                    "" if M == max_points else f" (one layer needs ~{_one_layer_mb(sets):.1f} MB)") + "."
                notes.append("projections: " + dec[len("Decimated: "):])
            pts = {**{k: v for k, v in P["head"].items() if k != "all_layers"}, "layers": shown_layers,
                   "points": encoded, "decimation": dec,
                   "shown": {"max_points": M, "layer_step": step, "layers_in_file": P["head"]["all_layers"]}}
    room -= _size(pts)
    # 2. pictures and the trace, against what is left (holding back the tables' share)
    trace_need = (sum(_trace_key_bytes(th["T"], len(idx_of[k]) if idx_of[k] is not None else th["width_of"][k],
                                       trace_enc) for k in (f"{i}/{s}" for i, s in th["keys"]) if k in idx_of)
                  + _trace_head_bytes(th) if th and pts else 0)
    caps = _share_out(room, {"tables": tables_full, "trace": trace_need, "pictures": pics_full})
    kept_other, dropped, used = _pictures(other_pics, caps["pictures"])
    for p in dropped:
        notes.append(f"{p['where']}/{p['name']}: picture not embedded ({p['bytes'] / 2**20:.1f} MB; page size "
                     f"limit); {how}")
    heat_items = []
    if heat:
        step = _heatmap_step(heat, caps["pictures"] - used)
        if step == 0:
            notes.append(f"heatmaps: none of {len(heat)} pictures embedded (page size limit); {how}")
        else:
            heat_items = heat[::step]
            if step > 1:
                notes.append(f"heatmaps: {len(heat_items)} of {len(heat)} pictures embedded (every {_nth(step)}, "
                             f"page size limit); {how}")
    heatmaps = [{"key": it["key"], "name": it["name"], "layer": it["layer"], "site": it["site"],
                 "src": _png_uri(it["path"])} for it in heat_items] or None
    if sw is not None and any(p["where"] == "sweep" for p in kept_other):
        sw = _public_sweep(g["sweep"], png=True)
    pngs = [{"name": p["name"], "src": _png_uri(p["path"])} for p in kept_other if p["where"] == "skips"]
    room -= _size(heatmaps) + _size(pngs) + (len(sw["png"]) if sw and sw["png"] else 0)
    tr = None
    if th and pts:
        tr = _trace_section(th, idx_of, room - min(tables_full, caps["tables"]), notes, trace_encoding, how)
        room -= _size(tr)
    # 3. the tables: the rest (skip tables keep their best rows; then the sweep's markdown, then its rows)
    if tables_size() > room and sk:
        r = max((len(t["rows"]) for t in sk["tables"]), default=0)
        while r > 0 and tables_size() > room:
            r //= 2
            for t in sk["tables"]:
                t["rows"] = t["rows"][:r]
    _table_notes(sk, notes)
    if sw is not None and tables_size() > room and sw.get("markdown"):
        sw = {**sw, "markdown": None}
        notes.append(f"sweep/results.md: not embedded (page size limit); {how}")
    if sw is not None and tables_size() > room and sw.get("rows"):
        notes.append(f"sweep: its {len(sw['rows'])} cells not embedded (page size limit); {how}")
        sw = {**sw, "rows": []}
    if sk is not None:
        sk["pngs"] = pngs
    return {**skeleton, "notes": notes, "projections": pts, "trace": tr, "heatmaps": heatmaps, "summary": summary,
            "eval": ev, "sweep": sw, "skips": sk}


def _trace_head_bytes(th) -> int:
    """Bytes of the trace section without its activations (tokens, pieces, ids, metadata)."""
    m = th["meta"]
    return _size([th["tokens"], m.get("raw_tokens"), th["input_ids"], _jsonable(
        {k: m.get(k) for k in ("model", "prompt", "sample", "seed", "temperature", "max_new_tokens", "alignment",
                               "created")})]) + 400


def _one_layer_mb(sets) -> float:
    per = {}
    for ps in sets:
        per[ps["layer"]] = per.get(ps["layer"], 0) + _set_bytes(ps, ps["N"])
    return max(per.values()) / 2**20


def _public_sweep(sw, png: bool = False):
    """The sweep section as the page holds it (the tradeoff picture embedded only when `png`)."""
    if sw is None:
        return None
    out = {k: v for k, v in sw.items() if k != "png_path"}
    out["png"] = _png_uri(sw["png_path"]) if png and sw.get("png_path") else None
    return out


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


def _shell(title: str, payload: str = "") -> str:
    css = (ASSETS / "view.css").read_text()
    js = (ASSETS / "view.js").read_text()
    title = _html.escape(f"neuroproj-prune report: {title}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{title}</title>\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<style>\n{css}\n</style>\n"
            f"<script type=\"text/javascript\">{_plotly_js()}</script>\n</head>\n<body>\n"
            f"<div id=\"app\"><p id=\"loading\">loading report…</p></div>\n"
            f"<script type=\"application/json\" id=\"{DATA_ID}\">{payload}</script>\n"
            f"<script type=\"text/javascript\">\n{js}\n</script>\n</body>\n</html>\n")


def render(data: dict) -> str:
    """The HTML page for `build_data`'s dict."""
    return _shell(str(data.get("title", ""))[:200], _dumps(data))


@dataclass
class ViewConfig(Config):
    """Every setting of `view` (CLI flags, the recipe's `report` section, keywords of `view()`)."""

    what = "view"

    model: str | None = opt("auto", "model for the energy E[h^2]*||w_out||^2: auto (the model the statistics name, "
                            "when it loads locally), none (E[h^2] only) or a model", kind=str)
    max_points: int = opt(20000, "neurons per layer and site beyond which an evenly spaced subset is drawn", ge=1)
    max_mb: float = opt(DEFAULT_MAX_MB, "size limit of the page in MiB: points, trace, pictures and tables are "
                        "thinned or left out to fit, and the page says what and how to see all", gt=0.0)
    layers: str | None = opt(None, "layers to show, e.g. 0-3,31 (default all): fewer layers leave room for every "
                             "neuron", kind=str)
    trace: str | None = opt(None, "trace file (default RUN_DIR/trace.safetensors)", kind=str)
    trace_encoding: str = opt("auto", "auto (float16, or int8 with a per-token scale when over the limit), f2 or i1",
                              ("auto", "f2", "i1"))


def view(run_dir, out="report.html", config: ViewConfig | None = None, **settings) -> Path:
    """Write the self-contained report page for a run directory; returns its path. The page is at most
    `max_mb` MiB (default 20) whatever the run's size: sections are thinned or left out to fit, and the page
    lists every such reduction and how to see everything (a larger `max_mb`, or fewer `layers`).

    `model`: where ‖w_out‖² comes from for the activation energy — a LoadedModel or spec, "auto" (the model
    the statistics name, when it loads locally, is at most 2 GB of weights and still matches) or None (E[h²]
    only). `max_points`: neurons per (layer, site) beyond which the scatter shows an evenly spaced subset.
    `trace_encoding`: auto (float16, or int8 with a per-token scale when over the limit), f2 or i1 (forced).
    `layers`: the layers to show (a spec like "0-3,31"; default all the projections hold). `config` (or the
    `ViewConfig` fields as keywords) says how."""
    given = settings.get("model", "auto")
    loaded = settings.pop("model") if not isinstance(given, (str, type(None))) else None   # a LoadedModel
    if given is None:
        settings["model"] = "none"
    cfg = config.replace(**settings) if config is not None else ViewConfig.make(**settings)
    max_mb = cfg.max_mb
    model = loaded if loaded is not None else None if str(cfg.model).lower() in ("none", "") else cfg.model
    data = build_data(run_dir, model=model, max_points=cfg.max_points, max_mb=max_mb, trace_file=cfg.trace,
                      trace_encoding=cfg.trace_encoding, layers=cfg.layers)
    page = render(data)
    size = len(page.encode("utf-8"))
    if size > int(max_mb * 2**20):   # build_data plans for this; a miss would be a bug, not the user's problem
        raise NeuroprojError(f"internal error: the page is {size / 2**20:.2f} MB, over --max-mb {max_mb:g}")
    return write_text(out, page)
