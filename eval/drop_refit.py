"""What the MLPs behind a removed layer should be refitted to (issue 28): SmolLM2-135M with `--drop-layers N` and
nothing else removed, the later layers left alone (`fold none`) or refitted by least squares to each
`--drop-target`; WikiText-2 perplexity on the first --windows windows of 1024 tokens.

    OMP_NUM_THREADS=1 python eval/drop_refit.py --samples 32 --windows 8 --drop 1
"""
from __future__ import annotations

import argparse
import time

import neuroproj_prune as npp
from neuroproj_prune.prune import prune

from blocks import C4, DATA, perplexity   # eval/ is the script's directory


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--drop", type=int, default=1)
    a = ap.parse_args()
    print(f"command: python eval/drop_refit.py --samples {a.samples} --windows {a.windows} --drop {a.drop}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| later layers | dropped | WikiText-2 |\n|---|---|---|")
    for name, kw in (("left alone (fold none)", {"fold": "none"}), ("refit, drop_target residual", {"drop_target": "residual"}),
                     ("refit, drop_target dense", {"drop_target": "dense"})):
        lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
        lm, plan, _ = prune(lm, str(C4), samples=a.samples, progress=False, drop_layers=a.drop, sparsity=0.0, **kw)
        print(f"| {name} | {plan.drop} | {perplexity(lm.model, lm.tokenizer, a.windows, DATA / 'wikitext2-test.txt'):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
