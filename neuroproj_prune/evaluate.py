"""Evaluation: perplexity by the standard protocol, and lm-eval tasks on the in-memory model.

Two numbers, two normalisations — they are not interchangeable:

**Perplexity (`perplexity`)** — the GPTQ / SparseGPT / Wanda / FLAP protocol. The whole text is tokenized
once (no special tokens), cut into non-overlapping windows of `seqlen` tokens (the tail shorter than a window
is dropped), and every window is scored independently, with no context carried over. The first token of a
window has nothing to condition on, so each window predicts `seqlen - 1` tokens:

    T = windows * (seqlen - 1),   NLL = sum over windows and positions of -log p(x_t | x_<t in the window)
    perplexity = exp(NLL / T)

This is exactly the number the usual reference code computes (`loss * seqlen` summed, divided by
`windows * seqlen`, where `loss` is the mean over the `seqlen - 1` shifted positions: the factors `seqlen`
cancel). It is normalised per *token of this model's tokenizer*, so it compares models that share a
tokenizer, at the same `seqlen`.

**lm-eval rolling tasks (`eval/tasks/`, `lm_eval_tasks`)** — `loglikelihood_rolling` scores each *document*
separately: all its tokens are predicted (the first one given a prefix token, BOS or else EOS), in disjoint
chunks of `max_length` predictions whose context is the previous chunk's last token (the last chunk is
given a full `max_length` context). The totals are normalised per unit of text, not per token:

    word_perplexity = exp(NLL_lm / words)      (words: whitespace-separated, of every document)
    byte_perplexity = exp(NLL_lm / bytes)      bits_per_byte = NLL_lm / (bytes * ln 2)

So `log(word_perplexity) = log(token perplexity) * tokens / words` when both sum the same NLL; they differ
only by where context is cut (document starts, window boundaries, the first token of each window and the
dropped tail). tests/test_evaluate.py checks both: lm-eval's NLL equals a hand computation over its windows,
and its per-token NLL agrees with `perplexity` on the same text within those boundary effects. Word and byte
perplexity compare models with different tokenizers; token perplexity does not.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .adapters import context_length
from .data import eval_windows, read_text
from .errors import NeuroprojError
from .io import write_json
from .models import LoadedModel, load_model
from .tasks import TASKS, default_batch_size as zeroshot_batch_size, expand, summary as zeroshot_summary

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SEQLEN = 2048
DEFAULT_EVAL_FILE = "wikitext2-test.txt"
LOGITS_BUDGET = 1 << 28          # float32 logits elements per forward pass (1 GiB) for the default batch size
TOKENS_BUDGET = 8192             # tokens per forward pass for the default batch size


# ------------------------------------------------------------------------------------------ helpers
def tasks_dir() -> Path:
    """The folder of local lm-eval task YAMLs (`eval/tasks/` of the checkout; NEUROPROJ_TASKS_DIR overrides)."""
    return Path(os.environ.get("NEUROPROJ_TASKS_DIR") or REPO / "eval" / "tasks")


def shared_data_dir() -> Path | None:
    """`shared/data` beside the checkout (or NEUROPROJ_DATA_DIR); None when not found."""
    if os.environ.get("NEUROPROJ_DATA_DIR"):
        return Path(os.environ["NEUROPROJ_DATA_DIR"]).expanduser()
    for parent in Path(__file__).resolve().parents:
        cand = parent / "shared" / "data"
        if cand.is_dir():
            return cand
    return None


def default_eval_data() -> str:
    """The standard perplexity text: shared/data/wikitext2-test.txt."""
    d = shared_data_dir()
    if d is None or not (d / DEFAULT_EVAL_FILE).is_file():
        raise NeuroprojError(f"no evaluation text given and shared/data/{DEFAULT_EVAL_FILE} not found: pass --data FILE")
    return str(d / DEFAULT_EVAL_FILE)


def model_context(model) -> int | None:
    """The model's maximum sequence length (None when its config does not say); see `Adapter.context_length`."""
    return context_length(model)


def default_batch_size(seqlen: int, vocab: int) -> int:
    """Windows per forward pass: about 8k tokens, and the float32 logits within 1 GiB."""
    return max(1, min(TOKENS_BUDGET // seqlen, LOGITS_BUDGET // max(1, seqlen * vocab)))


def _unpack(model, tokenizer=None):
    """(model, tokenizer, name, fingerprint) from a LoadedModel, a (model, tokenizer) pair or a bare model."""
    if isinstance(model, LoadedModel):
        return model.model, tokenizer or model.tokenizer, model.spec, model.fingerprint
    if isinstance(model, (tuple, list)) and len(model) == 2:
        model, tokenizer = model[0], tokenizer or model[1]
    if tokenizer is None:
        raise NeuroprojError("perplexity needs a tokenizer: pass a LoadedModel, (model, tokenizer) or tokenizer=")
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    return model, tokenizer, name, None


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------- perplexity
def perplexity(model, tokenizer=None, data=None, *, seqlen: int | None = None, max_windows: int | None = None,
               batch_size: int | None = None, progress: bool = True) -> dict:
    """Perplexity of a causal LM on a text, by the standard non-overlapping-window protocol.

    Call as `perplexity(loaded, data)` (a `LoadedModel`, or a `(model, tokenizer)` pair) or
    `perplexity(model, tokenizer, data)`. `data`: a `.txt`/`.jsonl` path or `datasets` name (see data.py;
    None: shared/data/wikitext2-test.txt), a 1-D LongTensor of token ids (cut into windows), or a 2-D
    LongTensor of ready windows (`seqlen` = its width).

    Protocol (see the module docstring): the whole text tokenized once, non-overlapping windows of
    `seqlen` (default min(2048, the model's context)), tail dropped, each window scored on its own; the
    first token of every window is not predicted, so `tokens = windows * (seqlen - 1)`;
    `value = exp(nll)`, `nll` = mean token NLL (accumulated in float64). `max_windows` keeps the *first*
    K windows (a quick look, reported as `max_windows` with `windows_total`).

    Batched (`batch_size` windows per forward pass, default ~8k tokens), under `torch.inference_mode`, on
    the model's device; the result does not depend on the batch size beyond float rounding.
    Returns {value, nll, seqlen, windows, tokens, data, windows_total, [max_windows], batch_size, seconds, protocol}.
    """
    if data is None and tokenizer is not None and isinstance(tokenizer, (str, os.PathLike, torch.Tensor)):
        data, tokenizer = tokenizer, None          # perplexity(loaded, data)
    model, tokenizer, _, _ = _unpack(model, tokenizer)
    ctx = model_context(model)
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        if seqlen is not None and seqlen != data.shape[1]:
            raise NeuroprojError(f"seqlen {seqlen} differs from the width {data.shape[1]} of the given windows")
        seqlen = data.shape[1]
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, ctx) if ctx else DEFAULT_SEQLEN
    if seqlen < 2:
        raise NeuroprojError(f"seqlen must be at least 2 (got {seqlen})")
    if ctx is not None and seqlen > ctx:
        raise NeuroprojError(f"seqlen {seqlen} exceeds the model's context of {ctx} tokens")
    if max_windows is not None and max_windows < 1:
        raise NeuroprojError(f"max_windows must be at least 1 (got {max_windows})")

    if data is None:
        data = default_eval_data()
    if isinstance(data, torch.Tensor):
        ids = data.long().cpu()
        if ids.dim() == 1:
            n = ids.numel() // seqlen
            if n < 1:
                raise NeuroprojError(f"{ids.numel()} tokens are fewer than one window of {seqlen}")
            ids = ids[: n * seqlen].view(n, seqlen)
        elif ids.dim() != 2:
            raise NeuroprojError("token data must be a 1-D id sequence or a 2-D (windows, seqlen) tensor")
        windows, desc = ids, f"given tokens ({ids.numel()})"
    else:
        windows, desc = eval_windows(tokenizer, str(data), seqlen)
    total = windows.shape[0]
    if max_windows is not None:
        windows = windows[:max_windows]
    n = windows.shape[0]
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    bs = batch_size or default_batch_size(seqlen, vocab)
    if bs < 1:
        raise NeuroprojError(f"batch_size must be at least 1 (got {bs})")

    device = _device_of(model)
    nll_sum = torch.zeros((), dtype=torch.float64)
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc=f"perplexity ({seqlen} tokens/window)", unit="window", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, bs):
                batch = windows[start:start + bs].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                for row in range(batch.shape[0]):      # one (seqlen, vocab) log-softmax at a time
                    nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum")
                    nll_sum += nll.double().cpu()
                del logits
                bar.update(batch.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    tokens = n * (seqlen - 1)
    mean = float(nll_sum) / tokens
    if not math.isfinite(mean):
        raise NeuroprojError("the model's loss is not finite (NaN/inf logits): its weights hold NaN/inf, or it "
                             "overflows in its dtype (try --dtype float32)")
    out = {
        "value": math.exp(mean),
        "nll": mean,
        "seqlen": seqlen,
        "windows": n,
        "tokens": tokens,
        "data": desc,
        "windows_total": total,
        "batch_size": bs,
        "seconds": round(time.perf_counter() - t0, 3),
        "protocol": "whole text tokenized once (no special tokens), non-overlapping windows, tail dropped, "
                    "each window scored independently, seqlen-1 predicted tokens per window, exp(mean token NLL)",
    }
    if max_windows is not None and max_windows < total:
        out["max_windows"] = max_windows
    return out


# ------------------------------------------------------------------------------------------ lm-eval
_TASK_MANAGERS: dict = {}


def _task_manager(include_defaults: bool, include_path):
    """A cached lm-eval TaskManager; `include_path` a folder or a list of folders."""
    paths = [str(p) for p in (include_path if isinstance(include_path, (list, tuple)) else [include_path])]
    key = (include_defaults, tuple(paths))
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(include_path=paths, include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


def _builtin_task_dirs(names) -> tuple[list[Path], set[str]] | None:
    """Folders of lm-eval's built-in task YAMLs that mention `names` as a task, group or tag (or list item).

    Indexing all ~14k built-in YAMLs takes 15 s or more; a text scan takes about one, so a task manager over
    just these folders finds a built-in task fast, and a name no YAML mentions is unknown at once.
    Returns (folders, names found); None when lm-eval's task folder is not found (use the full index)."""
    import re

    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    if not root.is_dir():
        return None
    pats = [re.compile(rf"^\s*(?:(?:task|group|tag)\s*:\s*|-\s*)['\"]?{re.escape(n)}['\"]?\s*$", re.M)
            for n in names]
    dirs, found = set(), set()
    for y in root.rglob("*.yaml"):
        try:
            text = y.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for n, p in zip(names, pats):
            if n in text and p.search(text):
                dirs.add(y.parent)
                found.add(n)
    return sorted(dirs), found


def local_tasks(include_path=None) -> list[str]:
    """Names (tasks and tags) of the local task YAMLs: e.g. local_wikitext2, local_c4, local_shakespeare,
    and the tag local_perplexity (all three)."""
    path = Path(include_path) if include_path else tasks_dir()
    if not path.is_dir():
        return []
    return _task_manager(False, path).all_tasks


def load_tasks(tasks, include_path=None) -> list:
    """lm-eval Task/Group objects for task names (local YAMLs first, then lm-eval's built-in tasks).

    Fails with one NeuroprojError naming the local alternatives when a name is unknown or its data cannot
    be reached (offline, `HF_DATASETS_OFFLINE=1` makes that immediate)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise NeuroprojError("no lm-eval task given")

    names, zeroshot_dirs = expand(names)          # `zeroshot` -> the eight tasks; their data checked (tasks.py)
    path = Path(include_path) if include_path else tasks_dir()
    paths = [path, *zeroshot_dirs]
    local = local_tasks(path) + [n for n in TASKS if zeroshot_dirs]
    alternatives = f"local tasks (offline, in {path}): {', '.join(local) or 'none found'}"
    builtin = [n for n in names if n not in local]
    tm, found = _task_manager(False, paths), set()
    if builtin:
        scan = _builtin_task_dirs(builtin)
        if scan is None:
            tm, found = _task_manager(True, paths), set(builtin)
        else:
            tm, found = _task_manager(False, [*paths, *scan[0]]), scan[1]
    objs = []
    for name in names:
        try:
            try:
                loaded = tm.load([name])
            except KeyError as e:
                if not _unregistered(e) or name not in found or tm is _TASK_MANAGERS.get((True, tuple(map(str, paths)))):
                    raise
                tm = _task_manager(True, paths)      # a group whose members live elsewhere: the full index
                loaded = tm.load([name])
        except KeyError as e:
            if not _unregistered(e):
                raise NeuroprojError(f"lm-eval task {name!r} could not be built (KeyError: {e})") from None
            raise NeuroprojError(f"unknown lm-eval task {name!r}; {alternatives}") from None
        except FileNotFoundError as e:
            raise NeuroprojError(f"lm-eval task {name!r}: {e}") from None
        except Exception as e:  # datasets/hub raise many types (ConnectionError, OfflineModeIsEnabled, ...)
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise NeuroprojError(
                f"lm-eval task {name!r} could not load its data ({type(e).__name__}: {msg}); {alternatives}"
            ) from None
        if name in loaded["groups"]:
            objs.append(loaded["groups"][name])
        else:
            objs.extend(loaded["tasks"].values())
    return objs


def _unregistered(e: KeyError) -> bool:
    """lm-eval's TaskManager raises KeyError "... is not a registered task/group/tag name ..." for unknown names."""
    return "registered" in str(e)


def _clean_metrics(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k in ("alias", "name", "sample_len") or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue                      # keep numbers only ("N/A" stderrs, names, lm-eval's bookkeeping)
        if isinstance(v, float) and math.isnan(v):
            continue
        key = k[: -len(",none")] if k.endswith(",none") else k
        out[key] = v
    return out


def lm_eval_tasks(model, tokenizer=None, tasks=("local_wikitext2",), *, max_length: int | None = None,
                  batch_size: int | None = None, limit: int | float | None = None, num_fewshot: int | None = None,
                  include_path=None, bootstrap_iters: int = 100000, task_objects=None) -> dict:
    """Run lm-eval tasks on an in-memory model: `HFLM(pretrained=model, tokenizer=tok, max_length, batch_size)`
    and `lm_eval.simple_evaluate` with a TaskManager that includes `eval/tasks/`.

    `max_length` defaults to min(2048, the model's context); `limit` keeps the first N documents of each
    task (a fraction when < 1). Returns {"tasks": {name: {metric: value, samples, samples_total, version}},
    "groups": {...}, "protocol": {...}}; metric names lose lm-eval's ",none" filter suffix.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, name, _ = _unpack(model, tokenizer)
    objs = task_objects if task_objects is not None else load_tasks(tasks, include_path)
    ctx = model_context(model)
    max_length = max_length or (min(DEFAULT_SEQLEN, ctx) if ctx else DEFAULT_SEQLEN)
    if ctx is not None and max_length > ctx:
        raise NeuroprojError(f"max_length {max_length} exceeds the model's context of {ctx} tokens")
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    bs = batch_size or default_batch_size(max_length, vocab)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=bs)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=objs, limit=limit, num_fewshot=num_fewshot,
                                  bootstrap_iters=bootstrap_iters, log_samples=False,
                                  task_manager=_task_manager(False, Path(include_path) if include_path else tasks_dir()))
    if res is None:  # not rank 0
        return {}
    n_samples = res.get("n-samples", {})
    versions = res.get("versions", {})
    out_tasks = {}
    for task, metrics in res.get("results", {}).items():
        entry = _clean_metrics(metrics)
        if task in n_samples:
            entry["samples"] = n_samples[task].get("effective")
            entry["samples_total"] = n_samples[task].get("original")
        if task in versions:
            entry["version"] = versions[task]
        out_tasks[task] = entry
    groups = {g: _clean_metrics(m) for g, m in res.get("groups", {}).items()}
    try:
        from importlib.metadata import version

        lm_eval_version = version("lm_eval")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        lm_eval_version = getattr(lm_eval, "__version__", "unknown")
    return {
        "tasks": out_tasks,
        "groups": groups,
        "protocol": {
            "model": name, "max_length": max_length, "batch_size": bs, "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval_version": lm_eval_version, "include_path": str(include_path or tasks_dir()),
            "seconds": round(time.perf_counter() - t0, 3),
            "perplexity_metrics": "rolling loglikelihood per document; word_perplexity = exp(NLL / words), "
                                  "byte_perplexity = exp(NLL / bytes), bits_per_byte = NLL / (bytes ln 2)",
        },
    }


def task_scores(model, tokenizer=None, tasks=None, *, task_objects=None, max_length: int | None = None,
                batch_size: int | None = None, limit: int | float | None = None, num_fewshot: int | None = None,
                include_path=None) -> dict:
    """`lm_eval_tasks` with the batch size the zero-shot tasks default to (`tasks.default_batch_size`) and
    the zero-shot average added as `"zeroshot"` (when a zero-shot task ran): what `eval --tasks` and the
    sweep's cells report. Cost: one lm-eval run (about 0.1 s per loglikelihood request for SmolLM2-135M on
    one CPU core; `--tasks zeroshot --limit 500` is 11,495 requests)."""
    model, tokenizer, _, _ = _unpack(model, tokenizer)
    objs = task_objects if task_objects is not None else load_tasks(tasks, include_path)
    vocab = getattr(model.config, "vocab_size", None) or len(tokenizer)
    bs = batch_size or zeroshot_batch_size([t.config.task for t in objs if hasattr(t, "config")], vocab)
    res = lm_eval_tasks((model, tokenizer), tasks=None, task_objects=objs, max_length=max_length, batch_size=bs,
                        limit=limit, num_fewshot=num_fewshot, include_path=include_path)
    avg = zeroshot_summary(res.get("tasks", {}), limit)
    if avg:
        res["zeroshot"] = avg
    return res


def check_limit(limit):
    """lm-eval's `limit` as given by a user: None, a whole number of documents N >= 1 (returned as int) or a
    fraction in (0, 1); anything else is a one-line NeuroprojError."""
    if limit is None:
        return None
    ok = isinstance(limit, (int, float)) and not isinstance(limit, bool) and math.isfinite(limit) and limit > 0
    if not ok or (limit >= 1 and limit != int(limit)):
        raise NeuroprojError(f"limit must be a whole number of documents per task (>= 1) or a fraction in (0, 1), "
                             f"got {limit!r}")
    return int(limit) if limit >= 1 else float(limit)


# ------------------------------------------------------------------------------------------ evaluate
def evaluate(model_or_spec, *, data=None, seqlen: int | None = None, max_windows: int | None = None,
             tasks=None, batch_size: int | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, json_out=None, dtype="auto", device="auto", tokenizer=None,
             include_path=None, progress: bool = True) -> dict:
    """Perplexity and/or lm-eval tasks for one model; the `eval --json` format.

    `model_or_spec`: a LoadedModel, a (model, tokenizer) pair, or anything `load_model` accepts (hub id,
    directory, .gguf, pruned directory, 'smollm2-135m'). Perplexity runs when `data` is given or no `tasks`
    are (then on shared/data/wikitext2-test.txt); lm-eval runs when `tasks` (list or comma string) are given,
    with `max_length = seqlen` (default min(2048, model context)), through `task_scores`. Task names, their
    data and `limit` (`check_limit`) are checked before the model is loaded, so bad input fails at once.

    Returns `{"perplexity": {value, seqlen, windows, tokens, data, ...} | None,
    "lm_eval": {"tasks": ..., "groups": ..., "protocol": ...} | None, "model": {...}}`;
    `json_out` writes it (atomically).
    """
    limit = check_limit(limit)
    task_objs = load_tasks(tasks, include_path) if tasks else None
    run_ppl = data is not None or not tasks
    if run_ppl and data is None:
        data = default_eval_data()
    if run_ppl and not isinstance(data, torch.Tensor):
        p = Path(str(data)).expanduser()
        if p.suffix in (".txt", ".raw", ".jsonl", ".json") and not p.is_file():
            read_text(str(data))   # raises the standard "not found" error before the model is loaded
    if isinstance(model_or_spec, (str, os.PathLike)):
        loaded = load_model(str(model_or_spec), dtype=dtype, device=device)
    else:
        loaded = model_or_spec
    model, tok, name, fingerprint = _unpack(loaded, tokenizer)
    result = {"perplexity": None, "lm_eval": None,
              "model": {"spec": name, "fingerprint": fingerprint,
                        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                        "device": str(_device_of(model))}}
    if run_ppl:
        result["perplexity"] = perplexity((model, tok), data=data, seqlen=seqlen, max_windows=max_windows,
                                          batch_size=batch_size, progress=progress)
    if tasks:
        result["lm_eval"] = task_scores((model, tok), task_objects=task_objs, max_length=seqlen,
                                        batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                                        include_path=include_path)
    if json_out:
        write_json(json_out, result)
    return result


def format_summary(result: dict) -> str:
    """A readable summary of an `evaluate` result (what `neuroproj-prune eval` prints)."""
    lines = []
    m = result.get("model") or {}
    if m:
        lines.append(f"model: {m.get('spec')} ({m.get('dtype')}, {m.get('device')})")
    p = result.get("perplexity")
    if p:
        lim = f" (first {p['max_windows']} of {p['windows_total']})" if "max_windows" in p else ""
        lines.append(f"perplexity: {p['value']:.4f}  (seqlen {p['seqlen']}, {p['windows']} windows{lim}, "
                     f"{p['tokens']} tokens, data {p['data']}, {p['seconds']:.1f} s)")
    le = result.get("lm_eval")
    if le:
        pr = le["protocol"]
        lines.append(f"lm-eval {pr['lm_eval_version']}: max_length {pr['max_length']}, batch {pr['batch_size']}"
                     + (f", limit {pr['limit']}" if pr["limit"] is not None else ""))
        rows = []
        for task, metrics in {**le["tasks"], **le.get("groups", {})}.items():
            for k, v in metrics.items():
                if k in ("samples", "samples_total", "version") or k.endswith("_stderr") or "_stderr," in k:
                    continue
                err = metrics.get(k.replace(",", "_stderr,", 1) if "," in k else f"{k}_stderr")
                val = _fmt(v)
                if isinstance(err, float):
                    val += f" ± {_fmt(err)}"
                docs = (f"{metrics.get('samples')}/{metrics.get('samples_total')}"
                        if metrics.get("samples") is not None else "")
                rows.append((task, k, val, docs))
        if rows:
            w = [max(len(r[i]) for r in rows + [("task", "metric", "value", "docs")]) for i in range(4)]
            lines.append("  " + "  ".join(h.ljust(w[i]) for i, h in enumerate(("task", "metric", "value", "docs"))))
            for r in rows:
                lines.append("  " + "  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
        zs = le.get("zeroshot")
        if zs:
            lines.append(f"zero-shot average ({len(zs['tasks'])} of 8 tasks"
                         + (f", first {zs['limit']} documents each" if zs.get("limit") else "")
                         + f"): {zs['average']:.4f}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4e}" if v != 0 and not 1e-3 <= abs(v) < 1e6 else f"{v:.4f}"
    return str(v)
