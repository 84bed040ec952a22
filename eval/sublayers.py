"""What each sub-layer of SmolLM2-135M is worth (issue 28): WikiText-2 perplexity (first --windows windows of 1024
tokens) with one layer's attention sub-layer removed, or its MLP sub-layer, nothing refitted; then the attention
sub-layers removed together, cheapest alone first. The removed part adds nothing to the residual stream (its output
zeroed by a hook: what `Adapter.remove_attention` builds for the attention).

    OMP_NUM_THREADS=2 python eval/sublayers.py --windows 4 > eval/results/sublayers.md
"""
from __future__ import annotations

import argparse
import time
from contextlib import ExitStack

import torch

import neuroproj_prune as npp
from neuroproj_prune.prune.layers import attention_off

from blocks import DATA, perplexity   # eval/ is the script's directory


def mlp_off(model, a, i):
    """Layer i's MLP adds nothing (its output zeroed)."""
    class Off:
        def __enter__(self):
            self.h = a.mlp(model, i).register_forward_hook(lambda m, args, out: torch.zeros_like(out))

        def __exit__(self, *exc):
            self.h.remove()
    return Off()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--together", default="2,4,6,8,12")
    args = ap.parse_args()
    lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
    m, a = lm.model, lm.adapter
    wiki = DATA / "wikitext2-test.txt"

    def ppl(*ctxs):
        with ExitStack() as stack:
            for c in ctxs:
                stack.enter_context(c)
            return perplexity(m, lm.tokenizer, args.windows, wiki)

    print(f"command: `OMP_NUM_THREADS=2 python eval/sublayers.py --windows {args.windows} --together {args.together}`; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; WikiText-2, first {args.windows} windows × 1024 "
          f"tokens, float32, nothing refitted\n")
    dense = ppl()
    print(f"dense: {dense:.2f}\n\n| layer | attention removed | MLP removed |\n|---|---|---|")
    alone = {}
    L = a.num_layers(m)
    for i in range(L):
        alone[i] = ppl(attention_off(m, a, i))
        print(f"| {i} | {alone[i]:.2f} | {ppl(mlp_off(m, a, i)):.2f} |", flush=True)
    order = sorted(alone, key=alone.get)
    print("\n| attention sub-layers removed together (cheapest alone first) | layers | WikiText-2 |\n|---|---|---|")
    for n in (int(x) for x in args.together.split(",")):
        print(f"| {n} | {sorted(order[:n])} | {ppl(*(attention_off(m, a, i) for i in order[:n])):.2f} |", flush=True)


if __name__ == "__main__":
    main()
