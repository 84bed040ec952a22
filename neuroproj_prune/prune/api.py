"""The `prune` stage: calibration → allocation → the one per-layer loop (select → fold → slice) → checkpoint.

    cfg = PruneConfig.make(sparsity=0.3)                  # every setting of a run, validated once (config.py)
    calib = CALIBRATIONS[cfg.calibration](lm, cfg, ...)   # where each layer's moments come from (calibrate.py)
    widths = ALLOCATIONS[cfg.allocation](calib, cfg)      # how many neurons each layer keeps (allocate.py)
    plan = prune_layers(lm.model, calib, cfg, widths)     # the loop below
    save_pruned(...)                                      # model/checkpoint.py

`prune_layers` is the only place a model is pruned: `prune()` runs it, `plan()` runs it without folding (a plan
of dense statistics), and applying a written plan (`prune --plan`, `apply_plan`) runs it with the plan's kept
sets instead of a selection.
"""
from __future__ import annotations

import time
from copy import deepcopy

import torch

from ..analysis.clustering import load_clusters
from ..errors import NeuroprojError
from ..io import prepare_out_dir
from ..model import LoadedModel, api_call, command, num_params, save_dtype, save_pruned, source_dtype, update_config
from ..model.skip_modules import skip_source_remapper
from ..stats import distributed
from .allocate import ALLOCATIONS
from .calibrate import CALIBRATIONS, LayerWork, OneShot
from .config import PruneConfig
from .fold import RIDGE, FOLDS, fold_and_slice
from .layers import mean_loss
from .offload import LayerStream, open_model
from .budget import Shape, held_batch, resolve
from .heads import choose_heads, fold_heads
from .plan_file import Plan
from .select import select_layer
from .speed import read_latency, trunk_params


# ------------------------------------------------------------------------------------------------ the loop
def prune_layers(model, calib, cfg: PruneConfig, widths: dict[int, int] | None = None, *, plan: Plan | None = None,
                 apply: bool = True, drop=(), no_attn=()) -> Plan:
    """The one per-layer loop. For each site the calibration hands over — sequential calibration measures it on
    the hidden states the already-pruned layers produce — choose what stays (the MLP: `widths[i]` neurons by
    `cfg.select`, refined by the pass hooks; the attention: the heads of `cfg.head_sparsity`; or as `plan` says),
    then fold what goes into what stays and slice (unless `apply=False`). The layers in `drop` (or the plan's) are
    passed through and removed at the end; the attention sub-layers in `no_attn` (or the plan's) are removed before
    their layer is measured (the sequential pass), so the MLP behind them is pruned on what it will see. Returns the
    plan."""
    given = plan is not None
    plan = plan if given else Plan(meta={**plan_meta(cfg), **calib.meta}, drop=sorted(drop), no_attn=sorted(no_attn))
    a = calib.lm.adapter
    calib.drop, calib.no_attn = plan.drop, plan.no_attn
    calib.heads = bool(plan.heads) if given else cfg.head_sparsity > 0
    for work in calib.layers():
        i = work.layer
        if work.site == "attn":
            if not given:
                plan.heads[i] = choose_heads(model, a, work.moments, cfg)
            if apply and i in plan.heads:
                fold_heads(model, a, work, plan.heads[i], cfg)
            continue
        if not given:
            plan.layers[i] = work.refine(select_layer(model, work.moments, widths[i], cfg))
        if apply and i in plan.layers:
            fold_layer(model, work, plan.layers[i], cfg)
    if apply:
        for i in plan.no_attn:
            if a.has_attention(model, i):
                a.remove_attention(model, i)
    if apply and plan.drop:
        a.drop_layers(model, plan.drop)
    if not given and "fingerprint" in calib.meta:   # a disk stream knows it only after the pass
        plan.meta["fingerprint"] = calib.meta["fingerprint"]
    return plan


def fold_layer(model, work: LayerWork, layer_plan: dict, cfg: PruneConfig) -> None:
    """Fold layer `work.layer`'s removed neurons into its kept ones (`cfg.fold`) and slice it to `layer_plan`'s
    kept set, in place; record the kept set and the new output weights in `work` (the pass carries them)."""
    keep = torch.tensor(layer_plan["keep"], dtype=torch.long)
    remap = skip_source_remapper(model, {work.layer: keep})  # pruning after skips: refuse dropping a skip source
    if work.fold is not None:
        work.fold.representative = layer_plan["representative"]
    work.keep = keep
    work.W_new, work.b_new = fold_and_slice(model, work.layer, keep, cfg.fold, work.fold, add_bias=cfg.adds_bias)
    if remap is not None:
        remap()


def plan_meta(cfg: PruneConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("select", "fold", "allocation", "sparsity", "keep", "multiple", "calibration")}


# ---------------------------------------------------------------------------------------- the summary file
SUMMARY_FILE = "prune_summary.json"   # beside every checkpoint prune writes; its keys: `_summary` below
SUMMARY_KEYS = ("model", "sparsity", "select", "fold", "params_before", "params_after", "mlp_macs_per_token_before",
                "mlp_macs_per_token_after", "kept")


def read_summary(directory) -> dict:
    """prune_summary.json of a checkpoint directory, its schema checked; a one-line error otherwise."""
    import json
    from pathlib import Path

    path = Path(directory) / SUMMARY_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(doc, dict) and all(k in doc for k in SUMMARY_KEYS) and isinstance(doc["kept"], list)
              and all(isinstance(k, int) for k in doc["kept"]))
    except (OSError, UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise NeuroprojError(f"{path} is not a prune summary (damaged or edited): prune again")
    return doc


# ---------------------------------------------------------------------------------------------------- API
def prune(model, data=None, config: PruneConfig | None = None, *, stats=None, plan_file=None, clusters=None,
          out=None, overwrite: bool = False, dtype="auto", device="auto", progress: bool = True, **settings):
    """Prune a model's MLP neurons and (with `out`) save the checkpoint; returns (LoadedModel, Plan, summary).

    `data`: the calibration data — a data spec (`samples`×`seqlen` tokens are drawn from it with `seed`) or a
    (windows, tokens) tensor of token ids, used as given.

    `config` (or `PruneConfig` fields as keyword arguments, e.g. `sparsity=0.3, select="flap"`) says how;
    `plan_file` or `clusters` (a `cluster` JSON) give the kept sets as written instead of a selection (their
    folds use one-shot moments). Cost: sequential — one forward over samples×seqlen tokens plus N² per token
    and layer for the Gram; oneshot — the statistics pass (none with `stats`) plus the per-layer solves (O(N³)).

    `offload` (offload.py) streams the sequential pass's layers: with `cpu` the returned model keeps its layers in
    host memory (the rest on the device); with `disk` (which needs `model` as a directory and `out`) its layers
    are left on the meta device once written: load `out` to use it. Under several processes (torch.distributed,
    e.g. `accelerate launch`) each takes its share of the calibration windows, the moments are all-reduced
    per layer (calibrate.py), every process ends with the same pruned model and rank 0 writes `out`."""
    cfg = config.replace(**settings) if config is not None else PruneConfig.make(**settings)
    given = None
    if plan_file is not None or clusters is not None:
        if plan_file is not None and clusters is not None:
            raise NeuroprojError("give a plan or a clustering, not both")
        chosen = [k for k in ("sparsity", "keep", "select", "allocation", "head_sparsity", "drop_layers",
                              "drop_attn", "target_params", "target_speedup") if settings.get(k) is not None]
        if chosen:   # the kept sets are given: a setting that would choose them too is a conflict, not overridden
            raise NeuroprojError(f"{'plan_file' if plan_file is not None else 'clusters'} says which neurons each layer "
                                 f"keeps; {chosen[0]} chooses them too: give one of them")
        given = Plan.load(plan_file) if plan_file is not None else \
            load_clusters(clusters) if not hasattr(clusters, "layers") else clusters   # read (and checked) before the model
        # a plan's heads and removed layers are refitted in the sequential pass (dense statistics hold no attention)
        blocks = isinstance(given, Plan) and given.blocks
        cfg = cfg.replace(calibration="sequential" if blocks else "oneshot")
    elif cfg.sparsity is None and cfg.keep is None and not cfg.budgeted:
        raise NeuroprojError("give a sparsity in [0, 1), keep K, a target or a plan")
    if out is not None:
        prepare_out_dir(out, overwrite)  # refuse early, before any work
    t0 = time.time()
    dist, rank, _ = distributed()
    lm, stream = open_model(model, cfg, data=data, out=out, dtype=dtype, device=device, log=progress and rank == 0,
                            warn=rank == 0)
    try:
        p, summary = _prune(lm, stream, cfg, data, stats, given, progress and rank == 0, t0)
        dt = save_dtype(cfg.save_dtype, lm.spec)
        summary.update(source_dtype=_name(source_dtype(lm.spec)), save_dtype=_name(dt), command=command(
            api_call("npp.prune", lm.spec, data, stats=stats, plan_file=plan_file, clusters=clusters, out=out,
                     **cfg.changed())))
        if out is not None and rank == 0:
            save_pruned(lm.model, lm.tokenizer, out, summary=summary, overwrite=overwrite,
                        extra_files={"plan.json": p.to_json()}, stored=stream.stored, dtype=dt)
        if dist is not None:
            dist.barrier()  # the others return once the checkpoint is there
    finally:
        stream.close()
    return lm, p, summary


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _prune(lm, stream, cfg, data, stats, given, progress, t0):
    """calibration → allocation → the loop → config; returns (plan, summary)."""
    a = lm.adapter
    if given is not None and not isinstance(given, Plan):
        given = Plan.from_clusters(load_clusters(given) if not hasattr(given, "layers") else given, lm.model)
    if given is not None:
        given.check(lm.model, lm.fingerprint)
    had_bias = a.out_has_bias(lm.model)
    if cfg.latency is not None:
        read_latency(cfg.latency, lm.model, a)   # measured on this model's shape: refused before the pass, not after
    before = {"params": num_params(lm.model), "macs": a.mlp_macs_per_token(lm.model),
              "trunk": trunk_params(lm.model, a), "widths": [a.width(lm.model, i) for i in range(a.num_layers(lm.model))],
              "heads": _heads(lm.model, a)}
    calib = CALIBRATIONS[cfg.calibration](lm, cfg, data=data, stats=stats, progress=progress, stream=stream)
    shape = resolve(calib, cfg, _trial(lm, calib, cfg)) if given is None else \
        Shape(cfg, list(getattr(given, "drop", [])), no_attn=list(getattr(given, "no_attn", [])))
    calib.cfg, calib.drop, calib.no_attn = shape.cfg, shape.drop, shape.no_attn
    widths = shape.widths
    if given is None and widths is None:
        widths = ALLOCATIONS[cfg.allocation](calib, shape.cfg)
    p = prune_layers(lm.model, calib, shape.cfg, widths, plan=given, drop=shape.drop, no_attn=shape.no_attn)
    update_config(lm.model, added_bias=cfg.adds_bias and not had_bias)
    summary = _summary(lm, cfg, p, before, calib.description, time.time() - t0)
    summary["offload"] = stream.describe()
    for key in ("reconstruct", "swaps", "search", "layers", "budget"):    # what the optional steps did
        if key in calib.meta:
            summary[key] = calib.meta[key]
    lm.fingerprint = None  # the weights changed
    return p, summary


def _trial(lm, calib, cfg):
    """The budget's sequential judge (budget.py): shape → the mean loss on the held-back windows after the sequential
    pass prunes a copy of the model to `shape` on the first `judge_samples` calibration windows (no reconstruction,
    no swaps: the finalists are compared, not finished). None where it cannot run: no held-back windows, a streamed
    model (offload) or several processes. Cost per call: a copy of the model and judge_samples / samples of the
    prune's own pass, plus one forward of the held-back windows."""
    if calib.held is None or calib.ids is None or type(calib.stream) is not LayerStream or distributed()[2] > 1:
        return None
    n = min(cfg.judge_samples, calib.ids.shape[0])
    bs = held_batch(calib, cfg)

    def loss(shape: Shape) -> float:
        copy = LoadedModel(deepcopy(lm.model), lm.tokenizer, lm.spec, lm.fingerprint)
        tcfg = shape.cfg.replace(samples=n, reconstruct=0, swaps=0)
        sub = CALIBRATIONS["sequential"](copy, tcfg, data=calib.ids[:n], progress=False)
        prune_layers(copy.model, sub, tcfg, shape.widths, drop=shape.drop, no_attn=shape.no_attn)
        return mean_loss(copy, calib.held, calib.compute, bs)
    return loss


def _heads(model, a) -> list | None:
    """[query heads, key/value heads] of every layer ([0, 0] where its attention was removed; None where the family
    has no head site)."""
    if a.heads_refusal(model) is not None:
        return None
    return [[a.num_heads(model, i), a.num_kv_heads(model, i)] if a.has_attention(model, i) else [0, 0]
            for i in range(a.num_layers(model))]


def _summary(lm, cfg, p, before, calib_desc, seconds) -> dict:
    a, model = lm.adapter, lm.model
    L = a.num_layers(model)
    kept = [a.width(model, i) for i in range(L)]
    dense_rows = [i for i in range(len(before["widths"])) if i not in p.drop]   # the kept layers' dense indices
    total_before = sum(before["widths"][i] for i in dense_rows)
    trunk = trunk_params(model, a)
    return {
        "model": lm.spec, "sparsity": cfg.sparsity, "keep": cfg.keep, "actual_sparsity": 1 - sum(kept) / total_before,
        "select": cfg.select, "fold": cfg.fold, "allocation": cfg.allocation, "calibration": cfg.calibration,
        "target": cfg.target if cfg.calibration == "sequential" else None, "calibration_data": calib_desc,
        "config": cfg.to_dict(),
        "params_before": before["params"], "params_after": num_params(model),
        "trunk_params_before": before["trunk"], "trunk_params_after": trunk,
        "removed_trunk_fraction": 1 - trunk / before["trunk"],
        "mlp_macs_per_token_before": before["macs"], "mlp_macs_per_token_after": a.mlp_macs_per_token(model),
        "neurons_before": total_before, "neurons_after": sum(kept), "kept": kept,
        "heads_before": before["heads"], "heads": _heads(model, a),
        "dropped_layers": list(p.drop), "removed_attention": list(p.no_attn), "seconds": round(seconds, 1),
    }


def plan(stats, model, *, sparsity: float | None = None, keep: int | None = None, select: str = "wanda-sp",
         allocation: str = "uniform", multiple: int = 64, seed: int = 0, projections=None,
         ridge: float = RIDGE) -> Plan:
    """A removal plan from dense statistics (one-shot), nothing applied. `model`: LoadedModel or nn.Module."""
    if sparsity is None and keep is None:
        raise NeuroprojError("sparsity must be in [0, 1) (got None)")
    cfg = PruneConfig.make(sparsity=sparsity, keep=keep, select=select, allocation=allocation, multiple=multiple,
                           seed=seed, ridge=ridge, calibration="oneshot")
    lm = model if isinstance(model, LoadedModel) else LoadedModel(model, None, "", None)
    calib = CALIBRATIONS["oneshot"](lm, cfg, stats=stats, projections=projections)
    return prune_layers(lm.model, calib, cfg, ALLOCATIONS[cfg.allocation](calib, cfg), apply=False)


def apply_plan(model, plan: Plan, *, stats=None, fold: str = "lstsq", moments=None, add_bias: bool | None = None,
               ridge: float = RIDGE):
    """Prune `model` (an nn.Module, in place) by `plan`, folding the removed neurons by `fold`; returns it.

    Moments per layer come from `stats` (a Stats: one-shot calibration) or `moments` ({layer: {"G", "mean"[, "C",
    "c"]}}); fold `none` needs neither. `add_bias`: write an output bias on architectures without one (None: only
    for the `bias` fold)."""
    FOLDS.check(fold)
    plan.check(model)
    skip_source_remapper(model, {i: plan.keep(i) for i in plan.layers})   # refuse before any layer is sliced
    cfg = PruneConfig.make(fold=fold, add_bias=add_bias, ridge=ridge, calibration="oneshot", sparsity=None)
    lm = LoadedModel(model, None, "", None)
    had_bias = lm.adapter.out_has_bias(model)
    prune_layers(model, OneShot(lm, cfg, stats=stats, moments=moments, progress=False), cfg, plan=plan)
    update_config(model, added_bias=cfg.adds_bias and not had_bias)
    return model
