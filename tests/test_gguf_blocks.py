"""GGUF block encoding, checked against gguf-py's independent numpy implementation of llama.cpp's formats."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from compressor.quant.tensor import QuantizedTensor, quantize_rtn
from export.gguf_blocks import BLOCK_TYPES, encode_codes, encode_dense, mismatch


def _decode(data: np.ndarray, name: str, shape: tuple[int, int]) -> torch.Tensor:
    out = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(shape))


@pytest.mark.parametrize("name,bits,symmetric", [("Q4_0", 4, True), ("Q4_1", 4, False), ("Q5_0", 5, True),
                                                 ("Q5_1", 5, False), ("Q8_0", 8, True)])
def test_calibrated_codes_decode_to_the_same_weights(name, bits, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.05
    qt = quantize_rtn(w, bits, 32, symmetric)
    enc = encode_codes(qt, BLOCK_TYPES[name])
    decoded = _decode(enc.data, name, qt.shape)
    expected = qt.dequantize()
    if symmetric:  # same float16 scale, same codes: exact
        assert torch.equal(decoded, expected)
        assert enc.max_abs_error == 0 and not enc.refit
    else:  # the offset m = -scale*zero is rounded to float16
        assert (decoded - expected).abs().max() <= enc.max_abs_error + 1e-7
        assert enc.max_abs_error <= (qt.scales.float().abs().max() * 0.51).item()


def test_dense_encoding_is_as_accurate_as_llama_cpp_reference():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    w[3, 5] = 0.4  # an outlier inside one block
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        ours = _decode(encode_dense(w, BLOCK_TYPES[name]), name, w.shape)
        ref_data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name])
        ref = _decode(ref_data, name, w.shape)
        err_ours, err_ref = (ours - w).square().mean(), (ref - w).square().mean()
        assert err_ours <= err_ref * 1.02, (name, err_ours, err_ref)
        assert err_ours < w.square().mean() * 0.05


def test_block_layout_byte_for_byte():
    # One Q4_0 block: scale 0.5, codes 0..15 then 15..0; Q5_0 adds the high bits in qh.
    codes = torch.tensor([list(range(16)) + list(range(15, -1, -1))], dtype=torch.uint8)
    qt = QuantizedTensor(codes, torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[8]], dtype=torch.uint8),
                         4, 32, True)
    data = encode_codes(qt, BLOCK_TYPES["Q4_0"]).data[0]
    assert data[:2].view("<f2")[0] == np.float16(0.5)
    assert list(data[2:4]) == [0 | 15 << 4, 1 | 14 << 4]
    codes5 = torch.arange(32, dtype=torch.uint8).unsqueeze(0)
    qt5 = QuantizedTensor(codes5, torch.tensor([[1.0]], dtype=torch.float16), torch.tensor([[16]], dtype=torch.uint8),
                          5, 32, True)
    data5 = encode_codes(qt5, BLOCK_TYPES["Q5_0"]).data[0]
    assert int(data5[2:6].view("<u4")[0]) == 0xFFFF0000  # codes 16..31 have bit 4 set
    assert torch.equal(_decode(encode_codes(qt5, BLOCK_TYPES["Q5_0"]).data, "Q5_0", (1, 32)),
                       torch.arange(32.0).unsqueeze(0) - 16)


def test_codes_that_do_not_fit_are_refused_with_the_reason():
    w = torch.randn(8, 128)
    assert "4-bit codes" in mismatch(quantize_rtn(w, 4, 32, True), BLOCK_TYPES["Q8_0"])
    assert "groups of 64" in mismatch(quantize_rtn(w, 4, 64, True), BLOCK_TYPES["Q4_0"])
    assert "asymmetric" in mismatch(quantize_rtn(w, 4, 32, False), BLOCK_TYPES["Q4_0"])
    assert mismatch(quantize_rtn(w, 4, 32, True), BLOCK_TYPES["Q4_1"]) is None  # symmetric codes fit Q4_1 too
    with pytest.raises(ValueError, match="groups of 64"):
        encode_codes(quantize_rtn(w, 4, 64, True), BLOCK_TYPES["Q4_0"])
