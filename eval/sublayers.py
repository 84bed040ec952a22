"""What each sub-layer of SmolLM2-135M is worth (issue 28): WikiText-2 perplexity (first --windows windows of 1024
tokens) with one layer's attention sub-layer removed, replaced by its least-squares linear map, or its MLP
sub-layer removed, nothing else refitted; then the attention sub-layers removed (or replaced) together, cheapest
alone first; and each axis's price per share of the decoder layers' parameters.

Removed: the part adds nothing to the residual stream (its output zeroed by a hook: what
`Adapter.remove_attention` builds). Linear: the attention's output a replaced by W·u, u its normed input, W =
E[a uᵀ] E[u uᵀ]⁻¹ fitted on --fit-samples C4 windows of 512 tokens (the d×d map nemotron-nas calls
`replace_with_linear`: d² parameters instead of the attention's).

    OMP_NUM_THREADS=2 python eval/sublayers.py --windows 4 > eval/results/sublayers.md
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import ExitStack, contextmanager

import torch

import neuroproj_prune as npp
from neuroproj_prune.prune.speed import trunk_params
from neuroproj_prune.prune.layers import attention_off
from neuroproj_prune.stats import calibration_ids, hooked

from blocks import C4, DATA, perplexity   # eval/ is the script's directory


@contextmanager
def output_replaced(module, fn):
    """`module`'s output (a tuple's first element) replaced by fn(its first input)."""
    def hook(mod, args, kwargs, out):
        u = kwargs.get("hidden_states", args[0] if args else None)
        y = fn(u)
        return (y, *out[1:]) if isinstance(out, tuple) else y
    h = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def linear_maps(lm, ids, batch: int = 4) -> dict:
    """Per layer, W = E[a uᵀ] E[u uᵀ]⁻¹ (float64 sums, ridge 1e-6 of the mean diagonal): the attention's output a
    as a linear map of its input u."""
    m, a = lm.model, lm.adapter
    d = a.hidden_size(m)
    L = a.num_layers(m)
    G = {i: torch.zeros(d, d, dtype=torch.float64) for i in range(L)}
    C = {i: torch.zeros(d, d, dtype=torch.float64) for i in range(L)}
    got = {}
    points = [(("u", i), a.attn(m, i), "call") for i in range(L)] + [(("a", i), a.attn(m, i), "out") for i in range(L)]
    with torch.inference_mode(), hooked(points, got.__setitem__):
        for b in range(0, ids.shape[0], batch):
            m(input_ids=ids[b:b + batch])
            for i in range(L):
                args, kw = got["u", i]
                u = (kw.get("hidden_states") if "hidden_states" in kw else args[0]).reshape(-1, d).double()
                y = got["a", i].reshape(-1, d).double()
                G[i] += u.T @ u
                C[i] += y.T @ u
    eye = torch.eye(d, dtype=torch.float64)
    return {i: torch.linalg.solve(G[i] + 1e-6 * G[i].diagonal().mean() * eye, C[i].T).T.float() for i in range(L)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--fit-samples", type=int, default=16)
    ap.add_argument("--together", default="2,4,8,12")
    args = ap.parse_args()
    lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
    m, a = lm.model, lm.adapter
    wiki = DATA / "wikitext2-test.txt"
    L, T = a.num_layers(m), trunk_params(m, a)
    W = linear_maps(lm, calibration_ids(lm, str(C4), args.fit_samples, 512, 0)[0])

    def ppl(*ctxs):
        with ExitStack() as stack:
            for c in ctxs:
                stack.enter_context(c)
            return perplexity(m, lm.tokenizer, args.windows, wiki)

    def off(i):
        return attention_off(m, a, i)

    def lin(i):
        return output_replaced(a.attn(m, i), lambda u, i=i: u @ W[i].T)

    def mlp_off(i):
        return output_replaced(a.mlp(m, i), lambda u: torch.zeros_like(u))

    attn_p, mlp_p, d = a.attention_params(m, 0), sum(p.numel() for p in a.mlp(m, 0).parameters()), a.hidden_size(m)
    print(f"command: `OMP_NUM_THREADS=2 python eval/sublayers.py --windows {args.windows} --fit-samples "
          f"{args.fit_samples} --together {args.together}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"WikiText-2, first {args.windows} windows × 1024 tokens, float32; the linear maps fitted on "
          f"{args.fit_samples} × 512 C4 tokens. Parameters per layer: attention {attn_p:,} ({attn_p / T:.2%} of the "
          f"decoder layers), its linear map {d * d:,}, MLP {mlp_p:,} ({mlp_p / T:.2%}).\n")
    dense = ppl()
    print(f"dense: {dense:.2f}\n\n| layer | attention removed | attention → linear | MLP removed |\n"
          "|---|---|---|---|")
    alone = {}
    for i in range(L):
        alone[i] = ppl(off(i))
        print(f"| {i} | {alone[i]:.2f} | {ppl(lin(i)):.2f} | {ppl(mlp_off(i)):.2f} |", flush=True)
    order = sorted(alone, key=alone.get)
    print("\nTogether, cheapest alone first; price: ln(perplexity / dense) per 1 % of the decoder layers' parameters "
          "removed.\n\n| attention sub-layers | layers | removed: ppl | price | → linear: ppl | price |\n"
          "|---|---|---|---|---|---|")
    for n in (int(x) for x in args.together.split(",")):
        r, li = ppl(*(off(i) for i in order[:n])), ppl(*(lin(i) for i in order[:n]))
        pr = math.log(r / dense) / (100 * n * attn_p / T)
        pl = math.log(li / dense) / (100 * n * (attn_p - d * d) / T)
        print(f"| {n} | {sorted(order[:n])} | {r:.2f} | {pr:.4f} | {li:.2f} | {pl:.4f} |", flush=True)


if __name__ == "__main__":
    main()
