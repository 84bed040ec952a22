"""Refactors that promise "no result changes" keep their promise: every case of tests/golden.py (tiny models of
three families × default, global and search allocation, reconstruction, swaps, disk offload, one-shot FLAP + bias,
a written plan, a clustering; SmolLM2-135M at 30 % default and global) prunes to the checkpoint whose digest was
recorded before issue 24's restructuring — bit for bit, plan and every tensor. (First recorded on an AMD EPYC; when
the machine became an Intel Xeon, re-recorded there with the code of 73678bf, which had matched the EPYC record.)

The arithmetic is the same only on the platform that recorded the digests (torch version, CPU kernels, bfloat16
support decide the rounding): elsewhere the test says so and skips rather than compare different roundings."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

import golden

DOC = json.loads(golden.DIGESTS.read_text())
SAME_PLATFORM = DOC["platform"] == golden.platform()
WHY = f"digests recorded on {DOC['platform']}, this machine is {golden.platform()}: rounding differs"


def _check(cases, threads, expected):
    before = torch.get_num_threads()
    try:
        got = golden.compute(cases, threads)
    finally:
        torch.set_num_threads(before)
    wrong = {k: v[:16] for k, v in got.items() if v != expected.get(k)}
    assert set(got) == set(expected) and not wrong, f"changed: {sorted(wrong)}"


@pytest.mark.skipif(not SAME_PLATFORM, reason=WHY)
def test_tiny_prunes_are_bit_identical():
    _check(golden.tiny_cases(), 1, DOC["tiny"])


@pytest.mark.slow
@pytest.mark.skipif(not SAME_PLATFORM, reason=WHY)
def test_smollm2_prunes_are_bit_identical():
    _check(golden.smollm2_cases(), 2, DOC["smollm2"])


def test_digest_sees_a_changed_bit():
    """The digest is not blind: one flipped bit of one weight changes it."""
    from conftest import make_tokenizer, tiny_model

    import neuroproj_prune as npp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        model = tiny_model("llama")
        npp.prune(npp.model.LoadedModel(model, make_tokenizer(), "t", None), golden._ids(n=4), sparsity=0.25,
                  multiple=8, out=out, progress=False)
        first = golden.digest(out)
        from safetensors.torch import load_file, save_file

        f = out / "model.safetensors"
        state = load_file(str(f))
        w = state["model.layers.0.mlp.down_proj.weight"]
        w.view(torch.int32)[0, 0] ^= 1
        save_file(state, str(f), metadata={"format": "pt"})
        assert golden.digest(out) != first
