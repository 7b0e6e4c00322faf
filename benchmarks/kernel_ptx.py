#!/usr/bin/env python
"""Compile the fused dequantize-GEMM kernel for a GPU architecture on this machine (no GPU needed: Triton bundles
ptxas) and count its PTX instructions per weight: what bounds the kernel before any device time is spent.

    python benchmarks/kernel_ptx.py [--arch 90] [--bits 4] [--block-n 64] [--warps 4] [--stages 3] [--slabs]
    python benchmarks/kernel_ptx.py --gemv [--fp32] [--bits 4] [--block-n 32] [--warps 2]
    python benchmarks/kernel_ptx.py --mma [--bf16] [--block-m 8] [--warps 4] [--stages 2]   # the CUDA C++ kernel

The CUDA C++ kernel (--mma, compressor/kernels/qmm_mma.cu) is compiled by NVRTC instead, which needs the NVRTC
library (pip install nvidia-cuda-nvrtc). Disassembles the cubin with Triton's bundled cuobjdump and prints the machine
(SASS) instructions of the loop over tiles per weight of a thread, the most frequent ones and the registers; keeps
the PTX and SASS in benchmarks/out/ptx/.
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
    ap.add_argument("--gemv", action="store_true", help="the CUDA-core kernel for one activation row")
    ap.add_argument("--fp32", action="store_true", help="one code per instruction (the GEMV in float32)")
    ap.add_argument("--ahead", action="store_true", help="--gemv: scales, zeros and activations a tile ahead")
    ap.add_argument("--group", type=int, default=128, help="--gemv: rows per group (sets how often scales load)")
    ap.add_argument("--mma", action="store_true", help="the CUDA C++ tensor-core kernel (cuda_qmm.py)")
    ap.add_argument("--bf16", action="store_true", help="--mma: bfloat16 activations")
    ap.add_argument("--min-blocks", type=int, default=1, help="--mma: blocks per multiprocessor (register cap)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "ptx")
    args = ap.parse_args()
    if args.mma:
        return count_mma(args)

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    from compressor.kernels.layout import SUB
    from compressor.kernels.triton_qmm import _gemv_kernel, _qmm_kernel, slabs_per_group

    aligned_args = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "N", "K", "stride_xm", "stride_om")
    if args.gemv:
        kernel_fn = _gemv_kernel
        sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "perm_ptr": "*i32",
               "bias_ptr": "*fp16", "out_ptr": "*fp16", "ws_ptr": "*fp32", "count_ptr": "*i32", "M": "i32",
               "N": "i32", "K": "i32", "tiles_per_split": "i32", "stride_xm": "i32", "stride_om": "i32"}
        consts = {"group_size": args.group, "BITS": args.bits, "SUBR": SUB, "BLOCK_N": args.block_n,
                  "GROUP_SLABS": slabs_per_group(args.bits, args.group), "EVEN_K": True, "HAS_PERM": False,
                  "HAS_BIAS": False, "SPLIT": 1, "HALF2": args.bits == 4 and not args.fp32, "ASM": True, "PDL": False,
                  "AHEAD": args.ahead, "SWIGLU": False}
        options = {"num_warps": args.warps, "num_stages": 1}
        name = (f"gemv_sm{args.arch}_w{args.bits}_g{args.group}_n{args.block_n}w{args.warps}"
                + ("_fp32" if args.fp32 or args.bits != 4 else "_h2") + ("_ahead" if args.ahead else ""))
    else:
        kernel_fn = _qmm_kernel
        sig = {"x_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "perm_ptr": "*i32",
               "bias_ptr": "*fp16", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
               "tiles_per_split": "i32", "stride_xm": "i32", "stride_om": "i32"}
        consts = {"group_size": args.group, "BITS": args.bits, "SUBR": SUB, "BLOCK_M": args.block_m,
                  "BLOCK_N": args.block_n,
                  "MAGIC": 0x6400, "OFFSET": 1024.0, "ONE_DOT": not args.slabs, "HAS_PERM": False,
                  "HAS_BIAS": False, "ATOMIC": True, "HALF2": args.bits == 4 and not args.fp32,
                  "GROUP_SLABS": slabs_per_group(args.bits, args.group), "ASM": True}
        options = {"num_warps": args.warps, "num_stages": args.stages}
        name = f"qmm_sm{args.arch}_w{args.bits}_m{args.block_m}n{args.block_n}w{args.warps}s{args.stages}" + \
            ("_slabs" if args.slabs else "") + ("_fp16" if args.fp32 or args.bits != 4 else "")
    sig.update({k: "constexpr" for k in consts})
    # As a launch on real shapes specializes them: pointers, sizes and strides divisible by 16 (vector loads).
    aligned = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(kernel_fn.arg_names) if k in aligned_args}
    kernel = triton_compile(ASTSource(fn=kernel_fn, signature=sig, constexprs=consts, attrs=aligned),
                            target=GPUTarget("cuda", args.arch, 32), options=options)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.ptx").write_text(kernel.asm["ptx"])
    weights = SUB * (32 // args.bits) * args.block_n / (32 * args.warps)  # one tile's weights per thread
    return count_sass(kernel, name, weights, args.out)


def count_mma(args: argparse.Namespace) -> int:
    import torch

    from compressor.kernels import cuda_qmm, nvrtc

    rows = 8 if args.block_m <= 8 else 16
    d = cuda_qmm.defines(torch.bfloat16 if args.bf16 else torch.float16, rows, args.warps, args.group // 32, False,
                         args.stages > 1, args.min_blocks)
    cubin, log = nvrtc.compile_cubin(cuda_qmm.SOURCE.read_text(), "qmm_mma", args.arch, d, verbose=True)
    print(" ".join(re.sub(r"^ptxas\s+(info\s+:|\.)\s*", "", ln) for ln in log.splitlines()
                   if "Used" in ln or "spill" in ln))
    name = (f"mma_sm{args.arch}_{'bf16' if args.bf16 else 'fp16'}_m{rows}w{args.warps}s{args.stages}"
            f"b{args.min_blocks}_g{args.group}")
    args.out.mkdir(parents=True, exist_ok=True)
    # The loop body computes two tiles (ping-pong buffers): 2 x 8 steps x 1024 weights per warp (x2 at 16 rows).
    return count_sass(type("K", (), {"asm": {"cubin": cubin}})(), name, 2 * 8 * 1024 / 32, args.out)


def count_sass(kernel, name: str, weights: float, out: Path) -> int:
    """Disassemble the cubin with Triton's bundled cuobjdump; count the loop over tiles per weight of a thread."""
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    (out / f"{name}.sass").write_text(sass)
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    labels = {int(m.group(1), 16): i for i, ln in enumerate(lines)
              if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", ln))}
    loop = None
    for i, ln in enumerate(lines):  # the loop over tiles: the longest backward branch, from its target to itself
        m = re.search(r"BRA 0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) in labels and labels[int(m.group(1), 16)] < i:
            body = lines[labels[int(m.group(1), 16)]:i + 1]
            loop = body if loop is None or len(body) > len(loop) else loop
    if loop is None:
        print(f"{name}: no backward branch found; SASS kept in {out / (name + '.sass')}")
        return 1
    ops = Counter(re.sub(r"^\s+/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?", "", ln).split(" ")[0].split(".")[0]
                  for ln in loop)
    resources = " ".join(re.findall(r"(?:REG|STACK|LOCAL|SHARED):\d+", usage))
    print(f"{name}: loop over tiles {len(loop)} SASS instructions for {weights:.0f} weights per thread: "
          f"{len(loop) / weights:.2f} per weight; {resources}")
    for op, n in ops.most_common(16):
        print(f"  {n:6d}  {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
