"""The CUDA C++ tensor-core kernel (compressor/kernels/qmm_mma.cu).

Without a GPU the kernel cannot run here, so two things are checked on the CPU:
- NVRTC compiles every variant for sm_80 and sm_90 without spilling registers (when the NVRTC library is installed);
- an emulation that follows the kernel step by step (its staging of the activations, its bit tricks with the
  constants read from the source, the mma.m16n8k16 operand and accumulator layouts as the PTX ISA defines them, its
  output mapping) computes what the reference computes. That checks the index algebra the kernel rests on.
On a GPU the kernel itself is compared with the reference (tests/test_kernels.py runs every tuning candidate, and
this file's last test runs it directly).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from compressor.kernels import pack_for_kernel, reference
from compressor.kernels.layout import KernelWeight
from test_kernels import TOLERANCE, random_quantized

SOURCE = Path(__file__).resolve().parent.parent / "compressor" / "kernels" / "qmm_mma.cu"
CUDA = torch.cuda.is_available()


def nvrtc_available() -> bool:
    from compressor.kernels import nvrtc

    return nvrtc.available()


VARIANTS = [dict(BF16=bf16, MT=mt, WARPS=warps, GSLABS=gs, HAS_PERM=perm, PREFETCH=pf, MINB=1, PDL=0, SWIGLU=0)
            for bf16, mt, warps, gs, perm, pf in [(0, 1, 4, 4, 0, 1), (1, 1, 8, 4, 0, 1), (0, 2, 4, 0, 1, 1),
                                                  (1, 2, 8, 2, 1, 0), (0, 1, 4, 1, 0, 0), (0, 1, 4, 3, 0, 1),
                                                  (1, 1, 4, 12, 0, 1), (0, 2, 8, 16, 0, 1)]]
# 128 registers (16 warps resident) fit the decode case, groups of 128 rows: it must not spill there.
VARIANTS += [dict(BF16=bf16, MT=1, WARPS=warps, GSLABS=4, HAS_PERM=0, PREFETCH=1, MINB=minb, PDL=0, SWIGLU=0)
             for bf16 in (0, 1) for warps, minb in ((2, 8), (4, 4))]
VARIANTS += [dict(BF16=bf16, MT=mt, WARPS=4, GSLABS=4, HAS_PERM=perm, PREFETCH=1, MINB=1, PDL=0, SWIGLU=1)
             for bf16, mt, perm in ((0, 1, 0), (1, 2, 1))]
PDL_VARIANTS = [dict(BF16=bf16, MT=1, WARPS=4, GSLABS=4, HAS_PERM=0, PREFETCH=1, MINB=4, PDL=1, SWIGLU=0)
                for bf16 in (0, 1)]


@pytest.mark.skipif(not nvrtc_available(), reason="no NVRTC library (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_every_variant_compiles_without_spilling(arch, variant):
    from compressor.kernels import nvrtc

    cubin, log = nvrtc.compile_cubin(SOURCE.read_text(), "qmm_mma", arch, variant, verbose=True)
    assert cubin[:4] == b"\x7fELF"
    assert "0 bytes spill stores" in log and "0 bytes stack frame" in log, log


@pytest.mark.skipif(not nvrtc_available(), reason="no NVRTC library (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("variant", PDL_VARIANTS, ids=lambda d: f"BF16{d['BF16']}")
def test_programmatic_dependent_launch_compiles_for_hopper_and_its_launch_config_is_laid_out_as_cuda_h(variant):
    import ctypes

    from compressor.kernels import nvrtc

    cubin, log = nvrtc.compile_cubin(SOURCE.read_text(), "qmm_mma", 90, variant, verbose=True)
    assert "0 bytes spill stores" in log, log
    # cuda.h: CUlaunchAttribute is the id padded to 8 bytes and a 64-byte union; CUlaunchConfig has 7 unsigned
    # ints, the stream at offset 32, the attributes at 40 and their count at 48.
    assert ctypes.sizeof(nvrtc.LaunchAttribute) == 72 and nvrtc.LaunchAttribute.value.offset == 8
    assert (nvrtc.LaunchConfig.hStream.offset, nvrtc.LaunchConfig.attrs.offset,
            nvrtc.LaunchConfig.numAttrs.offset) == (32, 40, 48)


# ---- the emulation ----------------------------------------------------------------------------------------------


def constants(dtype: torch.dtype) -> dict[str, int]:
    """The #defines of the source's float16 or bfloat16 branch."""
    text = SOURCE.read_text()
    bf16, f16 = text.split("#if BF16", 1)[1].split("#else", 1)
    f16, common = f16.split("#endif", 1)
    branch = (bf16 if dtype == torch.bfloat16 else f16) + common
    return {k: int(v, 16) for k, v in re.findall(r"#define (H2_\w+) (0x[0-9A-Fa-f]+)u", branch)}


def halves(bits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 16-bit floats of 32-bit pairs (int64 holding uint32): low half first."""
    def one(h):
        return torch.where(h >= 1 << 15, h - (1 << 16), h).to(torch.int16).view(dtype)
    return one(bits & 0xFFFF), one((bits >> 16) & 0xFFFF)


def pair(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    as_int = (lambda h: h.view(torch.int16).to(torch.int64) & 0xFFFF)  # noqa: E731
    return as_int(lo) | (as_int(hi) << 16)


def pair_fma(a: torch.Tensor, b, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fma.rn on pairs: one rounding of the exact a * b + c (exact in float64 for 16-bit operands)."""
    (a0, a1), (c0, c1) = halves(a, dtype), halves(c, dtype)
    b0, b1 = halves(b, dtype) if isinstance(b, torch.Tensor) else halves(torch.tensor(b), dtype)
    f = (lambda p, q, r: (p.double() * q.double() + r.double()).to(dtype))  # noqa: E731
    return pair(f(a0, b0, c0), f(a1, b1, c1))


def warp_tiles(t0: int, t1: int, warp: int, warps: int) -> list[int]:
    """The tiles one warp computes, in the kernel's order: its ping-pong loop, two tiles per iteration."""
    done = []
    tile = t0 + warp
    while tile < t1:
        done.append(tile)
        nxt = tile + warps
        if nxt >= t1:
            break
        done.append(nxt)
        tile += 2 * warps
    return done


def emulate(x: torch.Tensor, kw: KernelWeight, rows_per_block: int, split: int, warps: int = 4,
            swiglu: bool = False) -> torch.Tensor:
    """What qmm_mma computes, block by block and step by step, for 32 lanes at once (`swiglu`: x is [gate | up])."""
    dtype, k_ = x.dtype, constants(x.dtype)
    m_all, n_all, k_all = x.shape[0], kw.out_features, kw.in_features
    tiles = -(-k_all // 256)
    per_split = -(-tiles // split)
    gslabs = 0 if kw.group_size >= k_all else kw.group_size // 32
    groups = kw.scales.shape[0]
    w = kw.qweight.to(torch.int64) & 0xFFFFFFFF
    s_bits, z_bits = (kw.scales.view(torch.int16).to(torch.int64) & 0xFFFF,
                      kw.zeros.view(torch.int16).to(torch.int64) & 0xFFFF)
    out = torch.zeros(m_all, n_all, dtype=torch.float64)
    lane = torch.arange(32)
    g, t = lane >> 2, lane & 3
    for m0 in range(0, m_all, rows_per_block):
        mr = min(m_all - m0, rows_per_block)
        for n0 in range(0, n_all, 32):
            col = n0 + 4 * g
            col_ok = col < n_all
            for t0 in range(0, tiles, per_split):
                t1 = min(t0 + per_split, tiles)
                # staging, unit by unit as the kernel's loop
                xs = torch.zeros((t1 - t0) * 32 * mr, 8, dtype=dtype)
                for u in range(mr * (t1 - t0) * 32):
                    chunk, j, rest = u & 3, (u >> 2) & 7, u >> 5
                    tl, m = rest % (t1 - t0), rest // (t1 - t0)
                    k = (t0 + tl) * 256 + j * 32 + chunk * 8
                    pos = (j & 3) * 2 + (j >> 2)
                    for e in range(8):
                        kk = k + e
                        src = (int(kw.perm[kk]) if kw.perm is not None else kk) if kk < k_all else None
                        v = x[m0 + m, src] if src is not None else torch.zeros((), dtype=dtype)
                        if swiglu and src is not None:  # silu in float32, rounded; times up, rounded
                            gf = v.float()
                            v = ((gf / (1 + torch.exp(-gf))).to(dtype).float() * x[m0 + m, k_all + src].float())
                            v = v.to(dtype)
                        xs[(tl * 32 + chunk * 8 + e) * mr + m, pos] = v
                d = torch.zeros(2, rows_per_block // 8, 16, 8, dtype=torch.float64)  # D of each (h, bt)
                order = [tile for wi in range(warps) for tile in warp_tiles(t0, t1, wi, warps)]
                assert sorted(order) == list(range(t0, t1))  # every tile once, by one warp
                for tile in order:
                    # per lane, column i, slab j: scale and zero bits (zero where the column is past N)
                    sc, zc = torch.zeros(32, 4, 4, dtype=torch.int64), torch.zeros(32, 4, 4, dtype=torch.int64)
                    for p in range(4):
                        grp = [min((tile * 8 + j) // gslabs, groups - 1) if gslabs else 0 for j in (p, p + 4)]
                        for i in range(4):
                            c = (col + i).clamp(max=n_all - 1)
                            lo_s = torch.where(col_ok, s_bits[grp[0], c], 0)
                            hi_s = torch.where(col_ok, s_bits[grp[1], c], 0)
                            lo_z = torch.where(col_ok, z_bits[grp[0], c], 0)
                            hi_z = torch.where(col_ok, z_bits[grp[1], c], 0)
                            sc[:, i, p] = lo_s | (hi_s << 16)
                            neg = k_["H2_NEG_MAGIC16"] if p & 1 and dtype == torch.float16 else k_["H2_NEG_MAGIC"]
                            zc[:, i, p] = pair_fma(lo_z | (hi_z << 16), k_["H2_NEG_ONE"], torch.full((32,), neg),
                                                   dtype)
                    for st in range(8):
                        prow = tile * 32 + 4 * st + t
                        words = torch.stack([torch.where(col_ok, w[prow, (col + i).clamp(max=n_all - 1)], 0)
                                             for i in range(4)], 1)  # [lane, i]
                        a = torch.zeros(32, 4, 4, dtype=torch.int64)  # [lane, word, pair]
                        for i in range(4):
                            wd = words[:, i]
                            steps = ([(wd, 0x000F000F, "H2_ONE"), (wd >> 4, 0x000F000F, "H2_ONE"),
                                      (wd >> 8, 0x000F000F, "H2_ONE"), (wd >> 12, 0x000F000F, "H2_ONE")]
                                     if dtype == torch.bfloat16 else  # high nibbles shifted down first
                                     [(wd, 0x000F000F, "H2_ONE"), (wd, 0x00F000F0, "H2_SIXTEENTH"),
                                      (wd >> 8, 0x000F000F, "H2_ONE"), (wd >> 8, 0x00F000F0, "H2_SIXTEENTH")])
                            for p, (src, mask, mul) in enumerate(steps):
                                magic = (src & mask) | k_["H2_MAGIC"]
                                qz = pair_fma(magic, k_[mul], zc[:, i, p], dtype)
                                a[:, i, p] = pair_fma(qz, sc[:, i, p], torch.full((32,), k_["H2_NEG_ZERO"]), dtype)
                        for bt in range(rows_per_block // 8):
                            row = (tile - t0) * 32 + 4 * st + t
                            b = xs[row * mr + (g + 8 * bt).clamp(max=mr - 1)]  # [lane, 8 halves]
                            for h in range(2):
                                for kk in range(2):  # the two products: pairs (0, 1), then (2, 3)
                                    am = torch.zeros(16, 16, dtype=torch.float64)
                                    bm = torch.zeros(16, 8, dtype=torch.float64)
                                    regs_a = [a[:, 2 * h, 2 * kk], a[:, 2 * h + 1, 2 * kk], a[:, 2 * h, 2 * kk + 1],
                                              a[:, 2 * h + 1, 2 * kk + 1]]
                                    for r, reg in enumerate(regs_a):  # PTX: a_r rows g (+8 for r odd), k 2t (+8)
                                        lo, hi = halves(reg, dtype)
                                        rows = g + 8 * (r & 1)
                                        ks = 2 * t + 8 * (r >> 1)
                                        am[rows, ks], am[rows, ks + 1] = lo.double(), hi.double()
                                    for r in range(2):  # PTX: b_r k 2t (+8 for r = 1), column g
                                        ks = 2 * t + 8 * r
                                        bm[ks, g] = b[:, 4 * kk + 2 * r].double()
                                        bm[ks + 1, g] = b[:, 4 * kk + 2 * r + 1].double()
                                    d[h, bt] += am @ bm
                # the kernel's output mapping of the accumulator fragments (c0..c3: D[g (+8), 2t (+1)])
                for h in range(2):
                    for bt in range(rows_per_block // 8):
                        for c in range(4):
                            dr, dc = g + 8 * (c >> 1), 2 * t + (c & 1)
                            m = 8 * bt + 2 * t + (c & 1)
                            n = n0 + 4 * g + 2 * h + (c >> 1)
                            ok = (m < mr) & (n < n_all)
                            out.index_put_((m0 + m[ok], n[ok]), d[h, bt][dr[ok], dc[ok]], accumulate=True)
    return out.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,group_size,act_order,rows,split,warps", [
    (1, 512, 64, 128, False, 8, 1, 4),    # decode: one row, groups of 128 (pairs span two groups)
    (5, 640, 72, 32, False, 8, 2, 2),     # a partial last tile, a partial column block, split over the input
    (12, 512, 40, 64, True, 16, 1, 8),    # 9-16 rows: two products per operand; activation order
    (3, 256, 32, -1, False, 8, 1, 4),     # one group over the whole input
    (2, 1792, 32, 96, False, 8, 1, 2),    # groups of 3 slabs: tiles straddle groups unevenly; 7 tiles, 2 warps
])
def test_emulated_kernel_computes_what_the_reference_computes(dtype, m, k, n, group_size, act_order, rows, split,
                                                              warps):
    # (the SwiGLU prologue: the next test)
    kw = pack_for_kernel(random_quantized(n, k, 4, group_size, act_order, seed=m + k), dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    got = emulate(x, kw, rows, split, warps).double()
    exact = x.double() @ reference.dequantize(kw).double()
    err = float((got - exact).norm() / exact.norm())
    assert err < TOLERANCE[dtype], err


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 8, 13, 40])
def test_kernel_on_the_gpu_matches_the_reference(dtype, m):
    from compressor.kernels import triton_qmm

    hopper = torch.cuda.get_device_capability() >= (9, 0)
    for group_size, act_order, split, warps, stages, pdl in [(128, False, 1, 4, 2, False), (32, True, 4, 8, 2, False),
                                                             (-1, False, 2, 4, 1, False), (96, False, 3, 8, 2, hopper),
                                                             (128, False, 4, 4, 2, hopper),
                                                             (64, False, 2, 2, 2, False)]:
        kw = pack_for_kernel(random_quantized(264, 1536, 4, group_size, act_order, seed=m), dtype).to("cuda")
        cfg = triton_qmm.Config(8 if m <= 8 else 16, 32, split, warps, stages, mma=True, pdl=pdl)
        for seed in (0, 1):  # twice: the split-K workspace must be left zeroed
            x = torch.randn(m, 1536, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
            bias = torch.randn(264, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)
            y = triton_qmm.quant_matmul(x, kw, bias, config=cfg)
            exact = x.double() @ reference.dequantize(kw).double() + bias.double()
            err = float((y.double() - exact).norm() / exact.norm())
            assert err < TOLERANCE[dtype], (cfg, group_size, act_order, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_emulated_swiglu_prologue_computes_the_swiglu_then_the_product(dtype, act_order):
    from compressor.kernels import fused_ops

    m, k, n = 3, 640, 40
    kw = pack_for_kernel(random_quantized(n, k, 4, 64, act_order, seed=5), dtype)
    gate_up = (torch.randn(m, 2 * k, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    got = emulate(gate_up, kw, 8, 2, 2, swiglu=True).double()
    exact = fused_ops.silu_mul(gate_up, False).double() @ reference.dequantize(kw).double()
    err = float((got - exact).norm() / exact.norm())
    assert err < TOLERANCE[dtype], err


def test_swiglu_matmul_without_the_cuda_kernel_is_the_swiglu_then_the_product():
    from compressor.kernels import fused_ops, quant_matmul, swiglu_matmul

    kw = pack_for_kernel(random_quantized(48, 256, 4, 32, False, seed=2), torch.float32)
    gate_up = torch.randn(2, 3, 512)
    bias = torch.randn(48)
    want = quant_matmul(fused_ops.silu_mul(gate_up.view(6, 512), False).view(2, 3, 256), kw, bias)
    assert torch.equal(swiglu_matmul(gate_up, kw, bias, use_triton=False), want)


def test_only_the_gemv_and_the_cuda_kernel_take_the_swiglu():
    from compressor.kernels import UnsupportedLayout, triton_qmm

    kw = pack_for_kernel(random_quantized(64, 256, 4, 32, False, 0))
    for cfg in (triton_qmm.Config(16, 64, 1, 4, 3), triton_qmm.Config(0, 64, 1, 4, 1, dense=True)):
        with pytest.raises(UnsupportedLayout, match="SwiGLU"):
            triton_qmm.quant_matmul(torch.randn(1, 512).half(), kw, config=cfg, swiglu=True)


def test_without_a_gpu_the_kernel_is_refused_clearly_and_tuning_passes_over_it():
    from compressor.kernels import UnsupportedLayout, triton_qmm

    kw = pack_for_kernel(random_quantized(64, 256, 4, 32, False, 0))
    cfg = triton_qmm.Config(8, 32, 1, 4, 2, mma=True)
    with pytest.raises(UnsupportedLayout, match="compute capability 8.0"):
        triton_qmm.quant_matmul(torch.randn(1, 256).half(), kw, config=cfg)
    assert str(cfg) == "mma-m8k1w4"


def test_each_warp_takes_every_warps_th_tile_once():
    for t0, t1, warps in [(0, 7, 2), (3, 4, 4), (0, 16, 4), (5, 37, 8), (0, 1, 2)]:
        order = [t for w in range(warps) for t in warp_tiles(t0, t1, w, warps)]
        assert sorted(order) == list(range(t0, t1))
        assert all(t % warps == (t0 + w) % warps for w in range(warps) for t in warp_tiles(t0, t1, w, warps))


def test_shared_memory_of_a_launch():
    from compressor.kernels import cuda_qmm

    # the staged activations: 16 bytes per packed row and activation row; the warps' sums when they are larger
    assert cuda_qmm.shared_bytes(m=1, tiles_per_split=56, rows_per_block=8, warps=4) == 56 * 32 * 16
    assert cuda_qmm.shared_bytes(m=13, tiles_per_split=2, rows_per_block=16, warps=4) == 2 * 32 * 13 * 16
    assert cuda_qmm.shared_bytes(m=1, tiles_per_split=1, rows_per_block=16, warps=8) == 8 * 32 * 16 * 4


def test_launch_parameters_point_at_each_argument():
    import ctypes

    from compressor.kernels.nvrtc import kernel_params

    args = [ctypes.c_void_p(0xDEADBEEF0), ctypes.c_int(-7), ctypes.c_int(4096)]
    params = kernel_params(args)
    assert ctypes.cast(params[0], ctypes.POINTER(ctypes.c_void_p))[0] == 0xDEADBEEF0
    assert [ctypes.cast(params[i], ctypes.POINTER(ctypes.c_int))[0] for i in (1, 2)] == [-7, 4096]


def test_the_profiling_script_reads_back_every_candidate_name():
    import sys
    from pathlib import Path

    from compressor.kernels import triton_qmm

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from profile_qmm import parse_config

    for m in (1, 4, 16, 64, 512):
        for cfg in triton_qmm.candidates(m):
            assert parse_config(str(cfg)) == cfg, str(cfg)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_swiglu_prologue_on_the_gpu_matches_the_swiglu_then_the_product(dtype):
    from compressor.kernels import fused_ops, triton_qmm

    for m, act_order, split in ((1, False, 1), (5, True, 3), (12, False, 2)):
        kw = pack_for_kernel(random_quantized(264, 1536, 4, 128, act_order, seed=m), dtype).to("cuda")
        gate_up = (torch.randn(m, 3072, generator=torch.Generator().manual_seed(m)) * 2).to("cuda", dtype)
        cfg = triton_qmm.Config(8 if m <= 8 else 16, 32, split, 4, 2, mma=True)
        y = triton_qmm.quant_matmul(gate_up, kw, config=cfg, swiglu=True)
        exact = fused_ops.silu_mul(gate_up, True).double() @ reference.dequantize(kw).double()
        err = float((y.double() - exact).norm() / exact.norm())
        assert err < TOLERANCE[dtype], (m, act_order, err)
