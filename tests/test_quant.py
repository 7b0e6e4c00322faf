import pytest
import torch

from compressor.quant import grid
from compressor.quant.packing import pack, pack_bytes, unpack, unpack_bytes
from compressor.quant.tensor import QuantizedTensor, QuantLinear, quantize_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_roundtrip(bits, dim):
    codes = torch.randint(0, 2**bits, (96, 64) if dim == 0 else (40, 96), dtype=torch.uint8)
    words = pack(codes, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == 96 * bits // 32
    assert torch.equal(unpack(words, bits, dim, 96), codes)


def test_pack_layout_lowest_code_in_lowest_bits():
    codes = torch.arange(8, dtype=torch.uint8).view(8, 1)
    assert pack(codes, 4, 0)[0, 0].item() == 0x76543210
    # 3 bits: code 10 straddles the first two words (bits 30..32)
    c3 = torch.zeros(32, 1, dtype=torch.uint8)
    c3[10] = 0b111
    w = pack(c3, 3, 0)[:, 0].to(torch.int64) & 0xFFFFFFFF
    assert w[0].item() == 0b11 << 30 and w[1].item() == 0b1


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 64, 65])
def test_byte_packing_roundtrip(bits, count):
    g = torch.Generator().manual_seed(bits * 100 + count)
    codes = torch.randint(0, 2**bits, (3, count), generator=g).to(torch.uint8)
    packed = pack_bytes(codes, bits)
    per = {1: 8, 2: 4, 3: 2, 4: 2}.get(bits, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-count // per))
    assert torch.equal(unpack_bytes(packed, bits, count), codes)


def test_byte_packing_puts_the_first_code_in_the_low_bits():
    assert pack_bytes(torch.tensor([[1, 2, 15]], dtype=torch.uint8), 4).tolist() == [[0x21, 0x0F]]
    with pytest.raises(ValueError, match="9 bits"):
        pack_bytes(torch.zeros(1, 2, dtype=torch.uint8), 9)


@pytest.mark.parametrize("bits,ratio", [(4, 2), (3, 2), (2, 4), (8, 1)])
def test_quant_linear_keeps_its_codes_packed_and_gives_them_back_exactly(bits, ratio):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits))
    qt = quantize_rtn(w, bits, 32, symmetric=False)
    layer = QuantLinear(qt, torch.randn(48))
    assert layer.codes.numel() * ratio == qt.codes.numel()  # the memory a finished layer keeps
    assert torch.equal(layer.qweight.codes, qt.codes)
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, qt.dequantize(), layer.bias))
    again = QuantLinear(qt, torch.zeros(48))
    again.load_state_dict(layer.state_dict())  # what resume and the stage cache rely on
    assert torch.equal(again.qweight.dequantize(), qt.dequantize())


def test_pack_refuses_partial_words():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        pack(torch.zeros(10, 1, dtype=torch.uint8), 4, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_grid_uses_all_levels_and_fp16_scales(bits):
    w = torch.randn(16, 32)
    scale, zero = grid.fit(w, bits, symmetric=True)
    assert torch.equal(scale, scale.half().float())
    assert (zero == 2 ** (bits - 1)).all()
    q = grid.quantize(w, scale[:, None], zero[:, None], bits)
    # the weight of largest magnitude sits exactly on code 0
    idx = w.abs().argmax(1)
    assert (q[torch.arange(16), idx] == 0).all()
    deq = grid.dequantize(q, scale[:, None], zero[:, None])
    inside = (deq - w).abs() <= scale.abs()[:, None] / 2 + 1e-6
    assert inside.float().mean() > 0.9  # only the clamped top code of the opposite sign may fall outside


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid_bounds_error_and_zero_at_least_one(bits):
    w = torch.randn(16, 32) + 0.3
    scale, zero = grid.fit(w, bits, symmetric=False)
    assert (zero >= 1).all() and (zero <= 2**bits - 1).all()
    q = grid.quantize(w, scale[:, None], zero[:, None], bits)
    deq = grid.dequantize(q, scale[:, None], zero[:, None])
    assert ((deq - w).abs() <= scale[:, None] * 1.0 + 1e-6).all()


def test_clip_search_never_worse():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * torch.linspace(0.1, 3, 32)
    for sym in (True, False):
        err = []
        for search in (False, True):
            s, z = grid.fit(w, 3, sym, clip_search=search)
            err.append((grid.dequantize(grid.quantize(w, s[:, None], z[:, None], 3), s[:, None], z[:, None]) - w)
                       .pow(2).sum(1))
        assert (err[1] <= err[0] + 1e-6).all() and err[1].sum() < err[0].sum()


def test_rtn_handles_last_partial_group_and_per_channel():
    w = torch.randn(8, 80)
    qt = quantize_rtn(w, 4, 32, True)
    assert qt.scales.shape == (8, 3)
    assert (qt.dequantize() - w).abs().max() < 0.5
    pc = quantize_rtn(w, 8, -1, True)
    assert pc.scales.shape == (8, 1) and pc.group_size == 80
    assert (pc.dequantize() - w).abs().max() < 0.05


def test_quantized_tensor_checks_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        QuantizedTensor(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 3).half(),
                        torch.zeros(4, 3, dtype=torch.uint8), 4, 32, True)


def test_dequantize_with_g_idx_matches_explicit_formula():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    scales = torch.rand(6, 2).half()
    zeros = torch.randint(1, 16, (6, 2), dtype=torch.uint8)
    g_idx = torch.randperm(64) % 2
    qt = QuantizedTensor(codes, scales, zeros, 4, 32, False, g_idx.to(torch.int32))
    expect = torch.stack([(codes[:, i].float() - zeros[:, g_idx[i]].float()) * scales[:, g_idx[i]].float()
                          for i in range(64)], 1)
    assert torch.allclose(qt.dequantize(), expect)
    assert not qt.has_consecutive_groups()
