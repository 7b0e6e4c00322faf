"""AWQ: scales that leave the model's function unchanged, a search that never does worse than no scaling on its own
objective, and quantization (alone or before GPTQ) that beats round to nearest on calibration-like text."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model

from compressor.algorithms.awq import output_error, search_scales
from compressor.awq_maps import ScaleMapError, maps_for
from compressor.quant.tensor import quantize_rtn
from compressor.recipe import QuantizeConfig, Recipe, RecipeError
from compressor.sequential import run_layerwise
from compressor.stages.base import StageContext
from compressor.stages.quantize import _AWQStage, apply_quantize, select_linears


def _windows(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, 384, (n, 64), generator=torch.Generator().manual_seed(seed))


def _kl(ref: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        p = ref(ids).logits.log_softmax(-1)
        q = model(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_scales_leave_the_function_unchanged(family):
    """Scales folded into norms (Gemma's 1 + weight included) and into v_proj / up_proj rows: same logits, while
    the weights really changed."""
    model = tiny_model(family)
    before = copy.deepcopy(model)
    cfg = QuantizeConfig(method="awq", bits=3, group_size=32)
    stage = _AWQStage(model, cfg, set(select_linears(model, cfg)))
    run_layerwise(model, _windows(0), stage, batch_size=8)
    assert sum(g["alpha"] is not None for g in stage.groups) > 0
    q_before = before.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before)
    ids = _windows(1, 4)
    with torch.no_grad():
        a, b = before(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 1e-4 * a.abs().max()


def test_search_is_never_worse_than_no_scaling():
    torch.manual_seed(0)
    x = torch.randn(512, 64) * torch.linspace(0.1, 5, 64)  # a few loud input channels, as in LLMs
    hessian = 2 * x.t() @ x / x.shape[0]
    weights = [torch.randn(48, 64), torch.randn(16, 64)]

    def rtn(w):
        return quantize_rtn(w, 3, 32, True).dequantize()

    res = search_scales(weights, hessian, rtn, grid=10)
    plain = sum(output_error(w, rtn(w), hessian) for w in weights)
    assert res.loss_unscaled == pytest.approx(plain, rel=1e-5)
    assert res.alpha is not None and res.loss < 0.99 * plain
    scaled = sum(output_error(w, rtn(w * res.scales) / res.scales, hessian) for w in weights)
    assert scaled == pytest.approx(res.loss, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_awq_beats_rtn_and_awq_gptq_is_not_worse_than_gptq(family):
    model = tiny_model(family)
    calib, held_out = _windows(2, 24), _windows(3, 8)
    kl = {}
    for name, cfg in {"rtn": QuantizeConfig(method="rtn", bits=3, group_size=32),
                      "awq": QuantizeConfig(method="awq", bits=3, group_size=32),
                      "gptq": QuantizeConfig(method="gptq", bits=3, group_size=32),
                      "awq+gptq": QuantizeConfig(method="gptq", bits=3, group_size=32, awq_scales=True)}.items():
        q = copy.deepcopy(model)
        report = apply_quantize(cfg, q, StageContext(calibration=calib, batch_size=8))
        kl[name] = _kl(model, q, held_out)
        if cfg.uses_awq:
            assert report.summary["awq_groups"] == 8 and any("awq_alpha" in r for r in report.layers)
    assert kl["awq"] < kl["rtn"]
    assert kl["awq+gptq"] < kl["gptq"] * 1.05


def test_unknown_architecture_and_bad_options_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ScaleMapError, match="no scale mapping for model_type 'gpt2'; supported: gemma"):
        maps_for(gpt2, gpt2.transformer.h[0])
    base = {"model": "x", "evaluate": None}
    with pytest.raises(RecipeError, match="awq_scales adds AWQ scales before GPTQ"):
        Recipe.from_dict({**base, "calibration": {}, "stages": [{"quantize": {"method": "rtn", "awq_scales": True}}]})
    with pytest.raises(RecipeError, match="method awq needs a `calibration` section"):
        Recipe.from_dict({**base, "stages": [{"quantize": {"method": "awq"}}]})


def test_grouped_query_attention_gets_no_o_proj_scale():
    """v_proj (kv heads) and o_proj (all heads) differ in width: that map is skipped, the others stay."""
    model = tiny_model("llama")
    maps = maps_for(model, model.model.layers[0])
    assert [m.producer for m in maps] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    mha = tiny_model("llama", num_key_value_heads=4)
    assert len(maps_for(mha, mha.model.layers[0])) == 4
