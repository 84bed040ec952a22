"""Wall time and peak memory of `neuroproj-prune prune` (calibration included), each run in a fresh process.

    python eval/bench_prune.py --sparsity 0.3 --md eval/results/prune_speed.md

The reference point (issue text): official FLAP's pruning step on SmolLM2-135M with 128×512 calibration tokens
takes 138 s wall and 6 GB on this 2-core machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4-train-sample-1000.jsonl"


def run_once(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one CLI run in a child process."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "neuroproj_prune.cli", *args], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB (max over children)
    return wall, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--extra", default="", help="more prune flags, e.g. '--select flap --fold bias --calibration oneshot'")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--md", default=None, help="append a Markdown row to this file")
    a = ap.parse_args()
    rows = []
    for _ in range(a.repeats):
        with tempfile.TemporaryDirectory() as d:
            args = ["prune", "--model", a.model, "--data", str(C4), "--sparsity", str(a.sparsity),
                    "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--out", f"{d}/out", *a.extra.split()]
            rows.append(run_once(args))
    for wall, peak in rows:
        print(f"wall {wall:.1f} s, peak RSS {peak:.2f} GiB")
    if a.md:
        with open(a.md, "a") as f:
            cmd = f"python eval/bench_prune.py --sparsity {a.sparsity} --samples {a.samples} --seqlen {a.seqlen}"
            if a.extra:
                cmd += f" --extra '{a.extra}'"
            f.write(f"| `{cmd}` | {os.cpu_count()} cores, {platform.machine()}, torch threads default | "
                    + ", ".join(f"{w:.0f}" for w, _ in rows) + " | " + ", ".join(f"{p:.2f}" for _, p in rows)
                    + f" | {time.strftime('%Y-%m-%d')} |\n")


if __name__ == "__main__":
    main()
