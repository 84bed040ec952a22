"""The nemotron-nas export in mlx-lm (CPU), against transformers on the same checkpoint.

    python eval/check_mlx.py --model g30=runs/smol-global-0.3 [--model ...] --out eval/results/inference_mlx.md

Per model: export nemotron-nas (zero-padded to the readers' multiples of 256), load it with mlx-lm's own
`nemotron-nas` model (mlx_lm.utils.load_model: no tokenizer, no remote code), and compare with transformers:
perplexity on the first --windows windows of --len tokens of WikiText-2 (same protocol as
eval/bench_inference.py), greedy continuations (full recomputation per token), the largest log-prob difference.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.errors import missing_extra  # noqa: E402
from neuroproj_prune.export import export  # noqa: E402

sys.path.insert(0, str(REPO / "eval"))
from bench_inference import PROMPTS, hf_ppl, windows  # noqa: E402


def mlx_logprobs(model, ids):
    import mlx.core as mx

    x = np.array(model(mx.array([ids])).astype(mx.float32))[0].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="NAME=SPEC")
    ap.add_argument("--work", default="runs/bench_inference")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default="eval/results/inference_mlx.md")
    a = ap.parse_args()
    try:
        import mlx_lm
        from mlx_lm.utils import load_model
    except ImportError:
        raise SystemExit(f"check_mlx: {missing_extra('mlx-lm', 'running the nemotron-nas export in mlx')}") from None

    torch.set_num_threads(2)
    rows = []
    for item in a.model:
        name, spec = item.split("=", 1)
        lm = npp.load_model(spec, dtype="float32", device="cpu")
        nas = Path(a.work) / f"{name}-nemotron-nas"
        if not (nas / "config.json").is_file():
            export(lm, "nemotron-nas", nas)
        model, _ = load_model(nas)
        wins = windows(lm.tokenizer, a.windows, a.len)
        nll = cnt = 0
        for w in wins:
            lp = mlx_logprobs(model, w)
            nll -= lp[np.arange(len(w) - 1), np.asarray(w[1:])].sum()
            cnt += len(w) - 1
        ppl_mlx, ppl_hf = math.exp(nll / cnt), hf_ppl(lm.model, wins)
        same, dmax = 0, 0.0
        for text in PROMPTS:
            ids = lm.tokenizer(text)["input_ids"]
            ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                                    do_sample=False)[0].tolist()
            seq = list(ids)
            for _ in range(a.tokens):
                seq.append(int(mlx_logprobs(model, seq)[-1].argmax()))
            same += seq == ref
            hf_lp = torch.log_softmax(lm.model(torch.tensor([ref])).logits[0].double(), -1).numpy()
            dmax = max(dmax, float(np.abs(mlx_logprobs(model, ref) - hf_lp).max()))
        rows.append((name, spec, ppl_hf, ppl_mlx, f"{same}/{len(PROMPTS)}", dmax))
        print(rows[-1], flush=True)
    L = ["# nemotron-nas export in mlx-lm (CPU) vs transformers", "",
         f"Command: `python eval/check_mlx.py {' '.join('--model ' + m for m in a.model)} --windows {a.windows} "
         f"--len {a.len} --tokens {a.tokens}`; mlx-lm {mlx_lm.__version__} "
         f"(`mlx[cpu]`), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Perplexity: first {a.windows} windows of "
         f"{a.len} WikiText-2 tokens (as eval/bench_inference.py). Greedy: {a.tokens} tokens after each prompt. Δ: the "
         f"largest difference of all log-probs (whole vocabulary, every position of the greedy sequences).", "",
         "| model | checkpoint | ppl transformers | ppl mlx-lm | greedy equal | max Δ log-prob |", "|---|---|---|---|---|---|"]
    L += [f"| {n} | `{s}` | {h:.3f} | {m:.3f} | {g} | {d:.1e} |" for n, s, h, m, g, d in rows]
    Path(a.out).write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
