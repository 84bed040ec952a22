"""Inference speed and quality of dense vs pruned models in transformers (CPU) and llama.cpp (xllamacpp, CPU), in
every GGUF type users run.

    nice -n 10 python eval/bench_inference.py --model dense=smollm2-135m --model u30=runs/smollm2-135m/pruned \
        --reps 5 --out eval/results/inference.md          # ~20 min on a quiet 2-core CPU (see below)
    python eval/bench_inference.py --model dense=smollm2-135m --model u30=DIR --types f32,q4_k_m --reps 1 \
        --decode 4 --batch 2 --prefill 32 --ppl-windows 1 --ppl-len 64 --agree-tokens 4 --no-peak --out /tmp/inf.md

Per round (--reps rounds, ≥ 5 for a claim), every model runs every cell back to back — transformers float32 and
llama.cpp in each --types GGUF type (f32, q8_0, q4_0, q4_k_m, q5_k_m, q6_k), batch 1 and --batch — so each cell's
dense and pruned runs form an interleaved pair on the same machine state; the table gives medians with min–max
over the rounds and the per-round ratios pruned / dense (median, min–max):
- prefill tokens/s on a --prefill-token prompt (transformers: one forward with cache; llama.cpp: the server's
  prompt timing), decode tokens/s at batch 1 and --batch (transformers: a greedy loop on the KV cache;
  llama.cpp: --batch concurrent requests on --batch slots, aggregate tokens/s);
- peak RSS of a fresh process that loads the model, prefills and decodes (VmHWM, `--peak` child mode);
- the ideal speed-up beside each measurement: weights read per decoded token (all linear layers + output
  matrix) and MACs per prefill token (linear layers + attention at the prompt length), dense / pruned;
- quality: perplexity on the first --ppl-windows windows of --ppl-len tokens of WikiText-2 in transformers and in
  llama.cpp for every type (hidden states from llama.cpp's embedding endpoint, logits with the GGUF's own output
  matrix); greedy continuations of the prompts compared token by token (f32), with the largest next-token
  log-prob difference.
llama.cpp runs with its defaults for speed (f16 KV cache, flash attention auto) and `precise` (f32 KV, no
flash attention) for the agreement and perplexity checks. Cost for SmolLM2 dense + one pruned checkpoint on 2
threads (measured 2026-12-06): ~2.5 min a round with all 6 types (5 rounds: 15 min), ~3 min for the peaks and
perplexities, plus the exports when they are not in --work yet (~15 s each; the K-quants need llama-quantize,
`scripts/setup.sh`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# OMP_WAIT_POLICY is left as the environment has it (the report records it). PASSIVE keeps torch's spinning
# threads from turning a 135M model's decode into seconds per token on a CPU shared with other work, but it also
# put llama.cpp's two-thread decode at about twice its time here (eval/results/latency_threads_passive.md): on a
# shared machine set it for the torch rows only, in a separate run.
import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.export import export, features  # noqa: E402
from neuroproj_prune.export.latency import machine  # noqa: E402
from neuroproj_prune.export.llamacpp import LlamaCpp, output_weight  # noqa: E402

WIKI = REPO.parent / "shared" / "data" / "wikitext2-test.txt"
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "To make a cup of tea, first"]


# ------------------------------------------------------------------------------------------ ideal
def ideal_counts(model, ctx: int) -> dict:
    """Weights read per decoded token (every linear weight of the blocks + the output matrix) and MACs per
    prefill token at context `ctx` (the same weights + QKᵀ and AV over ctx/2 positions on average)."""
    cfg = model.config
    lin = sum(p.numel() for n, p in model.model.layers.named_parameters() if n.endswith("proj.weight"))
    out = model.lm_head.weight.numel()
    heads, hd = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * 2 * heads * hd * ctx / 2
    return {"weights_per_token": lin + out, "macs_per_prefill_token": lin + out + attn,
            "params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------- transformers
@torch.no_grad()
def hf_prefill(model, ids) -> float:
    t = time.perf_counter()
    model(ids, use_cache=True)
    return ids.shape[1] / (time.perf_counter() - t)


@torch.no_grad()
def hf_decode(model, prompt, n: int) -> float:
    """Aggregate decoded tokens/s of a greedy loop on the KV cache (batch = prompt rows)."""
    out = model(prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(n):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return prompt.shape[0] * n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------- llama.cpp
def lc_speed(gguf, ids512, prompt64, n: int, batch: int, threads: int) -> dict:
    ll = LlamaCpp(gguf, threads=threads, ctx=1024, parallel=batch, precise=False)
    ll.complete(prompt64[0], 4, ignore_eos=True)  # warm-up
    pre = ll.complete(ids512, 1)["timings"]["prompt_per_second"]
    dec1 = ll.complete(prompt64[0], n, ignore_eos=True)["timings"]["predicted_per_second"]
    res = [None] * batch

    def go(k):
        res[k] = ll.complete(prompt64[k], n, ignore_eos=True)

    t = time.perf_counter()
    ths = [threading.Thread(target=go, args=(k,)) for k in range(batch)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    decb = batch * n / (time.perf_counter() - t)  # includes the batch's prompt processing (64 tokens each)
    del ll
    return {"prefill": pre, "decode1": dec1, "decodeB": decb}


# ------------------------------------------------------------------------------------------ quality
def windows(tok, n: int, L: int) -> list[list[int]]:
    ids = tok(WIKI.read_text())["input_ids"]
    return [ids[i * L:(i + 1) * L] for i in range(n)]


@torch.no_grad()
def hf_ppl(model, wins) -> float:
    nll, cnt = 0.0, 0
    for w in wins:
        lp = torch.log_softmax(model(torch.tensor([w])).logits[0, :-1].double(), -1)
        nll -= lp.gather(1, torch.tensor(w[1:])[:, None]).sum().item()
        cnt += len(w) - 1
    return math.exp(nll / cnt)


def lc_ppl(gguf, wins, threads: int) -> float:
    ll = LlamaCpp(gguf, threads=threads, ctx=len(wins[0]), embedding=True, batch=len(wins[0]), precise=True)
    W = output_weight(gguf)
    nll, cnt = 0.0, 0
    for w in wins:
        h = ll.hidden(w)
        logits = (h[:-1] @ W.T).astype(np.float64)
        m = logits.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
        nll += float((lse - logits[np.arange(len(w) - 1), np.asarray(w[1:])]).sum())
        cnt += len(w) - 1
    return math.exp(nll / cnt)


@torch.no_grad()
def agreement(model, tok, gguf, n: int, threads: int) -> dict:
    ll = LlamaCpp(gguf, threads=threads, ctx=512, precise=True)
    same, dmax = 0, 0.0
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        got, top = ll.greedy(ids, n, n_probs=5)
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids):]
        same += got == ref.tolist()
        seq = ids + ref.tolist()
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
        for s, t in enumerate(top[:len(ref)]):
            if got[:s] != ref.tolist()[:s]:
                break
            dmax = max(dmax, max(abs(lp[len(ids) - 1 + s, k].item() - v) for k, v in t.items()))
    return {"greedy_equal": f"{same}/{len(PROMPTS)}", "max_dlogprob": dmax}


# ---------------------------------------------------------------------------------------- peak mode
def peak_child(args) -> None:
    """One fresh process: load, prefill --prefill tokens, decode 16; print its peak RSS (VmHWM) in MiB."""
    torch.set_num_threads(args.threads)
    ids = list(range(1000, 1000 + args.prefill))
    if args.peak_runtime == "transformers":
        lm = npp.load_model(args.peak_model, dtype="float32", device="cpu")
        hf_prefill(lm.model, torch.tensor([ids]))
        hf_decode(lm.model, torch.tensor([ids[:64]]), 16)
    else:
        ll = LlamaCpp(args.peak_model, threads=args.threads, ctx=1024, precise=False)
        ll.complete(ids, 16, ignore_eos=True)
    hwm = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    print(json.dumps({"peak_mib": int(hwm.split()[1]) / 1024}))  # VmHWM: ru_maxrss survives fork+exec


def peak(spec, runtime, args) -> float:
    cmd = [sys.executable, __file__, "--peak-model", str(spec), "--peak-runtime", runtime,
           "--threads", str(args.threads), "--prefill", str(args.prefill)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if lines else float("nan")


# --------------------------------------------------------------------------------------------- main
KEYS = {"hf": ("prefill", "decode1", "decodeB"), "lc": ("prefill", "decode1", "decodeB")}


def measure_round(args, names, lms, ggufs, types, ids512, prompts64, cells) -> None:
    """One round: every model in transformers, then every type with every model in llama.cpp, back to back, so
    that each dense/pruned pair of a cell is measured within seconds of each other (interleaved pairs)."""
    for n in names:
        m = lms[n].model
        cells["hf", "f32", n]["prefill"].append(hf_prefill(m, torch.tensor([ids512])))
        cells["hf", "f32", n]["decode1"].append(hf_decode(m, torch.tensor(prompts64[:1]), args.decode))
        cells["hf", "f32", n]["decodeB"].append(hf_decode(m, torch.tensor(prompts64), args.decode))
    for t in types:
        for n in names:
            for k, v in lc_speed(ggufs[n, t], ids512, prompts64, args.decode, args.batch, args.threads).items():
                cells["lc", t, n][k].append(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=SPEC (first: the dense reference)")
    ap.add_argument("--work", default="runs/bench_inference", help="where the GGUF exports go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (each gives one dense/pruned pair per cell)")
    ap.add_argument("--types", default="f32,q8_0,q4_0,q4_k_m,q5_k_m,q6_k", help="GGUF types run in llama.cpp")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--out", default="eval/results/inference.md")
    ap.add_argument("--peak-model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peak-runtime", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_model:
        return peak_child(args)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [m.split("=", 1)[0] for m in args.model]
    specs = dict(m.split("=", 1) for m in args.model)
    types = [t for t in args.types.split(",") if t]
    if "f32" not in types:
        types.insert(0, "f32")   # the agreement and perplexity checks read the f32 file
    lms, ggufs, ideal = {}, {}, {}
    for n in names:
        lms[n] = npp.load_model(specs[n], dtype="float32", device="cpu")
        for t in types:
            ggufs[n, t] = work / f"{n}-{t}.gguf"
            if not ggufs[n, t].is_file():
                export(lms[n], "gguf", ggufs[n, t], type=t)
        ideal[n] = ideal_counts(lms[n].model, args.prefill)
        ideal[n]["uniform"] = features(lms[n].model)["uniform"]
        print(f"{n}: {specs[n]}, {ideal[n]['params'] / 1e6:.1f} M parameters", flush=True)
    tok = lms[names[0]].tokenizer
    text_ids = tok(WIKI.read_text()[:20000])["input_ids"]
    ids512 = text_ids[:args.prefill]
    prompts64 = [text_ids[1000 + 64 * k:1000 + 64 * (k + 1)] for k in range(args.batch)]
    cells = {("hf", "f32", n): {k: [] for k in KEYS["hf"]} for n in names}
    cells.update({("lc", t, n): {k: [] for k in KEYS["lc"]} for t in types for n in names})
    for rep in range(args.reps):
        measure_round(args, names, lms, ggufs, types, ids512, prompts64, cells)
        print(f"round {rep + 1}/{args.reps}: " + "; ".join(
            f"{r} {t} {n} b1 {c['decode1'][-1]:.1f}" for (r, t, n), c in cells.items()), flush=True)
    peaks = {} if args.no_peak else {
        n: {"hf": peak(specs[n], "transformers", args), "lc": peak(ggufs[n, "f32"], "llamacpp", args)} for n in names}
    wins = windows(tok, args.ppl_windows, args.ppl_len)
    quality = {}
    for n in names:
        q = {"hf_ppl": hf_ppl(lms[n].model, wins)}
        q.update({f"lc_ppl_{t}": lc_ppl(ggufs[n, t], wins, args.threads) for t in types})
        q.update(agreement(lms[n].model, tok, ggufs[n, "f32"], args.agree_tokens, args.threads))
        quality[n] = q
        print(f"{n}: {q}", flush=True)
    sizes = {f"{n}/{t}": ggufs[n, t].stat().st_size / 2**20 for n in names for t in types}
    write_report(args, names, specs, types, cells, peaks, ideal, quality, sizes)


def _spread(v: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"


def write_report(args, names, specs, types, cells, peaks, ideal, quality, sizes):
    import xllamacpp

    d = names[0]
    L = ["# Inference speed: dense vs pruned, transformers and llama.cpp on CPU", "",
         f"Command: `nice -n 10 python eval/bench_inference.py {' '.join(sys.argv[1:])}`", "",
         f"Machine: {machine()}, {args.threads} threads (`nproc` {os.cpu_count()}), torch {torch.__version__} "
         f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), xllamacpp {xllamacpp.__version__}; "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.reps} interleaved rounds: in each, every model "
         f"runs every cell back to back, so a cell's dense and pruned runs form a pair; each entry is the median "
         f"(min–max) over the rounds, and ×: the median (min–max) of the per-round ratios pruned / dense. Prefill: one "
         f"{args.prefill}-token prompt (WikiText-2). Decode: {args.decode} greedy tokens after a 64-token prompt; batch "
         f"{args.batch}: aggregate tokens/s of {args.batch} sequences (llama.cpp: {args.batch} concurrent requests on "
         f"{args.batch} slots, prompt processing included). transformers float32; llama.cpp with its defaults "
         f"(f16 KV cache, flash attention auto). Ideal: dense / pruned weights read per decoded token (linear layers "
         f"+ output matrix) and MACs per prefill token (+ attention at {args.prefill} tokens).", "",
         "| runtime | type | model | params | decode b1 tok/s | × | decode b" + str(args.batch) + " tok/s | × | "
         "prefill tok/s | × | ideal decode × | ideal prefill × |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (rt, t, n), c in cells.items():
        ref = cells[rt, t, d]

        def ratio(k):
            if n == d:
                return "–"
            return _spread([a / b for a, b in zip(c[k], ref[k])], ".2f")

        i = ideal[n]
        L.append(f"| {'transformers' if rt == 'hf' else 'llama.cpp'} | {t} | {n} | {i['params'] / 1e6:.1f} M | "
                 f"{_spread(c['decode1'])} | {ratio('decode1')} | {_spread(c['decodeB'])} | {ratio('decodeB')} | "
                 f"{_spread(c['prefill'])} | {ratio('prefill')} | "
                 f"{ideal[d]['weights_per_token'] / i['weights_per_token']:.2f} | "
                 f"{ideal[d]['macs_per_prefill_token'] / i['macs_per_prefill_token']:.2f} |")
    if peaks:
        L += ["", "Peak resident memory (VmHWM) of a fresh process that loads the model, prefills "
              f"{args.prefill} tokens and decodes 16: " + "; ".join(
                  f"{n} {peaks[n]['hf']:.0f} MiB (transformers) / {peaks[n]['lc']:.0f} MiB (llama.cpp f32)" for n in names)]
    L += ["", "## Quality: transformers vs llama.cpp, and what each GGUF type costs", "",
          f"Perplexity on the first {args.ppl_windows} windows of {args.ppl_len} tokens of WikiText-2 test (each window "
          f"scored alone; llama.cpp: f32 KV cache, no flash attention, hidden states × the GGUF's own output matrix). "
          f"Greedy: {args.agree_tokens} tokens after each of {len(PROMPTS)} prompts, llama.cpp f32 vs transformers; "
          f"Δ log-prob: the largest difference of the top-5 next-token log-probs along the agreeing prefix.", "",
          "| model | GGUF arch | ppl transformers | greedy equal | max Δ log-prob | "
          + " | ".join(f"ppl {t} (Δ vs f32, MiB)" for t in types) + " |", "|---|---|---|---|---|" + "---|" * len(types)]
    for n in names:
        q = quality[n]
        arch = "llama" if ideal[n]["uniform"] else "deci"
        f32 = q["lc_ppl_f32"]
        L.append(f"| {n} | {arch} | {q['hf_ppl']:.3f} | {q['greedy_equal']} | {q['max_dlogprob']:.1e} | " + " | ".join(
            f"{q[f'lc_ppl_{t}']:.3f} ({(q[f'lc_ppl_{t}'] / f32 - 1) * 100:+.2f} %, {sizes[f'{n}/{t}']:.0f})"
            for t in types) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(L) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"cells": {"/".join(k): v for k, v in cells.items()}, "peak": peaks, "ideal": ideal, "quality": quality,
         "sizes_mib": sizes}, indent=1))
    print("\n".join(L))


if __name__ == "__main__":
    main()
