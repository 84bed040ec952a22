"""The `prune` stage: one config, then calibration → allocation → (select → fold → slice) per layer → checkpoint.

    cfg = PruneConfig(sparsity=0.3)                       # every method choice of a run, validated once
    calib = CALIBRATIONS[cfg.calibration](lm, cfg, ...)   # where moments come from (calibrate.py)
    widths = ALLOCATIONS[cfg.allocation](calib, cfg)      # how many neurons each layer keeps
    for work in calib.layers():                           # layer by layer
        prune_layer(lm.model, work, cfg, widths[i])       # SELECTORS (plan.py) → FOLDS (surgery.py) → slice
    save_pruned(...)                                      # checkpoint.py

`PruneConfig` is the single description of a run: the CLI flags (`add_arguments`), the recipe's `prune`
section (`recipe_defaults`), `sweep`, `eval/ablate.py` and the keyword arguments of `prune()` are all made
from its fields. Every method kind is a registry with one signature: `plan.SELECTORS`, `surgery.FOLDS`,
`calibrate.CALIBRATIONS`, `ALLOCATIONS` (here).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from .adapters import adapter_for, num_params
from .calibrate import CALIBRATIONS, COMPUTE_DTYPES, RECONSTRUCT_SCOPES, TARGETS, Calibration, Sequential, compute_dtype_for  # noqa: F401
from .calibrate import error_curves, rms_token_weights  # noqa: F401 (re-exported)
from .checkpoint import prepare_out_dir, save_pruned, skip_source_remapper, update_config
from .clustering import load_clusters
from .config import Config, ConfigError, opt  # noqa: F401 (ConfigError re-exported)
from .errors import NeuroprojError
from .models import LoadedModel
from .offload import OFFLOADS, open_model
from .plan import SELECTORS, LayerMoments, Plan, Selection, layer_width, make_layer_plan
from .stats import distributed
from .surgery import FOLDS, RIDGE, fold_and_slice, refine_swaps


# -------------------------------------------------------------------------------------------- config
@dataclass
class PruneConfig(Config):
    """Every method choice of one prune. Validated when made; `replace(**changes)` makes a validated copy."""

    what = "prune"

    sparsity: float | None = opt(0.3, "fraction of MLP neurons to remove, in [0, 1)", kind=float, optional=True)
    keep: int | None = opt(None, "neurons to keep per layer (instead of sparsity)", kind=int)
    select: str = opt("wanda-sp", "selection method (best measured: wanda-sp, eval/results/smollm2.md)",
                      lambda: SELECTORS)
    fold: str = opt("lstsq", "how removed neurons fold into the kept ones", lambda: FOLDS)
    calibration: str = opt("sequential", "sequential (layer by layer on the pruned model's own inputs) or "
                           "oneshot (dense statistics; the default when a stats file is given)", lambda: CALIBRATIONS)
    allocation: str = opt("uniform", "uniform (same width everywhere: a standard checkpoint), global "
                          "(per-layer widths from measured per-layer importance) or search (global, then refined "
                          "by the pruned model's loss on held-back calibration windows)", lambda: ALLOCATIONS)
    target: str = opt("layer", "sequential fold target: layer (its own output on the pruned inputs), dense "
                      "(the dense model's MLP output) or residual (also repair the residual stream's drift)", TARGETS)
    weighting: str = opt("rms", "sequential token weights: rms (1/mean(out_t^2), as the next norm sees an "
                         "error) or none", ("rms", "none"))
    output_weighting: str = opt("none", "selection sees output errors scaled by the downstream norms' gains "
                                "(norms) or not (none)", ("none", "norms"))
    multiple: int = opt(64, "round widths to a multiple (1 = exact)")
    ridge: float = opt(RIDGE, "relative ridge of the least-squares solves (raised to 1e-2 on too few tokens)")
    add_bias: bool | None = opt(None, "let folds write an MLP output bias on architectures without one "
                                "(default: only for the bias fold)", kind=bool)
    samples: int = opt(128, "calibration windows")
    seqlen: int = opt(512, "tokens per calibration window")
    seed: int = opt(0, "which calibration windows are drawn; selection seeds")
    batch_size: int | None = opt(None, "calibration windows per forward pass (default ~4096 tokens)", kind=int)
    alloc_samples: int = opt(32, "global allocation: calibration windows that measure the error curves")
    max_shift: float = opt(1.0, "global allocation: each layer's sparsity within ± this of the mean one")
    alloc_weights: str = opt("grad", "global allocation token weights: grad (loss units, one backward pass) or "
                             "rms (no backward)", ("grad", "rms"))
    search_samples: int = opt(8, "allocation search: held-back calibration windows that score candidate widths "
                              "(drawn beside the calibration windows, never used to fit)")
    search_rounds: int = opt(6, "allocation search: forward + backward passes over the held-back windows")
    search_step: int = opt(32, "allocation search: neurons one move shifts between two layers (rounded up to "
                           "the width multiple)")
    search_pairs: int = opt(4, "allocation search: moves (one layer gains a grid step, another gives it) tried "
                            "at once; halved when a round does not lower the loss")
    swaps: int = opt(0, "swap refinement: per layer, up to this many exact trials of single swaps (a kept neuron "
                     "out, a removed one in), proposed by the refit's error on the calibration windows and kept only "
                     "where the error on held-back windows falls (0 = off; sequential, lstsq, target layer)")
    swap_holdout: float = opt(0.125, "swap refinement: share of the calibration windows (whole batches) that "
                              "judges the swaps")
    compute_dtype: str = opt("auto", "matmul precision of the calibration forwards of a float32 model: auto "
                             "(bfloat16 where fast: CPUs with AVX512-BF16/AMX, CUDA), float32 or bfloat16; "
                             "Grams and solves stay float64", COMPUTE_DTYPES)
    reconstruct: int = opt(0, "block reconstruction: Adam steps per layer that train the kept gate/up/down "
                           "against the dense block's output after the fold (0 = off; sequential only)")
    reconstruct_lr: float = opt(1e-3, "block reconstruction: peak learning rate (cosine decay; 1e-3 measured best of "
                                "1e-4 / 3e-4 / 1e-3 / 3e-3 on two texts, eval/results/smollm2.md)")
    reconstruct_tokens: int = opt(2048, "block reconstruction: tokens per step (scope mlp)")
    reconstruct_holdout: float = opt(0.125, "block reconstruction: share of calibration windows held back "
                                     "for early stopping")
    reconstruct_scope: str = opt("mlp", "block reconstruction: the MLP alone, or the whole decoder layer "
                                 "(attention included, one batch of windows per step)", RECONSTRUCT_SCOPES)
    offload: str = opt("auto", "where the decoder layers live during the sequential pass: none (all on the device), "
                       "cpu (host memory, one layer at a time on the device), disk (read from the model's safetensors "
                       "files and written to --out one layer at a time) or auto (by free memory: "
                       "neuroproj_prune/offload.py gives the formula); the checkpoint is the same", OFFLOADS)

    # -- validation (the one place; the types and choices are checked by Config.validate)
    def check(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise ConfigError("sparsity", f"sparsity must be in [0, 1) (got {self.sparsity})")
        if self.sparsity is not None and self.keep is not None:
            raise ConfigError("keep", "give sparsity or keep, not both")
        if self.keep is not None and self.keep < 1:
            raise ConfigError("keep", f"keep {self.keep}: a layer would be pruned to zero width; keep at least 1 neuron")
        self.at_least({"multiple": 1, "samples": 1, "seqlen": 2, "batch_size": 1, "alloc_samples": 1, "seed": 0,
                       "reconstruct": 0, "reconstruct_tokens": 1, "swaps": 0, "search_samples": 1, "search_rounds": 1,
                       "search_pairs": 1, "search_step": 1})
        if self.allocation == "search" and self.calibration != "sequential":
            raise ConfigError("allocation", "allocation search scores candidates with the sequential calibration's "
                              "data: use --calibration sequential or --allocation global")
        if self.swaps and (self.calibration != "sequential" or self.fold != "lstsq" or self.target != "layer"):
            raise ConfigError("swaps", "swap refinement judges the least-squares refit of each layer's own output on "
                              "held-back windows: use --calibration sequential --fold lstsq --target layer, or --swaps 0")
        if not 0.0 < self.swap_holdout < 1.0:
            raise ConfigError("swap_holdout", f"swap_holdout must be in (0, 1) (got {self.swap_holdout})")
        if self.ridge < 0:
            raise ConfigError("ridge", f"ridge must be >= 0 (got {self.ridge})")
        if not 0.0 < self.max_shift <= 1.0:
            raise ConfigError("max_shift", f"max_shift must be in (0, 1] (got {self.max_shift})")
        if not self.reconstruct_lr > 0:
            raise ConfigError("reconstruct_lr", f"reconstruct_lr must be > 0 (got {self.reconstruct_lr})")
        if not 0.0 <= self.reconstruct_holdout < 1.0:
            raise ConfigError("reconstruct_holdout", f"reconstruct_holdout must be in [0, 1) (got {self.reconstruct_holdout})")
        if self.reconstruct and self.calibration != "sequential":
            raise ConfigError("reconstruct", "block reconstruction runs in the sequential pass: use --calibration "
                              "sequential or --reconstruct 0")
        if self.calibration == "sequential" and self.fold != "lstsq" and self.target != "layer":
            raise ConfigError("target", f"target {self.target!r} only changes the lstsq fold: use fold lstsq or target layer")
        if self.offload in ("cpu", "disk"):
            if self.calibration != "sequential":
                raise ConfigError("offload", f"offload {self.offload} streams the sequential pass's layers: use "
                                  f"--calibration sequential, or --offload none")
            if self.allocation != "uniform":
                raise ConfigError("offload", f"allocation {self.allocation} measures its error curves with whole-model "
                                  f"passes, which offload {self.offload} does not hold: use --allocation uniform or "
                                  f"--offload none")
            if self.output_weighting != "none":
                raise ConfigError("offload", f"output weighting {self.output_weighting} reads every later layer's "
                                  f"norms, which offload {self.offload} does not hold: use --output-weighting none or "
                                  f"--offload none")

    @property
    def adds_bias(self) -> bool:
        """Whether folds may write an MLP output bias (by default only the bias fold does)."""
        return self.fold == "bias" if self.add_bias is None else self.add_bias

    @classmethod
    def make(cls, **given) -> "PruneConfig":
        """From keyword arguments (None means: the default). Giving `keep` and no `sparsity` drops the default
        sparsity."""
        given = cls.given_settings(given)
        if "keep" in given and "sparsity" not in given:
            given["sparsity"] = None
        return cls(**given)


# ---------------------------------------------------------------------------------------- allocation
def allocate_uniform(calib: Calibration, cfg: PruneConfig) -> dict[int, int]:
    """Every layer keeps N·(1 − sparsity) (or `keep`) neurons, rounded to the multiple."""
    return {i: layer_width(N, cfg.sparsity, cfg.keep, cfg.multiple) for i, N in calib.widths().items()}


def allocate_global(calib: Calibration, cfg: PruneConfig, search: bool = False) -> dict[int, int]:
    """Per-layer widths at the same total, from the per-layer importance the calibration measures."""
    total = sum(layer_width(N, cfg.sparsity, cfg.keep, 1) for N in calib.widths().values())
    return calib.global_widths(cfg, total, search=search)


def allocate_search(calib: Calibration, cfg: PruneConfig) -> dict[int, int]:
    """`global`'s widths, refined by the measured loss of candidate allocations on held-back windows."""
    return allocate_global(calib, cfg, search=True)


ALLOCATIONS = {"uniform": allocate_uniform, "global": allocate_global, "search": allocate_search}


# ------------------------------------------------------------------------------------ the shared step
def select_layer(model, m: LayerMoments, width: int, cfg: PruneConfig) -> dict:
    """The layer plan {"width", "keep", "representative"} that `cfg.select` makes for `width` kept neurons.
    With `output_weighting=norms` the selection sees output errors as the downstream norms do (the fold's
    optimum does not depend on it)."""
    D = adapter_for(model).downstream_gain(model, m.layer) if cfg.output_weighting == "norms" else None
    if D is not None:
        m = dataclasses.replace(m, W=D[:, None] * m.W)
    return make_layer_plan(m, SELECTORS[cfg.select](m, width, cfg.seed))


def prune_layer(model, work, cfg: PruneConfig, width: int | None = None, layer_plan: dict | None = None) -> dict:
    """Select (unless `layer_plan` is given) → fold → slice layer `work.layer` of `model` in place; fills
    `work.keep/W_new/b_new` for the calibration and returns the layer plan."""
    i = work.layer
    if layer_plan is None:
        layer_plan = select_layer(model, work.moments, width, cfg)
        if work.held is not None and cfg.swaps:   # (fit, held-back) Grams: refine the kept set on them
            keep, work.swaps = refine_swaps(work.moments.W, *work.held, torch.tensor(layer_plan["keep"]),
                                            cfg.swaps, work.fold.ridge)
            layer_plan = make_layer_plan(work.moments, Selection(keep))
    keep = torch.tensor(layer_plan["keep"], dtype=torch.long)
    remap = skip_source_remapper(model, {i: keep})  # pruning after skips: refuse dropping a skip source
    work.fold.representative = layer_plan["representative"]
    work.keep = keep
    work.W_new, work.b_new = fold_and_slice(model, i, keep, cfg.fold, work.fold, add_bias=cfg.adds_bias)
    if remap is not None:
        remap()
    return layer_plan


# ---------------------------------------------------------------------------------------------- API
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
    widths = ALLOCATIONS[cfg.allocation](calib, cfg)
    p = Plan(meta={**_plan_meta(cfg), **calib.meta})
    for work in calib.layers():
        p.layers[work.layer] = select_layer(lm.model, work.moments, widths[work.layer], cfg)
    return p


def _plan_meta(cfg: PruneConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("select", "fold", "allocation", "sparsity", "keep", "multiple", "calibration")}


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
    per layer (see `Sequential.layers`), every process ends with the same pruned model and rank 0 writes `out`."""
    cfg = config.replace(**settings) if config is not None else PruneConfig.make(**settings)
    given = None
    if plan_file is not None or clusters is not None:
        if plan_file is not None and clusters is not None:
            raise NeuroprojError("give a plan or a clustering, not both")
        cfg = cfg.replace(calibration="oneshot")
        given = Plan.load(plan_file) if plan_file is not None else clusters
    elif cfg.sparsity is None and cfg.keep is None:
        raise NeuroprojError("give a sparsity in [0, 1), keep K or a plan")
    if out is not None:
        prepare_out_dir(out, overwrite)  # refuse early, before any work
    t0 = time.time()
    dist, rank, _ = distributed()
    lm, stream = open_model(model, cfg, data=data, out=out, dtype=dtype, device=device, log=progress and rank == 0,
                            warn=rank == 0)
    try:
        p, summary = _prune(lm, stream, cfg, data, stats, given, progress and rank == 0, t0)
        if out is not None and rank == 0:
            save_pruned(lm.model, lm.tokenizer, out, summary=summary, overwrite=overwrite,
                        extra_files={"plan.json": p.to_json()}, stored=stream.stored)
        if dist is not None:
            dist.barrier()  # the others return once the checkpoint is there
    finally:
        stream.close()
    return lm, p, summary


def _prune(lm, stream, cfg, data, stats, given, progress, t0):
    """calibration → allocation → per-layer select/fold/slice → config; returns (plan, summary)."""
    a = lm.adapter
    if given is not None and not isinstance(given, Plan):
        given = Plan.from_clusters(load_clusters(given) if not hasattr(given, "layers") else given, lm.model)
    if given is not None:
        given.check(lm.model, lm.fingerprint)
    had_bias = a.out_has_bias(lm.model)
    before = {"params": num_params(lm.model), "macs": a.mlp_macs_per_token(lm.model)}
    calib = CALIBRATIONS[cfg.calibration](lm, cfg, data=data, stats=stats, progress=progress, stream=stream)
    widths = ALLOCATIONS[cfg.allocation](calib, cfg) if given is None else {}
    p = Plan(meta={**_plan_meta(cfg), **calib.meta}) if given is None else given
    for work in calib.layers():
        i = work.layer
        if given is None:
            p.layers[i] = prune_layer(lm.model, work, cfg, widths[i])
        elif i in given.layers:
            prune_layer(lm.model, work, cfg, layer_plan=given.layers[i])
    if given is None and "fingerprint" in calib.meta:  # a disk stream knows it only after the pass
        p.meta["fingerprint"] = calib.meta["fingerprint"]
    update_config(lm.model, added_bias=cfg.adds_bias and not had_bias)
    summary = _summary(lm, cfg, p, before, calib.description, time.time() - t0)
    summary["offload"] = stream.describe()
    for key in ("reconstruct", "swaps", "search"):    # what the optional steps did
        if key in calib.meta:
            summary[key] = calib.meta[key]
    lm.fingerprint = None  # the weights changed
    return p, summary


def _summary(lm, cfg, p, before, calib_desc, seconds) -> dict:
    a = lm.adapter
    kept = [a.width(lm.model, i) for i in range(a.num_layers(lm.model))]
    total_before = sum(p.layers[i]["width"] if i in p.layers else kept[i] for i in range(len(kept)))
    return {
        "model": lm.spec, "sparsity": cfg.sparsity, "keep": cfg.keep, "actual_sparsity": 1 - sum(kept) / total_before,
        "select": cfg.select, "fold": cfg.fold, "allocation": cfg.allocation, "calibration": cfg.calibration,
        "target": cfg.target if cfg.calibration == "sequential" else None, "calibration_data": calib_desc,
        "config": cfg.to_dict(),
        "params_before": before["params"], "params_after": num_params(lm.model),
        "mlp_macs_per_token_before": before["macs"], "mlp_macs_per_token_after": a.mlp_macs_per_token(lm.model),
        "neurons_before": total_before, "neurons_after": sum(kept), "kept": kept, "seconds": round(seconds, 1),
    }


def sequential_prune(lm: LoadedModel, ids: torch.Tensor, *, widths: dict[int, int], select: str, fold: str,
                     target: str = "layer", batch_size: int = 8, seed: int = 0, ridge: float = RIDGE,
                     weighting: str = "none", add_bias: bool = False, output_weighting: str = "none",
                     compute=None, progress: bool = True) -> Plan:
    """Prune `lm.model` in place, layer by layer on token ids `ids`, to the given per-layer `widths`
    (the sequential calibration without allocation). Returns the plan it applied."""
    cfg = PruneConfig.make(select=select, fold=fold, target=target, batch_size=batch_size, seed=seed, ridge=ridge,
                           weighting=weighting, add_bias=add_bias, output_weighting=output_weighting,
                           compute_dtype="bfloat16" if compute == torch.bfloat16 else "float32")
    p = Plan(meta=_plan_meta(cfg))
    for work in Sequential(lm, cfg, ids=ids, progress=progress).layers():
        p.layers[work.layer] = prune_layer(lm.model, work, cfg, widths[work.layer])
    update_config(lm.model, added_bias=add_bias and not lm.adapter.out_has_bias(lm.model))
    return p
