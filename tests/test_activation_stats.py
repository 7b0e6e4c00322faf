"""The importance matrix (mean of x² per input column of every linear layer) that guides llama.cpp's quantizer."""
import pytest
import torch
from torch import nn

from compressor.activation_stats import mean_squared_inputs
from conftest import tiny_model


def _reference(model, ids, batch_size):
    """The same statistic from plain forward passes, logits and all."""
    sums, counts = {}, {}

    def hook(name):
        def fn(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(batch)
    for h in handles:
        h.remove()
    return {n: (s / counts[n]).float() for n, s in sums.items()}


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_statistics_of_every_linear_without_computing_the_logits(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    head_calls = []
    model.lm_head.register_forward_hook(lambda m, a, out: head_calls.append(1))
    got = mean_squared_inputs(model, ids, batch_size=2)
    assert not head_calls  # the pass stops at the output projection's input
    want = _reference(model, ids, 2)
    assert got.keys() == want.keys() and "lm_head" in got
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-5), name


def test_statistics_from_bfloat16_passes_stay_close_to_float32():
    """calibration.precision bfloat16: the products round their inputs to bfloat16 (8 bits of mantissa), so each
    column's mean of x² moves by about a percent, not more; the float32 model itself is left as it was."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = mean_squared_inputs(model, ids, batch_size=2)
    got = mean_squared_inputs(model, ids, batch_size=2, compute_dtype=torch.bfloat16)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].dtype == torch.float32
        assert ((got[name] - ref[name]).norm() / ref[name].norm()).item() < 0.03, name
    assert not torch.equal(got["model.layers.0.mlp.down_proj"], ref["model.layers.0.mlp.down_proj"])  # bf16 ran
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.float32
