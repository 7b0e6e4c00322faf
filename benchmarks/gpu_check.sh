#!/usr/bin/env bash
# The whole GPU check in one device call: the kernel tests on the GPU, then benchmarks/bench_gpu.py.
#   OUT=<dir> bash benchmarks/gpu_check.sh [bench budget seconds] [more bench_gpu.py arguments]
# The device image has torch, triton and transformers but not pydantic: wheels carried in .whl/ are installed first.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee "$OUT/nvidia.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout ${PYTEST_S:-150} python3 -m pytest -q -n ${PYTEST_N:-16} -p no:cacheprovider tests/test_kernels.py tests/test_cuda_kernel.py tests/test_static_decode.py \
    tests/test_cuda_target.py 2>&1 | tee "$OUT/pytest.log" | tail -25
timeout $(( ${1:-270} + 60 )) python3 benchmarks/bench_gpu.py --out "$OUT" --budget-s "${1:-270}" "${@:2}" 2>&1 | tee "$OUT/bench.log"
