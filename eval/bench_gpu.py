"""GPU benchmark of the pipeline on an 8B-class geometry with random weights: nothing to download (issue 17).

    python eval/bench_gpu.py --geometry llama3-8b --out eval/results/gpu-llama3-8b      # not yet run on a GPU
    python eval/bench_gpu.py --geometry qwen2.5-7b --out eval/results/gpu-qwen2.5-7b
    python eval/bench_gpu.py --geometry tiny --out /tmp/bench-tiny                       # CPU smoke test, ~10 s

The model is built from a transformers config (Llama-3.1-8B: hidden 4096, MLP 14336, 32 layers, 32 heads,
8 KV heads, vocabulary 128256; Qwen2.5-7B: 3584 / 18944 / 28 / 28 / 4 / 152064) directly on the device
(`torch.device` context: the weights are initialised there, never in host memory), in bfloat16, with
random weights — timing does not depend on the values — and fed random token ids (128 × 2048 by default).
One run builds, checks and times, in this order (the model is pruned in place, so prune comes last; the
streamed variants start from a fresh copy saved to disk):

- `build` — the model on the device (and its fingerprint);
- `forward` — `model(input_ids, use_cache=False)` over every calibration batch (LM head included), and
  `trunk` — the decoder stack alone (`model.base_model`): what `collect` runs, as it stops after the last layer;
- `collect` — `neuroproj_prune.stats.collect` of `mlp.neurons` at every layer (`--collect-layers`) over the
  same batches: float32 Gram products into float64 totals (8·N² bytes a layer: 53 GB for 32 × 14336), then
  copied to host memory; the ratios collect/forward and collect/trunk;
- `project` — `project --mode exact` of one layer's N neurons (14336 for Llama): the N×N correlation on the
  host (float64), then classical MDS + SMACOF on the device (`fit_exact`, also timed alone);
- `prune` — `neuroproj_prune.prune.prune` at 30 % (wanda-sp, lstsq fold, sequential calibration: the
  defaults) on the token ids, with its parts timed (layer inputs, per-layer moments, select+fold, carry);
- `prune (offload=cpu|disk)` — the same with `PruneConfig.offload` streaming the layers (neuroproj_prune/prune/offload.py),
  as a user runs it: from the model saved as safetensors in `--work-dir` (saved before the stage, untimed; a
  placeholder tokenizer beside it, the calibration being token ids) to the checkpoint written in `--work-dir`.
  Its time includes loading (cpu: the whole model into host memory; disk: embeddings and head) and writing; its
  parts add the layers' trips (fetch, put away) and the write. After the stage (untimed) the checkpoint is
  loaded with plain transformers onto the device, its kept widths and a finite forward checked.

Each stage: wall seconds (CUDA synchronised), peak device memory (`torch.cuda.max_memory_allocated`, reset
before the stage; it includes a resident model, 16 GB for 8B in bfloat16) and peak host memory (VmHWM, reset
before the stage through /proc/self/clear_refs), a check of its result, and the goal of the issue where there is
one. Writes OUT.json and OUT.md (the table). Cost: about two forward passes, one statistics pass, one projection
and three prunes of the model, plus writing the model and two pruned checkpoints to `--work-dir` (8B: ~45 GB,
each removed when checked).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

GEOMETRIES = {
    "llama3-8b": dict(config="LlamaConfig", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "qwen2.5-7b": dict(config="Qwen2Config", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    # a large vocabulary on a small trunk (the issue-25 model "you do not see" has this shape): CPU-sized
    "qwen2.5-0.5b": dict(config="Qwen2Config", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    # the CPU smoke test: the same code paths at a size this 2-core machine runs in seconds
    "tiny": dict(config="LlamaConfig", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                 tie_word_embeddings=False),
}
# samples, seqlen
DEFAULTS = {"llama3-8b": (128, 2048), "qwen2.5-7b": (128, 2048), "qwen2.5-0.5b": (128, 512), "tiny": (4, 64)}
SPARSITY = 0.3
# the goals, per stage (None: no goal, measured for the record)
GOALS = {"prune": "< 300 s wall", "prune (offload=cpu)": "< 300 s wall, peak < 24 GB",
         "prune (offload=disk)": "< 300 s wall, peak < 24 GB", "project": "< 5 s (N = 14336)",
         "collect / forward": "≤ 1.2"}


# ------------------------------------------------------------------------------------------ helpers
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_host_peak() -> bool:
    """Reset this process's peak resident memory (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_peak_gb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")) / 1e9
    except (OSError, StopIteration):
        return None


class Stage:
    """`with Stage(rows, name, dev) as st:` — wall time (synchronised) and peak device memory of the block;
    `st.check` / `st.note` say what was verified. A failing stage is recorded (its error as the check) and
    the benchmark goes on with the next one."""

    def __init__(self, rows: list, name: str, dev: torch.device):
        self.rows, self.name, self.dev = rows, name, dev
        self.check, self.note = "", ""

    def __enter__(self):
        gc.collect()
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.host_reset = _reset_host_peak()
        _sync(self.dev)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, typ, exc, tb):
        _sync(self.dev)
        seconds = time.perf_counter() - self.t0
        peak = torch.cuda.max_memory_allocated(self.dev) / 1e9 if self.dev.type == "cuda" else None
        host = _host_peak_gb() if self.host_reset else None
        ok = typ is None
        if not ok:
            self.check = f"FAILED: {typ.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        self.rows.append({"stage": self.name, "seconds": round(seconds, 6), "peak_gb": None if peak is None else
                          round(peak, 2), "host_peak_gb": None if host is None else round(host, 3), "ok": ok,
                          "check": self.check, "note": self.note, "goal": GOALS.get(self.name)})
        print(f"[bench] {self.name}: {seconds:.2f} s" + ("" if peak is None else f", peak {peak:.2f} GB")
              + ("" if host is None else f", host peak {host:.2f} GB") + f" — {self.check}", file=sys.stderr,
              flush=True)
        return typ is not None and issubclass(typ, Exception)   # record and go on; never swallow Ctrl-C


@contextlib.contextmanager
def timed(owner, attr: str, bucket: dict, key: str, dev: torch.device):
    """Time every call of `owner.attr` (a module function or a method) into bucket[key] while in the block:
    the parts of one prune. Wraps the real function, which still does all the work."""
    real = getattr(owner, attr)

    def wrapper(*a, **kw):
        _sync(dev)
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            _sync(dev)
            bucket[key] = bucket.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, real)


def build_model(geometry: str, dev: torch.device, dtype: torch.dtype, layers: int | None, seed: int):
    """A causal LM of the geometry with random weights, made on `dev` (no host copy of the weights)."""
    import transformers

    from neuroproj_prune.model import LoadedModel, model_fingerprint

    g = dict(GEOMETRIES[geometry])
    cls = getattr(transformers, g.pop("config"))
    if layers is not None:
        g["num_hidden_layers"] = min(layers, g["num_hidden_layers"])
    cfg = cls(**g)
    torch.manual_seed(seed)
    with torch.device(dev):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval().requires_grad_(False)
    return LoadedModel(model, None, f"random:{geometry}", model_fingerprint(model))


def _batches(ids: torch.Tensor) -> list[torch.Tensor]:
    bs = max(1, 4096 // ids.shape[1])   # collect's and prune's default batch: ~4096 tokens
    return [ids[b:b + bs] for b in range(0, ids.shape[0], bs)]


@torch.inference_mode()
def _forward(module, batches, dev) -> torch.Tensor:
    out = None
    for x in batches:
        out = module(input_ids=x.to(dev), use_cache=False)
    return out[0] if isinstance(out, tuple) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)


def _placeholder_tokenizer(vocab_size: int):
    """A tokenizer to save beside the random model (loading a model directory reads one; the calibration is
    token ids, so its vocabulary does not matter)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>",
                                   model_max_length=vocab_size)


# ------------------------------------------------------------------------------------------ the run
def run_bench(geometry: str = "tiny", *, samples: int | None = None, seqlen: int | None = None, layers: int | None = None,
              collect_layers: str = "all", device: str | None = None, dtype: str | None = None, seed: int = 0,
              offload=("cpu", "disk"), out=None, work_dir=None) -> dict:
    """Build, check and time every stage (see the module docstring); returns the result dict (also written
    to OUT.json / OUT.md when `out` is given). `work_dir`: where the offload rows' model and checkpoints go
    (default: a temporary directory, removed at the end)."""
    from neuroproj_prune.prune.allocate import layer_width
    from neuroproj_prune.analysis.projection import project
    from neuroproj_prune.stats import collect

    import importlib

    # the modules (the package's `prune` and `project` names are the functions)
    projection_mod = importlib.import_module("neuroproj_prune.analysis.projection")
    prune_mod = importlib.import_module("neuroproj_prune.prune")

    if geometry not in GEOMETRIES:
        raise SystemExit(f"bench_gpu: unknown --geometry {geometry!r}: choose {', '.join(GEOMETRIES)}")
    d_samples, d_seqlen = DEFAULTS[geometry]
    samples, seqlen = samples or d_samples, seqlen or d_seqlen
    if samples < 1 or seqlen < 2 or (layers is not None and layers < 1):
        raise SystemExit("bench_gpu: --samples >= 1, --seqlen >= 2 and --layers >= 1 please")
    dev = torch.device(device or ("cpu" if geometry == "tiny" else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_gpu: --geometry {geometry} needs a CUDA GPU (this torch sees none); "
                         f"--geometry tiny is the CPU smoke test")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    rows: list[dict] = []
    g = GEOMETRIES[geometry]
    result = {"geometry": geometry, "config": {k: v for k, v in g.items()}, "samples": samples, "seqlen": seqlen,
              "tokens": samples * seqlen, "dtype": str(dt).replace("torch.", ""), "sparsity": SPARSITY,
              "device": _device_name(dev), "torch": torch.__version__,
              "command": f"python eval/bench_gpu.py --geometry {geometry} --samples {samples} --seqlen {seqlen}"
                         + (f" --layers {layers}" if layers else "")
                         + (f" --collect-layers {collect_layers}" if collect_layers != "all" else ""),
              "date": time.strftime("%Y-%m-%d %H:%M"), "stages": rows}
    ids = torch.randint(0, g["vocab_size"], (samples, seqlen), generator=torch.Generator().manual_seed(seed))
    batches = _batches(ids)

    import transformers

    # import the model's code before timing: transformers loads it lazily (seconds), which is not "build"
    transformers.AutoModelForCausalLM._model_mapping[getattr(transformers, g["config"])]
    lm = None
    with Stage(rows, "build", dev) as st:
        lm = build_model(geometry, dev, dt, layers, seed)
        a = lm.adapter
        L, N = a.num_layers(lm.model), a.width(lm.model, 0)
        n_params = sum(p.numel() for p in lm.model.parameters())
        st.check = f"{_count(n_params)} parameters, {L} layers × {N} neurons, on {dev}"
        result.update(layers=L, width=N, parameters=n_params)
    if lm is None:
        return _finish(result, out)
    _forward(lm.model, batches[:1], dev)                     # warm-up: kernels, cuBLAS handles
    with Stage(rows, "forward", dev) as st:
        logits = _forward(lm.model, batches, dev)
        assert torch.isfinite(logits.float()).all(), "non-finite logits"
        st.check = f"{len(batches)} batches of {batches[0].shape[0]}×{seqlen}; logits finite"
    del logits
    with Stage(rows, "trunk", dev) as st:
        hs = _forward(lm.model.base_model, batches, dev)
        st.check = f"decoder stack only (no LM head); hidden states {tuple(hs.shape)}"
        del hs

    stats = None
    with Stage(rows, "collect", dev) as st:
        stats = collect(lm, ids, sites="mlp.neurons", layers=None if collect_layers == "all" else collect_layers,
                        progress=False)
        assert stats.meta["tokens"] == samples * seqlen, stats.meta["tokens"]
        assert all(stats.width(i) == N for i in stats.layers)
        st.check = f"{len(stats.layers)} layers × {N}² float64 totals, {stats.meta['tokens']} tokens"
        st.note = "totals copied to host memory included"
    _ratios(rows, result)

    if stats is not None:
        fit = {}
        with Stage(rows, "project", dev) as st, timed(projection_mod, "fit_exact", fit, "fit", dev):
            proj = project(stats, mode="exact", dims=3, layers=[stats.layers[0]], device=str(dev), progress=False)
            P = proj.get(stats.layers[0])
            s = proj.stress(stats.layers[0])
            assert P.shape == (N, 3) and torch.isfinite(P).all() and 0 <= s <= 1, (P.shape, s)
            st.check = (f"layer {stats.layers[0]}: {N} points, normalised stress {s:.3f}, "
                        f"{proj.meta['iterations'][f'{stats.layers[0]}/mlp.neurons']} SMACOF iterations")
            st.note = "correlation on the host (float64) + classical MDS and SMACOF on the device"
        if "fit" in fit:
            rows.append({"stage": "project: fit_exact alone", "seconds": round(fit["fit"], 6), "peak_gb": None,
                         "ok": True, "check": "the device part of the row above", "note": "",
                         "goal": GOALS["project"]})
        stats = proj = None                                  # 53 GB of host memory for 8B: free before prune
    else:
        rows.append({"stage": "project", "seconds": None, "peak_gb": None, "ok": False, "goal": GOALS["project"],
                     "check": "not run: collect failed, and the projection needs its statistics", "note": ""})
    gc.collect()

    want = layer_width(N, SPARSITY, None, 64)
    parts: dict = {}
    with Stage(rows, "prune", dev) as st, _prune_parts(parts, dev):
        lm, plan, summary = prune_mod.prune(lm, ids, sparsity=SPARSITY, progress=False, offload="none")
        kept = summary["kept"]
        assert kept == [want] * L, kept
        with torch.inference_mode():
            x = lm.model(input_ids=batches[0][:1].to(dev), use_cache=False).logits
        assert torch.isfinite(x.float()).all(), "pruned model: non-finite logits"
        st.check = (f"{L} layers {N} → {want} (actual sparsity {summary['actual_sparsity']:.3f}); "
                    f"pruned forward finite")
        st.note = ", ".join(f"{k} {v:.3g} s" for k, v in parts.items())
    del lm
    gc.collect()
    if offload:
        temporary = work_dir is None
        work = Path(tempfile.mkdtemp(prefix="bench-gpu-") if temporary else work_dir)
        try:
            _offload_rows(rows, geometry, dev, dt, layers, seed, ids, batches[0][:1], want, L, N, offload, work)
        finally:
            if temporary:
                shutil.rmtree(work, ignore_errors=True)
    return _finish(result, out)


@contextlib.contextmanager
def _prune_parts(parts: dict, dev: torch.device):
    """Time the parts of one prune into `parts`: the sequential pass's steps, the streamed layers' trips between
    the device and where they live, and the checkpoint's write (of the streamed rows)."""
    import importlib

    calibrate_mod = importlib.import_module("neuroproj_prune.prune.calibrate")
    prune_mod = importlib.import_module("neuroproj_prune.prune.api")
    offload_mod = importlib.import_module("neuroproj_prune.prune.offload")
    with contextlib.ExitStack() as stack:
        for owner, attr, key in ((calibrate_mod, "layer_inputs", "layer inputs"),
                                 (calibrate_mod.Sequential, "_measure", "moments"),
                                 (prune_mod, "select_layer", "select + fold"),
                                 (prune_mod, "fold_layer", "select + fold"),
                                 (calibrate_mod.Sequential, "_carry", "carry"),
                                 (offload_mod.CpuStream, "fetch", "fetch layers"),
                                 (offload_mod.CpuStream, "release", "put layers away"),
                                 (offload_mod.DiskStream, "fetch", "fetch layers"),
                                 (offload_mod.DiskStream, "release", "put layers away"),
                                 (prune_mod, "save_pruned", "write checkpoint")):
            stack.enter_context(timed(owner, attr, parts, key, dev))
        yield


def _offload_rows(rows, geometry, dev, dt, layers, seed, ids, probe, want, L, N, offload, work: Path) -> None:
    """The `prune (offload=…)` rows: the model saved once in `work` (untimed), then each streamed prune from it
    to a checkpoint in `work`, checked by loading that checkpoint with plain transformers (untimed)."""
    import importlib

    from transformers import AutoModelForCausalLM

    prune_mod = importlib.import_module("neuroproj_prune.prune")
    model_dir = work / "model"
    lm = build_model(geometry, dev, dt, layers, seed)
    lm.model.save_pretrained(model_dir)
    _placeholder_tokenizer(lm.model.config.vocab_size).save_pretrained(model_dir)
    del lm
    gc.collect()
    for o in offload:
        name, out = f"prune (offload={o})", work / f"pruned-{o}"
        parts: dict = {}
        summary = None
        with Stage(rows, name, dev) as st, _prune_parts(parts, dev):
            lm, plan, summary = prune_mod.prune(str(model_dir), ids, sparsity=SPARSITY, progress=False, offload=o,
                                                out=out, overwrite=True, dtype=str(dt).replace("torch.", ""),
                                                device=str(dev))
            assert summary["kept"] == [want] * L, summary["kept"]
            place = summary["offload"]
            st.check = (f"{L} layers {N} → {want}; layers {o}, hidden states on {place['hidden_states']} "
                        f"(formula: {place['device_bytes'] / 1e9:.2f} GB device, {place['host_bytes'] / 1e9:.2f} GB "
                        f"host)")
            st.note = ", ".join(f"{k} {v:.3g} s" for k, v in parts.items())
            del lm
        row = rows[-1]
        if summary is not None:   # untimed: the checkpoint as any reader sees it
            try:
                gc.collect()
                m = AutoModelForCausalLM.from_pretrained(out, dtype=dt).to(dev).eval()
                assert m.config.intermediate_size == want, m.config.intermediate_size
                with torch.inference_mode():
                    x = m(input_ids=probe.to(dev), use_cache=False).logits
                assert torch.isfinite(x.float()).all(), "non-finite logits"
                row["check"] += "; the checkpoint loads with plain transformers, forward finite"
                del m
            except Exception as e:   # recorded like a failing stage; the benchmark goes on
                row["ok"] = False
                row["check"] += f"; checkpoint check FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        shutil.rmtree(out, ignore_errors=True)
        gc.collect()
    shutil.rmtree(model_dir, ignore_errors=True)


def _ratios(rows, result) -> None:
    t = {r["stage"]: r["seconds"] for r in rows if r["ok"]}
    if "collect" in t and t.get("forward"):
        result["collect_over_forward"] = round(t["collect"] / t["forward"], 3)
        rows.append({"stage": "collect / forward", "seconds": None, "peak_gb": None, "ok": True,
                     "goal": GOALS["collect / forward"], "note": "",
                     "check": f"ratio {t['collect'] / t['forward']:.2f} (collect / trunk "
                              f"{t['collect'] / t['trunk']:.2f})" if t.get("trunk") else ""})


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, no GPU"


def markdown(result: dict) -> str:
    """The table of one run."""
    lines = [f"**{result['geometry']}** ({_count(result.get('parameters', 0))} parameters, "
             f"{result.get('layers')} layers × {result.get('width')} neurons), {result['dtype']}, random weights, "
             f"{result['samples']} × {result['seqlen']} random calibration tokens, sparsity {result['sparsity']:.0%}  ",
             f"Device: {result['device']}; torch {result['torch']}; {result['date']}  ",
             f"Command: `{result['command']}`", "",
             "| stage | wall (s) | peak device memory (GB) | peak host memory (GB) | goal | check | parts / note |",
             "|---|---|---|---|---|---|---|"]
    for r in result["stages"]:
        sec = "–" if r["seconds"] is None else f"{r['seconds']:.3g}"
        peak = "–" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        host = "–" if r.get("host_peak_gb") is None else f"{r['host_peak_gb']:.2f}"
        lines.append(f"| {r['stage']} | {sec} | {peak} | {host} | {r['goal'] or ''} | {r['check']} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _finish(result: dict, out) -> dict:
    result["max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometry", default="llama3-8b", choices=sorted(GEOMETRIES))
    ap.add_argument("--samples", type=int, default=None, help="calibration windows (default 128; tiny 4)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048; tiny 64)")
    ap.add_argument("--layers", type=int, default=None, help="cap the layer count (a quicker run)")
    ap.add_argument("--collect-layers", default="all", help="layers collect gathers (default all, as `collect` does)")
    ap.add_argument("--device", default=None, help="default cuda (tiny: cpu)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default bfloat16 (cpu: float32)")
    ap.add_argument("--offload", default="cpu,disk", help="offload variants of prune to try ('' for none)")
    ap.add_argument("--work-dir", default=None, help="where the offload rows' model and checkpoints are written "
                                                     "(default: a temporary directory; 8B: ~45 GB at most)")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = ap.parse_args(argv)
    r = run_bench(a.geometry, samples=a.samples, seqlen=a.seqlen, layers=a.layers, collect_layers=a.collect_layers,
                  device=a.device, dtype=a.dtype, offload=tuple(x for x in a.offload.split(",") if x), out=a.out,
                  work_dir=a.work_dir)
    print(markdown(r))
    return 0 if all(x["ok"] is not False for x in r["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
