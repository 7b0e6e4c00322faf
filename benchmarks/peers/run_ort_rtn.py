"""onnxruntime's own weight-only int4 quantizer (MatMulNBitsQuantizer, round to nearest) applied to an ONNX export.

Runs in the ortgenai peer venv (it needs onnx-ir, which the project does not depend on):
    benchmarks/.venvs/ortgenai/bin/python benchmarks/peers/run_ort_rtn.py SRC_DIR DST_DIR [--block 32] [--asym]
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

ap = argparse.ArgumentParser()
ap.add_argument("src", type=Path)
ap.add_argument("dst", type=Path)
ap.add_argument("--block", type=int, default=32)
ap.add_argument("--asym", action="store_true")
ap.add_argument("--accuracy-level", type=int, default=4)
args = ap.parse_args()
t = time.perf_counter()
config = DefaultWeightOnlyQuantConfig(block_size=args.block, is_symmetric=not args.asym,
                                      accuracy_level=args.accuracy_level)
quantizer = MatMulNBitsQuantizer(onnx.load(str(args.src / "model.onnx")), algo_config=config)
quantizer.process()
args.dst.mkdir(parents=True)
quantizer.model.save_model_to_file(str(args.dst / "model.onnx"), use_external_data_format=False)
shutil.copy(args.src / "config.json", args.dst / "config.json")
print(f"quantized in {time.perf_counter() - t:.1f}s -> {args.dst}")
