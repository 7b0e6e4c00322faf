#!/usr/bin/env python
"""Experiment for the next GPU session (issue 8): the dequantize-GEMM slab loop with the packed words stored N-major
([N, K/8], a weight column's codes contiguous), multiplied by the transposed slab. Compiled for sm_90 on the CPU,
it shows packed `sub.f16x2`, `cp.async` pipelined loads and 5x fewer scalar shared-memory stores than the product
kernel (`benchmarks/kernel_ptx.py`). Not used by the product, and not yet timed on a GPU.

    python benchmarks/kernel_layout_experiment.py [--block-n 64]
"""
from __future__ import annotations

import argparse
import re
from collections import Counter

import triton
import triton.language as tl


@triton.jit
def _slabs_n_major(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, KP, group_size, tiles_per_split, stride_xm,
                   BITS: tl.constexpr, SUBR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, SUBR)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        t = pid_k * tiles_per_split + i
        words = tl.load(w_ptr + offs_n[:, None] * KP + (t * SUBR + offs_r)[None, :])  # [BLOCK_N, SUB]
        for j in tl.static_range(PACK):
            row0 = t * SUBR * PACK + j * SUBR
            g = row0 // group_size
            s = tl.load(s_ptr + g * N + offs_n)
            z = tl.load(z_ptr + g * N + offs_n)
            xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + (row0 + offs_r)[None, :],
                         mask=offs_m[:, None] < M, other=0.0)
            q = (words >> (j * BITS)) & MASK
            h = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            d = h - (z + 1024.0).to(tl.float16)[:, None]
            acc += tl.dot(xv, tl.trans(d)) * s.to(tl.float32)[None, :]
    tl.atomic_add(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, mask=offs_m[:, None] < M)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "out_ptr": "*fp32", "M": "i32",
           "N": "i32", "KP": "i32", "group_size": "i32", "tiles_per_split": "i32", "stride_xm": "i32"}
    consts = {"BITS": 4, "SUBR": 32, "BLOCK_M": 16, "BLOCK_N": args.block_n}
    sig.update({k: "constexpr" for k in consts})
    k = triton_compile(ASTSource(fn=_slabs_n_major, signature=sig, constexprs=consts),
                       target=GPUTarget("cuda", args.arch, 32), options={"num_warps": 4, "num_stages": 3})
    ops = Counter(m.group(2) for m in re.finditer(r"^\s+(@!?%p\d+ )?([a-z][\w.:]*)", k.asm["ptx"], re.M))
    print(f"{sum(ops.values())} PTX instructions, {k.metadata.shared} bytes of shared memory")
    for op, n in ops.most_common(25):
        print(f"  {n:6d}  {op}")


if __name__ == "__main__":
    main()
