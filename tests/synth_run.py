"""A synthetic run directory of a given model size, in the project's own file formats, with random data.

`make_run(out, layers=32, width=14336, hidden=4096)` writes what a full run of an 8B model (Llama-3.1-8B
geometry: 32 layers × 14336 MLP neurons, hidden size 4096, three sites) would leave for the report: the
statistics (sparse on disk: its 32 + 64 float64 Gram matrices would be 61 GB; only count, shift and sum
are written, the Grams read as zeros), projections, clusters (k-means, keep 70 %), a 30 % plan, a
48-token trace of every layer and site, one ordering heatmap per layer, a skip report with its per-neuron
CSV, a sweep and evaluations. No model is needed; ~10 s and ~0.4 GB of real disk for the 8B size.

    python tests/synth_run.py OUT_DIR [--layers 32 --width 14336 --hidden 4096]
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SITES = ("mlp.neurons", "mlp.out", "attn.out")


def _sparse_safetensors(path: Path, tensors: list[tuple[str, str, tuple, np.ndarray | None]], meta: dict) -> int:
    """A valid safetensors file whose tensors given as None are left as holes (zeros, no disk blocks).
    `tensors`: (name, safetensors dtype, shape, data or None), laid out in order. Returns the file size."""
    item = {"F64": 8, "F32": 4, "I64": 8}
    header, off = {"__metadata__": {"neuroproj_prune": json.dumps(meta)}}, 0
    for name, dt, shape, _ in tensors:
        n = int(np.prod(shape)) * item[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)                      # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        base = f.tell()
        for name, dt, shape, data in tensors:
            if data is not None:
                f.seek(base + header[name]["data_offsets"][0])
                f.write(np.ascontiguousarray(data).tobytes())
        f.truncate(base + off)
    return base + off


def _png(path: Path, w: int, h: int, seed: int, levels: int = 24) -> None:
    """A picture about as large as a real heatmap of a wide layer (correlations look like noise to deflate)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    cmap = (rng.random((levels, 3)) * 255).astype(np.uint8)
    img = cmap[rng.integers(0, levels, (h, w))]
    Image.fromarray(img).save(path, optimize=False)


def make_run(out, *, layers: int = 32, width: int = 14336, hidden: int = 4096, tokens: int = 48,
             n_prompt: int = 32, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    L, N, d, T = layers, width, hidden, tokens
    W = {"mlp.neurons": N, "mlp.out": d, "attn.out": d}
    model = f"synthetic/{L}x{N}x{d}"
    created = time.strftime("%Y-%m-%dT%H:%M:%S")

    # statistics: count, shift, sum per (layer, site) written; the N×N Grams left as holes
    small, grams = [], []
    for i in range(L):
        for s in SITES:
            k = f"layer.{i}.{s}."
            small += [(k + "count", "I64", (1,), np.array([T * 128], dtype="<i8")),
                      (k + "shift", "F64", (W[s],), rng.standard_normal(W[s]).astype("<f8") * 0.1),
                      (k + "sum", "F64", (W[s],), rng.standard_normal(W[s]).astype("<f8") * 50)]
            grams.append((k + "gram", "F64", (W[s], W[s]), None))
    _sparse_safetensors(out / "stats.safetensors", small + grams, {
        "format": "neuroproj-prune/stats/1", "model": model, "model_type": "llama", "fingerprint": "0" * 32,
        "num_layers": L, "hidden_size": d, "mlp_in_blocks": 2, "widths": [N] * L, "layers": list(range(L)),
        "sites": list(SITES), "cross_layer_window": 0, "tokens": T * 128, "data": "synthetic", "samples": 128,
        "seqlen": 2048, "seed": seed, "dtype": "bfloat16", "processes": 1, "created": created})

    # projections: blobs in 3-D
    from safetensors.numpy import save_file

    pts, stress = {}, {}
    for i in range(L):
        for s in SITES:
            c = rng.standard_normal((24, 3)).astype(np.float32)
            pts[f"layer.{i}.{s}"] = c[rng.integers(0, 24, W[s])] + 0.15 * rng.standard_normal((W[s], 3), np.float32)
            stress[f"{i}/{s}"] = float(0.2 + 0.1 * rng.random())
    save_file(pts, out / "projections.safetensors", metadata={"neuroproj_prune": json.dumps({
        "format": "neuroproj-prune/projection/1", "mode": "exact", "dims": 3, "norm_order": 2.0, "init": "cmds",
        "layers": list(range(L)), "sites": list(SITES), "stress": stress, "model": model, "created": created})})

    # clusters of mlp.neurons (k-means, keep 70 %) and a 30 % plan
    k = int(0.7 * N)
    clayers, players, kept_counts = {}, {}, []
    for i in range(L):
        labels = rng.integers(0, k, N)
        labels[:k] = np.arange(k)                   # every cluster non-empty
        rng.shuffle(labels)
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(k + 1))
        poles = [{"id": c, "size": int(bounds[c + 1] - bounds[c]), "density": 1.0, "spread": 0.1,
                  "representative": int(order[bounds[c]]), "members": order[bounds[c]:bounds[c + 1]].tolist()}
                 for c in range(k)]
        clayers[str(i)] = {"n_neurons": N, "n_clusters": k, "algo": "kmeans", "metric": "euclidean",
                           "representative": "energy", "eps": None, "min_samples": None, "k": k,
                           "labels": labels.tolist(), "noise": [],
                           "representatives": {str(p["id"]): p["representative"] for p in poles}, "poles": poles}
        keep = np.sort(rng.choice(N, k, replace=False))
        removed = np.setdiff1d(np.arange(N), keep)
        players[str(i)] = {"width": N, "keep": keep.tolist(), "representative": {
            str(j): int(r) for j, r in zip(removed.tolist(), keep[rng.integers(0, k, len(removed))].tolist())}}
        kept_counts.append(k)
    (out / "clusters.json").write_text(json.dumps({"format": "neuroproj-prune/clusters/1", "algo": "kmeans",
                                                   "space": "projection", "site": "mlp.neurons",
                                                   "layers": clayers}))
    (out / "pruned").mkdir(exist_ok=True)
    (out / "pruned" / "plan.json").write_text(json.dumps({"format": "neuroproj-prune/plan/1", "meta": {
        "select": "synthetic", "sparsity": 0.3}, "layers": players}))
    (out / "pruned" / "prune_summary.json").write_text(json.dumps({
        "model": model, "sparsity": 0.3, "select": "synthetic", "fold": "lstsq", "kept": kept_counts,
        "params_before": 8_030_261_248, "params_after": 6_228_000_000,
        "mlp_macs_per_token_before": 5_637_144_576, "mlp_macs_per_token_after": 3_946_001_203}))

    # trace: T tokens × every layer and site
    words = [f" w{t}" for t in range(T)]
    tr = {"input_ids": np.arange(T, dtype=np.int64) + 100}
    for i in range(L):
        for s in SITES:
            tr[f"layer.{i}.{s}"] = rng.standard_normal((T, W[s]), np.float32)
    save_file(tr, out / "trace.safetensors", metadata={"neuroproj_prune": json.dumps({
        "format": "neuroproj-prune/trace/1", "model": model, "fingerprint": "0" * 32, "prompt": "".join(words[:n_prompt]),
        "generated": "".join(words[n_prompt:]), "tokens": words, "raw_tokens": [w.replace(" ", "Ġ") for w in words],
        "n_prompt": n_prompt, "layers": list(range(L)), "sites": list(SITES), "sample": False, "seed": None,
        "temperature": None, "max_new_tokens": T - n_prompt, "created": created,
        "alignment": "row t = activation at position t of one full forward over prompt + generated tokens"})})
    del tr

    # one heatmap per layer (1800×630, as heatmap.py draws them), a skip report, a sweep, evaluations
    (out / "heatmaps").mkdir(exist_ok=True)
    _png(out / "heatmaps" / "layer0-mlp.neurons.png", 1800, 630, seed)
    for i in range(1, L):
        shutil.copyfile(out / "heatmaps" / "layer0-mlp.neurons.png", out / "heatmaps" / f"layer{i}-mlp.neurons.png")
    sk = out / "skips"
    sk.mkdir(exist_ok=True)
    _png(sk / "skips.png", 1000, 400, seed + 1, levels=2)    # a plot: flat colours, compresses well
    th = [0.9, 0.95, 0.99]
    cands = [{"target": int(m), "neuron": int(j), "r2": float(r), "sources": [[int(m) - 1, int(j)]], "coef": [1.0],
              "intercept": 0.0, "predictor": "single"}
             for m, j, r in zip(rng.integers(1, L, 5000), rng.integers(0, N, 5000), 0.95 + 0.05 * rng.random(5000))]
    (sk / "skips.json").write_text(json.dumps({
        "meta": {"model": model, "num_layers": L, "window": 1, "top_k": 2}, "thresholds": th, "min_r2": 0.95,
        "counts": {"single": {"per_layer": {str(m): [300, 160, 20] for m in range(1, L)}, "total": [0, 0, 0],
                              "selected": [0, 0, 0], "r2_source": "fit"}},
        "cost_at_min_r2": {"single": {"skipped": 5000}}, "candidates": {"single": cands}}, indent=1))
    with open(sk / "skips.csv", "w") as f:
        f.write("layer,neuron,dead,single_src_layer,single_src_index,single_slope,single_intercept,single_r2_fit,"
                "single_r2_heldout,topk_sources,topk_coef,topk_intercept,topk_r2_fit,topk_r2_heldout\n")
        for m in range(1, L):
            r2 = rng.random(N)
            src = rng.integers(0, N, N)
            f.writelines(f"{m},{j},False,{m - 1},{src[j]},0.5,0.01,{r2[j]:.6f},{r2[j] * 0.9:.6f},{m - 1}:{src[j]} "
                         f"{m - 1}:{(src[j] + 1) % N},0.5 0.25,0.0,{r2[j]:.6f},\n" for j in range(N))
    sw = out / "sweep"
    sw.mkdir(exist_ok=True)
    with open(sw / "results.csv", "w") as f:
        f.write("method,sparsity,actual_sparsity,ppl,params,mlp_macs_per_token,seconds,error\ndense,0,0,6.2,,,,\n")
        for m in ("flap", "wanda-sp"):
            for sp in (0.1, 0.2, 0.3):
                f.write(f"{m},{sp},{sp},{6.2 * (1 + 3 * sp * sp):.3f},,,,\n")
    _png(sw / "tradeoff.png", 800, 500, seed + 2, levels=4)
    for name, ppl in (("eval_dense.json", 6.2), ("eval.json", 7.9)):
        (out / name).write_text(json.dumps({"model": {"spec": model}, "perplexity": {
            "value": ppl, "seqlen": 2048, "windows": 40, "tokens": 81920, "data": "synthetic"}}))
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=14336)
    ap.add_argument("--hidden", type=int, default=4096)
    a = ap.parse_args()
    t0 = time.time()
    make_run(a.out, layers=a.layers, width=a.width, hidden=a.hidden)
    print(f"wrote {a.out} in {time.time() - t0:.1f} s", file=sys.stderr)
