"""The `neuroproj-prune` command: a thin layer over the Python API, one function per subcommand.

Every user-facing failure is a NeuroprojError: printed as one line `neuroproj-prune: error: ...`, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import NeuroprojError

MODEL_HELP = "hub id, local directory, .gguf file, pruned directory, or 'smollm2-135m' (offline default)"


def _model_args(p, required=True):
    p.add_argument("--model", required=required, help=MODEL_HELP)
    p.add_argument("--dtype", default="auto", help="float32|bfloat16|float16|float64|auto (float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default="auto", help="cpu|cuda|cuda:N|auto (cuda when present)")


def _device_for_process(device: str) -> str:
    """Under `accelerate launch` each process takes the device Accelerate assigns it."""
    if device == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return str(PartialState().device)
    return device


# ------------------------------------------------------------------------------------------- collect
def _add_collect(sub):
    p = sub.add_parser(
        "collect", help="stream calibration text through the model and save exact activation statistics",
        description="One pass over calibration text: per layer and site the token count, sum and Gram matrix "
                    "(float64 totals), optionally cross-layer blocks. Runs under `accelerate launch` too: "
                    "each process takes its share of batches and the totals are all-reduced.")
    _model_args(p)
    p.add_argument("--data", required=True, help=".txt/.jsonl file (field 'text') or a datasets name NAME[:CONFIG][@SPLIT]")
    p.add_argument("--samples", type=int, default=128, help="number of calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn (default 0)")
    p.add_argument("--sites", default="mlp.neurons", help="comma list of mlp.neurons,mlp.out,attn.out (default mlp.neurons)")
    p.add_argument("--layers", default=None, help="layer SPEC such as 0-3,7 (default all)")
    p.add_argument("--cross-layer-window", type=int, default=0,
                   help="also collect Σ h_l h_mᵀ for mlp.neurons of layer pairs l < m <= l+K (skip analysis)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: ~4096 tokens)")
    p.add_argument("--max-memory-gb", type=float, default=None, help="memory the totals may use (default: what is free)")
    p.add_argument("--out", required=True, help="output STATS.safetensors")
    p.set_defaults(func=_run_collect)


def _run_collect(a):
    from .stats import collect

    stats = collect(
        a.model, a.data, samples=a.samples, seqlen=a.seqlen, seed=a.seed, sites=a.sites, layers=a.layers,
        cross_layer_window=a.cross_layer_window, batch_size=a.batch_size, out=a.out, dtype=a.dtype,
        device=_device_for_process(a.device),
        max_memory=None if a.max_memory_gb is None else int(a.max_memory_gb * 2**30))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {a.out}: {len(stats.layers)} layers x {stats.sites}, {stats.meta['tokens']} tokens, "
              f"{len(stats.cross_pairs)} cross-layer blocks")


# ---------------------------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="describe a statistics file (and check it against a model)")
    p.add_argument("stats", help="STATS.safetensors")
    p.add_argument("--model", default=None, help="also check that the statistics were collected on this model")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=_run_info)


def _run_info(a):
    from .stats import load_stats

    st = load_stats(a.stats)
    if a.model:
        from .models import load_model

        st.check_model(load_model(a.model, dtype=a.dtype, device=a.device))
    if a.json:
        print(json.dumps(st.meta, indent=2))
        return
    m = st.meta
    print(f"{a.stats}: model {m['model']} ({m['model_type']}, fingerprint {m['fingerprint']})")
    print(f"  data: {m['data']}; {m['tokens']} tokens; {m['processes']} process(es); dtype {m['dtype']}")
    print(f"  layers {m['layers'][0]}-{m['layers'][-1]} ({len(m['layers'])}), sites {', '.join(m['sites'])}, "
          f"cross-layer blocks {len(st.cross_pairs)}")
    for site in st.sites:
        dead = sum(int(st.dead(i, site).sum()) for i in st.layers)
        print(f"  {site}: width {st.width(st.layers[0], site)}, dead neurons {dead}")
    if a.model:
        print("  matches the model: yes")


# ---------------------------------------------------------------------------------------------- main
COMMANDS = [_add_collect, _add_info]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuroproj-prune",
        description="Prune MLP neurons of Hugging Face causal LMs by their activation correlations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NeuroprojError as e:
        print(f"neuroproj-prune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuroproj-prune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
