"""Measure what each part of a model costs per decoded token in llama.cpp: the latency file `prune --target-speedup`
prices removals by (its model and format: prune/speed.py).

    neuroproj-prune latency smollm2-135m --type q8_0 --out latency.json

Probes: the dense model and cut copies of it — the first half and the first quarter of its layers, every MLP at a
quarter width, every other attention sub-layer removed (layer 0 keeps its own: llama.cpp reads the head size there) — each
exported to GGUF in `type` by this package's exporter and decoded in llama.cpp (xllamacpp, in-process; its defaults:
f16 key/value cache, flash attention auto) from a `prompt`-token prompt for `tokens` greedy tokens. Decode time does
not depend on the weights' values, so the copies are cut without a refit. `rounds` interleaved rounds (each probe
once per round, so a busy machine slows all alike); per probe the median ms per token (llama.cpp's own counter).
The four costs of `t = fixed + attn·n_attn + mlp·n_mlp + per_param·P` are the non-negative least-squares fit to
the medians; every probe's prediction is written beside its measurement. A family whose attention cannot be removed gets no attention probe: its layers' fixed cost is in
`mlp` and `attn` is 0 (its attention sub-layers cannot be removed, so the split never prices anything).

Cost: five exports (SmolLM2-135M: ~5 s each in f32, ~10 s in q8_0) and rounds × 5 × (load + 4 + `tokens` decode
steps).
"""
from __future__ import annotations

import copy
import datetime
import os
import platform
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, opt
from ..errors import NeuroprojError
from ..io import write_json
from ..model import LoadedModel, command, api_call, load_model, update_config
from ..prune.speed import COSTS, Latency, model_shape, trunk_params
from .gguf import GGUF_TYPES, K_QUANTS, export_gguf, preflight
from .llamacpp import LlamaCpp


@dataclass
class LatencyConfig(Config):
    """Every setting of `latency` (CLI flags, keywords of `measure_latency()`)."""

    what = "latency"

    type: str = opt("q8_0", "GGUF tensor type to time: the one you will run the pruned model in", GGUF_TYPES)
    threads: int | None = opt(None, "llama.cpp CPU threads (default: every core this process may use); the costs "
                              "hold for this count. On a small model fewer threads can be faster (SmolLM2-135M on "
                              "a 2-core VM decoded faster at 1 thread than at 2): time the count you deploy", kind=int, ge=1)
    rounds: int = opt(7, "interleaved rounds: each probe is timed once per round, the medians are fitted", ge=1)
    tokens: int = opt(128, "greedy tokens decoded per timing", ge=4)
    prompt: int = opt(16, "prompt tokens before the decode", ge=1)
    context: int = opt(4096, "llama.cpp's context size (n_ctx; llama-server's default): the decode attends over the "
                       "key/value cells in use, padded to 256", ge=32)


def _probes(lm: LoadedModel, type: str) -> dict[str, LoadedModel]:
    """The dense model and its cut copies (module docstring), by name."""
    model, a = lm.model, lm.adapter
    L, N = a.num_layers(model), a.width(model, 0)
    block = 256 if type in K_QUANTS and N // 4 >= 256 else 32   # a width every row block of `type` divides
    narrow = max(block, N // 4 // block * block)   # a quarter: the weights' share stands out of the timing noise

    def cut(edit) -> LoadedModel:
        m = copy.deepcopy(model)
        edit(m)
        update_config(m)
        return LoadedModel(m, lm.tokenizer, lm.spec, None)

    probes = {"dense": lm}
    for k in sorted({max(1, L // 2), max(1, L // 4)} - {L}, reverse=True):
        probes[f"{k} layers"] = cut(lambda m, k=k: a.drop_layers(m, range(k, L)))
    if narrow < N:
        probes[f"MLPs at {narrow}"] = cut(lambda m: [a.select_neurons(m, i, torch.arange(narrow)) for i in range(L)])
    if a.attn_refusal(model) is None and L > 1:
        probes[f"attention in {len(range(0, L, 2))} of {L}"] = cut(lambda m: [a.remove_attention(m, i)
                                                                              for i in range(1, L, 2)])
    return probes


def counts(lm: LoadedModel) -> tuple[int, int, float]:
    """(attention sub-layers, MLP sub-layers, decoder-layer parameters) of a model: what `Latency.ms` prices."""
    model, a = lm.model, lm.adapter
    L = a.num_layers(model)
    return sum(a.has_attention(model, i) for i in range(L)), L, float(trunk_params(model, a))


def prompt_ids(tokenizer, n: int) -> list[int]:
    """The `n`-token prompt every timing decodes from (a fixed English sentence, repeated)."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:n]
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def decode_ms(path: Path, prompt: list[int], cfg: LatencyConfig, threads: int) -> float:
    """ms per decoded token: a fresh llama.cpp server on the GGUF, a 4-token warm-up, then `tokens` greedy tokens
    (llama.cpp's own eval counter)."""
    ll = LlamaCpp(path, threads=threads, ctx=max(cfg.context, len(prompt) + cfg.tokens + 8), precise=False, quiet=True)
    try:
        ll.complete(prompt, 4, ignore_eos=True)
        t = ll.complete(prompt, cfg.tokens, ignore_eos=True)["timings"]
    finally:
        del ll
    return float(t["predicted_ms"]) / max(int(t["predicted_n"]), 1)


def fit(rows: np.ndarray, ms: np.ndarray, free: list[bool]) -> np.ndarray:
    """The non-negative least squares of ms ≈ rows · costs over the `free` columns (the others 0): the least-squares
    solution on every subset of them, the best one with no negative cost (exact; ≤ 4 columns: 16 small solves)."""
    cols = [j for j, f in enumerate(free) if f]
    best, best_r = np.zeros(rows.shape[1]), float(ms @ ms)
    for mask in range(1, 1 << len(cols)):
        sub = [c for k, c in enumerate(cols) if mask >> k & 1]
        sol, *_ = np.linalg.lstsq(rows[:, sub], ms, rcond=None)
        if (sol < 0).any():
            continue
        costs = np.zeros(rows.shape[1])
        costs[sub] = sol
        r = float(((rows @ costs - ms) ** 2).sum())
        if r < best_r:
            best, best_r = costs, r
    return best


def fit_latency(parts: dict[str, tuple], times: dict[str, list[float]], shape: dict, meta: dict) -> Latency:
    """The latency model of timed probes: `parts` {name: counts()}, `times` {name: ms per token of each round}; the
    costs fit the medians (`fit`), every probe's measurement and prediction go into the meta. A fit that gives the
    weights no cost is refused: `--target-speedup` sizes MLP widths by per_param, and on a noisy machine (or a model
    whose weights are read faster than the timings vary) the medians can hide it; so is one whose weights' reads
    come to under 0.1 % of the dense model's token (a least-squares round-off, not a cost)."""
    rows = np.array([[1.0, n_attn, n_mlp, params / 1e6] for n_attn, n_mlp, params in parts.values()])
    med = np.array([statistics.median(times[name]) for name in parts])
    separate = any(n_attn != n_mlp for n_attn, n_mlp, _ in parts.values())
    costs = fit(rows, med, [True, separate, True, True])
    if not costs[3] * rows[:, 3].max() > 1e-3 * med.max():   # below 0.1 % of a token: round-off, not a cost
        raise NeuroprojError("the timings show no cost for the weights (per_param fitted 0: the probes' times vary "
                             "more than their weights' reads): time again on a quiet machine with more --rounds "
                             "and --tokens")
    pred = rows @ costs
    meta = {**meta, "attention_separated": separate,
            "probes": [{"name": name, "n_attn": c[0], "n_mlp": c[1], "params": c[2], "ms": float(m),
                        "min": min(times[name]), "max": max(times[name]), "predicted": round(float(p), 4)}
                       for (name, c), m, p in zip(parts.items(), med, pred)]}
    return Latency(**dict(zip(COSTS, (float(x) for x in costs))), model=shape, meta=meta)


def measure_latency(model, out=None, config: LatencyConfig | None = None, *, overwrite: bool = False,
                    progress: bool = True, **settings) -> Latency:
    """Measure the latency model of `model` (a LoadedModel or anything `load_model` loads; the dense model, uniform
    MLP widths) in llama.cpp and (with `out`) write it as a latency file. Cost: module docstring."""
    cfg = config.replace(**settings) if config is not None else LatencyConfig.make(**settings)
    if out is not None and Path(out).exists() and not overwrite:
        raise NeuroprojError(f"output {out} exists: choose another --out or pass --overwrite")
    preflight(cfg.type)
    lm = model if isinstance(model, LoadedModel) else load_model(str(model), dtype="float32", device="cpu")
    a = lm.adapter
    L = a.num_layers(lm.model)
    if len({a.width(lm.model, i) for i in range(L)}) > 1 or not all(a.has_attention(lm.model, i) for i in range(L)):
        raise NeuroprojError("measure the latency of the dense model (every layer at one MLP width, every attention "
                             "present): the file prices removals from it")
    threads = cfg.threads or len(os.sched_getaffinity(0))
    prompt = prompt_ids(lm.tokenizer, cfg.prompt)
    probes = _probes(lm, cfg.type)
    work = Path(tempfile.mkdtemp(prefix="neuroproj-latency-"))
    try:
        paths = {}
        for name, p in tqdm(probes.items(), desc=f"export {cfg.type}", unit="probe", disable=not progress):
            paths[name] = work / f"{len(paths)}.gguf"
            export_gguf(p, paths[name], type=cfg.type)
        times = {name: [] for name in probes}
        bar = tqdm(total=cfg.rounds * len(probes), desc="decode", unit="run", disable=not progress)
        for _ in range(cfg.rounds):
            for name, path in paths.items():
                times[name].append(decode_ms(path, prompt, cfg, threads))
                bar.update()
        bar.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    parts = {name: counts(p) for name, p in probes.items()}
    meta = {"runtime": "llama.cpp (xllamacpp, defaults: f16 key/value cache, flash attention auto)",
            "type": cfg.type, "threads": threads, "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command(api_call("npp.measure_latency", lm.spec, out, **cfg.changed())),
            "settings": cfg.to_dict(), "source_model": lm.spec}
    lat = fit_latency(parts, times, model_shape(lm.model, a), meta)
    if out is not None:
        write_json(out, lat.to_json())
    return lat


def describe(lat: Latency) -> str:
    """The fitted costs and every probe's measured and predicted ms per token, as lines of text."""
    m = lat.meta
    lines = [f"llama.cpp {m['type']}, {m['threads']} threads: ms per decoded token = {lat.fixed:.3f} + "
             f"{lat.attn:.3f} per attention sub-layer + {lat.mlp:.3f} per MLP sub-layer + {lat.per_param:.4f} per "
             f"million decoder-layer weights"]
    for p in m["probes"]:
        lines.append(f"  {p['name']:<24} {p['ms']:7.3f} ms ({p['min']:.3f}-{p['max']:.3f}), fit {p['predicted']:7.3f}")
    return "\n".join(lines)


def machine() -> str:
    """The CPU's model name and count, as timings record it."""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs"
