"""Structured pruning: width (MLP channels, KV groups) and depth (whole blocks) give an ordinary smaller model that
transformers reloads and that llama.cpp and onnxruntime compute exactly as torch does; bad options fail early."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from compressor.algorithms.structured import aligned_keep, reconstruct
from compressor.recipe import PruneDepthConfig, PruneWidthConfig, Recipe
from compressor.stages.base import ShapeError, StageContext
from compressor.stages.structured import apply_prune_depth, apply_prune_width


def _windows(seed: int, n: int, seq: int = 64) -> torch.Tensor:
    return torch.randint(0, 384, (n, seq), generator=torch.Generator().manual_seed(seed))


def _kl(model, ref_logprobs, ids) -> float:
    with torch.no_grad():
        out = torch.log_softmax(model(ids).logits, -1)
    return float(torch.nn.functional.kl_div(out, ref_logprobs, log_target=True, reduction="sum")) / ids[:, :].numel()


def _same_after_reload(model, tmp_path, ids) -> bool:
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        return torch.allclose(again(ids).logits, model(ids).logits, atol=1e-5)


def test_aligned_widths_and_least_squares_refit():
    assert aligned_keep(1536, 0.25, 32) == 1152
    assert aligned_keep(128, 0.9, 32) == 32 and aligned_keep(128, 0.01, 32) == 96  # never none, never all
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 6, generator=g) @ torch.randn(6, 16, generator=g)  # inputs of rank 6 in 16 channels
    w = torch.randn(8, 16, generator=g)
    keep = torch.arange(10)
    refit = reconstruct(w, x.T @ x / len(x), keep, damp=1e-6)
    # the kept channels span the inputs, so the refit reproduces the projection's output exactly
    assert torch.allclose(x[:, keep] @ refit.T, x @ w.T, atol=1e-2 * float((x @ w.T).abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_width_pruning_gives_an_ordinary_smaller_model(family, tmp_path):
    ids = _windows(9, 4, 48)
    base = tiny_model(family)
    with torch.no_grad():
        ref = torch.log_softmax(base(ids).logits, -1)
    kl = {}
    for refit in (False, True):
        model = tiny_model(family)
        report = apply_prune_width(PruneWidthConfig(mlp=0.25, kv_groups=1, reconstruct=refit), model,
                                   StageContext(calibration=_windows(0, 32)))
        kl[refit] = _kl(model, ref, ids)
    cfg = model.config
    assert cfg.intermediate_size == 96 and cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 2
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == (96, 64) and block.mlp.down_proj.weight.shape == (64, 96)
        assert block.self_attn.k_proj.weight.shape == (16, 64) and block.self_attn.o_proj.weight.shape == (64, 32)
    rows = report.layers
    assert len(rows) == 2 * 2 and all(r["error_refit"] <= r["error_dropped"] for r in rows)
    assert report.summary["block_parameters_removed"] > 0.25
    assert kl[True] < kl[False], kl  # the least-squares refit recovers part of what removal lost
    assert _same_after_reload(model, tmp_path, ids)
    assert model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_depth_pruning_removes_the_least_influential_blocks(family, tmp_path):
    model = tiny_model(family, num_hidden_layers=4)
    types = list(getattr(model.config, "layer_types", None) or [])
    with torch.no_grad():
        # make block 1 a near no-op: its residual branches add almost nothing
        for name in ("o_proj",):
            getattr(model.model.layers[1].self_attn, name).weight.mul_(1e-3)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    report = apply_prune_depth(PruneDepthConfig(blocks=1), model, StageContext(calibration=_windows(0, 8)))
    assert report.summary["blocks_removed"] == [1]
    assert min(r["influence"] for r in report.layers) == report.layers[1]["influence"]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    if types:
        assert model.config.layer_types == [types[0], types[2], types[3]]
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1, 2]
    ids = _windows(3, 2, 40)
    assert _same_after_reload(model, tmp_path, ids)
    with torch.no_grad():  # the KV cache (indexed by layer_idx) gives the same logits as a full pass
        full = model(ids).logits[:, -1]
        past = model(ids[:, :-1], use_cache=True).past_key_values
        step = model(ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    assert torch.allclose(full, step, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_pruned_models_run_the_same_in_llama_cpp_and_onnxruntime(family, tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from transformers import AutoTokenizer

    from compressor.evaluate.llama_cpp_runtime import LlamaCppRuntime
    from compressor.evaluate.onnx_runtime import open_decoder
    from export.gguf import write_gguf
    from export.gguf_arch import ArchitectureError
    from export.onnx import OnnxOptions, write_onnx

    model = tiny_model(family, num_hidden_layers=4)
    calib = StageContext(calibration=_windows(0, 16))
    apply_prune_depth(PruneDepthConfig(blocks=1), model, calib)
    apply_prune_width(PruneWidthConfig(mlp=0.25, kv_groups=1), model, calib)
    ids = _windows(5, 2, 48)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family == "qwen2":  # llama.cpp's qwen2 loader wants heads x head_dim = hidden_size: said, not written
        with pytest.raises(ArchitectureError, match="attention heads were pruned"):
            write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
        assert not (tmp_path / "m.gguf").exists()
    else:
        write_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
        rt = LlamaCppRuntime("gguf", tmp_path / "m.gguf", n_ctx=64)
        try:
            got = rt.logits(ids)
        finally:
            rt.close()
        assert (got - ref).abs().max() / ref.abs().max() < 2e-3
    write_onnx(model, None, tmp_path / "onnx", OnnxOptions(weights="float32"))
    dec = open_decoder(tmp_path / "onnx")
    logits, _ = dec.step(ids.numpy(), dec.empty_cache(2), 0)
    assert np.abs(logits - ref.numpy()).max() < 1e-4 * max(1.0, float(ref.abs().max()))


def test_bad_structured_options_fail_before_calibration(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import RunError, run

    model = tiny_model("llama")
    with pytest.raises(ShapeError, match="kv_groups 2: the model has 2 KV groups per block; remove at most 1"):
        apply_prune_width(PruneWidthConfig(kv_groups=2), model, StageContext(calibration=_windows(0, 4)))
    with pytest.raises(ShapeError, match="alignment 128: the MLP width 128 cannot shrink"):
        apply_prune_width(PruneWidthConfig(mlp=0.5, alignment=128), model, StageContext(calibration=_windows(0, 4)))
    with pytest.raises(ShapeError, match="blocks 2: the model has 2 decoder blocks; remove at most 1"):
        apply_prune_depth(PruneDepthConfig(blocks=2), model, StageContext(calibration=_windows(0, 4)))
    cases = [
        ([{"prune_width": {"mlp": 0.25, "alignment": 16}}, {"quantize": {"bits": 4, "group_size": 64}}],
         RunError, "group_size 64: after width pruning the inputs of down_proj are 96 wide"),
        ([{"prune_depth": {"blocks": 3}}], ShapeError, r"stages\[0\].prune_depth.blocks 3"),
        ([{"prune_width": {"kv_groups": 1}}], RunError, r"export\[0\].gguf: .*attention heads were pruned"),
        # chained stages are checked against what the earlier ones leave
        ([{"prune_width": {"kv_groups": 1}}, {"prune_width": {"kv_groups": 1}}], ShapeError,
         r"stages\[1\].prune_width.kv_groups 1: the model has 1 KV groups per block \(after the earlier stages\)"),
        ([{"prune_depth": {"blocks": 1}}, {"prune_depth": {"blocks": 1}}], ShapeError,
         r"stages\[1\].prune_depth.blocks 1: the model has 1 decoder blocks \(after the earlier stages\)"),
        ([{"prune_width": {"mlp": 0.25, "alignment": 32}}, {"prune_width": {"mlp": 0.5, "alignment": 64}}],
         ShapeError, r"stages\[1\].prune_width.alignment 64: the MLP width 96 cannot shrink"),
    ]
    for stages, error, message in cases:
        recipe = tiny_recipe(model_dir_factory("qwen2"), tmp_path / "run", export=[{"gguf": {"type": "f16"}}])
        recipe["stages"] = stages
        with pytest.raises(error, match=message):
            run(Recipe.from_dict(recipe))
        assert not (tmp_path / "run").exists()


def test_compress_run_with_depth_and_width_pruning_then_gptq(model_dir_factory, tmp_path):
    pytest.importorskip("llama_cpp")
    from conftest import tiny_recipe

    from compressor.run import run
    from export.safetensors import load_checkpoint

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("llama"), out, export=[{"safetensors": {"format": "gptq"}},
                                                                  {"gguf": {"type": "q4_0"}},
                                                                  {"onnx": {"weights": "int4"}}])
    recipe["stages"][:0] = [{"prune_depth": {"blocks": 1}}, {"prune_width": {"mlp": 0.25, "kv_groups": 1}}]
    assert run(Recipe.from_dict(recipe)).passed
    report = json.loads((out / "report.json").read_text())
    kinds = [s["kind"] for s in report["stages"]]
    assert kinds == ["prune_depth", "prune_width", "quantize"]
    loaded, _ = load_checkpoint(out / "safetensors")
    assert loaded.config.num_hidden_layers == 1 and loaded.config.intermediate_size == 96
    arts = {a["name"]: a for a in report["artifacts"]}
    assert all(arts[k]["accuracy"]["kl_divergence"] > 0 for k in ("safetensors", "gguf", "onnx"))
    md = (out / "report.md").read_text()
    assert "## Stage: prune_width" in md and "error_refit" in md and "## Stage: prune_depth" in md
