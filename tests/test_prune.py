"""Unstructured and N:M pruning: masks, the three methods' ordering, the stage on real architectures, zeros kept by
a later quantization and by the exporters, recipe checks, and a whole run."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from compressor.algorithms.sparsegpt import sparsegpt_prune
from compressor.algorithms.sparsity import magnitude_scores, n_m_mask, outlier_ratio, owl_sparsities, sparsity_of, \
    unstructured_mask, wanda_scores
from compressor.quant.tensor import QuantLinear
from compressor.recipe import PruneConfig, QuantizeConfig, Recipe, RecipeError
from compressor.stages.base import ShapeError, StageContext
from compressor.stages.prune import apply_prune
from compressor.stages.quantize import apply_quantize


def _windows(seed: int, n: int, seq: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 384, (n, seq), generator=g)


def _layer_problem(seed: int = 0):
    """A layer whose inputs have channels of very different scale and correlated directions, as LLM activations do."""
    g = torch.Generator().manual_seed(seed)
    in_f, n = 128, 2048
    scale = torch.exp(torch.randn(in_f, generator=g))
    mix = torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)
    x = (torch.randn(n, in_f, generator=g) @ mix) * scale
    w = torch.randn(64, in_f, generator=g)
    return w, x


def test_masks_remove_exactly_the_lowest_scores():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    row = unstructured_mask(scores, 0.25, per_row=True)
    assert (row.sum(dim=1) == 4).all()
    assert (scores[row].reshape(8, 4).max(dim=1).values <= scores.masked_fill(row, 2).min(dim=1).values).all()
    layer = unstructured_mask(scores, 0.5, per_row=False)
    assert int(layer.sum()) == 64 and scores[layer].max() <= scores[~layer].min()
    nm = n_m_mask(scores, 2, 4)
    assert (nm.reshape(8, 4, 4).sum(dim=2) == 2).all()
    assert not unstructured_mask(scores, 0.0, per_row=True).any()
    with pytest.raises(ValueError, match="multiple of M=3"):
        n_m_mask(scores, 1, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        unstructured_mask(scores, 1.0, per_row=False)


@pytest.mark.parametrize("n_m", [None, (2, 4), (4, 8)])
def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error(n_m):
    w, x = _layer_problem()
    hessian = 2 * x.T @ x / x.shape[0]

    def output_error(pruned: torch.Tensor) -> float:
        return float(((x @ (w - pruned).T) ** 2).mean())

    sq = x.square().sum(dim=0)
    if n_m is None:
        magnitude = unstructured_mask(magnitude_scores(w), 0.5, per_row=False)
        wanda = unstructured_mask(wanda_scores(w, sq), 0.5, per_row=True)
    else:
        magnitude = n_m_mask(magnitude_scores(w), *n_m)
        wanda = n_m_mask(wanda_scores(w, sq), *n_m)
    res = sparsegpt_prune(w, hessian, 0.5, n_m)
    assert sparsity_of(res.weight) == pytest.approx(0.5, abs=1e-3)
    if n_m is not None:
        zeros = (res.weight == 0).reshape(64, -1, n_m[1]).sum(dim=2)
        assert (zeros >= n_m[0]).all()
    errs = [output_error(w.masked_fill(magnitude, 0)), output_error(w.masked_fill(wanda, 0)),
            output_error(res.weight)]
    assert errs[2] < errs[1] < errs[0], errs
    # the loss SparseGPT reports is the error it causes, ½ Σ_rows dW H dWᵀ (exactly so without dampening)
    exact = sparsegpt_prune(w, hessian, 0.5, n_m, damp=1e-6)
    dw = w - exact.weight
    assert exact.loss == pytest.approx(float(torch.einsum("oi,ij,oj->", dw, hessian, dw)) / 2, rel=1e-3)


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    w, x = _layer_problem(2)
    res = sparsegpt_prune(w, 2 * x.T @ x / x.shape[0], 0.0)
    assert torch.equal(res.weight, w) and res.loss == 0


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_stage_prunes_every_layer_and_calibrated_methods_lose_less(family):
    """Each method reaches the sparsity in every chosen layer; on the model's own output, SparseGPT loses less than
    magnitude pruning (the full ordering is a benchmark figure: tiny random models are too noisy for it)."""
    ids = _windows(9, 8, 48)
    base = tiny_model(family)
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits, -1)
    kl = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model(family)
        cfg = PruneConfig(method=method, sparsity=0.5, exclude=("o_proj",))
        report = apply_prune(cfg, model, StageContext(calibration=_windows(0, 32, 64), batch_size=8))
        assert len(report.layers) == 2 * 6
        assert all(not r["name"].endswith("o_proj") and r["sparsity"] == pytest.approx(0.5, abs=0.01)
                   for r in report.layers)
        assert report.summary["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert sparsity_of(model.model.layers[0].self_attn.o_proj.weight) == 0
        with torch.no_grad():
            out = torch.log_softmax(model(ids).logits, -1)
        kl[method] = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))
    assert kl["sparsegpt"] < kl["magnitude"], kl


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_after_pruning_keeps_the_zeros(symmetric):
    model = tiny_model("llama")
    calib = _windows(0, 16, 48)
    apply_prune(PruneConfig(method="sparsegpt", pattern="2:4"), model, StageContext(calibration=calib))
    pruned = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    apply_quantize(QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=symmetric, act_order=True), model,
                   StageContext(calibration=calib))
    for name, zero in pruned.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear)
        w = layer.weight
        assert (w[zero] == 0).all(), name
        assert (w[~zero] != 0).float().mean() > 0.9  # the kept weights were not all rounded to zero


def test_pruned_and_quantized_zeros_survive_every_export(tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    from export.gguf import write_gguf
    from export.safetensors import load_checkpoint, write_gptq

    model = tiny_model("llama")
    calib = _windows(0, 16, 48)
    apply_prune(PruneConfig(method="wanda", pattern="2:4"), model, StageContext(calibration=calib))
    apply_quantize(QuantizeConfig(method="gptq", bits=4, group_size=32), model, StageContext(calibration=calib))
    down = model.model.layers[1].mlp.down_proj.weight
    zero = down == 0
    assert zero.float().mean() >= 0.5
    write_gptq(model, None, tmp_path / "st", dtype="float32")
    loaded, _ = load_checkpoint(tmp_path / "st")
    assert (loaded.model.layers[1].mlp.down_proj.weight[zero] == 0).all()
    write_gguf(model, AutoTokenizer.from_pretrained(tokenizer_dir), tmp_path / "m.gguf", "q4_0")
    t = next(t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == "blk.1.ffn_down.weight")
    w = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(down.shape).copy())
    assert (w[zero] == 0).all()


def test_bad_prune_options_are_refused_early(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import run

    for bad, message in (({"sparsity": 1.0}, "less than 1"), ({"pattern": "4:2"}, "0 < N < M"),
                         ({}, "exactly one of sparsity"), ({"sparsity": 0.5, "method": "obs"}, "magnitude")):
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict({"model": "x", "calibration": {}, "stages": [{"prune": bad}]})
    with pytest.raises(RecipeError, match="needs a `calibration` section"):
        Recipe.from_dict({"model": "x", "stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]})
    with pytest.raises(RecipeError, match=r"stages\[1\].prune comes after a quantize stage"):
        Recipe.from_dict({"model": "x", "calibration": {}, "stages": [{"quantize": {}},
                                                                     {"prune": {"sparsity": 0.5}}]})
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run", export=[])
    recipe["stages"] = [{"prune": {"method": "sparsegpt", "pattern": "3:5"}}]
    with pytest.raises(ShapeError, match=r"stages\[0\].prune.pattern 3:5: in_features must be a multiple of 5"):
        run(Recipe.from_dict(recipe))
    assert not (tmp_path / "run").exists()


def test_compress_run_prunes_then_quantizes_and_reports_sparsity(model_dir_factory, tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import tiny_recipe

    from compressor.run import run

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("qwen2"), out, export=[
        {"safetensors": {"format": "gptq"}}, {"gguf": {"type": "q4_0"}}, {"onnx": {"weights": "int4"}}])
    recipe["stages"].insert(0, {"prune": {"method": "sparsegpt", "sparsity": 0.5}})
    result = run(Recipe.from_dict(recipe))
    assert result.passed
    report = json.loads((out / "report.json").read_text())
    prune, quant = report["stages"]
    assert prune["kind"] == "prune" and quant["kind"] == "quantize"
    assert prune["summary"]["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.02) for r in prune["layers"])
    arts = {a["name"]: a for a in report["artifacts"]}
    assert set(arts) == {"safetensors", "gguf", "onnx"}
    assert all(a["accuracy"]["kl_divergence"] > 0 for a in arts.values())
    from export.safetensors import load_checkpoint

    loaded, _ = load_checkpoint(out / "safetensors")
    assert all(sparsity_of(loaded.get_submodule(r["name"]).weight) >= r["sparsity"] for r in prune["layers"])
    md = (out / "report.md").read_text()
    assert "## Stage: prune" in md and "| sparsity |" in md


def test_owl_gives_blocks_with_more_outliers_a_lower_sparsity():
    s = owl_sparsities([0.01, 0.03, 0.02, 0.05], target=0.6, lam=0.1)
    assert sum(s) / 4 == pytest.approx(0.6) and max(s) - min(s) == pytest.approx(0.2)
    assert s.index(min(s)) == 3 and s.index(max(s)) == 0
    assert owl_sparsities([0.02, 0.02], 0.5, 0.1) == [0.5, 0.5]
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 9.0])], 2.0) == 0.25

    model = tiny_model("llama", num_hidden_layers=3)
    with torch.no_grad():  # a few input channels of block 1 carry huge activations, as LLM outlier features do
        model.model.layers[1].input_layernorm.weight[:3] = 40.0
        model.model.layers[1].post_attention_layernorm.weight[:3] = 40.0
    cfg = PruneConfig(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1)
    report = apply_prune(cfg, model, StageContext(calibration=_windows(0, 16, 48)))
    owl = report.summary["owl"]
    assert owl["outlier_ratio"][1] == max(owl["outlier_ratio"].values())
    per_block = owl["block_sparsity"]
    assert per_block[1] == min(per_block.values()) and sum(per_block.values()) / 3 == pytest.approx(0.5, abs=1e-3)
    assert report.summary["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    rows = {r["name"]: r["sparsity"] for r in report.layers}
    assert rows["model.layers.1.mlp.down_proj"] == pytest.approx(per_block[1], abs=0.01)
    with pytest.raises(ValueError, match="N:M pattern is the same everywhere"):
        PruneConfig(method="wanda", pattern="2:4", allocation="owl")
