"""What the width multiple (`prune --multiple M`) costs and buys, at one sparsity: speed in llama.cpp and
transformers, the allocation's predicted error, and which GGUF quantizations can store the widths.

    OMP_NUM_THREADS=2 python eval/bench_multiple.py --sparsity 0.3 --multiples 1,32,64,128,256 \
        --out eval/results/multiple.md

For each multiple M:
- uniform: every layer keeps round(N·(1−s)/M)·M neurons (so the kept count itself moves with M);
- global: the `--allocation global` widths at the same total (error curves of the dense layers, measured once
  on --alloc-samples C4 windows with loss-gradient token weights, as `prune` does), rounded to M inside the
  allocation; the column "Σe / Σe(M=1)" is the allocation's predicted loss increase against exact widths.
Speed does not depend on which neurons are kept, so the speed checkpoints keep the first k_i neurons of the
dense model (no calibration): prefill tokens/s of a 512-token prompt and decode tokens/s at batch 1 in
llama.cpp (f32 GGUF: `llama` for uniform, `deci` for per-layer widths; xllamacpp, interleaved over --reps
rounds, medians) and in transformers (float32), each as a ratio to the dense model in the same round.
Quantization: Q8_0/Q4_0 store rows in blocks of 32, K-quants in 256; a width that is not a multiple cannot
be quantized (the export refuses).
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

import neuroproj_prune as npp  # noqa: E402
from neuroproj_prune.prune.allocate import error_curves
from neuroproj_prune.stats import compute_dtype_for  # noqa: E402
from neuroproj_prune.model import save_pruned, update_config  # noqa: E402
from neuroproj_prune.export import export  # noqa: E402
from neuroproj_prune.prune.allocate import allocate_by_error, layer_width  # noqa: E402
from neuroproj_prune.stats import calibration_ids  # noqa: E402

from bench_inference import hf_decode, hf_prefill, lc_speed  # noqa: E402

C4 = REPO.parent / "shared" / "data" / "c4-train-sample-1000.jsonl"


def shaped(lm, widths: dict[int, int], out: Path) -> Path:
    """A checkpoint of the dense model keeping the first widths[i] neurons of layer i (speed only)."""
    m = copy.deepcopy(lm.model)
    a = lm.adapter
    for i, k in widths.items():
        a.select_neurons(m, i, torch.arange(k))
    update_config(m)
    save_pruned(m, lm.tokenizer, out, overwrite=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--multiples", default="1,32,64,128,256")
    ap.add_argument("--alloc-samples", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/bench_multiple")
    ap.add_argument("--out", default="eval/results/multiple.md")
    a = ap.parse_args()
    Ms = [int(x) for x in a.multiples.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = npp.load_model("smollm2-135m", dtype="float32", device="cpu")
    ad, L = lm.adapter, lm.adapter.num_layers(lm.model)
    Ns = {i: ad.width(lm.model, i) for i in range(L)}
    ids, _ = calibration_ids(lm, str(C4), a.alloc_samples, 512, 0)
    t = time.time()
    curves = error_curves(lm, ids, select="wanda-sp", weights="grad", batch_size=4,
                          compute=compute_dtype_for("auto", lm.model), progress=True)
    print(f"error curves: {time.time() - t:.0f} s", flush=True)
    total = sum(layer_width(N, a.sparsity, None, 1) for N in Ns.values())
    rows, models = [], {"dense": None}
    for M in Ms:
        u = {i: layer_width(N, a.sparsity, None, M) for i, N in Ns.items()}
        g = allocate_by_error(curves, total, M, 1.0)
        err = {k: float(sum(curves[i][w[i]] for i in Ns)) for k, w in (("u", u), ("g", g))}
        rows.append({"M": M, "u": u, "g": g, "err": err})
        for kind, w in (("u", u), ("g", g)):
            models[f"{kind}{M}"] = w
    base = {k: rows[0]["err"][k] for k in ("u", "g")} if Ms[0] == 1 else None
    # checkpoints and GGUFs (identical widths share one)
    paths, ggufs, seen = {}, {}, {}
    for name, w in models.items():
        key = None if w is None else tuple(w[i] for i in range(L))
        if key in seen:
            paths[name], ggufs[name] = paths[seen[key]], ggufs[seen[key]]
            continue
        seen[key] = name
        paths[name] = "smollm2-135m" if w is None else shaped(lm, w, work / name)
        gg = work / f"{name}.gguf"
        if not gg.exists():
            export(str(paths[name]), "gguf", gg, type="f32", overwrite=True)
        ggufs[name] = gg
    tok = lm.tokenizer
    text = (REPO.parent / "shared" / "data" / "wikitext2-test.txt").read_text()
    ids512 = tok(text)["input_ids"][:512]
    prompt = [ids512[:64]]
    speed = {n: {"lc_pre": [], "lc_dec": [], "hf_pre": [], "hf_dec": []} for n in models}
    loaded = {n: (lm.model if models[n] is None else npp.load_model(str(paths[n]), device="cpu").model) for n in models}
    torch.set_num_threads(a.threads)
    for r in range(a.reps):
        for n in models:
            s = lc_speed(ggufs[n], ids512, prompt, 32, 1, a.threads)
            speed[n]["lc_pre"].append(s["prefill"])
            speed[n]["lc_dec"].append(s["decode1"])
            speed[n]["hf_pre"].append(hf_prefill(loaded[n], torch.tensor([ids512])))
            speed[n]["hf_dec"].append(hf_decode(loaded[n], torch.tensor(prompt), 32))
            print(r, n, {k: round(v[-1], 1) for k, v in speed[n].items()}, flush=True)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in speed.items()}
    dense = med["dense"]

    def cell(n, k):
        return f"{med[n][k]:.1f} ({med[n][k] / dense[k]:.2f})"

    lines = [f"# Width multiple (`--multiple`) at {a.sparsity:.0%} MLP sparsity: SmolLM2-135M", "",
             f"Command: `OMP_NUM_THREADS={a.threads} python eval/bench_multiple.py --sparsity {a.sparsity} "
             f"--multiples {a.multiples} --reps {a.reps} --threads {a.threads}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {a.threads} threads (2-core VM shared with other "
             f"jobs), torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"Medians of {a.reps} interleaved rounds; (×) = ratio to the dense model. Dense: llama.cpp prefill "
             f"{dense['lc_pre']:.1f} / decode {dense['lc_dec']:.1f} tok/s, transformers {dense['hf_pre']:.1f} / "
             f"{dense['hf_dec']:.1f} tok/s.", "",
             "| M | alloc | kept neurons | widths (min–max) | Σe / Σe(M=1) | Q8_0/Q4_0 | K-quants | llama.cpp prefill tok/s (×) "
             "| llama.cpp decode tok/s (×) | HF prefill tok/s (×) | HF decode tok/s (×) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        M = row["M"]
        for kind, label in (("u", "uniform"), ("g", "global")):
            w = row[kind]
            vals = list(w.values())
            rel = f"{row['err'][kind] / base[kind]:.4f}" if base else "–"
            q32 = "yes" if all(v % 32 == 0 for v in vals) else "no"
            q256 = "yes" if all(v % 256 == 0 for v in vals) else "no"
            n = f"{kind}{M}"
            lines.append(f"| {M} | {label} | {sum(vals)} | {min(vals)}–{max(vals)} | {rel} | {q32} | {q256} | "
                         f"{cell(n, 'lc_pre')} | {cell(n, 'lc_dec')} | {cell(n, 'hf_pre')} | {cell(n, 'hf_dec')} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
