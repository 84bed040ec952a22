"""The tradeoff sweep: every (selection, fold, calibration, sparsity) cell → perplexity, size, time, and
optionally the zero-shot accuracies (`tasks`).

One statistics pass serves every one-shot cell (saved as `stats.safetensors` in the sweep directory);
sequential cells run their own layer-by-layer pass. Each finished cell is appended to `cells.jsonl`, so an
interrupted or extended sweep recomputes nothing that is done. Outputs: `results.csv`, `results.md`
(a per-cell table and a method × sparsity pivot of perplexity) and `tradeoff.png` (perplexity against
sparsity, one line per method, log scale, the dense model as a dashed line).

With `tasks` (zero-shot task names, `zeroshot` for all eight; see tasks.py) every cell's model is also run
through those lm-eval tasks (`evaluate.task_scores`, the same call as `eval --tasks`, with lm-eval's
`max_length` = the perplexity window and `limit` documents per task). A cell keeps them in `lm_eval`
({limit, max_length, tasks: {task: metrics}}); the reports add each task's headline accuracy (acc_norm or
acc, `tasks.HEADLINE`) and their average (`zeroshot_avg`), and results.md a method × sparsity pivot of the
average. Resuming is per task: a cell that lacks a requested task at this limit and max_length is pruned
again (its perplexity is not recomputed; the re-pruned model must have the recorded parameter count) and
evaluated on the missing tasks only; its updated record is appended (the last line of a key wins).

Cost: one dense evaluation plus, per cell, a copy of the model, the pruning and one evaluation; with tasks,
one lm-eval run per model (for SmolLM2-135M on a CPU core, about an hour for `zeroshot` at limit 500).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, opt
from .errors import NeuroprojError
from .evaluate import model_context, perplexity, task_scores
from .evaluate.harness import check_tasks_limit, limit_opt
from .evaluate.tasks import HEADLINE, TASKS, resolve, summary as zeroshot_summary, yaml_dir
from .model import LoadedModel, load_model, num_params
from .prune import ALLOCATIONS, CALIBRATIONS, FOLDS, SELECTORS, PruneConfig, prune
from .prune.budget import AXES
from .stats import collect, eval_windows, load_stats


def method_name(select, fold, calibration, allocation="uniform", axes=None) -> str:
    """A cell's line: its selection, fold, calibration, a per-layer allocation, and the axes of a parameter budget
    (`[mlp+heads]`: then its sparsity is the share of the decoder layers' parameters removed)."""
    return (f"{select}+{fold}+{calibration}" + ("" if allocation == "uniform" else f"+{allocation}")
            + ("" if axes is None else f"[{axes}]"))


def cell_key(select, fold, calibration, sparsity, allocation="uniform", axes=None) -> str:
    return f"{method_name(select, fold, calibration, allocation, axes)}@{sparsity:g}"


# results.csv, the table `write_reports` writes (readers import this): these columns, then with zero-shot tasks one
# `{task}_{acc|acc_norm}` column per task, `zeroshot_avg` and `zeroshot_limit`
RESULTS_CSV = "results.csv"
RESULT_COLUMNS = ("method", "sparsity", "actual_sparsity", "ppl", "params", "mlp_macs_per_token", "seconds", "error")
# per cell; the rest of PruneConfig is shared
SWEPT = ("sparsity", "keep", "select", "fold", "calibration", "allocation", "target_params", "target_speedup", "axes")


@dataclass
class SweepConfig(Config):
    """The settings of `sweep` itself (CLI flags, the recipe's `sweep` section, keywords of `sweep()`); the
    settings every cell shares are a `PruneConfig` (all its fields but the swept ones)."""

    what = "sweep"

    sparsities: tuple = opt((0.1, 0.2, 0.3, 0.4, 0.5), "comma list of sparsities", item=float, ge=0.0, lt=1.0)
    select: tuple = opt(("wanda-sp",), "comma list of selection methods", lambda: SELECTORS, item=str)
    fold: tuple = opt(("lstsq",), "comma list of folds", lambda: FOLDS, item=str)
    calibration: tuple = opt(("sequential",), "comma list of calibrations", lambda: CALIBRATIONS, item=str)
    methods: tuple | None = opt(None, "explicit comma list of SELECT+FOLD[+CALIBRATION[+ALLOCATION]] (e.g. "
                                "flap+bias+oneshot,wanda-sp+lstsq+sequential+global) instead of the --select x --fold "
                                "x --calibration cross product (allocation uniform unless named)", kind=list, item=str)
    eval_seqlen: int | None = opt(None, "evaluation window (default min(2048, context))", kind=int, ge=2)
    max_windows: int | None = opt(None, "evaluate only the first K windows", kind=int, ge=1)
    tasks: tuple | None = opt(None, "also run every cell's model through these zero-shot tasks: zeroshot (all eight) "
                              "or a comma list of lambada_openai,hellaswag,piqa,winogrande,boolq,arc_easy,"
                              "arc_challenge,openbookqa (a finished cell gains missing tasks on a re-run)", kind=list,
                              item=str)
    limit: float | None = limit_opt("with --tasks")
    axes: tuple | None = opt(None, "comma list of axis sets, each a '+'-joined subset of "
                             f"{', '.join(AXES)} (e.g. mlp,mlp+heads,mlp+attn,{'+'.join(AXES)}): every method "
                             "is then swept per axis set at a parameter budget, the sparsities read as the share of "
                             "the decoder layers' parameters removed (--target-params), so that methods that remove "
                             "heads or layers compare at the same count", kind=list, item=str)

    def check(self) -> None:
        for axes in self.axes or ():
            parts = axes.split("+")
            if not parts or any(p not in AXES for p in parts) or len(set(parts)) != len(parts):
                raise ConfigError("axes", f"{axes!r} is not an axis set: join distinct axes of {', '.join(AXES)} "
                                  f"with '+' (e.g. mlp+heads), the sets with commas")
        try:
            resolve(self.tasks)
        except NeuroprojError as e:
            raise ConfigError("tasks", str(e)) from None
        check_tasks_limit(self)


def sweep(model, data, eval_data, config: SweepConfig | None = None, *, prune_config: PruneConfig | None = None,
          out, dtype="auto", device="auto", progress: bool = True, **settings) -> list[dict]:
    """Run (or resume) a sweep in directory `out`; returns all cells (dense first). `config` (or the
    `SweepConfig` fields as keywords: sparsities, select, fold, calibration, methods, eval_seqlen, max_windows,
    tasks, limit) says which cells; each cell is `prune_config` (or the other `PruneConfig` fields in `settings`:
    multiple, target, samples, ...) with its own selection, fold, calibration, allocation and sparsity. `tasks`:
    zero-shot tasks every cell is also evaluated on (`zeroshot`: all eight), `limit` documents of each (see the
    module docstring)."""
    own = {k: v for k, v in settings.items() if k in SweepConfig.field_names()}
    shared = {k: v for k, v in settings.items() if k not in own}
    cfg = config.replace(**own) if config is not None else SweepConfig.make(**own)
    base = prune_config.replace(**shared) if prune_config is not None else PruneConfig.make(**shared)
    names, limit, eval_seqlen, max_windows = resolve(cfg.tasks), cfg.limit, cfg.eval_seqlen, cfg.max_windows
    if names:
        yaml_dir()  # the task data is fetched and intact (else one line saying how), before any work
    sparsities, selects, folds, calibrations = cfg.sparsities, cfg.select, cfg.fold, cfg.calibration
    axis_sets = [None] if not cfg.axes else list(cfg.axes)
    if cfg.methods:  # explicit select+fold[+calibration[+allocation]] instead of the cross product
        combos = []
        for m in cfg.methods:
            parts = m.split("+")
            if len(parts) not in (2, 3, 4):
                raise NeuroprojError(f"method {m!r}: write SELECT+FOLD[+CALIBRATION[+{'|'.join(ALLOCATIONS)}]]")
            combos.append((parts[0], parts[1], parts[2] if len(parts) >= 3 else calibrations[0],
                            parts[3] if len(parts) == 4 else "uniform"))
    else:
        combos = [(s, f, c, "uniform") for c in calibrations for s in selects for f in folds]
    cells = [(s, f, c, sp, al, ax) for s, f, c, al in combos for ax in axis_sets for sp in sparsities]
    # every cell's config is validated before any work (unknown methods, sparsities out of range)
    configs = {cell: _cell_config(base, *cell) for cell in cells}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "cells.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                c = json.loads(line)
                done[c["key"]] = c
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    ctx = model_context(lm.model)
    eval_seqlen = eval_seqlen or min(2048, ctx or 2048)
    windows, eval_desc = eval_windows(lm.tokenizer, str(eval_data), eval_seqlen)
    if max_windows:
        windows = windows[:max_windows]

    def append(cell):
        with log.open("a") as f:
            f.write(json.dumps(cell) + "\n")
        done[cell["key"]] = cell
        return cell

    def record(cell):
        cell["eval"] = {"data": eval_desc, "seqlen": eval_seqlen, "windows": int(windows.shape[0]),
                        "max_windows": max_windows}
        return append(cell)

    def same_settings(cell) -> bool:
        le = cell.get("lm_eval") or {}
        return le.get("limit") == limit and le.get("max_length") == eval_seqlen

    def missing_tasks(cell) -> list[str]:
        have = cell["lm_eval"]["tasks"] if same_settings(cell) else {}
        return [n for n in names if n not in have]

    def add_tasks(cell, work) -> None:
        """Evaluate `work` on the requested tasks `cell` lacks; append the cell with them."""
        todo = missing_tasks(cell)
        if not todo:
            return
        res = task_scores(work, tasks=todo, max_length=eval_seqlen, limit=limit)
        kept = cell["lm_eval"]["tasks"] if same_settings(cell) else {}
        cell["lm_eval"] = {"limit": limit, "max_length": eval_seqlen, "tasks": {**kept, **res["tasks"]}}
        append(cell)

    if "dense" not in done:
        r = perplexity(lm, windows, progress=progress)
        record({"key": "dense", "method": "dense", "sparsity": 0.0, "actual_sparsity": 0.0, "ppl": r["value"],
                "params": num_params(lm.model), "mlp_macs_per_token": lm.adapter.mlp_macs_per_token(lm.model),
                "seconds": 0.0})
    add_tasks(done["dense"], lm)
    stats_path = out / "stats.safetensors"
    for cell in cells:
        sel, fo, cal, sp, al, ax = cell
        key, name = cell_key(sel, fo, cal, sp, al, ax), method_name(sel, fo, cal, al, ax)
        prev = done.get(key)
        if prev is not None and ("error" in prev or not missing_tasks(prev)):
            continue
        cfg = configs[cell]
        stats = None
        if cal == "oneshot":  # one statistics pass serves every one-shot cell
            if not stats_path.exists():
                collect(lm, str(data), samples=cfg.samples, seqlen=cfg.seqlen, seed=cfg.seed, out=stats_path,
                        progress=progress)
            stats = load_stats(stats_path)
        work = LoadedModel(copy.deepcopy(lm.model), lm.tokenizer, lm.spec, lm.fingerprint)
        t0 = time.time()
        try:
            _, _, summary = prune(work, str(data), cfg, stats=stats, progress=progress)
        except NeuroprojError as e:  # a combination that does not apply to this model: recorded, not fatal
            if prev is not None:     # ... but it pruned before: something changed under the sweep
                raise
            record({"key": key, "method": name, "sparsity": sp, "error": str(e)})
            continue
        seconds = time.time() - t0
        if prev is None:
            r = perplexity(work, windows, progress=progress)
            prev = record({"key": key, "method": name, "select": sel, "fold": fo, "calibration": cal,
                           "allocation": al, "axes": ax, "removed_trunk_fraction": summary["removed_trunk_fraction"],
                           "sparsity": sp, "actual_sparsity": summary["actual_sparsity"],
                           "ppl": r["value"], "params": summary["params_after"],
                           "mlp_macs_per_token": summary["mlp_macs_per_token_after"], "seconds": round(seconds, 1)})
        elif summary["params_after"] != prev["params"]:
            raise NeuroprojError(f"sweep cell {key}: pruned again for the zero-shot tasks it has "
                                 f"{summary['params_after']:,} parameters, the recorded cell {prev['params']:,}: "
                                 f"the shared settings changed since {log} was written; use a new --out")
        add_tasks(prev, work)
        del work
    wanted = ["dense"] + [cell_key(*c) for c in cells]
    rows = [done[k] for k in wanted if k in done]
    write_reports(rows, out, tasks=names or None)
    return rows


def _cell_config(base: PruneConfig, select, fold, calibration, sparsity, allocation, axes) -> PruneConfig:
    """A cell's prune settings: its sparsity as the MLP's, or with `axes` (a '+'-joined axis set) as the budget."""
    cell = dict(select=select, fold=fold, calibration=calibration, allocation=allocation, keep=None,
                target_speedup=None, latency=None)   # a cell's budget is its own (a recipe's prune section may name one)
    if axes is None:
        return base.replace(sparsity=sparsity, target_params=None, **cell)
    if sparsity <= 0:
        raise NeuroprojError(f"a parameter budget removes a share in (0, 1): drop {sparsity:g} from --sparsities "
                             f"with --axes")
    return base.replace(sparsity=None, target_params=sparsity, axes=tuple(axes.split("+")), **cell)


def read_results(directory) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a sweep's results.csv, numbers parsed, its header checked against RESULT_COLUMNS."""
    path = Path(directory) / RESULTS_CSV
    try:
        with open(path, newline="", encoding="utf-8") as f:
            r = csv.DictReader(f)
            cols = list(r.fieldnames or [])
            rows = list(r)
    except (OSError, UnicodeDecodeError, csv.Error):
        cols, rows = [], []
    if cols[:len(RESULT_COLUMNS)] != list(RESULT_COLUMNS):
        raise NeuroprojError(f"{path} is not a sweep's results table (damaged or edited): run the sweep again")
    return cols, [{k: _number(v) for k, v in row.items()} for row in rows]


def _number(v):
    if v in (None, ""):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def shown_tasks(rows: list[dict], tasks=None) -> list[str]:
    """The zero-shot tasks the reports show: `tasks`, else every task some row has results for."""
    if tasks:
        return resolve(tasks)
    return [n for n in TASKS if any(n in (r.get("lm_eval") or {}).get("tasks", {}) for r in rows)]


def zeroshot_columns(row: dict, shown: list[str]) -> dict:
    """A row's headline accuracy per shown task (`{task}_{acc|acc_norm}`) and, when it has all of them,
    their mean `zeroshot_avg` (`tasks.summary`)."""
    have = (row.get("lm_eval") or {}).get("tasks", {})
    got = {n: have[n] for n in shown if n in have}
    cols = {f"{n}_{HEADLINE[n]}": m[HEADLINE[n]] for n, m in got.items() if HEADLINE[n] in m}
    if got and len(cols) == len(shown):
        cols["zeroshot_avg"] = zeroshot_summary(got)["average"]
    return cols


def write_reports(rows: list[dict], out: Path, tasks=None) -> None:
    """results.csv, results.md and tradeoff.png from the sweep's cells; the zero-shot columns of `tasks`
    (default: those the cells hold)."""
    out = Path(out)
    shown = shown_tasks(rows, tasks)
    fields = list(RESULT_COLUMNS)
    if shown:
        fields += [f"{n}_{HEADLINE[n]}" for n in shown] + ["zeroshot_avg", "zeroshot_limit"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        zs = zeroshot_columns(r, shown)
        w.writerow({**r, **zs, **({"zeroshot_limit": r["lm_eval"]["limit"]} if zs else {})})
    (out / "results.csv").write_text(buf.getvalue())
    (out / "results.md").write_text(markdown_table(rows, shown))
    plot(rows, out / "tradeoff.png")


def _limit_text(rows: list[dict]) -> str:
    """Which documents the rows' zero-shot results saw, e.g. 'the first 500 documents of each task'."""
    limits = dict.fromkeys((r.get("lm_eval") or {}).get("limit") for r in rows if r.get("lm_eval"))
    return " / ".join("all documents" if lim is None else f"the first {lim:.0%} of the documents" if lim < 1
                      else f"the first {lim} documents" for lim in limits) + " of each task"


def markdown_table(rows: list[dict], shown: list[str] = ()) -> str:
    """The perplexity pivot (method × sparsity), with `shown` zero-shot tasks the pivot of their average,
    and the per-cell table (with each shown task's headline accuracy and the average, in %)."""
    ev = rows[0].get("eval", {}) if rows else {}
    lines = [f"Perplexity on {ev.get('data')} at seqlen {ev.get('seqlen')}, {ev.get('windows')} windows"
             + (f" (first {ev['max_windows']})" if ev.get("max_windows") else " (whole text)") + ".", ""]
    sps = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    lines.append("| method | " + " | ".join(f"{s:.0%}" for s in sps) + " |")
    lines.append("|---|" + "---|" * len(sps))
    if dense:
        lines.append("| dense | " + " | ".join(f"{dense['ppl']:.2f}" for _ in sps) + " |")
    for m in methods:
        cells = {r["sparsity"]: r for r in rows if r["method"] == m}
        lines.append(f"| {m} | " + " | ".join(
            (f"{cells[s]['ppl']:.2f}" if "ppl" in cells.get(s, {}) else ("n/a" if s in cells else "–")) for s in sps) + " |")
    zs = {r["key"]: zeroshot_columns(r, shown) for r in rows} if shown else {}
    if shown:
        def avg(r):
            return f"{100 * zs[r['key']]['zeroshot_avg']:.2f}" if r and "zeroshot_avg" in zs[r["key"]] else "–"

        lines += ["", f"Zero-shot average accuracy (%) over {', '.join(f'{n} ({HEADLINE[n]})' for n in shown)}; "
                  f"lm-eval on {_limit_text(rows)}.", "",
                  "| method | " + " | ".join(f"{s:.0%}" for s in sps) + " |", "|---|" + "---|" * len(sps)]
        if dense:
            lines.append("| dense | " + " | ".join(avg(dense) for _ in sps) + " |")
        for m in methods:
            cells = {r["sparsity"]: r for r in rows if r["method"] == m}
            lines.append(f"| {m} | " + " | ".join(avg(cells.get(s)) for s in sps) + " |")
    extra = [f"{n} {HEADLINE[n]}" for n in shown] + (["zero-shot avg"] if shown else [])
    head = ["method", "sparsity", "removed", "ppl", "params", "MLP MACs/token", "prune s", *extra]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = [f"{100 * zs[r['key']][c]:.2f}" if c in zs[r["key"]] else "–"
               for c in [f"{n}_{HEADLINE[n]}" for n in shown] + ["zeroshot_avg"]] if shown else []
        if "ppl" in r:
            cols = [r["method"], f"{r['sparsity']:.2f}", f"{r['actual_sparsity']:.3f}", f"{r['ppl']:.2f}",
                    f"{r['params']:,}", f"{r['mlp_macs_per_token']:,}", str(r["seconds"]), *acc]
        else:
            cols = [r["method"], f"{r['sparsity']:.2f}", "–", f"n/a: {r.get('error', '')}", "", "", "",
                    *([""] * len(acc))]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    dense = next((r for r in rows if r["method"] == "dense"), None)
    # collapsed methods (ppl in the millions) would flatten the ones worth comparing: cap the axis at 20× dense
    top = 20 * dense["ppl"] if dense else None
    for m in methods:
        pts = sorted((r["actual_sparsity"], r["ppl"]) for r in rows if r["method"] == m and "ppl" in r)
        if pts:
            off = top is not None and max(p for _, p in pts) > top
            ax.plot(*zip(*pts), marker="o", label=m + (" (partly above the plot)" if off else ""))
    if dense:
        ax.axhline(dense["ppl"], color="k", ls="--", lw=1, label=f"dense ({dense['ppl']:.2f})")
        ax.set_ylim(0.9 * dense["ppl"], top)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of MLP neurons removed")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
