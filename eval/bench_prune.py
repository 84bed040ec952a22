"""The cost of a prune as a ratio to one plain forward pass over the same calibration tokens (issue 25).

    python eval/bench_prune.py --pairs 5 --md eval/results/prune_speed.md              # the default prune
    python eval/bench_prune.py --pairs 5 --extra '--allocation global' --md ...         # another configuration
    python eval/bench_prune.py --stage collect --pairs 5 --md ...                       # `collect` instead of prune
    python eval/bench_prune.py --stage prune,floor --pairs 3                            # both in the same rounds
    python eval/bench_prune.py --profile                                                # where one prune's time goes

Each round runs fresh processes one after the other, in an order rotated each round: the *reference* — load the
model (as `prune` loads it), draw and tokenize the same calibration windows, run the decoder trunk over them (every
decoder layer, no final norm or LM head) in the calibration's batches, under the same compute dtype (bfloat16
autocast where `--compute-dtype auto` would use it) — and each *stage*: `neuroproj-prune prune ...` or `collect`
(its checkpoint or file written to a temporary directory), or `floor`, the reference plus every layer's exact Gram of
the MLP neurons as `collect` accumulates it, nothing written: the work any exact-statistics pass does. The ratio
stage / reference of each round cancels most of the machine's noise (a shared 2-core VM); the table gives per stage
the median ratio with its min–max over the rounds, both wall times, and each process's peak resident memory
(VmHWM). `--profile` runs one prune in this process and prints the seconds spent in each part of the sequential
pass.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
C4 = REPO.parent / "shared" / "data" / "c4-train-sample-1000.jsonl"

# the reference: the same loading and tokenizing as the stage, then the trunk forward in the stage's batches
REFERENCE = r"""
import re, sys, time, torch
from neuroproj_prune.model import load_model
from neuroproj_prune.stats import compute_dtype_for
from neuroproj_prune.stats import calibration_ids, hooked
model, data, samples, seqlen, batch_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t0 = time.time()
lm = load_model(model, device="cpu")
ids, _ = calibration_ids(lm, data, samples, seqlen, 0)
compute = compute_dtype_for("auto", lm.model)
a = lm.adapter
class Stop(Exception):
    pass
def stop(key, out):
    raise Stop
bs = max(1, batch_tokens // seqlen)
if len(sys.argv) > 6 and sys.argv[6] == "gram":   # the floor: the same forward + every layer's exact neuron Gram
    from neuroproj_prune.stats.capture import batches
    from neuroproj_prune.stats.collect import accumulate
    accumulate(lm.model, batches(ids, bs, 0), compute=compute, progress=False)   # stops after the last layer too
else:
    with torch.inference_mode(), torch.autocast("cpu", dtype=compute or torch.bfloat16, enabled=compute is not None), \
            hooked([(0, a.layers(lm.model)[-1], "out")], stop):
        for b in range(0, ids.shape[0], bs):
            try:
                lm.model(input_ids=ids[b:b + bs], use_cache=False)
            except Stop:
                pass
hwm = re.search(r"VmHWM:\s*(\d+)", open("/proc/self/status").read()).group(1)
print("RESULT", time.time() - t0, hwm)
"""

# a stage in a child process, reporting its own peak memory (VmHWM: this process since exec)
STAGE = r"""
import re, sys, time
t0 = time.time()
from neuroproj_prune.cli import main
rc = main(sys.argv[1:])
hwm = re.search(r"VmHWM:\s*(\d+)", open("/proc/self/status").read()).group(1)
print("RESULT", time.time() - t0, hwm, rc)
"""


def child(code: str, args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one fresh process; wall from its start (interpreter and imports included)."""
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.time() - t0
    out = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    if p.returncode != 0 or not out or (len(out[0].split()) > 3 and out[0].split()[3] != "0"):
        sys.exit(f"failed ({' '.join(args[:3])}):\n{p.stderr[-3000:]}")
    return wall, int(out[0].split()[2]) / 2**20


STAGES = ("prune", "collect", "floor")


def stage_args(a, stage: str, tmp: str) -> list[str]:
    common = ["--model", a.model, "--data", str(C4), "--samples", str(a.samples), "--seqlen", str(a.seqlen)]
    if stage == "collect":
        return ["collect", *common, "--out", f"{tmp}/stats.safetensors", *a.extra.split()]
    return ["prune", *common, "--sparsity", str(a.sparsity), "--out", f"{tmp}/out", *a.extra.split()]


def pairs(a) -> dict[str, list[dict]]:
    """Per stage, one row per round: the round runs the reference and every stage, in an order rotated each round,
    and each stage's ratio is to that round's reference."""
    stages = a.stage.split(",")
    rows = {s: [] for s in stages}
    ref_args = [a.model, str(C4), str(a.samples), str(a.seqlen), str(a.batch_tokens)]
    for k in range(a.pairs):
        runs = ["ref", *stages]
        order = runs[k % len(runs):] + runs[:k % len(runs)]
        got = {}
        with tempfile.TemporaryDirectory() as tmp:
            for which in order:
                if which == "ref":
                    got[which] = child(REFERENCE, ref_args)
                elif which == "floor":
                    got[which] = child(REFERENCE, ref_args + ["gram"])
                else:
                    got[which] = child(STAGE, stage_args(a, which, tmp))
        for s in stages:
            row = {"ref_s": got["ref"][0], "stage_s": got[s][0], "ratio": got[s][0] / got["ref"][0],
                   "ref_gib": got["ref"][1], "stage_gib": got[s][1]}
            rows[s].append(row)
            print(f"round {k + 1} ({' → '.join(order)}): reference {row['ref_s']:.1f} s, {s} {row['stage_s']:.1f} s, "
                  f"ratio {row['ratio']:.3f}; peak {row['ref_gib']:.2f} / {row['stage_gib']:.2f} GiB", flush=True)
    return rows


def table_row(a, stage, rows) -> str:
    r = [x["ratio"] for x in rows]
    cmd = f"python eval/bench_prune.py --stage {a.stage} --pairs {a.pairs}" + (f" --extra '{a.extra}'" if a.extra else "")
    med = statistics.median
    return (f"| `{cmd}`{'' if stage == a.stage else f': {stage}'} | **{med(r):.2f}** ({min(r):.2f}–{max(r):.2f}) | "
            f"{med([x['stage_s'] for x in rows]):.1f} | "
            f"{med([x['ref_s'] for x in rows]):.1f} | {max(x['stage_gib'] for x in rows):.2f} | "
            f"{max(x['ref_gib'] for x in rows):.2f} | {os.cpu_count()} cores {platform.machine()}, "
            f"{time.strftime('%Y-%m-%d')} |")


# -------------------------------------------------------------------------------------------------- profile
def _value(text: str):
    """A --set value: a Python literal (25, 0.5, True), else the string itself (global)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def profile(a) -> None:
    """One prune in this process; seconds per part (nested parts are inside their callers' time)."""
    import torch
    from bench_gpu import timed   # eval/ is the script's directory; on the CPU its device sync is a no-op

    import neuroproj_prune as npp
    from neuroproj_prune.prune import allocate, api, calibrate, fold, measure, reconstruct, select
    from neuroproj_prune.stats import moments

    parts: dict[str, float] = {}
    spots = [(calibrate, "layer_inputs", "layer inputs"), (calibrate, "run_layer", "  layer forwards"),
             (calibrate.Sequential, "_measure", "measure (forwards, moments, stash)"),
             (moments.Moments, "add", "  moments (Gram)"), (moments.Moments, "finish", "  moments finish"),
             (measure, "weigh_rms", "  token weights"), (api, "select_layer", "select"),
             (fold, "fold_and_slice", "fold + slice"), (select, "layer_plan", "  layer plan (representatives)"),
             (calibrate.Sequential, "_carry", "carry"), (api, "save_pruned", "write checkpoint"),
             # --set allocation=global: the dense pass that measures the error curves (its Grams count above too)
             (allocate, "measure_curves", "allocation curves (dense pass)"),
             (allocate, "loss_backward", "  forward + LM head (+ trunk backward)"),
             (allocate, "_trunk_forward", "  trunk forward (rms weights)"),
             (allocate, "_finish_layer", "  curves from the Grams (Cholesky)"),
             # --set reconstruct=N: the block's capture and its training (held-out checks inside); the carry re-runs the layer
             (reconstruct.Reconstruction, "batch", "  reconstruct: capture"),
             (reconstruct, "reconstruct", "reconstruct: train")]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for owner, attr, key in spots:
            stack.enter_context(timed(owner, attr, parts, key, torch.device("cpu")))
        t0 = time.time()
        lm = npp.load_model(a.model, device="cpu")
        t1 = time.time()
        npp.prune(lm, str(C4), sparsity=a.sparsity, samples=a.samples, seqlen=a.seqlen, out=f"{tmp}/out",
                  progress=False, **{k: _value(v) for k, v in (kv.split("=", 1) for kv in a.set)})
        total = time.time() - t1
    print(f"load {t1 - t0:.1f} s; prune {total:.1f} s")
    for k, v in parts.items():
        print(f"  {k:40s} {v:7.2f} s  {v / total:6.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage", default="prune",
                    help="prune, collect or floor, or a comma list of them timed in the same rounds; floor: the "
                         "reference plus every layer's exact mlp.neurons Gram (collect's accumulation, nothing "
                         "written) — the work any exact-statistics pass does")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="tokens per reference forward (as the stage batches)")
    ap.add_argument("--extra", default="", help="more flags of the stage, e.g. '--allocation global'")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--md", default=None, help="append the table row to this Markdown file")
    ap.add_argument("--profile", action="store_true", help="time the parts of one prune in this process")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --profile: a PruneConfig setting (a Python literal, else a string)")
    a = ap.parse_args()
    if a.profile:
        profile(a)
        return
    bad = [s for s in a.stage.split(",") if s not in STAGES]
    if bad:
        ap.error(f"unknown stage {bad[0]!r}, choose from {', '.join(STAGES)}")
    rows = pairs(a)
    lines = [table_row(a, s, r) for s, r in rows.items()]
    print("\n".join(lines))
    if a.md:
        with open(a.md, "a") as f:
            f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
