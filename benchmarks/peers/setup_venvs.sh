#!/usr/bin/env bash
# Create the isolated virtual environments for the peer GPTQ tools used by the
# benchmark. Idempotent: re-running only (re)installs what is missing.
#
#   benchmarks/.venvs/gptqmodel      -> GPTQModel 7.6.0
#   benchmarks/.venvs/llmcompressor  -> llm-compressor (latest release that accepts torch 2.13)
#   benchmarks/.venvs/ortgenai       -> onnxruntime-genai model builder (ONNX export, int4 MatMulNBits);
#                                       only built when named
#
# Usage (from anywhere):   bash benchmarks/peers/setup_venvs.sh [gptqmodel|llmcompressor|ortgenai ...]
#                          (no argument = gptqmodel llmcompressor)
# Env overrides:
#   PYTHON             interpreter for the venvs (default: python3; must be 3.11 for the on-disk torch wheel)
#   GPTQMODEL_SPEC     default "gptqmodel==7.6.0"
#   LLMCOMPRESSOR_SPEC default "llmcompressor==0.14.0.1"
#   ORTGENAI_SPEC      default "onnxruntime-genai==0.18.0"
#
# The peers are NEVER installed into the project's own environment: they pin
# numpy / transformers versions that conflict with ours.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENVS="$ROOT/benchmarks/.venvs"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
GPTQMODEL_SPEC="${GPTQMODEL_SPEC:-gptqmodel==7.6.0}"
# llmcompressor 0.14.0.1 requires torch>=2.10,<=2.14.0 and transformers>=5.15,<=5.17
# (so its venv gets transformers 5.17, older than the project's 5.x).
LLMCOMPRESSOR_SPEC="${LLMCOMPRESSOR_SPEC:-llmcompressor==0.14.0.1}"
# onnxruntime-genai itself only requires numpy + onnxruntime; its model builder
# (python -m onnxruntime_genai.models.builder) also imports torch, transformers,
# onnx_ir, onnx (via onnxruntime.quantization's MatMulNBits quantizer),
# safetensors and tqdm, which are not declared dependencies.
ORTGENAI_SPEC="${ORTGENAI_SPEC:-onnxruntime-genai==0.18.0}"

mkdir -p "$VENVS"
# Pin torch for every pip call after the first one, including the isolated build
# environments of sdists (PIP_BUILD_CONSTRAINT; pip >= 25.3 no longer applies
# PIP_CONSTRAINT there). Without this pip may resolve a different torch, which on
# PyPI is a multi-GB CUDA build.
CONSTRAINTS="$VENVS/constraints.txt"
echo "$TORCH_SPEC" > "$CONSTRAINTS"
export PIP_CONSTRAINT="$CONSTRAINTS"
export PIP_BUILD_CONSTRAINT="$CONSTRAINTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

make_venv() {  # $1 = name
  local dir="$VENVS/$1"
  if [ ! -x "$dir/bin/python" ]; then
    echo ">>> creating venv $dir with $($PYTHON -V 2>&1)"
    "$PYTHON" -m venv "$dir"
  fi
  # A recent pip is needed for PIP_BUILD_CONSTRAINT.
  "$dir/bin/python" -m pip install -q --upgrade "pip>=25.3"
  # torch FIRST, before anything that depends on it: torch==2.13.0 resolves to the
  # CPU wheel available locally; any later requirement 'torch>=x' is then satisfied.
  "$dir/bin/python" -m pip install -q "$TORCH_SPEC"
}

report() {  # $1 = name, rest = packages to show
  local dir="$VENVS/$1"; shift
  echo "=== $dir"
  "$dir/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
for name in sys.argv[1:]:
    try:
        print(f"  {name}=={version(name)}")
    except PackageNotFoundError:
        print(f"  {name}: NOT INSTALLED")
PY
}

setup_gptqmodel() {
  make_venv gptqmodel
  local py="$VENVS/gptqmodel/bin/python"
  # GPTQModel 7.x ships as a pure-python sdist (setup.py builds no extension;
  # kernels are JIT-compiled at run time only on first use of a GPU backend), so
  # no CUDA toolkit is needed. We still set the switches older releases read to
  # skip CUDA extension builds, in case a different GPTQMODEL_SPEC is used:
  #   BUILD_CUDA_EXT=0       (auto-gptq / GPTQModel <= 4.x)
  #   GPTQMODEL_FORCE_BUILD=0, CUDA_VISIBLE_DEVICES="" (no GPU probing)
  # --no-build-isolation is NOT needed: the build backend only requires setuptools.
  BUILD_CUDA_EXT=0 GPTQMODEL_FORCE_BUILD=0 CUDA_VISIBLE_DEVICES="" \
    "$py" -m pip install -q "$GPTQMODEL_SPEC"
  report gptqmodel torch gptqmodel transformers accelerate numpy safetensors datasets threadpoolctl
}

setup_llmcompressor() {
  make_venv llmcompressor
  local py="$VENVS/llmcompressor/bin/python"
  "$py" -m pip install -q "$LLMCOMPRESSOR_SPEC"
  report llmcompressor torch llmcompressor compressed-tensors transformers accelerate numpy safetensors datasets auto-round
}

setup_ortgenai() {
  make_venv ortgenai
  local py="$VENVS/ortgenai/bin/python"
  "$py" -m pip install -q "$ORTGENAI_SPEC" transformers onnx onnx-ir safetensors tqdm
  report ortgenai torch onnxruntime-genai onnxruntime onnx onnx-ir transformers tokenizers numpy safetensors
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(gptqmodel llmcompressor)
for t in "${targets[@]}"; do
  case "$t" in
    gptqmodel) setup_gptqmodel ;;
    llmcompressor) setup_llmcompressor ;;
    ortgenai) setup_ortgenai ;;
    *) echo "unknown peer: $t" >&2; exit 2 ;;
  esac
done
