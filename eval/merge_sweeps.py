"""Merge the cells of several sweep directories into one Markdown table + plot.

    python eval/merge_sweeps.py runs/sweep-baselines runs/sweep-default --out eval/results/smollm2 \
        --header eval/results/smollm2.header.md

Writes OUT.md (the header, then the method × sparsity pivot and the per-cell table), OUT.csv and OUT.png.
Cells are matched by key; the first directory's dense row is kept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from neuroproj_prune.sweep import markdown_table, plot, write_reports


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="sweep directories (each with cells.jsonl)")
    ap.add_argument("--out", required=True, help="output prefix (OUT.md, OUT.csv, OUT.png)")
    ap.add_argument("--header", default=None, help="Markdown placed above the tables (commands, machine)")
    a = ap.parse_args()
    cells: dict[str, dict] = {}
    for d in a.dirs:
        for line in (Path(d) / "cells.jsonl").read_text().splitlines():
            if line.strip():
                c = json.loads(line)
                cells.setdefault(c["key"], c)
    rows = sorted(cells.values(), key=lambda c: (c["method"] != "dense", c["method"], c["sparsity"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / (out.name + ".parts")
    tmp.mkdir(exist_ok=True)
    write_reports(rows, tmp)
    header = Path(a.header).read_text() if a.header else ""
    out.with_suffix(".md").write_text(header + markdown_table(rows) +
                                      f"\n![tradeoff]({out.with_suffix('.png').name})\n")
    out.with_suffix(".csv").write_text((tmp / "results.csv").read_text())
    plot(rows, out.with_suffix(".png"))
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print(f"wrote {out.with_suffix('.md')}, .csv, .png ({len(rows)} cells)")


if __name__ == "__main__":
    main()
