"""Low-rank factorization: the math (plain and activation-aware SVD, refit, rank choice), the stage on every family,
later stages through the factors, merging back, and bad input."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import FAMILIES, tiny_model

from compressor.algorithms.low_rank import RankOptions, allocate_ranks, decompose, factor_parameters, \
    output_error, rank_for_energy, rank_for_ratio, refit_second
from compressor.low_rank import LowRankLinear, low_rank_layers, merge, merged
from compressor.quant.tensor import QuantLinear
from compressor.recipe import DistillConfig, LowRankConfig, QuantizeConfig, Recipe, RecipeError
from compressor.stages.base import ShapeError, StageContext
from compressor.stages.distill import apply_distill
from compressor.stages.low_rank import apply_low_rank
from compressor.stages.quantize import apply_quantize


def _correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few strong directions, as real activations have (an isotropic X would make both SVDs agree)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) * torch.logspace(0, -2, features)[:, None]
    return torch.randn(n, features, generator=g) @ mix


def test_full_rank_factors_reproduce_the_weight_and_the_tail_is_the_discarded_energy():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    dec = decompose(w)
    first, second = dec.factors(24)
    assert torch.allclose(second @ first, w, atol=1e-4)
    tail = dec.tail()
    assert tail[0] == pytest.approx(1.0) and tail[-1] == 0
    first, second = dec.factors(10)
    assert output_error(w, second @ first, None) == pytest.approx(float(tail[10]), rel=1e-4)


def test_activation_aware_truncation_minimizes_the_output_error_and_predicts_it():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 48, generator=g)
    x = _correlated_inputs(2000, 48)
    h = x.t() @ x
    plain, aware = decompose(w), decompose(w, h, damp=1e-9)
    for rank in (4, 12, 24):
        p = plain.factors(rank)[1] @ plain.factors(rank)[0]
        a = aware.factors(rank)[1] @ aware.factors(rank)[0]
        # each is optimal in its own norm: activation-aware for the outputs, plain for the weights
        assert output_error(w, a, h) < output_error(w, p, h)
        assert output_error(w, p, None) < output_error(w, a, None)
        # the discarded whitened energy is the output error it leaves
        assert output_error(w, a, h) == pytest.approx(float(aware.tail()[rank]), rel=1e-3)
        # and on the inputs themselves
        assert float(((x @ (w - a).t()) ** 2).sum() / ((x @ w.t()) ** 2).sum()) == pytest.approx(
            output_error(w, a, h), rel=1e-3)


def test_refitting_the_second_factor_lowers_plain_svd_output_error():
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(2000, 48, seed=3)
    h = x.t() @ x
    first, second = decompose(w).factors(12)
    refit = refit_second(w, first, h, damp=1e-9)
    assert output_error(w, refit @ first, h) < 0.8 * output_error(w, second @ first, h)
    # with the activation-aware factors it is already the optimum: the refit changes (almost) nothing
    a_first, a_second = decompose(w, h, damp=1e-9).factors(12)
    assert output_error(w, refit_second(w, a_first, h, damp=1e-9) @ a_first, h) == pytest.approx(
        output_error(w, a_second @ a_first, h), rel=1e-3)


def test_rank_rules():
    # 20% fewer parameters than 64x128 (8192): r (64 + 128) <= 6553 -> r <= 34 -> 32 on an alignment of 8 or 32
    assert rank_for_ratio(64, 128, 0.2, 8) == 32 and rank_for_ratio(64, 128, 0.2, 32) == 32
    assert factor_parameters(64, 128, 32) <= 0.8 * 64 * 128
    assert rank_for_ratio(64, 64, 0.2, 32) is None  # rank 32 of a 64x64 matrix is as big as the matrix
    tail = torch.tensor([1.0, 0.5, 0.2, 0.1, 0.05, 0.0], dtype=torch.float64)
    assert rank_for_energy(tail, 100, 100, 0.8, 1) == 2
    assert rank_for_energy(tail, 100, 100, 0.95, 2) == 4
    assert rank_for_energy(tail, 8, 8, 0.95, 1) is None  # rank 4 of 8x8 is not smaller


def test_sensitivity_allocation_meets_the_budget_with_the_least_error():
    g = torch.Generator().manual_seed(4)
    layers = {}
    for i, decay in enumerate((0.3, 1.0, 3.0)):
        s = (torch.exp(-decay * torch.arange(16, dtype=torch.float64) / 4) * (1 + torch.rand(16, generator=g))).sort(
            descending=True).values
        dec_tail = torch.cat([s.square().flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
        layers[f"l{i}"] = RankOptions(32, 16, dec_tail / dec_tail[0])
    ratio = 0.5
    chosen = allocate_ranks(layers, ratio, alignment=2)

    def cost(name, r):
        return 32 * 16 if r is None else factor_parameters(32, 16, r)

    budget = (1 - ratio) * 3 * 32 * 16
    assert sum(cost(n, r) for n, r in chosen.items()) <= budget
    error = sum(0.0 if r is None else float(layers[n].tail[r]) for n, r in chosen.items())
    grid = [r for r in range(2, 17, 2) if factor_parameters(32, 16, r) < 32 * 16] + [None]
    best = min(sum(0.0 if r is None else float(layers[n].tail[r]) for n, r in zip(layers, combo))
               for combo in itertools.product(grid, repeat=3)
               if sum(cost(n, r) for n, r in zip(layers, combo)) <= budget)
    assert error == pytest.approx(best, rel=1e-9)
    assert chosen["l2"] < chosen["l0"]  # the fast-decaying spectrum needs the fewest ranks
    with pytest.raises(ValueError, match="lower the ratio"):
        allocate_ranks(layers, 0.95, alignment=8)


def _windows(n: int = 16, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, seq), generator=torch.Generator().manual_seed(seed))


def _kl(model, reference, x) -> float:
    with torch.no_grad():
        a, b = model(x).logits.log_softmax(-1), reference(x).logits.log_softmax(-1)
    return float((b.exp() * (b - a)).sum(-1).mean())


@pytest.mark.parametrize("family", FAMILIES)
def test_low_rank_stage_on_every_family(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    calib, held = _windows(), _windows(8, seed=1)
    aware = copy.deepcopy(model)
    report = apply_low_rank(LowRankConfig(ratio=0.2, alignment=8), aware, StageContext(calibration=calib))
    layers = low_rank_layers(aware)
    assert report.summary["factorized"] == len(layers) > 0
    assert report.summary["parameters_removed_ratio"] >= 0.2
    for row in report.layers:
        if row["rank"] is not None:
            assert row["rank"] % 8 == 0 and row["parameters"] <= 0.8 * row["dense_parameters"]
            layer = aware.get_submodule(row["name"])
            assert isinstance(layer, LowRankLinear) and layer.rank == row["rank"]
            # the bias (Qwen2's q/k/v) moved to the second factor unchanged
            original = reference.get_submodule(row["name"])
            if original.bias is not None:
                assert torch.equal(layer.second.bias, original.bias)
    plain = copy.deepcopy(model)
    apply_low_rank(LowRankConfig(method="svd", ratio=0.2, alignment=8), plain, StageContext())
    assert _kl(aware, reference, held) < _kl(plain, reference, held)
    # merging gives the same function as ordinary linear layers
    before = aware(held).logits
    merge(aware)
    assert not low_rank_layers(aware)
    assert torch.allclose(aware(held).logits, before, atol=1e-4)


def test_energy_fixed_rank_kind_ratios_and_layers_left_dense():
    model = tiny_model("llama")
    report = apply_low_rank(LowRankConfig(ratio={r"mlp\.": 0.3}, alignment=8), model,
                            StageContext(calibration=_windows()))
    assert {r["name"].split(".")[-1] for r in report.layers} == {"gate_proj", "up_proj", "down_proj"}
    model = tiny_model("llama")
    # k/v are 32x64: rank 24 would need 2304 > 2048 parameters, so they stay dense and are reported
    report = apply_low_rank(LowRankConfig(rank=24, method="svd"), model, StageContext())
    dense = set(report.summary["left_dense"])
    assert dense and all(n.endswith(("k_proj", "v_proj")) for n in dense)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in dense)
    model = tiny_model("llama")
    report = apply_low_rank(LowRankConfig(energy=0.8, alignment=4), model, StageContext(calibration=_windows()))
    for row in report.layers:
        if row["rank"] is not None:
            assert row["predicted_error"] <= 0.2 + 1e-6
    with pytest.raises(ShapeError, match="exceeds the smaller dimension of every chosen layer"):
        apply_low_rank(LowRankConfig(rank=500, method="svd"), tiny_model("llama"), StageContext())
    with pytest.raises(ShapeError, match="nothing would be factorized"):
        apply_low_rank(LowRankConfig(ratio=0.1, alignment=64, method="svd"), tiny_model("llama"), StageContext())
    with pytest.raises(ShapeError, match="even rank 32 in every layer keeps"):
        apply_low_rank(LowRankConfig(ratio=0.9, allocation="sensitivity", method="svd"), tiny_model("llama"),
                       StageContext())
    with pytest.raises(ShapeError, match="no selected linear layer matches"):
        apply_low_rank(LowRankConfig(ratio={"nothing_here": 0.3}), tiny_model("llama"),
                       StageContext(calibration=_windows()))


def test_sensitivity_allocation_in_the_stage_and_sequential_modes():
    model = tiny_model("qwen3")
    reference = copy.deepcopy(model)
    calib, held = _windows(), _windows(8, seed=1)
    uniform = copy.deepcopy(model)
    apply_low_rank(LowRankConfig(ratio=0.3, alignment=8), uniform, StageContext(calibration=calib))
    sens = copy.deepcopy(model)
    report = apply_low_rank(LowRankConfig(ratio=0.3, alignment=8, allocation="sensitivity", sequential=False), sens,
                            StageContext(calibration=calib))
    assert report.summary["parameters_removed_ratio"] >= 0.3 - 1e-9
    assert len({r["rank"] for r in report.layers}) > 1  # ranks differ between layers
    assert _kl(sens, reference, held) < _kl(uniform, reference, held)


def test_quantize_and_distill_work_through_the_factors():
    model = tiny_model("llama")
    teacher = copy.deepcopy(model)
    calib = _windows(24)
    apply_low_rank(LowRankConfig(ratio=0.3, alignment=32, include=(r"mlp\.",)), model,
                   StageContext(calibration=calib))
    names = list(low_rank_layers(model))
    assert names
    factor = model.get_submodule(names[0]).first.weight.clone()
    # random tokens carry no structure to learn from a few windows: enough of them that the held-out KL can fall
    cfg = DistillConfig(steps=20, lr=1e-3, batch_size=4, eval_every=10, holdout=4)
    report = apply_distill(cfg, model, StageContext(calibration=_windows(160, seed=5), teacher=teacher))
    assert report.summary["holdout_kl_after"] < report.summary["holdout_kl_before"]
    assert not torch.equal(model.get_submodule(names[0]).first.weight, factor)  # trained through the factors
    before = model(calib[:2]).logits
    apply_quantize(QuantizeConfig(method="gptq", bits=8, group_size=32), model, StageContext(calibration=calib))
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer.first, QuantLinear) and isinstance(layer.second, QuantLinear)
        assert layer.second.in_features == layer.rank
    assert torch.allclose(model(calib[:2]).logits, before, atol=0.5)  # 8 bits: close to the float factors
    with merged(model) as merged_names:
        assert set(merged_names) == set(names)
        assert not low_rank_layers(model)
        assert torch.allclose(model(calib[:2]).logits, before, atol=0.5)
    assert set(low_rank_layers(model)) == set(names)  # restored


def test_bad_low_rank_recipes_are_refused_before_any_work():
    base = {"model": "x", "calibration": {"source": "python-docs"}}
    cases = [
        ({"low_rank": {"ratio": 1.0}}, "must lie in \\(0, 1\\)"),
        ({"low_rank": {"ratio": 0.2, "rank": 64}}, "exactly one of ratio"),
        ({"low_rank": {}}, "exactly one of ratio"),
        ({"low_rank": {"ratio": {"mlp": 0.2}, "allocation": "sensitivity"}}, "single fraction"),
        ({"low_rank": {"ratio": {"(": 0.2}}}, "regular expression"),
        ({"low_rank": {"energy": 1.5}}, "energy"),
    ]
    for stage, message in cases:
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict({**base, "stages": [stage]})
    with pytest.raises(RecipeError, match="needs a `calibration` section"):
        Recipe.from_dict({"model": "x", "stages": [{"low_rank": {"ratio": 0.2}}]})
    Recipe.from_dict({"model": "x", "stages": [{"low_rank": {"ratio": 0.2, "method": "svd"}}]})  # data-free
    lr = {"low_rank": {"ratio": 0.2}}
    with pytest.raises(RecipeError, match="quantize method awq after a low_rank stage"):
        Recipe.from_dict({**base, "stages": [lr, {"quantize": {"method": "awq"}}]})
    with pytest.raises(RecipeError, match="prune_width after a low_rank stage"):
        Recipe.from_dict({**base, "stages": [lr, {"prune_width": {"mlp": 0.25}}]})
    with pytest.raises(RecipeError, match="low_rank comes after a quantize stage"):
        Recipe.from_dict({**base, "stages": [{"quantize": {}}, lr]})
    with pytest.raises(RecipeError, match="set low_rank: merge"):
        Recipe.from_dict({**base, "stages": [lr], "export": [{"gguf": {}}]})
    with pytest.raises(RecipeError, match="use format: dense"):
        Recipe.from_dict({**base, "stages": [lr], "export": [{"safetensors": {"format": "gptq",
                                                                              "low_rank": "merge"}}]})
    Recipe.from_dict({**base, "stages": [lr], "export": [{"gguf": {"low_rank": "merge"}}]})


def test_compress_run_low_rank_distill_quantize_and_every_export(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import run
    from export.safetensors import load_checkpoint

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("qwen2"), out, export=[
        {"safetensors": {"format": "gptq"}}, {"onnx": {"weights": "int4"}},
        {"gguf": {"type": "q8_0", "low_rank": "merge"}},
        {"safetensors": {"format": "dense", "low_rank": "merge", "dtype": "float32", "name": "merged"}}])
    recipe["calibration"]["samples"] = 24
    recipe["stages"] = [{"low_rank": {"ratio": {"mlp": 0.2}, "alignment": 32}},
                        {"distill": {"steps": 10, "lr": 1e-3, "eval_every": 5, "holdout": 4}},
                        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}]
    result = run(Recipe.from_dict(recipe))
    report = result.report
    low_rank = report["stages"][0]
    assert low_rank["kind"] == "low_rank" and low_rank["summary"]["factorized"] == 6  # gate/up/down in 2 blocks
    assert low_rank["summary"]["parameters_removed_ratio"] >= 0.2
    arts = {a["name"]: a for a in report["artifacts"]}
    for art in arts.values():
        assert art["accuracy"]["kl_divergence"] < 1.0, art["name"]
    # the GPTQ checkpoint keeps the factors; the merged one is an ordinary model
    model, _ = load_checkpoint(out / "safetensors")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, LowRankLinear) and isinstance(layer.first, QuantLinear) and layer.rank == 32
    from compressor.run import inspect_artifact

    assert len(inspect_artifact(out / "safetensors")["low_rank_layers"]) == 6
    assert inspect_artifact(out / "merged")["low_rank_layers"] == {}
    merged_model, _ = load_checkpoint(out / "merged")
    assert not low_rank_layers(merged_model)
    x = torch.randint(0, 384, (2, 32))
    assert torch.allclose(merged_model(x).logits, model(x).logits, atol=2e-2)
    assert arts["onnx"]["onnx"]["carried_codes"] > 0
    # the factor pairs are two smaller matrices in the ONNX and GPTQ files, not in the merged GGUF
    ppl = {n: a["accuracy"]["perplexity"] for n, a in arts.items()}
    assert abs(ppl["onnx"] / ppl["safetensors"] - 1) < 0.05, ppl


def test_bad_low_rank_stages_fail_before_calibration(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import RunError, run

    cases = [
        ([{"low_rank": {"ratio": 0.2, "alignment": 16}}, {"quantize": {"bits": 4, "group_size": 32}}],
         RunError, r"group_size 32: the ranks of stages\[0\].low_rank are multiples of 16"),
        ([{"low_rank": {"rank": 500}}], ShapeError, r"stages\[0\].low_rank.rank 500 exceeds"),
        ([{"low_rank": {"ratio": 0.1, "alignment": 64}}], ShapeError, r"stages\[0\].low_rank: .*nothing would be"),
    ]
    for stages, error, message in cases:
        recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run", export=[{"onnx": {}}])
        recipe["stages"] = stages
        with pytest.raises(error, match=message):
            run(Recipe.from_dict(recipe))
        assert not (tmp_path / "run").exists()
