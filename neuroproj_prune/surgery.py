"""Apply a plan: slice neurons, fold the removed ones into the kept ones, save and reload checkpoints.

MLP output `y = W h + b` (W: d_model × N). Keeping K, removing R, with moments over calibration tokens
(G = E[h hᵀ], μ = E[h]); a *target* cross-moment C = E[y* hᵀ] (one-shot: C = W G, i.e. preserve this
layer's own output):

    none            W' = W_:,K
    representative  w_r += a_j w_j for each removed j folding into r, a_j = E[h_j h_r]/E[h_r²]
                    (centred slope Cov/Var and b += w_j (μ_j − a_j μ_r) when the layer has a bias)
    bias            W' = W_:,K,  b += W_:,R μ_R                                  (FLAP's compensation)
    lstsq           W' = C_:,K (G_KK + λI)⁻¹                 (augmented with a constant 1 when b exists)

All solves in float64 (Cholesky; ridge λ = 1e-7·mean diag G: on SmolLM2 at 30 %, 1e-4 and 1e-6 gave the same perplexity
and 1e-2 clearly worse; a near-zero ridge lets an exact duplicate fold away exactly). Cost per layer: O(N·K·d + K³).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import NeuroprojError
from .models import adapter_for

FOLDS = ("none", "representative", "bias", "lstsq")
RIDGE = 1e-7


def effective_ridge(ridge: float, tokens: int, N: int, warn: bool = True) -> float:
    """The ridge for a layer of N neurons calibrated on `tokens` tokens. With fewer than 2·N tokens the
    Gram matrix is (nearly) singular and a near-zero ridge lets the refit explode on new text, so it is raised
    to 1e-2 (measured on SmolLM2: worse than 1e-7 with ample data, but safe); use more calibration tokens."""
    if tokens < 2 * N and ridge < 1e-2:
        if warn:
            _warn_few_tokens(tokens, N)
        return 1e-2
    return ridge


@functools.lru_cache(maxsize=None)
def _warn_few_tokens(tokens: int, N: int) -> None:  # once per (tokens, width), not once per layer
    print(f"neuroproj-prune: warning: {tokens} calibration tokens for {N} neurons: ridge raised to 1e-2; give at "
          f"least {2 * N} tokens (--samples x --seqlen) for the full least-squares refit", file=sys.stderr)


def _chol_solve(A: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """X with X A = B (A symmetric PSD, ridge-regularised), i.e. B A⁻¹."""
    lam = ridge * A.diagonal().mean().clamp(min=1e-30)
    L, info = torch.linalg.cholesky_ex(A + lam * torch.eye(A.shape[0], dtype=A.dtype))
    if int(info) != 0:
        return torch.linalg.lstsq(A + lam * torch.eye(A.shape[0], dtype=A.dtype), B.T).solution.T
    return torch.cholesky_solve(B.T, L).T


def fold_layer(fold: str, W: torch.Tensor, keep: torch.Tensor, *, G: torch.Tensor, mean: torch.Tensor,
               bias: torch.Tensor | None = None, C: torch.Tensor | None = None, c: torch.Tensor | None = None,
               representative: dict[int, int] | None = None, use_bias: bool = False, ridge: float = RIDGE):
    """New (W', b') for one layer. W: (d, N) float64; G, mean: moments of h; C (d, N), c (d,): target
    moments E[y* hᵀ], E[y*] (default: this layer's own output, C = W G, c = W μ). `use_bias`: a bias may be
    written (the layer has one, or one is added). Returns (W' (d, K), b' (d,) or None)."""
    if fold not in FOLDS:
        raise NeuroprojError(f"unknown fold {fold!r}: choose from {', '.join(FOLDS)}")
    keep = torch.as_tensor(keep, dtype=torch.long)
    N = W.shape[1]
    removed = torch.ones(N, dtype=torch.bool)
    removed[keep] = False
    R = removed.nonzero().flatten()
    b = None if bias is None else bias.clone()
    if use_bias and b is None:
        b = torch.zeros(W.shape[0], dtype=W.dtype)
    if fold == "none" or (R.numel() == 0 and C is None):  # nothing removed: bit-exact identity
        return W[:, keep].clone(), b
    if fold == "bias":
        if b is None:
            raise NeuroprojError("fold 'bias' needs an output bias: allow adding one (--add-bias) or use lstsq")
        return W[:, keep].clone(), b + W[:, R] @ mean[R]
    if fold == "representative":
        Wk = W.clone()
        pos = {int(j): p for p, j in enumerate(keep.tolist())}
        var = (G.diagonal() - mean**2).clamp(min=0)
        for j, r in (representative or {}).items():
            if j not in pos and r in pos:
                if b is not None:
                    a = (G[j, r] - mean[j] * mean[r]) / var[r].clamp(min=1e-30)
                    b += W[:, j] * (mean[j] - a * mean[r])
                else:
                    a = G[j, r] / G[r, r].clamp(min=1e-30)
                Wk[:, r] += a * W[:, j]
        return Wk[:, keep], b
    # lstsq
    if C is None:
        C, c = W @ G, W @ mean
    elif c is None:
        raise NeuroprojError("a target cross-moment C needs its mean c")
    if b is None:  # no bias: y ≈ W' h_K
        return _chol_solve(G[keep][:, keep], C[:, keep], ridge), None
    # with a bias: regress on [h_K, 1]; the constant column's moments are μ_K and 1
    K = keep.numel()
    A = torch.empty(K + 1, K + 1, dtype=G.dtype)
    A[:K, :K] = G[keep][:, keep]
    A[:K, K] = A[K, :K] = mean[keep]
    A[K, K] = 1.0
    B = torch.cat([C[:, keep], c[:, None]], dim=1)
    X = _chol_solve(A, B, ridge)
    return X[:, :K], b + X[:, K]  # targets exclude the bias: the old bias stays, the fitted constant adds


def apply_plan(model, plan, *, stats=None, fold: str = "lstsq", moments=None, add_bias: bool | None = None,
               ridge: float = RIDGE):
    """Prune `model` in place by `plan` and fold removed neurons (see module docstring).

    Moments per layer come from `stats` (a Stats: one-shot calibration) or `moments` (dict layer →
    dict(G, mean[, C, c])), e.g. from sequential calibration. `add_bias`: write an output bias on
    architectures without one (None: only for the `bias` fold). Returns the model."""
    if fold not in FOLDS:
        raise NeuroprojError(f"unknown fold {fold!r}: choose from {', '.join(FOLDS)}")
    a = adapter_for(model)
    plan.check(model)
    if add_bias is None:
        add_bias = fold == "bias"
    has_bias = a.out_has_bias(model)
    from .skips import skip_source_remapper  # prune after skip: refuse removing a skip source, remap the rest

    remap_skips = skip_source_remapper(model, {i: plan.keep(i) for i in plan.layers})
    for i, d in sorted(plan.layers.items()):
        keep = plan.keep(i)
        W = a.out_weight(model, i).detach().double().cpu()
        bias = a.out_bias(model, i)
        bias = None if bias is None else bias.double().cpu()
        if fold == "none" and not add_bias:
            a.select_neurons(model, i, keep)
            continue
        layer_ridge = ridge
        if moments is not None and i in moments:
            mo = moments[i]
        elif stats is not None:
            mo = {"G": stats.second_moment(i), "mean": stats.mean(i)}
            layer_ridge = effective_ridge(ridge, stats.count(i), W.shape[1])
        else:
            raise NeuroprojError(f"fold {fold!r} needs activation statistics of layer {i}")
        Wn, bn = fold_layer(fold, W, keep, G=mo["G"], mean=mo["mean"], bias=bias, C=mo.get("C"), c=mo.get("c"),
                            representative=d["representative"], use_bias=has_bias or add_bias, ridge=layer_ridge)
        a.select_neurons(model, i, keep)
        a.set_out_weight(model, i, Wn)
        if bn is not None:
            a.set_out_bias(model, i, bn)
    if remap_skips is not None:
        remap_skips()
    _update_config(model, plan, added_bias=add_bias and not has_bias)
    return model


def _update_config(model, plan, added_bias: bool):
    a = adapter_for(model)
    L = a.num_layers(model)
    widths = [a.width(model, i) for i in range(L)]
    section = dict(getattr(model.config, "neuroproj_prune", None) or {})
    if len(set(widths)) == 1:
        a.set_config_width(model.config, widths[0])
        section.pop("widths", None)
    else:
        a.set_config_width(model.config, max(widths))
        section["widths"] = widths
    if added_bias:
        if a.config_can_express_out_bias(model.config):
            a.declare_out_bias(model)
        else:
            section["out_bias"] = True
    if section:
        section["format"] = "neuroproj-prune/checkpoint/1"
        model.config.neuroproj_prune = section
    elif hasattr(model.config, "neuroproj_prune"):
        del model.config.neuroproj_prune


# ----------------------------------------------------------------------------------------- checkpoints
def save_pruned(model, tokenizer, out, *, summary: dict | None = None, extra_files: dict | None = None,
                overwrite: bool = False) -> Path:
    """Write the checkpoint atomically: a temporary directory beside `out`, renamed when complete.
    Uniform widths and no added bias → a standard checkpoint (plain `from_pretrained`); otherwise the
    config carries a `neuroproj_prune` section and `load_pruned` rebuilds the modules."""
    out = Path(out)
    prepare_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if summary is not None:
            (tmp / "prune_summary.json").write_text(json.dumps(summary, indent=2))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise NeuroprojError(f"output {out} exists and is not empty: choose another --out or pass --overwrite")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary directory to `out`, replacing an old one only at the last moment."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load_pruned(path, dtype=None, device=None, return_tokenizer: bool = False):
    """Rebuild a checkpoint whose config has a `neuroproj_prune` section (per-layer widths, added MLP
    biases, applied skips) and load its weights strictly; refuse what cannot be reproduced exactly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise NeuroprojError(f"cannot read the checkpoint config in {path}: {str(e).splitlines()[0][:200]}") from None
    section = getattr(config, "neuroproj_prune", None) or {}
    if section and section.get("format") != "neuroproj-prune/checkpoint/1":
        raise NeuroprojError(f"{path}: unknown neuroproj_prune checkpoint format {section.get('format')!r}; "
                             f"upgrade neuroproj-prune")
    unknown = set(section) - {"format", "widths", "out_bias", "skips"}
    if unknown:
        raise NeuroprojError(f"{path}: the checkpoint needs features this version cannot rebuild: {sorted(unknown)}")
    dt = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype or "float32").replace("torch.", ""))
    model = AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=False)
    a = adapter_for(model)
    widths = section.get("widths")
    if widths is not None:
        if len(widths) != a.num_layers(model):
            raise NeuroprojError(f"{path}: {len(widths)} widths for {a.num_layers(model)} layers")
        for i, w in enumerate(widths):
            a.select_neurons(model, i, torch.arange(int(w)))
    if section.get("out_bias"):
        for i in range(a.num_layers(model)):
            if a.out_bias(model, i) is None:
                a.set_out_bias(model, i, torch.zeros(a.hidden_size(model)))
    if section.get("skips"):
        from .skips import attach_skips  # applied skip connections (issue: skips)

        attach_skips(model, section["skips"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NeuroprojError(f"{path} holds no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if getattr(config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (getattr(config, "tie_word_embeddings", False) and k == "lm_head.weight")]
    if missing or unexpected:
        raise NeuroprojError(f"{path}: the checkpoint does not match its neuroproj_prune section "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device or "cpu").eval()
    model.requires_grad_(False)
    if return_tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError):
            tok = None
        return model, tok
    return model
