"""`neuroproj-prune run RECIPE.yaml`: a whole run from one YAML recipe, re-running only what changed.

A recipe names the model, the data and each stage's settings (see `DEFAULTS` for every key and its
default; `recipes/*.yaml` for examples). The run directory holds one file per stage (the layout the viewer
reads); `run_state.json` records, per stage, a hash of its settings and of the stages it reads. A stage
runs when its outputs are missing or its hash changed; otherwise it is skipped. The whole recipe is
validated (unknown key, wrong type, missing file) before any model is loaded.

Stages and outputs: stats → stats.safetensors; projection → projections.safetensors; clustering →
clusters.json; heatmaps → heatmaps/; prune → pruned/ (+ plan.json); recover (off by default) → recovered/,
distilled from the recipe's dense model; eval → eval.json (of recovered/ when recover runs, else of pruned/) and
eval_dense.json;
sweep → sweep/; skips → skips/; trace → trace.safetensors; export → export/ (model.gguf, nemotron-nas/, hf/) of
the model eval evaluates;
report → report.html.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path

import yaml

from .analysis import cluster, heatmaps, project, run_skips, trace
from .config import ConfigError
from .errors import NeuroprojError
from .evaluate import check_limit, default_eval_data, evaluate
from .evaluate.tasks import GROUP, TASKS, read_manifest, resolve
from .export import EXPORTERS, export
from .io import check_writable, write_json, write_text
from .model import LoadedModel, load_model
from .prune import PruneConfig, prune
from .recover import RecoverConfig, recover
from .report import view
from .stats import collect, load_stats, parse_layers, parse_sites
from .sweep import sweep

CALIBRATION_KEYS = ("samples", "seqlen", "seed")

# Every key a recipe may hold, with its default. Types are checked against the default's type
# (None: anything; a list default accepts a list or a comma string).
DEFAULTS: dict = {
    "model": None,
    "dtype": "auto",
    "device": "auto",
    "output_dir": None,
    "calibration": {"data": None, "samples": 128, "seqlen": 512, "seed": 0},
    "stats": {"enabled": True, "samples": None, "sites": ["mlp.neurons"], "layers": None, "cross_layer_window": 0},
    "projection": {"enabled": True, "mode": "exact", "dims": 3, "sites": None, "norm_order": 2.0},
    "clustering": {"enabled": True, "algo": "kmeans", "keep_fraction": 0.7, "eps": None, "min_samples": None},
    "heatmaps": {"enabled": True, "layers": "0,-1"},
    # every PruneConfig field (samples, seqlen and seed come from the calibration section)
    "prune": {"enabled": True, **PruneConfig.recipe_defaults(exclude=CALIBRATION_KEYS)},
    # every RecoverConfig field but the teacher (the recipe's model); data: the calibration text when None
    "recover": {"enabled": False, "data": None, **RecoverConfig.recipe_defaults(exclude=("teacher",))},
    "eval": {"enabled": True, "data": None, "seqlen": 1024, "max_windows": None, "tasks": [], "limit": None,
             "dense": True},
    # tasks: zero-shot tasks every sweep cell is also evaluated on (zeroshot = all eight), limit documents each
    "sweep": {"enabled": False, "sparsities": [0.1, 0.2, 0.3, 0.4, 0.5], "select": ["wanda-sp"], "fold": ["lstsq"],
              "calibration": ["sequential"], "max_windows": None, "tasks": [], "limit": None},
    "skips": {"enabled": False, "min_r2": 0.95, "top_k": 4, "apply": False},
    "trace": {"enabled": False, "prompt": "The capital of France is", "max_new_tokens": 16},
    "export": {"enabled": False, "to": ["gguf"], "type": "f32"},
    "report": {"enabled": True},
}
FILES = {"data": ("calibration", "data"), "eval": ("eval", "data")}


def prune_config(r: dict) -> PruneConfig:
    """The recipe's prune settings as one validated config."""
    p = {k: v for k, v in r["prune"].items() if k != "enabled"}
    try:
        return PruneConfig.make(**p, **{k: r["calibration"][k] for k in CALIBRATION_KEYS})
    except ConfigError as e:
        section = "calibration" if e.field in CALIBRATION_KEYS else "prune"
        raise NeuroprojError(f"recipe key '{section}.{e.field}': {e}") from None


def recover_config(r: dict) -> RecoverConfig:
    """The recipe's recover settings as one validated config (the teacher is the recipe's model)."""
    try:
        return RecoverConfig.make(**{k: v for k, v in r["recover"].items() if k not in ("enabled", "data")})
    except ConfigError as e:
        raise NeuroprojError(f"recipe key 'recover.{e.field}': {e}") from None


# ------------------------------------------------------------------------------------------ recipes
def _set(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    known = DEFAULTS
    for k in keys[:-1]:
        known = known.get(k) if isinstance(known, dict) else None
        if k not in d and isinstance(known, dict):
            d[k] = {}   # a section the recipe leaves at its defaults
        if not isinstance(d.get(k), dict):
            raise NeuroprojError(f"--set {dotted}: {k!r} is not a section of the recipe")
        d = d[k]
    d[keys[-1]] = value


def load_recipe(path, overrides=()) -> dict:
    """Read, override (`key.sub=value`, value parsed as YAML), fill defaults and validate a recipe."""
    path = Path(path)
    if not path.is_file():
        raise NeuroprojError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise NeuroprojError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise NeuroprojError(f"recipe {path} must be a mapping of keys")
    for o in overrides:
        if "=" not in o:
            raise NeuroprojError(f"--set {o!r}: use key=value, e.g. prune.sparsity=0.2")
        k, v = o.split("=", 1)
        _set(raw, k.strip(), yaml.safe_load(v))
    recipe = _merge(copy.deepcopy(DEFAULTS), raw, "")
    if "keep" in (raw.get("prune") or {}) and "sparsity" not in raw["prune"]:
        recipe["prune"]["sparsity"] = None  # keep K replaces the default sparsity
    validate(recipe, path)
    return recipe


def _merge(base: dict, over: dict, prefix: str) -> dict:
    for k, v in over.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise NeuroprojError(f"recipe key {name!r} is unknown; known keys here: {', '.join(base)}")
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise NeuroprojError(f"recipe key {name!r} must be a mapping")
            _merge(base[k], v, name + ".")
        else:
            base[k] = _check_type(name, base[k], v)
    return base


def _check_type(name, default, v):
    if v is None or default is None:
        return v
    if isinstance(default, str) and isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # a layer spec such as `0` read by YAML as a number
    if isinstance(default, bool):
        ok = isinstance(v, bool)
    elif isinstance(default, (int, float)):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif isinstance(default, list):
        if isinstance(v, str):
            v = [x.strip() for x in v.split(",") if x.strip()]
        ok = isinstance(v, list)
    else:
        ok = isinstance(v, type(default))
    if not ok:
        raise NeuroprojError(f"recipe key {name!r} must be a {type(default).__name__}, got {v!r}")
    return v


def validate(r: dict, path) -> None:
    for key in ("model", "output_dir"):
        if not r[key]:
            raise NeuroprojError(f"recipe key {key!r} is required")
    if not r["calibration"]["data"]:
        raise NeuroprojError("recipe key 'calibration.data' is required")
    for section, key in (("calibration", "data"), ("eval", "data"), ("recover", "data")):
        v = r[section][key]
        looks_like_file = str(v).endswith((".txt", ".jsonl", ".json", ".raw")) or str(v).startswith((".", "/", "~"))
        if v and looks_like_file and not Path(v).expanduser().is_file():  # else: a `datasets` name
            raise NeuroprojError(f"recipe key '{section}.{key}': file {v} not found")
    prune_config(r)
    recover_config(r)
    if r["recover"]["enabled"] and not r["prune"]["enabled"]:
        raise NeuroprojError("recipe stage 'recover' trains the pruned model: enable prune too")
    if r["skips"]["enabled"] and not r["stats"]["cross_layer_window"]:
        raise NeuroprojError("recipe stage 'skips' needs cross-layer statistics: set stats.cross_layer_window >= 1")
    for fmt in _as_list(r["export"]["to"]):
        if fmt not in EXPORTERS:
            raise NeuroprojError(f"recipe key 'export.to': unknown format {fmt!r} ({', '.join(EXPORTERS)})")
    for s in r["sweep"]["sparsities"]:
        try:
            prune_config(r).replace(sparsity=s, keep=None)
        except ConfigError as e:
            raise NeuroprojError(f"recipe key 'sweep.sparsities': {e}") from None
    for section in ("eval", "sweep"):
        try:
            check_limit(r[section]["limit"])
        except NeuroprojError as e:
            raise NeuroprojError(f"recipe key '{section}.limit': {e}") from None
    try:
        sweep_tasks = resolve(r["sweep"]["tasks"])
    except NeuroprojError as e:
        raise NeuroprojError(f"recipe key 'sweep.tasks': {e}") from None
    if sweep_tasks or any(t == GROUP or t in TASKS for t in r["eval"]["tasks"]):
        read_manifest(check=False)  # the zero-shot data is fetched (else one line saying how), before any work

    try:
        parse_sites(r["stats"]["sites"])
    except NeuroprojError as e:
        raise NeuroprojError(f"recipe key 'stats.sites': {e}") from None
    if r["projection"]["mode"] not in ("exact", "minibatch"):
        raise NeuroprojError("recipe key 'projection.mode' must be exact or minibatch")
    if r["clustering"]["algo"] not in ("dbscan", "kmeans"):
        raise NeuroprojError("recipe key 'clustering.algo' must be dbscan or kmeans")


# -------------------------------------------------------------------------------------------- state
def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    def __init__(self, out: Path):
        self.path = out / "run_state.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def fresh(self, stage, h, outputs) -> bool:
        s = self.data.get(stage)
        return bool(s) and s["hash"] == h and all(Path(o).exists() for o in outputs)

    def done(self, stage, h, outputs, seconds):
        self.data[stage] = {"hash": h, "outputs": [str(o) for o in outputs], "seconds": round(seconds, 1),
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.ran.append(stage)
        write_json(self.path, self.data, indent=1)


# ---------------------------------------------------------------------------------------------- run
def run(recipe, overrides=(), *, progress: bool = True, log=print) -> dict:
    """Run a recipe (path or dict already validated) end to end; returns {"ran": [...], "skipped": [...],
    "output_dir": ...}. Cost: the sum of the stages that are not up to date."""
    r = load_recipe(recipe, overrides) if not isinstance(recipe, dict) else recipe
    out = Path(r["output_dir"])
    check_writable(out)
    created = not out.exists()
    try:
        return _run(r, out, progress, log)
    except BaseException:
        if created and not (out / "run_state.json").exists():  # nothing finished: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run(r: dict, out: Path, progress, log) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", yaml.safe_dump(r, sort_keys=False))
    st = _State(out)
    lm_cache = {}

    def lm():
        if "lm" not in lm_cache:
            lm_cache["lm"] = load_model(r["model"], dtype=r["dtype"], device=r["device"])
        return lm_cache["lm"]

    def stage(name, enabled, h, outputs, fn):
        if not enabled:
            return
        if st.fresh(name, h, outputs):
            st.skipped.append(name)
            log(f"[run] {name}: up to date")
            return
        log(f"[run] {name} ...")
        t0 = time.time()
        fn()
        st.done(name, h, outputs, time.time() - t0)
        log(f"[run] {name}: done in {time.time() - t0:.1f} s")

    model_key = (r["model"], r["dtype"])
    cal = r["calibration"]
    S = r["stats"]
    stats_f = out / "stats.safetensors"
    h_stats = _hash("stats", model_key, cal, S)

    def do_stats():
        collect(lm(), cal["data"], samples=S["samples"] or cal["samples"], seqlen=cal["seqlen"], seed=cal["seed"],
                sites=S["sites"], layers=S["layers"], cross_layer_window=S["cross_layer_window"], out=stats_f,
                progress=progress)

    stage("stats", S["enabled"], h_stats, [stats_f], do_stats)

    P = r["projection"]
    proj_f = out / "projections.safetensors"
    h_proj = _hash("projection", h_stats, P)

    def do_projection():
        project(stats_f, mode="exact", dims=P["dims"], site=P["sites"] or S["sites"], norm_order=P["norm_order"],
                out=proj_f, progress=progress)

    stage("projection", S["enabled"] and P["enabled"], h_proj, [proj_f], do_projection)

    C = r["clustering"]
    clusters_f = out / "clusters.json"
    h_clu = _hash("clustering", h_proj, C)

    def do_clustering():
        kw = {"keep_fraction": C["keep_fraction"]} if C["algo"] == "kmeans" else {"eps": C["eps"]}
        cluster(proj_f, algo=C["algo"], min_samples=C["min_samples"], stats=stats_f, model=lm(), out=clusters_f, **kw)

    stage("clustering", S["enabled"] and P["enabled"] and C["enabled"], h_clu, [clusters_f], do_clustering)

    Hm = r["heatmaps"]
    heat_d = out / "heatmaps"
    h_heat = _hash("heatmaps", h_stats, h_proj, Hm)

    def do_heatmaps():
        s = load_stats(stats_f)
        layers = [i for i in parse_layers(str(Hm["layers"]), s.meta["num_layers"]) if i in s.layers]
        heatmaps(s, projections=proj_f if proj_f.exists() else None, layers=layers, out=heat_d, progress=progress,
                 overwrite=True)

    stage("heatmaps", S["enabled"] and Hm["enabled"], h_heat, [heat_d], do_heatmaps)

    Pr = r["prune"]
    pruned_d = out / "pruned"
    Pr_key = {k: v for k, v in Pr.items() if k != "offload"}  # where layers live does not change the checkpoint
    h_prune = _hash("prune", model_key, cal, Pr_key)

    def do_prune():

        lm_p = _fresh_copy(lm())
        prune(lm_p, cal["data"], prune_config(r), out=pruned_d, overwrite=True, progress=progress)
        shutil.copy(pruned_d / "plan.json", out / "plan.json")

    stage("prune", Pr["enabled"], h_prune, [pruned_d, out / "plan.json"], do_prune)

    # recover: distil the dense model into the pruned one; eval and export then read its output instead
    R = r["recover"]
    recovered_d = out / "recovered"
    rec_data = R["data"] or cal["data"]
    h_recover = _hash("recover", h_prune, model_key, rec_data, R)

    def do_recover():
        recover(pruned_d, rec_data, recovered_d, recover_config(r), teacher_model=lm(), overwrite=True,
                device=r["device"], progress=progress, log=log)

    do_rec = R["enabled"] and Pr["enabled"]
    stage("recover", do_rec, h_recover, [recovered_d], do_recover)
    final_d, h_final = (recovered_d, h_recover) if do_rec else (pruned_d, h_prune)

    E = r["eval"]
    eval_data = E["data"]
    if E["enabled"] and not eval_data:
        eval_data = default_eval_data()
    ekw = dict(data=eval_data, seqlen=E["seqlen"], max_windows=E["max_windows"], tasks=E["tasks"] or None,
               limit=E["limit"], progress=progress)

    def do_eval_dense():
        evaluate(lm(), json_out=out / "eval_dense.json", **ekw)

    def do_eval():
        evaluate(str(final_d), json_out=out / "eval.json", dtype=r["dtype"], device=r["device"], **ekw)

    stage("eval_dense", E["enabled"] and E["dense"], _hash("eval", model_key, E), [out / "eval_dense.json"], do_eval_dense)
    stage("eval", E["enabled"] and Pr["enabled"], _hash("eval", h_final, E), [out / "eval.json"], do_eval)

    Sw = r["sweep"]

    def do_sweep():
        sweep(lm(), cal["data"], eval_data, sparsities=Sw["sparsities"], select=Sw["select"], fold=Sw["fold"],
              calibration=Sw["calibration"], eval_seqlen=E["seqlen"], max_windows=Sw["max_windows"] or E["max_windows"],
              tasks=Sw["tasks"], limit=Sw["limit"], config=prune_config(r), out=out / "sweep", progress=progress)

    stage("sweep", Sw["enabled"], _hash("sweep", model_key, cal, Pr_key, Sw, E), [out / "sweep" / "results.csv"],
          do_sweep)

    Sk = r["skips"]

    def do_skips():
        run_skips(stats_f, lm(), report=out / "skips", min_r2=Sk["min_r2"], top_k=Sk["top_k"],
                  apply_out=(out / "skipped") if Sk["apply"] else None, overwrite=True, progress=progress)

    skip_outputs = [out / "skips"] + ([out / "skipped"] if Sk["apply"] else [])
    stage("skips", Sk["enabled"] and S["enabled"], _hash("skips", h_stats, Sk), skip_outputs, do_skips)

    T = r["trace"]

    def do_trace():
        trace(lm(), projections=proj_f, prompt=T["prompt"], max_new_tokens=T["max_new_tokens"],
              out=out / "trace.safetensors")

    stage("trace", T["enabled"] and proj_f.exists(), _hash("trace", h_proj, T), [out / "trace.safetensors"], do_trace)

    # export: the pruned checkpoint in other runtimes' formats (export/model.gguf, export/nemotron-nas, ...)
    X = r["export"]
    x_outs = {fmt: out / "export" / ("model.gguf" if fmt == "gguf" else fmt) for fmt in _as_list(X["to"])}

    def do_export():
        for fmt, path in x_outs.items():
            export(str(final_d), fmt, path, type=X["type"], overwrite=True)

    stage("export", X["enabled"] and Pr["enabled"], _hash("export", h_final, X), list(x_outs.values()), do_export)

    def do_report():
        view(out, out=out / "report.html")

    if r["report"]["enabled"]:  # cheap, and it reads everything: always rendered
        log("[run] report ...")
        do_report()
        st.ran.append("report")
    return {"output_dir": str(out), "ran": st.ran, "skipped": st.skipped}


def _as_list(v) -> list:
    return [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)


def _fresh_copy(lm):
    """A pruning copy of the loaded model, so later stages still see the dense one."""
    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, lm.fingerprint)
