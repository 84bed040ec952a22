"""`neuroproj-prune run RECIPE`: a whole run from one YAML recipe, re-running only what changed.

A recipe names the model, the data and each stage's settings. Every stage's section is generated from the
stage's config (`SECTIONS`: the same names, defaults and ranges as its CLI flags and API keywords), plus a few
keys that belong to the recipe (`enabled`, and where a stage reads files: `eval.data`, `eval.dense`,
`recover.data`, `export.to`); `calibration` (data, samples, seqlen, seed) is shared by `prune` and `stats`.
`DEFAULTS` lists every key and its default. A recipe is a path or the name of a shipped one
(`neuroproj_prune/recipes/NAME.yaml`: `neuroproj-prune run smollm2-135m`).

The whole recipe is validated before the first stage runs: unknown keys, types, every section's config
(ranges and conflicting settings), files, the eval tasks, the export formats and types, the heatmap layers
against the model's layer count (read from its config, no weights). The run directory holds one file per stage
(the layout the viewer reads); `run_state.json` records, per stage, a hash of its settings and of the stages it
reads. A stage runs when its outputs are missing or its hash changed; otherwise it is skipped.

Stages and outputs: stats → stats.safetensors; projection → projections.safetensors; clustering →
clusters.json; heatmaps → heatmaps/; prune → pruned/ (+ plan.json); recover (off by default) → recovered/,
distilled from the recipe's dense model; eval → eval.json (of recovered/ when recover runs, else of pruned/) and
eval_dense.json; sweep → sweep/; skips → skips/; trace → trace.safetensors; export → export/ (model.gguf,
nemotron-nas/, hf/) of the model eval evaluates; report → report.html.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from importlib import resources
from pathlib import Path

import yaml

from .analysis import cluster, heatmaps, project, run_skips, trace
from .analysis.clustering import ClusterConfig
from .analysis.heatmap import HeatmapConfig
from .analysis.projection import ProjectConfig
from .analysis.skips import SkipsConfig
from .analysis.trace import TraceConfig
from .config import ConfigError
from .errors import NeuroprojError
from .evaluate import default_eval_data, evaluate, load_tasks
from .evaluate.api import EvalConfig, read_eval
from .export import EXPORTERS, ExportConfig, export
from .export.common import HF_TYPES
from .export.gguf import GGUF_TYPES
from .io import check_output, removed_if_left_empty, write_json, write_text
from .model import LoadedModel, adapter_for, load_model, model_config, model_source, write_card
from .prune import PruneConfig, prune
from .recover import RecoverConfig, recover
from .report.page import ViewConfig, view
from .stats import check_sites, collect, load_stats, parse_layers
from .stats.data import data_path
from .stats.collect import CollectConfig
from .sweep import SweepConfig, sweep

CALIBRATION_KEYS = ("samples", "seqlen", "seed")
# section: (its config, the config fields the recipe leaves out, the recipe's own keys and their defaults)
SECTIONS = {
    "stats": (CollectConfig, CALIBRATION_KEYS, {"enabled": True, "samples": None}),   # samples: the calibration's
    "projection": (ProjectConfig, (), {"enabled": True}),
    "clustering": (ClusterConfig, (), {"enabled": True}),
    "heatmaps": (HeatmapConfig, (), {"enabled": True}),
    "prune": (PruneConfig, CALIBRATION_KEYS, {"enabled": True}),
    "recover": (RecoverConfig, ("teacher",), {"enabled": False, "data": None}),     # teacher: the recipe's model
    "eval": (EvalConfig, (), {"enabled": True, "data": None, "dense": True}),
    "sweep": (SweepConfig, (), {"enabled": False}),
    "skips": (SkipsConfig, (), {"enabled": False}),
    "trace": (TraceConfig, (), {"enabled": False}),
    "export": (ExportConfig, (), {"enabled": False, "to": ["gguf"]}),
    "report": (ViewConfig, (), {"enabled": True}),
}
# Every key a recipe may hold, with its default. Types are checked against the default's type
# (None: anything; a list default accepts a list or a comma string).
DEFAULTS: dict = {
    "model": None,
    "dtype": "auto",
    "device": "auto",
    "output_dir": None,
    "calibration": {"data": None, "samples": 128, "seqlen": 512, "seed": 0},
    **{name: {**own, **cls.recipe_defaults(exclude=(*left_out, *own))} for name, (cls, left_out, own) in SECTIONS.items()},
}


def section_config(r: dict, name: str, **extra):
    """The recipe's section `name` as its stage's validated config (`extra`: settings from elsewhere)."""
    cls, left_out, own = SECTIONS[name]
    given = {k: v for k, v in r[name].items() if k not in own}
    try:
        return cls.make(**given, **extra)
    except ConfigError as e:
        where = "calibration" if e.field in CALIBRATION_KEYS and e.field in extra else name
        raise NeuroprojError(f"recipe key '{where}.{e.field}': {e}") from None


def prune_config(r: dict) -> PruneConfig:
    """The recipe's prune settings as one validated config."""
    return section_config(r, "prune", **{k: r["calibration"][k] for k in CALIBRATION_KEYS})


def recover_config(r: dict) -> RecoverConfig:
    """The recipe's recover settings as one validated config (the teacher is the recipe's model)."""
    return section_config(r, "recover")


def collect_config(r: dict) -> CollectConfig:
    S, cal = r["stats"], r["calibration"]
    return section_config(r, "stats", samples=S["samples"] or cal["samples"], seqlen=cal["seqlen"], seed=cal["seed"])


# ------------------------------------------------------------------------------------------ recipes
def shipped_recipes() -> dict[str, Path]:
    """The recipes the package ships (package data), by name."""
    folder = resources.files("neuroproj_prune") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def recipe_path(recipe) -> Path:
    """A recipe given as a path, or by the name of a shipped one (`smollm2-135m`)."""
    path = Path(recipe)
    if path.is_file() or path.suffix in (".yaml", ".yml") or "/" in str(recipe):
        return path
    shipped = shipped_recipes()
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    raise NeuroprojError(f"recipe {recipe!r} is neither a file nor a shipped recipe: give a path, or one of "
                         f"{', '.join(shipped)}")


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
    path = recipe_path(path)
    if path.is_dir():
        raise NeuroprojError(f"recipe {path} is a directory: give a YAML file (or a shipped recipe's name)")
    if not path.is_file():
        raise NeuroprojError(f"recipe {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise NeuroprojError(f"recipe {path} is not UTF-8 text (a binary file?): give a YAML recipe") from None
    except yaml.YAMLError as e:
        raise NeuroprojError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise NeuroprojError(f"recipe {path} must be a mapping of keys")
    for o in overrides:
        if "=" not in o:
            raise NeuroprojError(f"--set {o!r}: use key=value, e.g. prune.sparsity=0.2")
        k, v = o.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise NeuroprojError(f"--set {o!r}: the value is not YAML ({str(e).splitlines()[0]}); quote strings") from None
        _set(raw, k.strip(), value)
    recipe = _merge(copy.deepcopy(DEFAULTS), raw, "")
    if "keep" in (raw.get("prune") or {}) and "sparsity" not in raw["prune"]:
        recipe["prune"]["sparsity"] = None  # keep K replaces the default sparsity
    if "k" in (raw.get("clustering") or {}) and "keep_fraction" not in raw["clustering"]:
        recipe["clustering"]["keep_fraction"] = None
    validate(recipe, path)
    return recipe


def _merge(base: dict, over: dict, prefix: str) -> dict:
    for k, v in over.items():
        name = f"{prefix}{k}"
        if not isinstance(k, str) or k not in base:
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
    """The whole recipe, every stage, before any model loads (see the module docstring)."""
    for key in ("model", "output_dir"):
        if not r[key]:
            raise NeuroprojError(f"recipe key {key!r} is required")
    if not r["calibration"]["data"]:
        raise NeuroprojError("recipe key 'calibration.data' is required")
    for section, key in (("calibration", "data"), ("eval", "data"), ("recover", "data")):
        v = r[section][key]
        looks_like_file = str(v).endswith((".txt", ".jsonl", ".json", ".raw")) or str(v).startswith((".", "/", "~"))
        if v and looks_like_file and not data_path(v).is_file():  # else: a `datasets` name
            what = "is a directory: give a .txt or .jsonl file" if data_path(v).is_dir() else "not found"
            raise NeuroprojError(f"recipe key '{section}.{key}': file {v} {what}")
    pc = prune_config(r)
    cc = collect_config(r)
    configs = {name: section_config(r, name) for name in SECTIONS if name not in ("prune", "stats")}
    if r["recover"]["enabled"] and not r["prune"]["enabled"]:
        raise NeuroprojError("recipe stage 'recover' trains the pruned model: enable prune too")
    pj = configs["projection"]
    absent = [x for x in (pj.site or ()) if x not in cc.sites]
    if r["projection"]["enabled"] and pj.mode == "exact" and absent:
        raise NeuroprojError(f"recipe key 'projection.site': the statistics collect no site(s) {', '.join(absent)}: "
                             f"add them to stats.sites")
    if r["skips"]["enabled"] and not r["stats"]["cross_layer_window"]:
        raise NeuroprojError("recipe stage 'skips' needs cross-layer statistics: set stats.cross_layer_window >= 1")
    for s in configs["sweep"].sparsities:
        try:
            pc.replace(sparsity=s, keep=None, target_params=None, target_speedup=None, latency=None)
        except ConfigError as e:
            raise NeuroprojError(f"recipe key 'sweep.sparsities': {e}") from None
    if r["export"]["enabled"]:
        for fmt in _as_list(r["export"]["to"]):
            if fmt not in EXPORTERS:
                raise NeuroprojError(f"recipe key 'export.to': {EXPORTERS.unknown(fmt)}")
            types = GGUF_TYPES if fmt == "gguf" else HF_TYPES
            if configs["export"].type not in types:
                raise NeuroprojError(f"recipe key 'export.type': {configs['export'].type!r} is not a {fmt} type "
                                     f"({', '.join(types)})")
    if r["eval"]["enabled"] and configs["eval"].tasks:
        try:
            load_tasks(list(configs["eval"].tasks))   # names and data, before any model loads
        except NeuroprojError as e:
            raise NeuroprojError(f"recipe key 'eval.tasks': {e}") from None
    if r["sweep"]["enabled"] and configs["sweep"].tasks:
        load_tasks(list(configs["sweep"].tasks))
    # the model's config, checked against its weights' headers (model_config); a hub model that cannot be reached now
    # fails at its first stage, a local one is refused here
    source, _, _ = model_source(r["model"])
    try:
        config = model_config(r["model"])
    except NeuroprojError:
        if isinstance(source, Path):
            raise
        config = None
    if config is not None and r["stats"]["enabled"]:
        try:   # a site the family lacks (attn.heads where heads are unknown)
            check_sites(config, cc.sites)
        except NeuroprojError as e:
            raise NeuroprojError(f"recipe key 'stats.sites': {e}") from None
    if config is not None:
        _check_against_model(r, configs, pc, config)


def _check_against_model(r: dict, configs: dict, pc: PruneConfig, config) -> None:
    """The settings whose range depends on the model, from its config (no weights read), so that no stage runs on a
    recipe a later stage would refuse: layer specs within its layers, windows within its context, projection dims
    below the neurons of a layer, a trace that fits the context, `keep` within the width, `alloc_samples` within the
    calibration windows."""
    a = adapter_for(config)
    L, ctx, width = a.config_layers(config), a.context_length(config), a.config_width(config)
    S, on = r["stats"], {name: bool(r[name]["enabled"]) for name in SECTIONS}
    projected = on["stats"] and on["projection"]
    layer_specs = [("stats.layers", S["layers"], on["stats"]), ("projection.layers", configs["projection"].layers,
                   projected), ("heatmaps.layers", configs["heatmaps"].layers, on["stats"] and on["heatmaps"])]
    for key, spec, used in layer_specs:
        try:
            if used:
                parse_layers(spec, L)
        except NeuroprojError as e:
            raise NeuroprojError(f"recipe key '{key}': {e}") from None
    if ctx is not None:
        minibatch = projected and configs["projection"].mode == "minibatch"
        windows = [("calibration.seqlen", r["calibration"]["seqlen"], on["stats"] or on["prune"] or on["sweep"]),
                   ("eval.seqlen", configs["eval"].seqlen, on["eval"]),
                   ("sweep.eval_seqlen", configs["sweep"].eval_seqlen, on["sweep"]),
                   ("recover.seqlen", configs["recover"].seqlen, on["recover"]),
                   ("projection.seqlen", configs["projection"].seqlen, minibatch)]
        for key, v, used in windows:
            if used and v is not None and v > ctx:
                raise NeuroprojError(f"recipe key '{key}': {v} tokens exceed the model's context of {ctx}")
        if on["trace"] and configs["trace"].max_new_tokens >= ctx:
            raise NeuroprojError(f"recipe key 'trace.max_new_tokens': {configs['trace'].max_new_tokens} leaves no room "
                                 f"for the prompt in the model's context of {ctx} tokens")
    if projected:
        sites = list(configs["projection"].site or collect_config(r).sites)
        N = min(width if site == "mlp.neurons" else int(config.hidden_size) for site in sites)
        if configs["projection"].dims >= N:
            raise NeuroprojError(f"recipe key 'projection.dims': {configs['projection'].dims} dims for {N} neurons "
                                 f"(points), which span at most {N - 1}: give {N - 1} or less")
    if on["prune"] and pc.keep is not None and pc.keep > width:
        raise NeuroprojError(f"recipe key 'prune.keep': {pc.keep} exceeds the model's {width} MLP neurons per layer")
    if on["prune"] and pc.allocation != "uniform" and pc.alloc_samples is not None and pc.alloc_samples > pc.samples:
        raise NeuroprojError(f"recipe key 'prune.alloc_samples': {pc.alloc_samples} exceeds the calibration's "
                             f"{pc.samples} windows")


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
    """Run a recipe (path, shipped name, or dict already validated) end to end; returns {"ran": [...],
    "skipped": [...], "output_dir": ...}. Cost: the sum of the stages that are not up to date."""
    r = load_recipe(recipe, overrides) if not isinstance(recipe, dict) else recipe
    out = check_output(r["output_dir"], "dir", flag="output_dir")   # an existing run directory is resumed
    created = not out.exists()
    with removed_if_left_empty([out]):   # the parents made for it, once it is gone
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
    stage("stats", S["enabled"], h_stats, [stats_f],
          lambda: collect(lm(), cal["data"], collect_config(r), out=stats_f, progress=progress))

    P = r["projection"]
    proj_f = out / "projections.safetensors"
    h_proj = _hash("projection", h_stats, P)
    minibatch = {"model": lm, "data": cal["data"]} if P["mode"] == "minibatch" else {}
    stage("projection", S["enabled"] and P["enabled"], h_proj, [proj_f],
          lambda: project(stats_f, section_config(r, "projection"), out=proj_f, progress=progress,
                          **{k: (v() if callable(v) else v) for k, v in minibatch.items()}))

    C = r["clustering"]
    clusters_f = out / "clusters.json"
    h_clu = _hash("clustering", h_proj, C)
    stage("clustering", S["enabled"] and P["enabled"] and C["enabled"], h_clu, [clusters_f],
          lambda: cluster(proj_f, section_config(r, "clustering"), stats=stats_f, model=lm(), out=clusters_f))

    Hm = r["heatmaps"]
    heat_d = out / "heatmaps"
    h_heat = _hash("heatmaps", h_stats, h_proj, Hm)

    def do_heatmaps():
        s = load_stats(stats_f)
        layers = [i for i in parse_layers(str(Hm["layers"]), s.meta["num_layers"]) if i in s.layers]
        heatmaps(s, section_config(r, "heatmaps"), layers=",".join(map(str, layers)),
                 projections=proj_f if proj_f.exists() else None, out=heat_d, progress=progress, overwrite=True)

    stage("heatmaps", S["enabled"] and Hm["enabled"], h_heat, [heat_d], do_heatmaps)

    Pr = r["prune"]
    pruned_d = out / "pruned"
    Pr_key = {k: v for k, v in Pr.items() if k != "offload"}  # where layers live does not change the checkpoint
    h_prune = _hash("prune", model_key, cal, Pr_key)

    def do_prune():
        prune(_fresh_copy(lm()), cal["data"], prune_config(r), out=pruned_d, overwrite=True, progress=progress)
        shutil.copy(pruned_d / "plan.json", out / "plan.json")

    stage("prune", Pr["enabled"], h_prune, [pruned_d, out / "plan.json"], do_prune)

    # recover: distil the dense model into the pruned one; eval and export then read its output instead
    R = r["recover"]
    recovered_d = out / "recovered"
    rec_data = R["data"] or cal["data"]
    h_recover = _hash("recover", h_prune, model_key, rec_data, R)
    do_rec = R["enabled"] and Pr["enabled"]
    stage("recover", do_rec, h_recover, [recovered_d],
          lambda: recover(pruned_d, rec_data, recovered_d, recover_config(r), teacher_model=lm(), overwrite=True,
                          device=r["device"], progress=progress, log=log))
    final_d, h_final = (recovered_d, h_recover) if do_rec else (pruned_d, h_prune)

    E = r["eval"]
    eval_data = E["data"]
    if E["enabled"] and not eval_data:
        eval_data = default_eval_data()
    ecfg = section_config(r, "eval")
    stage("eval_dense", E["enabled"] and E["dense"], _hash("eval", model_key, E), [out / "eval_dense.json"],
          lambda: evaluate(lm(), ecfg, data=eval_data, json_out=out / "eval_dense.json", progress=progress))
    def do_eval():
        evaluate(str(final_d), ecfg, data=eval_data, json_out=out / "eval.json", dtype=r["dtype"], device=r["device"],
                 progress=progress)
        dense = out / "eval_dense.json"   # the checkpoint's card gains the numbers measured here
        write_card(final_d, evaluation=read_eval(out / "eval.json"),
                   dense_evaluation=read_eval(dense) if dense.is_file() else None)

    stage("eval", E["enabled"] and Pr["enabled"], _hash("eval", h_final, E), [out / "eval.json"], do_eval)

    Sw = r["sweep"]

    def do_sweep():
        scfg = section_config(r, "sweep")
        scfg = scfg.replace(eval_seqlen=scfg.eval_seqlen or ecfg.seqlen, max_windows=scfg.max_windows or ecfg.max_windows)
        sweep(lm(), cal["data"], eval_data or default_eval_data(), scfg, prune_config=prune_config(r),
              out=out / "sweep", progress=progress)

    stage("sweep", Sw["enabled"], _hash("sweep", model_key, cal, Pr_key, Sw, E), [out / "sweep" / "results.csv"],
          do_sweep)

    Sk = r["skips"]
    skip_outputs = [out / "skips"] + ([out / "skipped"] if Sk["apply"] else [])
    stage("skips", Sk["enabled"] and S["enabled"], _hash("skips", h_stats, Sk), skip_outputs,
          lambda: run_skips(stats_f, lm(), section_config(r, "skips"), report=out / "skips",
                            apply_out=(out / "skipped") if Sk["apply"] else None, overwrite=True, progress=progress))

    T = r["trace"]
    stage("trace", T["enabled"] and proj_f.exists(), _hash("trace", h_proj, T), [out / "trace.safetensors"],
          lambda: trace(lm(), proj_f, config=section_config(r, "trace"), out=out / "trace.safetensors"))

    # export: the pruned checkpoint in other runtimes' formats (export/model.gguf, export/nemotron-nas, ...)
    X = r["export"]
    x_outs = {fmt: out / "export" / ("model.gguf" if fmt == "gguf" else fmt) for fmt in _as_list(X["to"])}

    def do_export():
        for fmt, path in x_outs.items():
            export(str(final_d), fmt, path, section_config(r, "export"), overwrite=True)

    stage("export", X["enabled"] and Pr["enabled"], _hash("export", h_final, X), list(x_outs.values()), do_export)

    if r["report"]["enabled"]:  # cheap, and it reads everything: always rendered
        log("[run] report ...")
        view(out, out / "report.html", section_config(r, "report"))
        st.ran.append("report")
    return {"output_dir": str(out), "ran": st.ran, "skipped": st.skipped}


def _as_list(v) -> list:
    return [x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)


def _fresh_copy(lm):
    """A pruning copy of the loaded model, so later stages still see the dense one."""
    return LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, lm.fingerprint)
