"""What the MLPs behind (and, `drop_fold`, before) a removed layer or attention sub-layer should be refitted to (issue 28): SmolLM2-135M with
`--drop N` layers (or, `--part attn`, N attention sub-layers) removed and the MLPs kept at --keep neurons per layer
(default: all), each `--drop-target` (layer: their own output on the stream they see; residual: also the drift
from the dense stream; dense: the dense MLP outputs), and with nothing refitted (`fold none`, at full width only).
Mean loss on the 8 held-back C4 windows drawn beside the calibration ones, and WikiText-2 perplexity on the first
--windows windows of 1024 tokens.

    OMP_NUM_THREADS=2 python eval/drop_refit.py --samples 32 --windows 8 --drop 1
    OMP_NUM_THREADS=2 python eval/drop_refit.py --samples 16 --windows 8 --drop 1 --part attn --keep 832
"""
from __future__ import annotations

import argparse
import time

import neuroproj_prune as npp
from neuroproj_prune.prune import prune
from neuroproj_prune.prune.layers import mean_loss
from neuroproj_prune.stats import calibration_ids

from blocks import C4, DATA, perplexity   # eval/ is the script's directory


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--drop", type=int, default=1)
    ap.add_argument("--part", choices=("layer", "attn"), default="layer")
    ap.add_argument("--keep", type=int, default=None, help="MLP neurons kept per layer (default: all)")
    ap.add_argument("--folds-only", action="store_true", help="only the drop_fold rows (not the drop_target ones)")
    a = ap.parse_args()
    print(f"command: `OMP_NUM_THREADS=2 python eval/drop_refit.py --samples {a.samples} --windows {a.windows} --drop "
          f"{a.drop} --part {a.part}" + (f" --keep {a.keep}" if a.keep else "") + (" --folds-only" if a.folds_only else "") +
          f"`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    base = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
    ids, _ = calibration_ids(base, str(C4), a.samples, 512, 0, holdout=8)
    held = ids[a.samples:]
    removal = {"drop_layers" if a.part == "layer" else "drop_attn": a.drop}
    width = {"keep": a.keep} if a.keep else {"sparsity": 0.0}
    rows = [("nothing removed", {**width})]
    if not a.keep:
        rows.append(("left alone (fold none)", {**removal, **width, "fold": "none"}))
    if a.part == "layer":   # the MLP before the removed layer takes over its work, or not
        rows += [(f"drop_fold {f}", {**removal, **width, "drop_fold": f}) for f in ("none", "previous")]
    if not a.folds_only:
        rows += [(f"drop_target {t}", {**removal, **width, "drop_target": t, "drop_fold": "none"})
                 for t in ("layer", "residual", "dense")]
    print("| MLPs behind the removal | removed | held-back loss | WikiText-2 |\n|---|---|---|---|")
    for name, kw in rows:
        lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
        lm, plan, _ = prune(lm, str(C4), samples=a.samples, progress=False, multiple=1, **kw)
        gone = plan.drop if a.part == "layer" else plan.no_attn
        print(f"| {name} | {gone} | {mean_loss(lm, held, None, 8):.4f} | "
              f"{perplexity(lm.model, lm.tokenizer, a.windows, DATA / 'wikitext2-test.txt'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
