"""Golden digests of pruned checkpoints: a refactor that promises "no result changes" is checked against them.

Each case prunes a model through the public API (`npp.prune`, `npp.collect`, `npp.project`, `npp.cluster`) and
digests what a user keeps: the plan's layers (kept indices, representatives, widths), every tensor of the written
checkpoint (bytes, in name order) and the config keys that describe its shape. `tests/golden/digests.json` holds
the digests recorded with the code before the refactor (issue 24) and the platform they were recorded on; the
arithmetic is only bit-for-bit the same on the same platform (torch version, CPU kernels, bfloat16 support),
so `test_golden.py` compares there and says so elsewhere.

    python tests/golden.py --record            # tiny models (seconds)
    python tests/golden.py --record --smollm2  # also SmolLM2-135M at 30 % (minutes)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DIGESTS = HERE / "golden" / "digests.json"
FAMILIES = ("llama", "gpt2", "opt")
SHAPE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "num_hidden_layers", "n_layer", "mlp_bias", "neuroproj_prune")


def platform() -> dict:
    """What decides whether the arithmetic is bit-for-bit the same. The CPU's model too: an AMD EPYC and an Intel
    Xeon, both AVX512 with bfloat16, rounded the tiny cases differently."""
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "cpu_model": _cpu_model()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform as _platform
    return _platform.processor() or _platform.machine()


def digest(out: Path) -> str:
    """sha256 of the plan's layers, every checkpoint tensor (name, dtype, shape, bytes) and the shape keys."""
    from safetensors.torch import load_file

    h = hashlib.sha256()
    plan = json.loads((out / "plan.json").read_text())
    h.update(json.dumps(plan["layers"], sort_keys=True).encode())
    state = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for k in sorted(state):
        t = state[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = json.loads((out / "config.json").read_text())
    h.update(json.dumps({k: config.get(k) for k in SHAPE_KEYS}, sort_keys=True).encode())
    return h.hexdigest()


def _ids(n=12, T=40, seed=0):
    return torch.randint(0, 384, (n, T), generator=torch.Generator().manual_seed(seed))


def tiny_cases():
    """(name, function(work_dir) -> output dir) for the tiny models of three families."""
    import neuroproj_prune as npp
    from conftest import make_tokenizer, tiny_model

    tok = make_tokenizer()
    ids = _ids()
    base = dict(sparsity=0.25, multiple=8, device="cpu", progress=False)

    def dense_dir(family, work):
        d = work / f"dense-{family}"
        if not d.exists():
            tiny_model(family).save_pretrained(d)
            tok.save_pretrained(d)
        return d

    def prune(family, **kw):
        def run(work):
            out = work / "out"
            npp.prune(str(dense_dir(family, work)), ids, out=out, **{**base, **kw})
            return out
        return run

    def with_plan(family):
        def run(work):
            first = work / "first"
            npp.prune(str(dense_dir(family, work)), ids, out=first, **base)
            out = work / "out"
            npp.prune(str(dense_dir(family, work)), ids, plan_file=first / "plan.json", out=out, device="cpu",
                      progress=False)
            return out
        return run

    def with_clusters(family):
        def run(work):
            lm = npp.load_model(str(dense_dir(family, work)), device="cpu")
            stats = npp.collect(lm, ids, progress=False)
            proj = npp.project(stats, mode="exact", dims=3, progress=False)
            npp.cluster(proj, algo="kmeans", keep_fraction=0.75, out=work / "clusters.json")
            out = work / "out"
            npp.prune(str(dense_dir(family, work)), ids, clusters=work / "clusters.json", out=out, device="cpu",
                      progress=False)
            return out
        return run

    for family in FAMILIES:
        yield f"{family}/default", prune(family)
        yield f"{family}/global", prune(family, allocation="global", alloc_samples=8)
        yield f"{family}/search", prune(family, allocation="search", alloc_samples=8, search_samples=4,
                                        search_rounds=3, search_step=8)
        if family != "opt":   # OPT has no MLP module to reconstruct (refused since issue 24)
            yield f"{family}/reconstruct", prune(family, reconstruct=12)
        yield f"{family}/swaps", prune(family, swaps=6, batch_size=2)
        yield f"{family}/offload-disk", prune(family, offload="disk")
        yield f"{family}/oneshot-flap-bias", prune(family, calibration="oneshot", select="flap", fold="bias")
        yield f"{family}/plan", with_plan(family)
        yield f"{family}/clusters", with_clusters(family)


def smollm2_cases():
    import neuroproj_prune as npp
    from conftest import C4

    def prune(**kw):
        def run(work):
            out = work / "out"
            npp.prune("smollm2-135m", str(C4), sparsity=0.3, out=out, device="cpu", progress=False, **kw)
            return out
        return run

    yield "smollm2/default-0.3", prune()
    yield "smollm2/global-0.3", prune(allocation="global")


def compute(cases, threads: int) -> dict[str, str]:
    torch.set_num_threads(threads)
    out = {}
    for name, run in cases:
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = digest(run(Path(tmp)))
        print(f"{name}: {out[name][:16]}", flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", action="store_true", help="write tests/golden/digests.json")
    p.add_argument("--smollm2", action="store_true", help="also the SmolLM2-135M cases (minutes)")
    a = p.parse_args(argv)
    doc = json.loads(DIGESTS.read_text()) if DIGESTS.exists() else {}
    tiny = compute(tiny_cases(), threads=1)
    doc.update({"platform": platform(), "tiny": tiny})
    if a.smollm2:
        doc["smollm2"] = compute(smollm2_cases(), threads=2)
    if a.record:
        DIGESTS.parent.mkdir(exist_ok=True)
        DIGESTS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"wrote {DIGESTS}")


if __name__ == "__main__":
    main()
