"""The `cuda` evaluation target: skipped without a GPU; on a GPU, each variant measured against fp16."""
from __future__ import annotations

import pytest
import torch

from compressor.evaluate import cuda_target
from compressor.quant.tensor import QuantLinear, quantize_rtn
from compressor.recipe import Recipe

CUDA = torch.cuda.is_available()


def _quantized(model):
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear(quantize_rtn(m.weight.detach(), 4, 32, True)))
    return model


def _measure(baseline, compressed):
    windows = torch.randint(0, 384, (2, 64), generator=torch.Generator().manual_seed(0))
    return cuda_target.measure(baseline, compressed, windows, prompt_tokens=16, decode_tokens=8, prefill_tokens=64,
                               repeats=2)


def test_target_recipe_field_is_validated():
    r = Recipe.model_validate({"model": "m", "evaluate": {"targets": ["cpu", "cuda"]}})
    assert r.evaluate.targets == ("cpu", "cuda")
    assert Recipe.model_validate({"model": "m"}).evaluate.targets == ("cpu",)
    with pytest.raises(ValueError, match="cpu.*cuda|'cpu' or 'cuda'"):
        Recipe.model_validate({"model": "m", "evaluate": {"targets": ["tpu"]}})
    with pytest.raises(ValueError, match="twice"):
        Recipe.model_validate({"model": "m", "evaluate": {"targets": ["cuda", "cuda"]}})


@pytest.mark.skipif(CUDA, reason="checks the report of a machine without a GPU")
def test_cuda_target_is_skipped_without_a_gpu():
    from conftest import tiny_model

    from compressor.report import _cuda_section

    out = _measure(tiny_model("llama"), None)
    assert out == {"skipped": "no CUDA GPU visible to torch"}
    assert "Skipped: no CUDA GPU" in "\n".join(_cuda_section({"targets": {"cuda": out}, "artifacts": []}))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma"])  # graph-captured decode, and the eager fallback
def test_cuda_target_measures_fp16_and_fused_quantized(family):
    from conftest import tiny_model

    base = tiny_model(family, hidden_size=128, intermediate_size=256)
    out = _measure(base, _quantized(tiny_model(family, hidden_size=128, intermediate_size=256)))
    v = out["variants"]
    assert set(v) == {"fp16 baseline", "quantized (fused kernels)"}
    for row in v.values():
        assert row["decode_ms_per_token"] > 0 and row["prefill_tokens_per_s"] > 0 and row["peak_gpu_bytes"] > 0
    assert ("CUDA graph" in v["fp16 baseline"]["decode_method"]) == (family == "llama")
    acc = v["quantized (fused kernels)"]["accuracy"]
    assert 0 < acc["kl_divergence"] < 1 and acc["top1_agreement"] > 0.3


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_target_runs_two_four_layers_sparse():
    from conftest import tiny_model

    from compressor.algorithms.sparsity import n_m_mask

    base = tiny_model("llama", hidden_size=128, intermediate_size=256)
    pruned = tiny_model("llama", hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for name, m in pruned.named_modules():
            if isinstance(m, torch.nn.Linear) and "layers" in name:
                m.weight[n_m_mask(m.weight.abs(), 2, 4)] = 0
    out = _measure(base, pruned)
    row = out["variants"]["2:4 sparse"]
    assert "semi-structured sparse" in row["note"] and row["decode_ms_per_token"] > 0
