"""`evaluate`: perplexity and/or lm-eval tasks for one model, in the `eval --json` format."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, opt
from ..errors import NeuroprojError
from ..io import write_json
from ..model import load_model
from ..stats.data import data_path, read_text
from .harness import check_tasks_limit, limit_opt, load_tasks, task_scores
from .tasks import GROUP, TASKS
from .perplexity import _device_of, _unpack, default_eval_data, perplexity


@dataclass
class EvalConfig(Config):
    """Every setting of `eval` (CLI flags, the recipe's `eval` section, keywords of `evaluate()`)."""

    what = "eval"

    seqlen: int | None = opt(None, "window length for perplexity and lm-eval's max_length (default min(2048, model "
                             "context))", kind=int, ge=2)
    max_windows: int | None = opt(None, "score only the first K windows (a quick look)", kind=int, ge=1)
    batch_size: int | None = opt(None, "windows per forward pass (default: ~8k tokens)", kind=int, ge=1)
    tasks: tuple | None = opt(None, "comma list of lm-eval tasks, e.g. local_wikitext2,hellaswag; zeroshot: the eight "
                              "zero-shot tasks (lambada_openai, hellaswag, piqa, winogrande, boolq, arc_easy, "
                              "arc_challenge, openbookqa; offline after `neuroproj-prune tasks fetch`)", kind=list,
                              item=str)
    limit: float | None = limit_opt("lm-eval")
    num_fewshot: int | None = opt(None, "lm-eval: few-shot examples (not for the zero-shot tasks, which have no "
                                  "training split)", kind=int, ge=0)

    def check(self) -> None:
        check_tasks_limit(self)
        if self.num_fewshot is not None and not self.tasks:
            raise ConfigError("num_fewshot", "--num-fewshot applies to lm-eval tasks: give --tasks too")
        zero = [t for t in self.tasks or () if t == GROUP or t in TASKS]
        if self.num_fewshot and zero:
            raise ConfigError("num_fewshot", f"the zero-shot tasks ({', '.join(zero)}) have no training split to draw "
                              f"few-shot examples from: drop --num-fewshot or use --num-fewshot 0")


def evaluate(model_or_spec, config: EvalConfig | None = None, *, data=None, json_out=None, dtype="auto",
             device="auto", tokenizer=None, include_path=None, progress: bool = True, **settings) -> dict:
    """Perplexity and/or lm-eval tasks for one model; the `eval --json` format. `config` (or the `EvalConfig`
    fields as keywords: seqlen, max_windows, batch_size, tasks, limit, num_fewshot) says how.

    `model_or_spec`: a LoadedModel, a (model, tokenizer) pair, or anything `load_model` accepts (hub id,
    directory, .gguf, pruned directory, 'smollm2-135m'). Perplexity runs when `data` is given or no `tasks`
    are (then on shared/data/wikitext2-test.txt); lm-eval runs when `tasks` (list or comma string) are given,
    with `max_length = seqlen` (default min(2048, model context)), through `task_scores`. Task names, their
    data and `limit` (`check_limit`) are checked before the model is loaded, so bad input fails at once.

    Returns `{"perplexity": {value, seqlen, windows, tokens, data, ...} | None,
    "lm_eval": {"tasks": ..., "groups": ..., "protocol": ...} | None, "model": {...}}`;
    `json_out` writes it (atomically). Cost: one forward pass per window, one lm-eval run per task list.
    """
    cfg = config.replace(**settings) if config is not None else EvalConfig.make(**settings)
    seqlen, max_windows, batch_size, limit, num_fewshot = (cfg.seqlen, cfg.max_windows, cfg.batch_size, cfg.limit,
                                                           cfg.num_fewshot)
    tasks = list(cfg.tasks) if cfg.tasks else None
    task_objs = load_tasks(tasks, include_path) if tasks else None
    run_ppl = data is not None or not tasks
    if run_ppl and data is None:
        data = default_eval_data()
    if run_ppl and not isinstance(data, torch.Tensor):
        p = data_path(data)
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


def read_eval(path) -> dict:
    """An `eval --json` file, its schema checked: {"perplexity": {"value", "seqlen", "windows", "tokens", "data", ...}
    | None, "lm_eval": {"tasks": {...}, ...} | None, "model": {...}}; a one-line error otherwise."""
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        p, le = doc.get("perplexity"), doc.get("lm_eval")
        ok = (isinstance(doc, dict) and isinstance(doc.get("model"), dict)
              and (p is None or (isinstance(p, dict) and isinstance(p.get("value"), (int, float))
                                 and all(k in p for k in ("seqlen", "windows", "tokens", "data"))))
              and (le is None or (isinstance(le, dict) and isinstance(le.get("tasks"), dict))))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise NeuroprojError(f"{path} is not an evaluation result (damaged or edited): run `neuroproj-prune eval "
                             f"--json {path}` again")
    return doc


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
