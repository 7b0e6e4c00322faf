import pytest
import torch

from compressor.algorithms.gptq import gptq_quantize
from compressor.quant.tensor import quantize_rtn


def _problem(rows=96, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs with uneven channel energy: the case where error feedback pays off.
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(2048, cols, generator=g) @ mix * torch.linspace(0.2, 3.0, cols)
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=g) * 0.05
    return w, h, x


def _out_err(w, q, x):
    return (x @ (q.dequantize() - w).T).pow(2).mean().item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error(bits, act_order):
    w, h, x = _problem()
    rtn = quantize_rtn(w, bits, 32, True)
    res = gptq_quantize(w, h, bits, 32, True, act_order=act_order)
    assert _out_err(w, res.qweight, x) < 0.85 * _out_err(w, rtn, x)
    assert res.qweight.codes.dtype == torch.uint8 and int(res.qweight.codes.max()) < 2**bits
    assert res.qweight.g_idx is None  # static groups: consecutive, no column permutation to store


def test_gptq_asymmetric_per_channel():
    w, h, x = _problem()
    res = gptq_quantize(w, h, 4, -1, False)
    assert res.qweight.scales.shape == (w.shape[0], 1)
    assert _out_err(w, res.qweight, x) < _out_err(w, quantize_rtn(w, 4, -1, False), x)


def test_gptq_codes_reproduce_its_own_dequantized_weight():
    w, h, _ = _problem()
    res = gptq_quantize(w, h, 4, 32, True, act_order=True)
    qt = res.qweight
    # scales are already float16 values: storing them loses nothing
    assert torch.equal(qt.scales.float().half().float(), qt.scales.float())


def test_singular_hessian_raises_dampening_and_dead_inputs_are_zero():
    w, h, _ = _problem(cols=64)
    x = torch.randn(8, 64)  # 8 tokens: rank-8 Hessian
    x[:, 5] = 0  # a dead input column
    h = 2 * x.T @ x / 8
    res = gptq_quantize(w, h, 4, 32, True, damp=1e-12)
    assert res.damp > 1e-12
    assert res.qweight.dequantize()[:, 5].abs().max() == 0


def test_gptq_runs_on_partial_last_group():
    w, h, x = _problem(cols=80)
    res = gptq_quantize(w, h, 4, 32, True)
    assert res.qweight.scales.shape == (w.shape[0], 3)
    assert _out_err(w, res.qweight, x) < _out_err(w, quantize_rtn(w, 4, 32, True), x)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gptq_stage_with_bfloat16_passes_is_as_good_as_with_float32_ones(family):
    """calibration.precision bfloat16 changes only the precision of the calibration passes: the quantized
    model's output error must stay that of float32 passes, and nearly all codes must be the same."""
    import copy

    from compressor.quant.tensor import QuantLinear
    from compressor.recipe import QuantizeConfig, QuantizeStage
    from compressor.stages import StageContext, apply_stage
    from conftest import tiny_model

    ref = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, ref.config.vocab_size, (8, 48), generator=g)
    test = torch.randint(0, ref.config.vocab_size, (4, 48), generator=g)
    with torch.no_grad():
        want = ref(test).logits.log_softmax(-1)
    kl, codes = {}, {}
    for dtype in (None, torch.bfloat16):
        model = copy.deepcopy(ref)
        cfg = QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=True)
        apply_stage(QuantizeStage(quantize=cfg), model, StageContext(calibration=calib, batch_size=4,
                                                                     compute_dtype=dtype))
        with torch.no_grad():
            got = model(test).logits.log_softmax(-1)
        kl[dtype] = torch.sum(want.exp() * (want - got), -1).mean().item()
        codes[dtype] = torch.cat([m.qweight.codes.flatten() for m in model.modules() if isinstance(m, QuantLinear)])
    agree = (codes[None] == codes[torch.bfloat16]).float().mean().item()
    assert kl[torch.bfloat16] < 1.1 * kl[None]
    assert agree > 0.85
