"""The model card (`README.md` with Hugging Face front matter) written into every checkpoint `prune`, `recover` and
`export --to hf|nemotron-nas` produce, and the command that produced it.

A user who publishes a pruned model needs what the card says: the base model (front matter `base_model`, which the
hub links and llama.cpp's converter turns into `general.base_model.*`), the method and its settings, the widths
each layer keeps, the calibration data, the command, and the numbers the run measured. Everything comes from
`prune_summary.json` (with its `recover` section) and, where a run evaluated the checkpoint, `eval.json`; the card
is rendered again from them whenever one of them changes, so it never says more than the files beside it.
"""
from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

import torch
import yaml

CARD_FILE = "README.md"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"   # what the offline alias `smollm2-135m` holds (as GGUF)
TAGS = ("neuroproj-prune", "pruned", "structured-pruning")

_COMMAND: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuroproj_prune_command", default=None)


# ------------------------------------------------------------------------------------------ the command
@contextlib.contextmanager
def invocation(command: str):
    """Within this block, `command()` is `command` (the CLI sets its argv here, so a checkpoint written by `run`
    names `neuroproj-prune run RECIPE`, the command a user repeats; `export` its API call when no CLI is)."""
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def command(api: str | None = None) -> str | None:
    """The command line (or API call, see `invocation`) that is running, else `api`."""
    return _COMMAND.get() or api


def api_call(fn: str, *args, **kwargs) -> str:
    """`fn(args..., key=value...)` as Python source: tensors and loaded models by what they are, None dropped."""
    def show(v):
        if isinstance(v, torch.Tensor):
            return f"<tensor {'x'.join(map(str, v.shape))}>"
        if hasattr(v, "spec") and hasattr(v, "model"):   # a LoadedModel: the spec it was loaded from
            return repr(str(v.spec))
        if isinstance(v, Path):
            return repr(str(v))
        return repr(v) if isinstance(v, (str, int, float, bool, list, tuple, dict)) else f"<{type(v).__name__}>"
    parts = [show(a) for a in args] + [f"{k}={show(v)}" for k, v in kwargs.items() if v is not None]
    return f"{fn}({', '.join(parts)})"


# ---------------------------------------------------------------------------------------------- card
def base_model_id(spec: str | None) -> str:
    """What `base_model` names: the hub id of the offline alias, a hub id as given, a local path as given (to be
    replaced by its hub id before publishing: the hub links only ids)."""
    if not spec:
        return "unknown"
    return SMOLLM2_HUB_ID if str(spec) == "smollm2-135m" else str(spec)


def model_card(summary: dict | None, *, spec: str | None = None, evaluation: dict | None = None,
               dense_evaluation: dict | None = None, export: dict | None = None, loader: str = "transformers") -> str:
    """The card of a checkpoint: front matter, then method, widths, data, measured numbers, loading and command.

    `summary`: prune_summary.json (None for a dense model); `spec`: the model when there is no summary;
    `evaluation` / `dense_evaluation`: eval.json of this checkpoint and of its dense model (a run's eval stage);
    `export`: {"format", "type"} for `export`; `loader`: transformers, load_pruned or trust_remote_code."""
    s = summary or {}
    base = base_model_id(s.get("model") or spec)
    front = {"base_model": base, "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": list(TAGS) if summary else ["neuroproj-prune"]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {_title(s, base)}", "",
             description(summary, base), ""]
    if summary:
        lines += _method(s) + _widths(s)
    lines += _measured(s, evaluation, dense_evaluation)
    lines += _loading(loader, export)
    cmds = [c for c in (s.get("command"), (s.get("recover") or {}).get("command"), (export or {}).get("command")) if c]
    if cmds:
        lines += ["## Command", "", "```", *cmds, "```", ""]
    return "\n".join(lines)


def description(summary: dict | None, base: str) -> str:
    """One paragraph: what this checkpoint is (also the GGUF's `general.description`)."""
    if not summary:
        return f"{base}, not pruned, written by neuroproj-prune."
    s = summary
    if s.get("skips") is not None and s.get("neurons_after") is None:   # `skips --apply`: no neurons removed
        text = (f"{base} with {len(s['skips'].get('applied') or [])} MLP skips applied by neuroproj-prune, "
                f"{_count(s.get('params_after', 0))} parameters.")
    else:
        parts = [f"{s.get('neurons_after', 0):,} of {s.get('neurons_before', 0):,} neurons"]
        heads = s.get("heads") or []
        before = [h for i, h in enumerate(s.get("heads_before") or []) if i not in set(s.get("dropped_layers") or [])]
        if heads and before and sum(h[0] for h in heads) != sum(h[0] for h in before):
            parts.append(f"{sum(h[0] for h in heads)} of {sum(h[0] for h in before)} attention heads")
        if s.get("dropped_layers"):
            parts.append(f"decoder layers {s['dropped_layers']} removed")
        if s.get("removed_attention"):
            parts.append(f"the attention of layers {s['removed_attention']} removed")
        text = (f"{base} with {s.get('actual_sparsity', 0):.1%} of its MLP neurons removed by neuroproj-prune "
                f"({s.get('select')} selection, {s.get('fold')} fold, {s.get('allocation')} widths, "
                f"{s.get('calibration')} calibration): {', '.join(parts)}, "
                f"{_count(s.get('params_after', 0))} of {_count(s.get('params_before', 0))} parameters.")
    rec = s.get("recover")
    if rec:
        text += (f" Then distilled from {rec.get('teacher')} ({rec.get('method')}, {rec.get('tokens_seen'):,} tokens "
                 f"of {rec.get('data')}).")
    return text


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _title(s: dict, base: str) -> str:
    name = base.rstrip("/").split("/")[-1]
    if not s:
        return name
    return f"{name}, {s.get('actual_sparsity', 0):.1%} of MLP neurons pruned" + (" and recovered" if s.get("recover") else "")


def _method(s: dict) -> list[str]:
    rows = [("selection", s.get("select")), ("fold", s.get("fold")), ("allocation", s.get("allocation")),
            ("calibration", s.get("calibration")), ("fold target", s.get("target")),
            ("calibration data", s.get("calibration_data")), ("requested sparsity", s.get("sparsity")),
            ("stored dtype", _dtype_text(s))]
    budget = _budget(s.get("budget"))
    if budget:
        rows.append(("budget", budget))
    rec = s.get("recover")
    if rec:
        rows += [("recover", f"{rec.get('method')} distillation from {rec.get('teacher')}, {rec.get('tokens_seen'):,} "
                             f"tokens of {rec.get('data')}, lr {rec.get('lr')}, kept the {rec.get('kept')} weights")]
    out = ["## Method", "", "| setting | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in rows if v is not None]
    where = "`config`" + ("; the recovery's: `recover.config`" if rec else "")
    return out + ["", f"Every setting: `prune_summary.json` ({where}).", ""]


def _budget(b: dict | None) -> str | None:
    """The budget a run was given and what its speed model predicts of the chosen shape."""
    if not b:
        return None
    want = [f"{b['target_params']:.0%} of the decoder layers' parameters"] if b.get("target_params") else []
    if b.get("target_speedup"):
        sm = b.get("speed_model") or {}
        m = sm.get("meta") or {}
        by = ("a latency file measured in llama.cpp " + ", ".join(
            [str(m.get("type"))] + ([f"{m['threads']} threads"] if m.get("threads") else []))
            if sm.get("source") == "measured" else "the bytes proxy")
        got = (b.get("chosen") or {}).get("predicted_speedup")
        want.append(f"{b['target_speedup']:g}x decode speed by {by}" + (f" (predicted {got:.2f}x)" if got else ""))
    return "; ".join(want) + f"; axes {', '.join(b.get('axes') or [])}, finalists judged {b.get('judge')}"


def _dtype_text(s: dict) -> str | None:
    if not s.get("save_dtype"):
        return None
    src = s.get("source_dtype")
    return s["save_dtype"] + (f" (the base model's files: {src})" if src else "")


def _widths(s: dict) -> list[str]:
    kept = s.get("kept") or []
    if not kept:
        return []
    dense = s.get("neurons_before", 0) // len(kept) if s.get("neurons_before", 0) % len(kept) == 0 else None
    of = f" of {dense}" if dense else ""
    if len(set(kept)) == 1:
        text = f"Every one of the {len(kept)} layers keeps {kept[0]}{of} MLP neurons."
    else:
        text = f"MLP neurons kept in layers 0 to {len(kept) - 1}{of and f' ({of.strip()})'}: {', '.join(map(str, kept))}."
    macs = ""
    if s.get("mlp_macs_per_token_before"):
        macs = (f" MLP multiply-accumulates per token: {s['mlp_macs_per_token_before']:,} → "
                f"{s['mlp_macs_per_token_after']:,}.")
    return ["## Widths", "", text + macs, ""]


def _measured(s: dict, evaluation: dict | None, dense: dict | None) -> list[str]:
    out = []
    ho = (s.get("recover") or {}).get("held_out")
    if ho:
        out.append(f"- recover, {ho['windows']} held-out windows of {ho['seqlen']} tokens: perplexity "
                   f"{ho['ppl_before']:.3f} before, {ho['ppl_after']:.3f} after (teacher {ho['teacher_ppl']:.3f})")
    p = (evaluation or {}).get("perplexity")
    if p:
        d = (dense or {}).get("perplexity")
        ref = f" (dense model: {d['value']:.3f})" if d and d.get("data") == p.get("data") else ""
        out.append(f"- perplexity on {p['data']}, {p['windows']} windows of {p['seqlen']} tokens: "
                   f"{p['value']:.3f}{ref}")
    z = (((evaluation or {}).get("lm_eval") or {}).get("zeroshot") or {}).get("average")
    if z is not None:
        out.append(f"- zero-shot average (lm-evaluation-harness): {z:.4f}")
    if not out:
        return ["## Measured", "", "Nothing was evaluated when this checkpoint was written: `neuroproj-prune eval "
                "--model DIR --data TEXT` measures its perplexity.", ""]
    return ["## Measured", "", *out, ""]


def _loading(loader: str, export: dict | None) -> list[str]:
    fmt = f" (`export --to {export['format']}`, {export['type']})" if export else ""
    if loader == "load_pruned":
        code = ["import neuroproj_prune as npp", "model, tok = npp.load_pruned('DIR', return_tokenizer=True)"]
        note = "Per-layer widths (or skips): `neuroproj_prune.load_pruned` rebuilds the modules"
    elif loader == "trust_remote_code":
        code = ["from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained('DIR', trust_remote_code=True)"]
        note = ("nemotron-nas (DeciLMForCausalLM, per-layer widths zero-padded to multiples of 256): vLLM, SGLang, "
                "mlx-lm and TensorRT-LLM read it; transformers runs the modeling files beside the weights")
    else:
        code = ["from transformers import AutoModelForCausalLM",
                "model = AutoModelForCausalLM.from_pretrained('DIR')"]
        note = "A standard checkpoint: plain transformers loads it"
    return ["## Loading", "", f"{note}{fmt}.", "", "```python", *code, "```", ""]


def read_front_matter(path) -> dict:
    """The YAML front matter of a card (what the hub and llama.cpp's converter read)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4:text.index("\n---", 4)]) or {}
