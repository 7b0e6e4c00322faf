#!/usr/bin/env python
"""One launch of the CUDA C++ 4-bit kernel (or a Triton configuration) on a Llama-like shape, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:"qmm_mma|_gemv_kernel|_qmm_kernel|_dequant_kernel" \\
        --launch-skip 3 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        python3 benchmarks/profile_qmm.py --k 14336 --n 14336 --m 1 --config mma-m8k1w4b4

`--config` is a configuration's name as the tuning log prints it (`mma-m8k4w4`, `mma-m8k2w4b4-pdl`, `gemv-n32k8w2`,
`m16n64k4w4s3`, ...); without it the tuner picks (its timing launches come first: raise --launch-skip past them, or
name a configuration). Four launches run: three warm-ups (compilation), then the one to profile. The result is
checked against the reference before the profiled launch.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.kernels import pack_for_kernel, reference, triton_qmm  # noqa: E402
from compressor.quant.tensor import quantize_rtn  # noqa: E402


def parse_config(name: str) -> triton_qmm.Config:
    """The inverse of Config.__str__ for the names the tuning log prints."""
    m = re.fullmatch(r"mma-m(\d+)k(\d+)w(\d+)(-s1)?(?:b(\d+))?(-pdl)?", name)
    if m:
        return triton_qmm.Config(int(m[1]), 32, int(m[2]), int(m[3]), 1 if m[4] else 2, mma=True,
                                 min_blocks=int(m[5] or 1), pdl=bool(m[6]))
    m = re.fullmatch(r"gemv-n(\d+)k(\d+)w(\d+)(-fp32)?(-ahead)?", name)
    if m:
        return triton_qmm.Config(1, int(m[1]), int(m[2]), int(m[3]), 1, gemv=True, half2=not m[4],
                                 ahead=bool(m[5]))
    m = re.fullmatch(r"dense-n(\d+)", name)
    if m:
        return triton_qmm.Config(0, int(m[1]), 1, 4, 1, dense=True)
    m = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(-slabs)?(-fp16)?", name)
    if m:
        return triton_qmm.Config(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), one_dot=not m[6],
                                 half2=not m[7])
    raise SystemExit(f"unknown configuration name {name!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=14336)
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--config", help="a configuration name (default: tune)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    dtype = torch.bfloat16 if args.bf16 else torch.float16
    qt = quantize_rtn(torch.randn(args.n, args.k) * 0.02, 4, args.group, symmetric=False)
    kw = pack_for_kernel(qt, dtype).to("cuda")
    x = torch.randn(args.m, args.k, device="cuda", dtype=dtype)
    cfg = parse_config(args.config) if args.config else triton_qmm.tuned_config(args.m, kw, dtype)
    for _ in range(3):
        y = triton_qmm.quant_matmul(x, kw, config=cfg)
    exact = x.double() @ reference.dequantize(kw).double()
    err = float((y.double() - exact).norm() / exact.norm())
    torch.cuda.synchronize()
    triton_qmm.quant_matmul(x, kw, config=cfg)  # the profiled launch
    torch.cuda.synchronize()
    print(f"{cfg} on m={args.m} k={args.k} n={args.n}: relative error {err:.1e}; weights {kw.nbytes() / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
