"""lm-evaluation-harness on the in-memory model: task lookup (local YAMLs, the offline zero-shot tasks, lm-eval's
built-in ones), `lm_eval_tasks` and `task_scores`.

**Rolling perplexity tasks (`local_tasks/`)** — `loglikelihood_rolling` scores each *document* separately: all
its tokens are predicted (the first one given a prefix token, BOS or else EOS), in disjoint chunks of
`max_length` predictions whose context is the previous chunk's last token (the last chunk is given a full
`max_length` context). The totals are normalised per unit of text, not per token:

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

from ..errors import NeuroprojError
from .perplexity import DEFAULT_SEQLEN, _unpack, default_batch_size, model_context
from .tasks import TASKS, default_batch_size as zeroshot_batch_size, expand, summary as zeroshot_summary

LOCAL_TASKS = Path(__file__).resolve().parent / "local_tasks"


def tasks_dir() -> Path:
    """The folder of local lm-eval task YAMLs (package data: `neuroproj_prune/evaluate/local_tasks`, which an
    installed wheel carries too; NEUROPROJ_TASKS_DIR overrides)."""
    return Path(os.environ.get("NEUROPROJ_TASKS_DIR") or LOCAL_TASKS)


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
    and `lm_eval.simple_evaluate` with a TaskManager that includes the local task YAMLs (`tasks_dir()`).

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


def limit_opt(what: str):
    """The `limit` setting of a config that runs lm-eval tasks (eval, sweep)."""
    from ..config import opt

    return opt(None, f"{what}: the first N documents per task (a fraction when < 1)", kind=float, gt=0.0)


def check_tasks_limit(cfg) -> None:
    """A config's `limit` as lm-eval takes it (`check_limit`), and only with `tasks`; ConfigError otherwise."""
    from ..config import ConfigError

    try:
        cfg.limit = check_limit(cfg.limit)
    except NeuroprojError as e:
        raise ConfigError("limit", str(e)) from None
    if cfg.limit is not None and not cfg.tasks:
        raise ConfigError("limit", "--limit counts lm-eval documents: give --tasks too")


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
