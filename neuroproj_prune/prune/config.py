"""`PruneConfig`: every setting of one prune, validated once. The `prune` flags, a recipe's `prune` section
(plus `calibration.samples/seqlen/seed`), the settings every `sweep` cell shares and the keyword arguments of
`npp.prune()` are generated from its fields (config.Config)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Config, ConfigError, opt
from ..model import SAVE_DTYPES
from .allocate import ALLOCATIONS
from .calibrate import CALIBRATIONS, COMPUTE_DTYPES
from .fold import FOLDS, RIDGE
from .heads import HEAD_GROUPS, HEAD_SELECTORS
from .measure import TARGETS, WEIGHTINGS
from .offload import OFFLOADS
from .budget import AXES
from .layers import LAYER_SELECTORS
from .reconstruct import RECONSTRUCT_SCOPES
from .select import SELECTORS
from .speed import Latency


@dataclass
class PruneConfig(Config):
    """Every method choice of one prune. Validated when made; `replace(**changes)` makes a validated copy."""

    what = "prune"

    sparsity: float | None = opt(0.3, "fraction of MLP neurons to remove", kind=float, optional=True, ge=0.0, lt=1.0)
    keep: int | None = opt(None, "neurons to keep per layer (instead of sparsity)", kind=int, ge=1,
                           why="a layer would be pruned to zero width")
    select: str = opt("wanda-sp", "selection method (best measured: wanda-sp, eval/results/smollm2.md)",
                      lambda: SELECTORS)
    fold: str = opt("lstsq", "how removed neurons fold into the kept ones", lambda: FOLDS)
    calibration: str = opt("sequential", "sequential (layer by layer on the pruned model's own inputs) or "
                           "oneshot (dense statistics; the default when a stats file is given)", lambda: CALIBRATIONS)
    allocation: str = opt("auto", "uniform (same width everywhere: a standard checkpoint), global "
                          "(per-layer widths from measured per-layer importance), search (global, then refined "
                          "by the pruned model's loss on held-back calibration windows) or auto (global under "
                          "--target-params / --target-speedup, whose pass measures its error curves anyway; else "
                          "uniform). On SmolLM2 at 35 percent of the decoder's parameters global beat uniform for MLP "
                          "only and the joint allocation (eval/results/blocks.md)", lambda: ("auto", *ALLOCATIONS))
    target: str = opt("layer", "sequential fold target: layer (its own output on the pruned inputs), dense "
                      "(the dense model's MLP output) or residual (also repair the residual stream's drift)", lambda: TARGETS)
    weighting: str = opt("rms", "sequential token weights: rms (1/mean(out_t^2), as the next norm sees an "
                         "error) or none", lambda: WEIGHTINGS)
    output_weighting: str = opt("none", "selection sees output errors scaled by the downstream norms' gains "
                                "(norms) or not (none)", ("none", "norms"))
    multiple: int = opt(64, "round widths to a multiple (1 = exact; 32 for GGUF q8_0/q4_0; 256 keeps every "
                        "ffn_down of a K-quant GGUF, q4_k_m/q5_k_m/q6_k, in its K-type)", ge=1)
    ridge: float = opt(RIDGE, "relative ridge of the least-squares solves (raised to 1e-2 on too few tokens)", ge=0.0)
    add_bias: bool | None = opt(None, "let folds write an MLP output bias on architectures without one "
                                "(default: only for the bias fold)", kind=bool)
    samples: int = opt(128, "calibration windows", ge=1)
    seqlen: int = opt(512, "tokens per calibration window", ge=2)
    seed: int = opt(0, "which calibration windows are drawn; selection seeds", ge=0)
    batch_size: int | None = opt(None, "calibration windows per forward pass (default ~4096 tokens)", kind=int, ge=1)
    alloc_samples: int | None = opt(None, "global allocation: calibration windows that measure the error curves "
                                    "(default min(32, the calibration's windows); more than it has is refused)",
                                    kind=int, ge=1)
    max_shift: float = opt(1.0, "global allocation: each layer's sparsity within ± this of the mean one", gt=0.0, le=1.0)
    alloc_weights: str = opt("grad", "global allocation token weights: grad (loss units: every token's loss "
                             "gradient at each layer's output, one backward pass), layer-grad (each token as the next "
                             "norm sees it, each layer scaled into loss units by a backward pass over a quarter of "
                             "the windows: cheaper, measured a little worse), head (the loss gradient at the last "
                             "layer's output for every layer: no backward through the layers) or rms (no loss at all)",
                             ("grad", "layer-grad", "head", "rms"))
    search_samples: int = opt(8, "held-back calibration windows that score candidates (allocation search, the layer "
                              "choice by loss, the joint budget) "
                              "(drawn beside the calibration windows, never used to fit)", ge=1)
    search_rounds: int = opt(6, "allocation search: forward + backward passes over the held-back windows", ge=1)
    search_step: int = opt(32, "allocation search: neurons one move shifts between two layers (rounded up to "
                           "the width multiple)", ge=1)
    search_pairs: int = opt(4, "allocation search: moves (one layer gains a grid step, another gives it) tried "
                            "at once; halved when a round does not lower the loss", ge=1)
    swaps: int = opt(0, "swap refinement: per layer, up to this many exact trials of single swaps (a kept neuron "
                     "out, a removed one in), proposed by the refit's error on the calibration windows and kept only "
                     "where the error on held-back windows falls (0 = off; sequential, lstsq, target layer)", ge=0)
    swap_holdout: float = opt(0.125, "swap refinement: share of the calibration windows (whole batches) that "
                              "judges the swaps", gt=0.0, lt=1.0)
    compute_dtype: str = opt("auto", "matmul precision of the calibration forwards of a float32 model: auto "
                             "(bfloat16 where fast: CPUs with AVX512-BF16/AMX, CUDA), float32 or bfloat16; "
                             "Grams and solves stay float64", COMPUTE_DTYPES)
    reconstruct: int = opt(0, "block reconstruction: Adam steps per layer that train the kept gate/up/down "
                           "against the dense block's output after the fold (0 = off; sequential only)", ge=0)
    reconstruct_lr: float = opt(1e-3, "block reconstruction: peak learning rate (cosine decay; 1e-3 measured best of "
                                "1e-4 / 3e-4 / 1e-3 / 3e-3 on two texts, eval/results/smollm2.md)", gt=0.0)
    reconstruct_tokens: int = opt(2048, "block reconstruction: tokens per step (scope mlp)", ge=1)
    reconstruct_holdout: float = opt(0.125, "block reconstruction: share of calibration windows held back "
                                     "for early stopping", ge=0.0, lt=1.0)
    reconstruct_scope: str = opt("mlp", "block reconstruction: the MLP alone, or the whole decoder layer "
                                 "(attention included, one batch of windows per step)", lambda: RECONSTRUCT_SCOPES)
    head_sparsity: float = opt(0.0, "fraction of attention query heads to remove in every layer (uniform: a standard "
                               "checkpoint; SmolLM2's 9 heads in 3 groups allow 1/3 and 2/3); 0 = keep all heads",
                               ge=0.0, lt=1.0)
    head_select: str = opt("obs", "which heads go: obs (the least output error after the least-squares refit of "
                           "o_proj, greedy) or wanda-sp (smallest summed channel scores)", lambda: HEAD_SELECTORS)
    head_groups: str = opt("query", "grouped-query attention: query (every key/value group loses the same number of "
                           "query heads; the key/value heads stay) or kv (whole groups go, their query heads with "
                           "them)", HEAD_GROUPS)
    drop_layers: int = opt(0, "whole decoder layers to remove (chosen by --layer-select); the layers behind them are "
                           "refitted as --drop-target says, their work optionally folded into the MLP before them "
                           "(--drop-fold)", ge=0)
    drop_attn: int = opt(0, "attention sub-layers to remove, the layer's MLP kept (chosen by --layer-select like "
                         "whole layers; a per-layer checkpoint: load_pruned, GGUF deci, nemotron-nas no_op); the MLPs "
                         "behind it are refitted as --drop-target says", ge=0)
    layer_select: str = opt("loss", "which layers go: loss (the measured loss increase on held-back calibration "
                            "windows when the layer alone is removed) or influence (ShortGPT's 1 - cos(in, out))",
                            lambda: LAYER_SELECTORS)
    drop_target: str = opt("layer", "what the MLPs behind a removed layer or attention sub-layer are refitted to: "
                           "layer (their own output on the stream they see, as everywhere else), residual (also make "
                           "up the stream's drift from the dense model's) or dense (the dense model's MLP outputs). "
                           "On SmolLM2 residual and dense lost to layer: one layer removed, WikiText-2 34.19 / 39.04 against "
                           "33.86; one attention removed beside 46 percent of the MLP, 132.0 / 949.9 against 94.5 "
                           "(eval/results/blocks.md)",
                           ("layer", "residual", "dense"))
    drop_fold: str = opt("none", "where a removed decoder layer's work goes: none (nowhere: the layers behind it "
                         "are refitted as --drop-target says) or previous (the MLP of the kept layer before it is "
                         "refitted by least squares to its own output plus what the removed layers added to the "
                         "stream). On SmolLM2 previous fitted the calibration text better and generalised worse: one "
                         "layer removed beside 896 of 1536 neurons, held-back C4 loss 4.174 against 4.182, WikiText-2 "
                         "84.0 against 81.3 (eval/results/blocks.md)", ("none", "previous"))
    target_params: float | None = opt(None, "fraction of the decoder layers' parameters to remove, split across MLP "
                                      "neurons, attention heads and whole layers by measured loss (instead of "
                                      "--sparsity; --axes limits the axes)", kind=float, gt=0.0, lt=1.0)
    target_speedup: float | None = opt(None, "the decode speed-up to reach, priced by --latency (a latency file "
                                       "measured in llama.cpp) or, without one, by its bytes proxy (the weights read "
                                       "per token: decoder layers + LM head). With --target-params too, the shape "
                                       "meets both", kind=float, gt=1.0)
    latency: str | None = opt(None, "--target-speedup's price list: a latency file written by `neuroproj-prune "
                              "latency MODEL` (ms per token of an attention sub-layer, an MLP sub-layer and a million "
                              "weights, measured for this model, runtime, type and thread count)", kind=str,
                              optional=True)
    axes: tuple = opt(AXES, "what --target-params may remove: a comma subset of mlp, heads, attn (attention sub-layers), "
                                "layers", AXES,
                      item=str)
    budget_judge: str = opt("sequential", "how --target-params judges its finalists: sequential (each is pruned by "
                            "the sequential pass on --judge-samples windows, on a copy of the model; the lowest loss "
                            "on the held-back windows wins) or oneshot (each applied at once to the dense model: "
                            "cheaper, but on SmolLM2, 35 percent removed, it chose a removed layer that lost after the pass)",
                            ("sequential", "oneshot"))
    judge_samples: int = opt(16, "--budget-judge sequential: calibration windows each finalist is pruned on",
                             ge=1)
    offload: str = opt("auto", "where the decoder layers live during the sequential pass: none (all on the device), "
                       "cpu (host memory, one layer at a time on the device), disk (read from the model's safetensors "
                       "files and written to --out one layer at a time) or auto (by free memory: "
                       "neuroproj_prune/prune/offload.py gives the formula); the checkpoint is the same", lambda: ("auto", *OFFLOADS))
    save_dtype: str = opt("auto", "dtype of the written checkpoint: auto (that of the model's own files: a bfloat16 "
                          "model pruned in float32 on a CPU is saved in bfloat16; float32 for GGUF and float32 "
                          "models), float32, bfloat16 or float16", SAVE_DTYPES)

    # -- rules between fields (types, choices and ranges are declared above and checked by Config.validate)
    def check(self) -> None:
        if self.allocation == "auto":
            self.allocation = self.auto_allocation
        self.refuse_together("sparsity", "keep")
        if self.latency is not None:
            if self.target_speedup is None:
                raise ConfigError("latency", "a latency file prices --target-speedup: give --target-speedup S too")
            Latency.load(self.latency)   # its schema now, its model's shape when the model is loaded
        for axis in ("target_params", "target_speedup"):
            self.refuse_together("sparsity", axis)
        budget = self.target_params is not None or self.target_speedup is not None
        if budget and (self.keep is not None or self.head_sparsity or self.drop_layers or self.drop_attn):
            raise ConfigError("target_params", "a parameter or speed target splits the budget itself: give it alone, "
                              "or --sparsity / --keep, --head-sparsity, --drop-attn and --drop-layers per axis")
        if (budget or self.head_sparsity or self.drop_layers or self.drop_attn) and self.calibration != "sequential":
            raise ConfigError("calibration", "attention heads and whole layers are measured in the sequential pass: "
                              "use --calibration sequential")
        if (budget or self.drop_layers or self.drop_attn) and self.offload in ("cpu", "disk"):
            raise ConfigError("offload", f"choosing layers runs the whole model on held-back windows, which offload "
                              f"{self.offload} does not hold: use --offload none or auto")
        if self.allocation == "search" and self.calibration != "sequential":
            raise ConfigError("allocation", "allocation search scores candidates with the sequential calibration's "
                              "data: use --calibration sequential or --allocation global")
        if self.swaps and (self.calibration != "sequential" or self.fold != "lstsq" or self.target != "layer"):
            raise ConfigError("swaps", "swap refinement judges the least-squares refit of each layer's own output on "
                              "held-back windows: use --calibration sequential --fold lstsq --target layer, or --swaps 0")
        if self.reconstruct and self.calibration != "sequential":
            raise ConfigError("reconstruct", "block reconstruction runs in the sequential pass: use --calibration "
                              "sequential or --reconstruct 0")
        if self.drop_fold == "previous" and (self.fold != "lstsq" or self.reconstruct):
            raise ConfigError("drop_fold", "--drop-fold previous refits the MLP before a removed layer by least "
                              "squares (block reconstruction would train it back to its own output): use --fold lstsq "
                              "and --reconstruct 0, or --drop-fold none")
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

    def changed(self) -> dict:
        """As Config's, without an allocation that `auto` gives (the command that repeats this run needs none)."""
        c = super().changed()
        if c.get("allocation") == self.auto_allocation:
            del c["allocation"]
        return c

    @property
    def auto_allocation(self) -> str:
        """What `allocation auto` means: global under a budget (its pass measures global's error curves anyway, so
        per-layer widths cost nothing more), else uniform (a standard checkpoint)."""
        return "global" if self.budgeted else "uniform"

    @property
    def adds_bias(self) -> bool:
        """Whether folds may write an MLP output bias (by default only the bias fold does)."""
        return self.fold == "bias" if self.add_bias is None else self.add_bias

    @property
    def dense_stream(self) -> bool:
        """Whether the sequential pass carries the dense model's hidden states too (targets dense, residual)."""
        return bool(TARGETS[self.target].dense_stream)

    @property
    def budgeted(self) -> bool:
        """Whether the joint allocation splits a parameter (or speed) budget across the axes."""
        return self.target_params is not None or self.target_speedup is not None

    @property
    def held_out_windows(self) -> int:
        """Calibration windows drawn beside the fitted ones and never fitted (the allocation search, the layer
        choice by loss and the joint allocation score on them)."""
        layers = (self.drop_layers or self.drop_attn) and self.layer_select == "loss"
        return self.search_samples if self.allocation == "search" or layers or self.budgeted else 0

    @classmethod
    def make(cls, **given) -> "PruneConfig":
        """From keyword arguments (None means: the default). Giving `keep` or a target and no `sparsity` drops the
        default sparsity; giving only heads or layers to remove makes it 0 (the MLPs keep their width)."""
        given = cls.given_settings(given)
        if ("keep" in given or "target_params" in given or "target_speedup" in given) and "sparsity" not in given:
            given["sparsity"] = None
        elif ("head_sparsity" in given or "drop_layers" in given or "drop_attn" in given) and "sparsity" not in given:
            given["sparsity"] = 0.0    # heads or layers alone: the MLPs keep their width (refitted behind a removal)
        return cls(**given)
