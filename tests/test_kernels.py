"""The fused dequantize-GEMM kernels against their PyTorch reference.

On a machine without CUDA the Triton kernel runs on CPU tensors through Triton's interpreter (float16 only: the
interpreter computes bfloat16 wrongly); on a GPU the same tests run on the device, in float16 and bfloat16.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from compressor.kernels import KernelWeight, UnsupportedLayout, pack_for_kernel, reference, use_fused_kernels
from compressor.kernels.layout import unpack_codes
from compressor.quant.tensor import QuantizedTensor, QuantLinear, quantize_rtn

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]
# ‖y - exact‖ / ‖exact‖ against float64 on the same dequantized weights: the kernels accumulate in fp32 and round the
# output once, so the error is the output dtype's rounding plus the inputs' (bf16 has 8 bits of mantissa, fp16 11).
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def random_quantized(out: int, inp: int, bits: int, group_size: int, act_order: bool, seed: int) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    qt = quantize_rtn(torch.randn(out, inp, generator=g), bits, group_size, symmetric=False)
    # Random codes, not only those of a Gaussian: every level, including 0 and the maximum, must decode right.
    codes = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, qt.zeros.shape, generator=g, dtype=torch.uint8)
    g_idx = None
    if act_order:
        gs = qt.group_size
        order = torch.randperm(inp, generator=g)
        g_idx = torch.empty(inp, dtype=torch.int32)
        g_idx[order] = (torch.arange(inp) // gs).int()
    return QuantizedTensor(codes, qt.scales, zeros, bits, qt.group_size, False, g_idx)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size,act_order", [(32, False), (64, True), (-1, False), (128, True)])
def test_packing_round_trip(bits, group_size, act_order):
    qt = random_quantized(24, 200, bits, group_size, act_order, seed=bits)
    kw = pack_for_kernel(qt, torch.float16)
    order = kw.perm.long() if kw.perm is not None else torch.arange(200)
    assert torch.equal(unpack_codes(kw), qt.codes.t()[order])
    assert torch.equal(reference.dequantize(kw), qt.dequantize(torch.float16).t())


def test_layouts_the_kernels_cannot_take_are_refused():
    with pytest.raises(UnsupportedLayout, match="3-bit"):
        pack_for_kernel(quantize_rtn(torch.randn(8, 64), 3, 32, False))
    with pytest.raises(UnsupportedLayout, match="multiple of 32"):
        pack_for_kernel(quantize_rtn(torch.randn(8, 64), 4, 16, False))


def test_reference_matches_the_dequantized_matmul():
    qt = random_quantized(48, 160, 4, 32, True, seed=1)
    kw = pack_for_kernel(qt, torch.float32)
    x = torch.randn(3, 160)
    bias = torch.randn(48)
    assert torch.allclose(reference.quant_matmul(x, kw, bias), x @ qt.dequantize().t() + bias, atol=1e-4)


def _kernel_case(bits, group_size, act_order, m, k, n, dtype, config, seed, bias=True):
    from compressor.kernels import triton_qmm

    qt = random_quantized(n, k, bits, group_size, act_order, seed)
    kw = pack_for_kernel(qt, dtype).to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    y = triton_qmm.quant_matmul(x, kw, b, config=config)
    w = reference.dequantize(kw).double()
    exact = x.double() @ w + (b.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    err = float((y.double() - exact).norm() / exact.norm())
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


CONFIGS = {  # block_m, block_n, split_k, warps, stages, one product per tile, CUDA-core kernel, two codes per
    # instruction (4-bit float16): narrow and wide blocks, split-K (atomic), several row blocks, the per-slab variant,
    # the GEMV with and without split-K, and both kernels with one code per instruction
    "narrow": (16, 32, 1, 4, 3, True), "split": (16, 64, 3, 4, 3, True), "wide": (32, 128, 1, 4, 3, True),
    "wide-split": (64, 64, 2, 4, 3, True), "slabs": (16, 64, 3, 4, 3, False),
    "gemv": (1, 32, 1, 2, 1, True, True), "gemv-split": (1, 64, 3, 4, 1, True, True),
    "gemv-narrow": (1, 16, 2, 1, 1, True, True), "gemv-fp32": (1, 32, 2, 2, 1, True, True, False),
    "wide-fp16": (32, 64, 2, 4, 3, True, False, False),
    "dense": dict(block_m=0, block_n=64, split_k=1, num_stages=1, dense=True),  # dequantize, then one product
    "gemv-ahead": dict(block_m=1, block_n=32, split_k=2, num_warps=2, num_stages=1, gemv=True, ahead=True)}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("bits,group_size,act_order", [(4, 32, False), (4, 128, True), (8, 64, False),
                                                        (2, -1, False)])
def test_kernel_matches_reference(bits, group_size, act_order, config, dtype):
    from compressor.kernels.triton_qmm import Config

    c = CONFIGS[config]
    cfg = Config(**c) if isinstance(c, dict) else Config(*c)
    # Shapes that are not multiples of the blocks: masked rows, columns and a partial last tile.
    for m in (1, 5) if cfg.block_m in (1, 16) else (3, 70):
        _kernel_case(bits, group_size, act_order, m, 448 if group_size != 128 else 640, 72, dtype, cfg,
                     seed=bits * 7 + m)


@needs_triton
@pytest.mark.parametrize("group_size,act_order,k,split", [
    (128, False, 1024, 1), (128, False, 1024, 3), (256, True, 896, 2), (-1, False, 640, 4), (128, True, 1000, 8)])
def test_gemv_requesting_a_tile_ahead_matches_reference(group_size, act_order, k, split):
    """The GEMV that requests the next tile's scales, zeros and activations with its words (4-bit, float16, one
    group pair per tile): whole and partial last tiles, splits whose last tile is past K or past the split, groups
    of 128 and 256 rows, one group, act-order; one and three rows."""
    from compressor.kernels.triton_qmm import Config, group_slabs

    kw = pack_for_kernel(random_quantized(64, k, 4, group_size, act_order, 5), torch.float16)
    assert group_slabs(kw) >= 4  # the variant applies
    for m in (1, 3):
        _kernel_case(4, group_size, act_order, m, k, 64, torch.float16,
                     Config(1, 32, split, 2, 1, gemv=True, ahead=True), seed=11 + m)


@needs_triton
@pytest.mark.parametrize("config", ["gemv-split", "gemv-ahead", "gemv-fp32"])
@pytest.mark.parametrize("group_size,act_order,k", [(128, False, 1024), (128, True, 640), (32, False, 448)])
def test_gemv_takes_a_down_projections_swiglu(config, group_size, act_order, k):
    """The GEMV given [gate | up] computes (silu(gate) * up) @ W, the SwiGLU rounded as its own kernel rounds it:
    one launch fewer per decoder layer."""
    from compressor.kernels import fused_ops, triton_qmm

    c = CONFIGS[config]
    cfg = triton_qmm.Config(**c) if isinstance(c, dict) else triton_qmm.Config(*c)
    kw = pack_for_kernel(random_quantized(72, k, 4, group_size, act_order, 3), torch.float16).to(DEVICE)
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(72, generator=g).to(DEVICE, torch.float16)
    for m in (1, 3):
        gate_up = (torch.randn(m, 2 * k, generator=g) * 3).to(DEVICE, torch.float16)
        y = triton_qmm.quant_matmul(gate_up, kw, bias, config=cfg, swiglu=True)
        a = fused_ops.silu_mul(gate_up, False)
        exact = a.double() @ reference.dequantize(kw).double() + bias.double()
        err = float((y.double() - exact).norm() / exact.norm())
        assert err < TOLERANCE[torch.float16], (m, err)
        # The unfused pair, as swiglu_matmul runs it where the tuner chose another kernel, gives the same.
        unfused = triton_qmm.quant_matmul(a, kw, bias, config=cfg)
        assert float((y.double() - unfused.double()).norm() / exact.norm()) < 1e-3


@needs_triton
def test_kernel_on_larger_shapes_and_default_configs():
    from compressor.kernels import triton_qmm

    k, n = (4096, 4096) if CUDA else (512, 256)
    for m in (1, 4, 16, 64) if CUDA else (1, 16):
        _kernel_case(4, 128, False, m, k, n, torch.float16, triton_qmm.default_config(m), seed=m, bias=False)


@needs_triton
def test_tuning_picks_a_default_without_a_gpu():
    from compressor.kernels import triton_qmm

    kw = pack_for_kernel(random_quantized(64, 256, 4, 32, False, 0))
    if CUDA:
        timed = triton_qmm.tune(1, kw.to("cuda"), torch.float16, triton_qmm.candidates(1)[:3], replays=2)
        assert timed and all(us > 0 for _, us in timed)
    else:
        assert triton_qmm.tuned_config(1, kw, torch.float16) == triton_qmm.default_config(1)
    triton = (lambda m, **kw: [c for c in triton_qmm.candidates(m, **kw) if not c.mma])  # noqa: E731
    cuda = (lambda m, **kw: [c for c in triton_qmm.candidates(m, **kw) if c.mma])  # noqa: E731
    assert all(c.gemv for c in triton(1))  # one row: the CUDA cores, no padding to 16 rows
    assert {c.gemv for c in triton(4)} == {True, False}
    assert not any(c.gemv for c in triton(16))
    assert min(c.block_m for c in triton(64)) >= 32
    # The CUDA C++ kernel: 8 rows per block up to a batch of 8 (nothing padded at decode), 16 beyond, up to 64 rows;
    # 4-bit weights and 16-bit activations only.
    assert {c.block_m for c in cuda(1)} == {c.block_m for c in cuda(8)} == {8}
    assert {c.block_m for c in cuda(16)} == {c.block_m for c in cuda(64)} == {16}
    assert not cuda(128) and not cuda(1, bits=8) and not cuda(1, dtype=torch.float32)
    assert cuda(1, dtype=torch.bfloat16)


def test_dispatch_falls_back_to_the_reference_without_triton_or_cuda(monkeypatch):
    import compressor.kernels as kernels

    kw = pack_for_kernel(random_quantized(32, 64, 4, 32, False, 0), torch.float32)
    x = torch.randn(2, 64)
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    assert torch.equal(kernels.quant_matmul(x, kw), reference.quant_matmul(x, kw))


def test_fused_linear_in_a_model_computes_what_quantlinear_computes():
    from conftest import tiny_model

    model = tiny_model("llama", intermediate_size=96)  # 96 columns: groups of 32 fit, K is not a tile multiple
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            gs = 32 if "mlp" not in name else 16  # groups of 16 are not kernel-packable: those layers stay
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantLinear(quantize_rtn(m.weight.detach(), 4, gs, True), m.bias))
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        want = model(ids).logits
        kept = use_fused_kernels(model, torch.float32)
        got = model(ids).logits
    assert kept and all("multiple of 32" in why for why in kept.values())
    assert set(kept) == {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    fused = [m for m in model.modules() if type(m).__name__ == "FusedQuantLinear"]
    assert len(fused) == 2 * 4  # q, k, v, o in each of the two blocks
    assert torch.allclose(got, want, atol=1e-4)
    assert isinstance(fused[0].kernel_weight(), KernelWeight)


@needs_triton
def test_tuning_never_chooses_a_configuration_that_computes_wrong(monkeypatch):
    """Mocks the GPU timing (all candidates equally fast): the first candidate gives wrong results and must be
    dropped."""
    from compressor.kernels import timing, triton_qmm

    kw = pack_for_kernel(random_quantized(64, 256, 4, 32, False, 0)).to(DEVICE)
    good, bad = triton_qmm.Config(16, 32, 1, 4, 3), triton_qmm.Config(16, 64, 2, 4, 3)
    real = triton_qmm.quant_matmul

    def faulty(x, w, bias=None, config=None):
        y = real(x, w, bias, config)
        return y * 1.5 if config == bad else y

    monkeypatch.setattr(triton_qmm, "quant_matmul", faulty)
    monkeypatch.setattr(timing, "graph_time_us", lambda calls, replays=5: 1.0)  # every candidate equally fast
    timed = triton_qmm.tune(1, kw, torch.float16, [bad, good])
    assert [c for c, _ in timed] == [good]


@needs_triton
def test_gemv_split_k_leaves_its_workspace_zeroed_for_the_next_call():
    """The last program of each column block takes the sums and zeroes them: a second call (another input, the same
    buffers) must not see the first call's sums."""
    from compressor.kernels import triton_qmm

    kw = pack_for_kernel(random_quantized(40, 512, 4, 64, False, 3)).to(DEVICE)
    cfg = triton_qmm.Config(1, 32, 2, 2, 1, gemv=True)
    for seed in (0, 1):
        x = torch.randn(2, 512, generator=torch.Generator().manual_seed(seed)).to(DEVICE, torch.float16)
        exact = x.double() @ reference.dequantize(kw).double()
        y = triton_qmm.quant_matmul(x, kw, config=cfg)
        assert float((y.double() - exact).norm() / exact.norm()) < TOLERANCE[torch.float16]
    sums, counts = triton_qmm._WORKSPACE[(str(x.device), 2 * 40, 2 * 2)]
    assert not sums.any() and not counts.any()


@needs_triton
@pytest.mark.parametrize("bits,half2", [(4, True), (4, False), (8, False)])
def test_gemv_whose_last_split_runs_past_k_reads_no_activation_beyond_it(bits, half2):
    """K a whole number of tiles, but not of tiles per split: the last program's second tile lies past K. The
    activations there are NaN (a row of a wider buffer); read unmasked, 0 * NaN would spoil the output."""
    from compressor.kernels import triton_qmm

    k = 5 * 32 * (32 // bits)  # 5 tiles; split 3 gives 2 tiles per program, the last one runs past K
    kw = pack_for_kernel(random_quantized(40, k, bits, 32, False, 5)).to(DEVICE)
    wide = torch.full((1, k + 512), float("nan"))
    wide[:, :k] = torch.randn(1, k, generator=torch.Generator().manual_seed(2))
    x = wide.to(DEVICE, torch.float16)[:, :k]
    cfg = triton_qmm.Config(1, 32, 3, 2, 1, gemv=True, half2=half2)
    y = triton_qmm.quant_matmul(x, kw, config=cfg)
    exact = x.double() @ reference.dequantize(kw).double()
    assert torch.isfinite(y).all()
    assert float((y.double() - exact).norm() / exact.norm()) < TOLERANCE[torch.float16]
    assert triton_qmm.half2_applies(cfg, bits, torch.float16) == half2


@needs_triton
def test_two_codes_per_instruction_keep_massive_activations_finite():
    """LLMs carry a few activations in the thousands. The float16 GEMV sums 4 products per half before scaling; its
    activations are divided by 16 first, so a group of rows with |x| = 4000 against codes 15 from their zero must
    neither overflow nor lose the output's precision (without the division a half would reach 240000). Both kernels,
    float16."""
    from compressor.kernels import triton_qmm

    k, n = 512, 48
    qt = random_quantized(n, k, 4, 128, False, 11)
    qt.zeros.fill_(0)
    qt.scales.fill_(1e-3)  # small weights, as in a real layer: the output itself stays within float16
    qt.codes[:, :128] = 15  # the widest |q - z| in the first group, where the activations are largest
    kw = pack_for_kernel(qt).to(DEVICE)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(4))
    x[:, :128] = 4000.0 * torch.sign(x[:, :128])
    x = x.to(DEVICE, torch.float16)
    exact = x.double() @ reference.dequantize(kw).double()
    for cfg in (triton_qmm.Config(1, 32, 1, 2, 1, gemv=True), triton_qmm.Config(16, 64, 1, 4, 3)):
        assert triton_qmm.half2_applies(cfg, 4, torch.float16)
        y = triton_qmm.quant_matmul(x, kw, config=cfg)
        assert torch.isfinite(y).all(), cfg
        assert float((y.double() - exact).norm() / exact.norm()) < TOLERANCE[torch.float16], cfg


def test_no_ptx_and_no_programmatic_launch_on_amd_gpus(monkeypatch):
    """ROCm builds of PyTorch call AMD GPUs "cuda": the kernels must not carry PTX (inline asm, griddepcontrol) or
    NVIDIA-only launches there, whatever the device reports as its capability (an MI300 says 9.4)."""
    from compressor.kernels import pdl

    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    monkeypatch.setattr(pdl, "_capability", lambda index: (9, 4))
    cuda = torch.device("cuda", 0)
    assert not pdl.nvidia(cuda) and not pdl.allowed(cuda)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert pdl.nvidia(cuda) and pdl.allowed(cuda)
    monkeypatch.setenv("COMPRESSOR_CUDA_PDL", "0")
    assert not pdl.allowed(cuda)
