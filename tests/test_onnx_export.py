"""ONNX export checked in onnxruntime itself: the graph computes what torch computes, calibrated codes arrive
unchanged, bad input is refused early, and `compress run` evaluates the export where it runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import FAMILIES, tiny_model, tiny_recipe

ort = pytest.importorskip("onnxruntime")

from compressor.evaluate.onnx_runtime import open_decoder  # noqa: E402
from compressor.quant.tensor import QuantLinear, quantize_rtn  # noqa: E402
from export.onnx import OnnxError, OnnxOptions, write_onnx  # noqa: E402
from export.onnx_weights import block_weights, dequantize_block_weights  # noqa: E402

EXACT = dict(lm_head="float", embedding="float", activations="float")


def _torch_logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits.numpy()


def _prefill_then_decode(folder, ids: torch.Tensor, prompt: int) -> np.ndarray:
    """Logits of every position: `prompt` tokens in one run from an empty cache, then one token per step."""
    dec = open_decoder(folder)
    logits, cache = dec.step(ids[:, :prompt].numpy(), dec.empty_cache(ids.shape[0]), 0)
    rows = [logits]
    for t in range(prompt, ids.shape[1]):
        logits, cache = dec.step(ids[:, t:t + 1].numpy(), cache, t)
        rows.append(logits)
    return np.concatenate(rows, axis=1)


def _quantize_linears(model: nn.Module, bits: int, group: int, symmetric: bool) -> nn.Module:
    for layer in model.model.layers:
        for name, mod in list(layer.named_modules()):
            if isinstance(mod, nn.Linear):
                parent, _, child = name.rpartition(".")
                qt = quantize_rtn(mod.weight.detach(), bits, group, symmetric)
                setattr(layer.get_submodule(parent), child, QuantLinear(qt, mod.bias))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_graph_matches_torch_in_prefill_and_decode(family, tmp_path):
    """Batch of 2, 24 prompt tokens then 16 single-token steps through the KV cache; Gemma 2/3 windows (16) are
    shorter than the sequence, so the sliding-window mask is exercised."""
    model = tiny_model(family)
    write_onnx(model, None, tmp_path, OnnxOptions(weights="float32"))
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = _torch_logits(model, ids)
    got = _prefill_then_decode(tmp_path, ids, 24)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_sliding_window_changes_the_result():
    """Guard for the test above: with a 16-token window, 40 tokens give other logits than full attention."""
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    local = _torch_logits(tiny_model("gemma2"), ids)
    full = _torch_logits(tiny_model("gemma2", sliding_window=512), ids)
    assert np.abs(local[0, -1] - full[0, -1]).max() > 1e-3


@pytest.mark.parametrize("family,bits,group,symmetric,weights", [
    ("llama", 4, 32, True, "int4"), ("qwen2", 4, 64, False, "int4"), ("qwen3", 3, 16, False, "int4"),
    ("gemma2", 8, 32, True, "int8"), ("mistral", 4, 32, True, "int8")])
def test_calibrated_codes_reach_onnxruntime_unchanged(family, bits, group, symmetric, weights, tmp_path):
    """A model whose linears hold codes computes in onnxruntime exactly what it computes in torch: the codes,
    scales and zero points went into MatMulNBits without re-rounding (3-bit codes in 4-bit blocks, 4-bit codes in
    8-bit blocks)."""
    model = _quantize_linears(tiny_model(family), bits, group, symmetric)
    summary = write_onnx(model, None, tmp_path, OnnxOptions(weights=weights, **EXACT))
    assert summary.carried_codes == 14 and summary.rounded_here == 0 and summary.requantized == []
    assert summary.operators["MatMulNBits"] == 2 * 4  # per layer: q/k/v in one call, o, gate/up in one call, down
    ids = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(2))
    ref = _torch_logits(model, ids)
    got = _prefill_then_decode(tmp_path, ids, 30)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_codes_that_do_not_fit_are_rounded_again_and_reported(tmp_path):
    model = _quantize_linears(tiny_model("llama"), 4, 24, True)  # 24 is not a MatMulNBits block size
    summary = write_onnx(model, None, tmp_path, OnnxOptions(weights="int4", **EXACT))
    assert len(summary.requantized) == 14 and summary.carried_codes == 0
    assert "model.layers.0.self_attn.q_proj" in summary.requantized


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_tied_quantized_table_is_stored_once_and_exact(bits, symmetric, tmp_path):
    """Embedding (GatherBlockQuantized) and output projection (MatMulNBits) of a tied model read one set of
    tensors, equal to rounding the table once in torch."""
    import onnx

    model = tiny_model("llama")
    ref_model = tiny_model("llama")
    table = model.model.embed_tokens.weight.detach()
    with torch.no_grad():
        ref_model.model.embed_tokens.weight.copy_(quantize_rtn(table, bits, 32, symmetric).dequantize())
    write_onnx(model, None, tmp_path, OnnxOptions(weights="float32", lm_head=f"int{bits}", embedding=f"int{bits}",
                                                  symmetric=symmetric, activations="float"))
    names = {i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    assert "lm_head.qweight" in names and not any(n.startswith("embed_tokens.q") for n in names)
    ids = torch.randint(0, 384, (1, 20), generator=torch.Generator().manual_seed(3))
    got = _prefill_then_decode(tmp_path, ids, 20)
    assert np.abs(got - _torch_logits(ref_model, ids)).max() < 1e-4


def test_tied_float_table_is_stored_once(tmp_path):
    model = tiny_model("qwen2")
    write_onnx(model, None, tmp_path, OnnxOptions(weights="float32"))
    table_bytes = model.model.embed_tokens.weight.numel() * 4
    body = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed_tokens" not in n)
    assert (tmp_path / "model.onnx").stat().st_size < table_bytes + body + 100_000


@pytest.mark.parametrize("bits,k", [(2, 96), (4, 100), (8, 70)])
def test_block_layout_round_trip(bits, k):
    """Packing order, padding of a last partial block and zero-point packing: the operator's view of the weights
    equals the QuantizedTensor's."""
    w = torch.randn(6, k)
    qt = quantize_rtn(w, bits, 32, symmetric=False)
    packed = block_weights(qt, bits)
    assert packed.packed.shape == (6, -(-k // 32), 32 * bits // 8)
    assert torch.equal(dequantize_block_weights(packed), qt.dequantize())
    sym = block_weights(quantize_rtn(w, bits, 32, symmetric=True), bits)
    assert sym.zero_points is None  # the operators' default zero point 2**(bits-1)


def test_float16_and_int8_activations_stay_close(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 384, (1, 30), generator=torch.Generator().manual_seed(4))
    ref = _torch_logits(model, ids)
    write_onnx(model, None, tmp_path / "f16", OnnxOptions(weights="float16"))
    got = _prefill_then_decode(tmp_path / "f16", ids, 20)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    q = _quantize_linears(tiny_model("llama"), 4, 32, True)
    write_onnx(q, None, tmp_path / "a8", OnnxOptions(weights="int4", lm_head="float", embedding="float",
                                                     activations="int8"))
    ref_q = _torch_logits(q, ids)
    got_q = _prefill_then_decode(tmp_path / "a8", ids, 20)
    assert (got_q.argmax(-1) == ref_q.argmax(-1)).mean() > 0.9


def test_external_data_file(tmp_path):
    model = tiny_model("llama")
    write_onnx(model, None, tmp_path, OnnxOptions(weights="float32", external_data=True))
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    ids = torch.randint(0, 384, (1, 12))
    assert np.abs(_prefill_then_decode(tmp_path, ids, 12) - _torch_logits(model, ids)).max() < 1e-4


def test_unsupported_architecture_and_missing_operator_are_clear(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(OnnxError, match="model_type 'gpt2'.*supported: gemma, gemma2"):
        write_onnx(gpt2, None, tmp_path / "a", OnnxOptions())
    assert not (tmp_path / "a").exists()

    from onnxruntime.capi import onnxruntime_pybind11_state as C

    schemas = [s for s in C.get_all_operator_schema() if s.name != "GroupQueryAttention"]
    monkeypatch.setattr(C, "get_all_operator_schema", lambda: schemas)
    with pytest.raises(OnnxError, match="lacks operator.*GroupQueryAttention.*upgrade"):
        write_onnx(tiny_model("llama"), None, tmp_path / "b", OnnxOptions())


def test_recipe_options_are_validated():
    from compressor.recipe import Recipe, RecipeError

    base = {"model": "x", "evaluate": None}
    with pytest.raises(RecipeError, match=r"export\[0\]\.onnx\.block_size: block_size must be a power of two"):
        Recipe.from_dict({**base, "export": [{"onnx": {"block_size": 24}}]})
    with pytest.raises(RecipeError, match=r"export\[0\]\.onnx\.weights"):
        Recipe.from_dict({**base, "export": [{"onnx": {"weights": "int3"}}]})
    with pytest.raises(RecipeError, match=r"export\[0\]\.onnx\.bits: unknown key; allowed keys: activations"):
        Recipe.from_dict({**base, "export": [{"onnx": {"bits": 4}}]})
    r = Recipe.from_dict({**base, "export": [{"onnx": {"weights": "int8"}}, {"onnx": {"name": "o2"}}]})
    assert [r.export_name(i) for i in range(2)] == ["onnx", "o2"]


def test_run_exports_onnx_and_checks_it_in_onnxruntime(model_dir_factory, tmp_path, monkeypatch):
    """`compress run` with ONNX targets: GPTQ codes in MatMulNBits, accuracy from onnxruntime on the same windows,
    the float export reproduces torch's greedy text; `inspect` and `eval` read the folder; a failing export
    leaves no folder behind."""
    from compressor.recipe import Recipe
    from compressor.run import evaluate_artifact, inspect_artifact, run

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("qwen3"), out, export=[
        {"onnx": {"weights": "int4", "activations": "float", "lm_head": "float", "embedding": "float"}},
        {"onnx": {"weights": "float32", "name": "onnx-fp32"}},
        {"safetensors": {"format": "dense", "dtype": "float32"}}])
    recipe["stages"][0]["quantize"]["group_size"] = 16
    result = run(Recipe.from_dict(recipe))
    report = json.loads((out / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    q = arts["onnx"]
    assert result.passed and q["format"] == "onnx-int4" and q["runtime"] == "onnxruntime"
    assert q["onnx"]["carried_codes"] == 14 and q["onnx"]["requantized"] == []
    torch_kl = arts["safetensors-dense"]["accuracy"]["kl_divergence"]
    for name in ("onnx", "onnx-fp32"):  # same weights as the dense checkpoint, so the same scores
        assert abs(arts[name]["accuracy"]["kl_divergence"] - torch_kl) < 0.01 * torch_kl + 1e-4
        assert arts[name]["generation_check"]["identical"], arts[name]["generation_check"]
    assert q["size"]["weights_bytes"] < arts["onnx-fp32"]["size"]["weights_bytes"] / 2
    info = inspect_artifact(out / "onnx")
    assert info["format"] == "onnx-int4" and info["matmul_nbits"] == {"int4 block 16 accuracy_level 1": 8}
    again = evaluate_artifact(out / "onnx-fp32")
    assert again["artifacts"][0]["runtime"] == "onnxruntime"
    assert abs(again["artifacts"][0]["accuracy"]["kl_divergence"] - torch_kl) < 0.01 * torch_kl + 1e-4

    import export.onnx as onnx_export

    def broken(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export._DecoderGraph, "build", broken)
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run2", stages=[], calibration=None,
                         export=[{"onnx": {"weights": "int8"}}], evaluate=None)
    with pytest.raises(RuntimeError, match="disk full"):
        run(Recipe.from_dict(recipe))
    assert not (tmp_path / "run2").exists() and list(tmp_path.iterdir()) == [out]


def test_existing_folder_is_not_overwritten_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import export.onnx as onnx_export

    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("user data")
    with pytest.raises(OnnxError, match="exists and is not empty"):
        write_onnx(tiny_model("llama"), None, target, OnnxOptions())
    assert (target / "mine.txt").read_text() == "user data"

    def broken(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export._DecoderGraph, "build", broken)
    with pytest.raises(KeyboardInterrupt):
        write_onnx(tiny_model("llama"), None, tmp_path / "new", OnnxOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_genai_config_describes_the_graph(tmp_path):
    """onnxruntime-genai reads genai_config.json to drive the export; its names and shapes must be the graph's."""
    import onnx

    write_onnx(tiny_model("qwen2"), None, tmp_path, OnnxOptions(weights="int8"))
    cfg = json.loads((tmp_path / "genai_config.json").read_text())["model"]
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    inputs = {i.name: i for i in graph.input}
    dec = cfg["decoder"]
    assert dec["inputs"]["past_key_names"] % 1 in inputs and dec["outputs"]["present_value_names"] % 1 in {
        o.name for o in graph.output}
    cache = [d.dim_value for d in inputs["past_key_values.0.key"].type.tensor_type.shape.dim]
    assert cache[1] == dec["num_key_value_heads"] and cache[3] == dec["head_size"]
    assert cfg["type"] == "qwen2" and cfg["vocab_size"] == 384


def test_speed_is_measured_in_onnxruntime_in_a_fresh_process(tmp_path):
    from compressor.evaluate import speed
    from compressor.recipe import SpeedConfig

    write_onnx(tiny_model("gemma2"), None, tmp_path, OnnxOptions(weights="int4"))
    cfg = SpeedConfig(prompt_tokens=8, decode_tokens=4, prefill_tokens=16, repeats=1, threads=1)
    result = speed.measure("onnx", str(tmp_path), cfg)
    assert result["device"] == "cpu (onnxruntime)" and result["threads"] == 1
    assert result["decode_ms_per_token"] > 0 and result["prefill_tokens_per_second"] > 0
    assert result["peak_rss_mb"] >= result["rss_after_load_mb"] > 0


def test_cuda_execution_provider_is_used_when_present(monkeypatch, caplog):
    """No GPU here: onnxruntime's provider list is mocked to say whether CUDA is available."""
    from compressor.evaluate.onnx_runtime import providers

    assert providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with caplog.at_level("WARNING"):
        assert providers("cuda") == ["CPUExecutionProvider"]
    assert "onnxruntime-gpu" in caplog.text


def test_stacked_layouts_keep_each_matrix_and_its_zero_points():
    """q/k/v or gate/up go into one operator call: a symmetric matrix (default zero point) stacked with an
    asymmetric one (own zero points) dequantizes to both matrices, in order."""
    from export.onnx_weights import concat_rows

    w1, w2 = torch.randn(6, 64), torch.randn(10, 64)
    a = block_weights(quantize_rtn(w1, 4, 32, symmetric=True), 4)
    b = block_weights(quantize_rtn(w2, 4, 32, symmetric=False), 4)
    assert a.zero_points is None and b.zero_points is not None
    both = concat_rows([a, b])
    expected = torch.cat([quantize_rtn(w1, 4, 32, True).dequantize(), quantize_rtn(w2, 4, 32, False).dequantize()])
    assert torch.equal(dequantize_block_weights(both), expected)
    assert concat_rows([a, block_weights(quantize_rtn(w2, 8, 32, True), 8)]) is None
