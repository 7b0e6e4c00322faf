#!/usr/bin/env python
"""Compile the fused dequantize-GEMM kernel for a GPU architecture on this machine (no GPU needed: Triton bundles
ptxas) and count its PTX instructions per weight: what bounds the kernel before any device time is spent.

    python benchmarks/kernel_ptx.py [--arch 90] [--bits 4] [--block-n 64] [--warps 4] [--stages 3] [--slabs]

Prints the most frequent instructions, instructions per weight of one tile, shared memory, and keeps the PTX in
benchmarks/out/ptx/.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--slabs", action="store_true", help="the per-slab variant instead of one product per tile")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ptx")
    args = ap.parse_args()

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from compressor.kernels.layout import SUB
    from compressor.kernels.triton_qmm import _qmm_kernel

    sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "perm_ptr": "*i32",
           "bias_ptr": "*fp16", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "group_size": "i32",
           "tiles_per_split": "i32", "stride_xm": "i32", "stride_om": "i32"}
    consts = {"BITS": args.bits, "SUBR": SUB, "BLOCK_M": args.block_m, "BLOCK_N": args.block_n, "MAGIC": 0x6400,
              "OFFSET": 1024.0, "ONE_DOT": not args.slabs, "HAS_PERM": False, "HAS_BIAS": False, "ATOMIC": True}
    sig.update({k: "constexpr" for k in consts})
    kernel = triton_compile(ASTSource(fn=_qmm_kernel, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", args.arch, 32),
                            options={"num_warps": args.warps, "num_stages": args.stages})
    ptx = kernel.asm["ptx"]
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"qmm_sm{args.arch}_w{args.bits}_m{args.block_m}n{args.block_n}w{args.warps}s{args.stages}" + \
        ("_slabs" if args.slabs else "")
    (args.out / f"{name}.ptx").write_text(ptx)
    ops = Counter(m.group(2) for m in re.finditer(r"^\s+(@!?%p\d+ )?([a-z][\w.:]*)", ptx, re.M))
    # The loop body is emitted once (not unrolled over tiles): its instructions serve one tile of weights.
    weights = SUB * (32 // args.bits) * args.block_n
    per_thread = weights / (32 * args.warps)
    total = sum(ops.values())
    print(f"{name}: {total} PTX instructions, {kernel.metadata.shared} bytes of shared memory")
    print(f"one tile = {weights} weights = {per_thread:.0f} per thread; "
          f"~{total / per_thread:.1f} instructions per weight per thread (all of the kernel's code over one tile)")
    for op, n in ops.most_common(25):
        print(f"  {n:6d}  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
