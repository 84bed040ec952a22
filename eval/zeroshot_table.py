"""Markdown table of zero-shot results from `neuroproj-prune eval --tasks zeroshot --json` files.

    python eval/zeroshot_table.py dense=/tmp/zs/dense.json "default 20 %=/tmp/zs/default-0.2.json" ...

One row per file: each task's headline accuracy (acc_norm where lm-eval defines it, else acc; see
neuroproj_prune/evaluate/tasks.py), LAMBADA perplexity, the average, the average without BoolQ (SmolLM2-135M answers
BoolQ below its majority class, so that task's swings are noise about a yes/no bias, not knowledge), the
fraction of the first file's (dense) average kept, and the documents per task."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuroproj_prune.evaluate.tasks import HEADLINE  # noqa: E402

SHORT = {"lambada_openai": "LAMBADA", "hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGrande",
         "boolq": "BoolQ", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}


def main(args: list[str]) -> str:
    head = ["model"] + [f"{SHORT[t]} ({m})" for t, m in HEADLINE.items()] + ["LAMBADA ppl", "**average**", "avg w/o BoolQ",
                                                                   "kept of first", "docs/task"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = None
    for arg in args:
        label, path = arg.split("=", 1)
        le = json.loads(Path(path).read_text())["lm_eval"]
        t = le["tasks"]
        cells = [label]
        for task, m in HEADLINE.items():
            cells.append(f"{100 * t[task][m]:.2f} ± {100 * t[task][m + '_stderr']:.2f}" if task in t else "–")
        cells.append(f"{t['lambada_openai']['perplexity']:.2f}" if "lambada_openai" in t else "–")
        avg = le["zeroshot"]["average"]
        first = avg if first is None else first
        rest = [t[k][m] for k, m in HEADLINE.items() if k in t and k != "boolq"]
        cells.append(f"**{100 * avg:.2f}**")
        cells.append(f"{100 * sum(rest) / len(rest):.2f}" if rest else "–")
        cells.append(f"{100 * avg / first:.1f} %")
        docs = sorted({v["samples"] for v in t.values()})
        cells.append("/".join(map(str, docs)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
