"""Inference speed and quality of dense vs pruned SmolLM2 in transformers (CPU) and llama.cpp (xllamacpp, CPU).

    nice -n 10 python eval/bench_inference.py --model dense=smollm2-135m --model u30=runs/smol-uniform-0.3 \
        --model g30=runs/smol-global-0.3 ... --out eval/results/inference.md

Per model, interleaved over --reps rounds (ratios come from one run on a shared machine; medians):
- prefill tokens/s on a --prefill-token prompt (transformers: one forward with cache; llama.cpp: the server's
  prompt timing), decode tokens/s at batch 1 and --batch (transformers: a greedy loop on the KV cache;
  llama.cpp: --batch concurrent requests on --batch slots, aggregate tokens/s), ms per decoded token;
- peak RSS of a fresh process that loads the model, prefills and decodes (VmHWM, `--peak` child mode);
- the ideal speed-up beside each measurement: weights read per decoded token (all linear layers + output
  matrix) and MACs per prefill token (linear layers + attention at the prompt length), dense / pruned;
- quality: perplexity on the first --ppl-windows windows of --ppl-len tokens of WikiText-2 in transformers
  and in llama.cpp (f32 GGUF; hidden states from llama.cpp's embedding endpoint, logits with the GGUF's own
  output matrix), and for --quant-models also q8_0 / q4_0; greedy continuations of --agree-prompts compared
  token by token, with the largest next-token log-prob difference.
llama.cpp runs with its defaults for speed (f16 KV cache, flash attention auto) and `precise` (f32 KV, no
flash attention) for the agreement and perplexity checks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # on a shared, oversubscribed CPU, spinning OpenMP threads
import numpy as np  # noqa: E402  (turn a 135M model's decode into ~3 s per token; set before torch loads)
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.export import export, features  # noqa: E402
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
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=SPEC (first: the dense reference)")
    ap.add_argument("--work", default="runs/bench_inference", help="where the GGUF exports go")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--ppl-len", type=int, default=512)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--quant-models", default="", help="comma list of NAMEs also exported q8_0 and q4_0")
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
    lms, ggufs, ideal = {}, {}, {}
    for n in names:
        lms[n] = npp.load_model(specs[n], dtype="float32", device="cpu")
        ggufs[n] = work / f"{n}-f32.gguf"
        if not ggufs[n].is_file():
            export(lms[n], "gguf", ggufs[n], type="f32")
        ideal[n] = ideal_counts(lms[n].model, args.prefill)
        ideal[n]["uniform"] = features(lms[n].model)["uniform"]
        print(f"{n}: {specs[n]}, {ideal[n]['params'] / 1e6:.1f} M parameters", flush=True)
    tok = lms[names[0]].tokenizer
    text_ids = tok(WIKI.read_text()[:20000])["input_ids"]
    ids512 = text_ids[:args.prefill]
    prompts64 = [text_ids[1000 + 64 * k:1000 + 64 * (k + 1)] for k in range(args.batch)]
    speed = {n: {k: [] for k in ("hf_prefill", "hf_decode1", "hf_decodeB", "lc_prefill", "lc_decode1", "lc_decodeB")}
             for n in names}
    for rep in range(args.reps):
        for n in names:
            m = lms[n].model
            s = speed[n]
            s["hf_prefill"].append(hf_prefill(m, torch.tensor([ids512])))
            s["hf_decode1"].append(hf_decode(m, torch.tensor(prompts64[:1]), args.decode))
            s["hf_decodeB"].append(hf_decode(m, torch.tensor(prompts64), args.decode))
            lc = lc_speed(ggufs[n], ids512, prompts64, args.decode, args.batch, args.threads)
            for k, v in lc.items():
                s["lc_" + k].append(v)
            print(f"rep {rep} {n}: " + " ".join(f"{k} {v[-1]:.1f}" for k, v in s.items()), flush=True)
    med = {n: {k: statistics.median(v) for k, v in speed[n].items()} for n in names}
    peaks = {n: {"hf": peak(specs[n], "transformers", args), "lc": peak(ggufs[n], "llamacpp", args)} for n in names}
    wins = windows(tok, args.ppl_windows, args.ppl_len)
    quality = {}
    for n in names:
        q = {"hf_ppl": hf_ppl(lms[n].model, wins), "lc_ppl_f32": lc_ppl(ggufs[n], wins, args.threads)}
        q.update(agreement(lms[n].model, tok, ggufs[n], args.agree_tokens, args.threads))
        quality[n] = q
        print(f"{n}: {q}", flush=True)
    quant = {}
    for n in [x for x in args.quant_models.split(",") if x]:
        for t in ("q8_0", "q4_0"):
            path = work / f"{n}-{t}.gguf"
            if not path.is_file():
                export(lms[n], "gguf", path, type=t)
            lc = lc_speed(path, ids512, prompts64, args.decode, 1, args.threads)
            quant[(n, t)] = {"ppl": lc_ppl(path, wins, args.threads), "size_mib": path.stat().st_size / 2**20,
                             "prefill": lc["prefill"], "decode1": lc["decode1"]}
            print(f"{n} {t}: {quant[(n, t)]}", flush=True)
    write_report(args, names, specs, med, peaks, ideal, quality, quant, ggufs)


def write_report(args, names, specs, med, peaks, ideal, quality, quant, ggufs):
    d = names[0]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import xllamacpp

    L = [f"# Inference speed: dense vs pruned SmolLM2-135M, transformers and llama.cpp on CPU", "",
         f"Command: `nice -n 10 python eval/bench_inference.py {' '.join('--model ' + n + '=' + specs[n] for n in names)} "
         f"--reps {args.reps} --threads {args.threads} --quant-models {args.quant_models}`", "",
         f"Machine: {cpu}, {args.threads} threads (`nproc` {os.cpu_count()}, shared with other jobs), torch "
         f"{torch.__version__} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), xllamacpp {xllamacpp.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
         f"Medians of {args.reps} interleaved rounds. Prefill: one {args.prefill}-token prompt (WikiText-2). "
         f"Decode: {args.decode} greedy tokens after a 64-token prompt; batch {args.batch}: aggregate tokens/s of "
         f"{args.batch} sequences (llama.cpp: {args.batch} concurrent requests on {args.batch} slots, prompt processing "
         f"included). transformers float32; llama.cpp f32 GGUF with its defaults (f16 KV cache). Peak: resident-set high-water mark (VmHWM) of a "
         f"fresh process that loads the model, prefills {args.prefill} tokens and decodes 16. Ideal: dense / pruned "
         f"weights read per decoded token (linear layers + output matrix; decode) and MACs per prefill token "
         f"(+ attention at {args.prefill} tokens; prefill).", "",
         "| model | params | ideal decode × | ideal prefill × | HF prefill tok/s (×) | HF decode b1 tok/s (×) | ms/token | "
         f"HF decode b{args.batch} tok/s (×) | llama.cpp prefill tok/s (×) | llama.cpp decode b1 tok/s (×) | ms/token | "
         f"llama.cpp decode b{args.batch} tok/s (×) | peak MiB HF / llama.cpp |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        m, r, i = med[n], med[d], ideal[n]

        def c(k):
            return f"{m[k]:.1f} ({m[k] / r[k]:.2f})"

        L.append(f"| {n} | {i['params'] / 1e6:.1f} M | {ideal[d]['weights_per_token'] / i['weights_per_token']:.2f} | "
                 f"{ideal[d]['macs_per_prefill_token'] / i['macs_per_prefill_token']:.2f} | {c('hf_prefill')} | "
                 f"{c('hf_decode1')} | {1000 / m['hf_decode1']:.1f} | {c('hf_decodeB')} | {c('lc_prefill')} | "
                 f"{c('lc_decode1')} | {1000 / m['lc_decode1']:.1f} | {c('lc_decodeB')} | "
                 f"{peaks[n]['hf']:.0f} / {peaks[n]['lc']:.0f} |")
    L += ["", f"## Quality: transformers vs llama.cpp (f32 GGUF, f32 KV cache, no flash attention)", "",
          f"Perplexity on the first {args.ppl_windows} windows of {args.ppl_len} tokens of WikiText-2 test (each window "
          f"scored alone). Greedy: {args.agree_tokens} tokens after each of {len(PROMPTS)} prompts, llama.cpp vs "
          f"transformers on the same checkpoint; Δ log-prob: the largest difference of the top-5 next-token log-probs "
          f"along the agreeing prefix.", "",
          "| model | GGUF arch | ppl transformers | ppl llama.cpp f32 | rel. diff | greedy equal | max Δ log-prob |",
          "|---|---|---|---|---|---|---|"]
    for n in names:
        q = quality[n]
        arch = "llama" if ideal[n]["uniform"] else "deci"
        L.append(f"| {n} | {arch} | {q['hf_ppl']:.3f} | {q['lc_ppl_f32']:.3f} | "
                 f"{(q['lc_ppl_f32'] / q['hf_ppl'] - 1) * 100:+.3f} % | {q['greedy_equal']} | {q['max_dlogprob']:.1e} |")
    if quant:
        L += ["", "## Quantized GGUF (llama.cpp, batch 1)", "",
              "| model | type | size MiB | ppl llama.cpp | prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|"]
        for (n, t), q in quant.items():
            L.append(f"| {n} | {t} | {q['size_mib']:.0f} | {q['ppl']:.3f} | {q['prefill']:.1f} | {q['decode1']:.1f} |")
        for n in sorted({n for n, _ in quant}):
            L.append(f"| {n} | f32 | {ggufs[n].stat().st_size / 2**20:.0f} | {quality[n]['lc_ppl_f32']:.3f} | "
                     f"{med[n]['lc_prefill']:.1f} | {med[n]['lc_decode1']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(L) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"speed": med, "peak": peaks, "ideal": ideal, "quality": quality,
         "quant": {f"{n}/{t}": q for (n, t), q in quant.items()}}, indent=1))
    print("\n".join(L))


if __name__ == "__main__":
    main()
