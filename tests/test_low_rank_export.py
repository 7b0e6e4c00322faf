"""Factorized (low-rank) layers through every exporter: safetensors keeps the two factors and its loader rebuilds
them, ONNX runs them as two linears in a row, GGUF refuses them unless they are merged first."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compressor.low_rank import LOW_RANK_KEY, LowRankLinear, low_rank_layers, merged
from compressor.quant.tensor import QuantLinear, quantize_rtn
from compressor.stages.base import set_submodule
from conftest import tiny_model
from export.safetensors import CheckpointError, load_checkpoint, write_dense, write_gptq

RANK = 32  # a multiple of the group size 32, so the second factor quantizes in whole groups
# q_proj stops the q/k/v fusion of layer 0, gate_proj the gate/up fusion of layer 1; down_proj has 128 inputs.
FACTORIZED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.gate_proj")


def _factorize(model: nn.Module, names: tuple[str, ...] = FACTORIZED, rank: int = RANK) -> nn.Module:
    """Each named linear replaced by its rank-`rank` truncated SVD (bias on the second factor)."""
    for name in names:
        layer = model.get_submodule(name)
        u, s, vh = torch.linalg.svd(layer.weight.detach().float(), full_matrices=False)
        bias = layer.bias.detach() if layer.bias is not None else None
        set_submodule(model, name, LowRankLinear.from_factors(s[:rank, None] * vh[:rank], u[:, :rank], bias))
    return model


def _with_biases(model: nn.Module) -> nn.Module:
    """Nonzero biases (random init leaves them 0), on the float16 grid that the GPTQ format stores them in."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.bias"):
                p.copy_(torch.randn_like(p).mul(0.1).half().float())
    return model


def _quantize_all(model: nn.Module, symmetric: bool = True, under: tuple[str, ...] = ("model.layers.",)
                  ) -> nn.Module:
    """Every nn.Linear whose name starts with one of `under` (factors included) rounded to nearest, 4 bits in
    groups of 32."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.startswith(under):
            qt = quantize_rtn(mod.weight.detach(), 4, 32, symmetric)
            set_submodule(model, name, QuantLinear(qt, mod.bias))
    return model


def _ids(n: int = 2, seq: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("family,names", [("llama", FACTORIZED + ("lm_head",)), ("qwen2", FACTORIZED)])
def test_dense_factors_round_trip(family, names, tmp_path):
    """Plain factors stored as <name>.first/.second, ranks in config.json, rebuilt by the loader (qwen2: q_proj's
    bias on the second factor; llama: a factorized head of a model whose embeddings were tied)."""
    model = _factorize(_with_biases(tiny_model(family)), names)
    write_dense(model, None, tmp_path / "c", dtype="float32")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config[LOW_RANK_KEY] == {"layers": {n: RANK for n in names}}
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.first.weight"].shape == (RANK, 64) and tensors[f"{q}.second.weight"].shape == (64, RANK)
    assert f"{q}.weight" not in tensors and (f"{q}.second.bias" in tensors) == (family == "qwen2")

    loaded, _ = load_checkpoint(tmp_path / "c")
    assert sorted(low_rank_layers(loaded)) == sorted(names)
    assert not hasattr(loaded.config, LOW_RANK_KEY)  # the layers themselves say it; _write records them again
    ids = _ids()
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


def test_gptq_quantized_factors_round_trip(tmp_path):
    """Quantized factors in the GPTQ layout (<name>.first.qweight, ...) next to ordinary quantized layers."""
    model = _quantize_all(_factorize(_with_biases(tiny_model("qwen2"))))
    write_gptq(model, None, tmp_path / "c", dtype="float32")
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    down = "model.layers.0.mlp.down_proj"
    assert tensors[f"{down}.first.qweight"].shape == (128 * 4 // 32, RANK)
    assert tensors[f"{down}.second.qweight"].shape == (RANK * 4 // 32, 64)
    assert "model.layers.0.self_attn.q_proj.second.bias" in tensors

    loaded, _ = load_checkpoint(tmp_path / "c")
    assert sorted(low_rank_layers(loaded)) == sorted(FACTORIZED)
    expected = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(got) == sorted(expected) and f"{down}.first" in got
    for name, m in expected.items():
        assert torch.equal(got[name].qweight.dequantize(), m.qweight.dequantize()), name
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_dense_export_dequantizes_quantized_factors(tmp_path):
    model = _quantize_all(_factorize(tiny_model("llama")))
    write_dense(model, None, tmp_path / "d", dtype="float32")
    tensors = load_file(tmp_path / "d" / "model.safetensors")
    first = model.get_submodule("model.layers.1.mlp.gate_proj.first")
    assert torch.equal(tensors["model.layers.1.mlp.gate_proj.first.weight"], first.qweight.dequantize())
    loaded, _ = load_checkpoint(tmp_path / "d")
    assert not any(isinstance(m, QuantLinear) for m in loaded.modules())
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.gate_proj").first, nn.Linear)
    ids = _ids()
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-5)


def test_config_entry_follows_the_model_not_its_config(tmp_path):
    """A LOW_RANK_KEY left in model.config (e.g. by another loader) is dropped when the model has no factorized
    layer, and replaced by the model's own ranks when it has."""
    plain = tiny_model("llama")
    setattr(plain.config, LOW_RANK_KEY, {"layers": {"model.layers.0.mlp.up_proj": 8}})
    write_dense(plain, None, tmp_path / "plain", dtype="float32")
    assert LOW_RANK_KEY not in json.loads((tmp_path / "plain" / "config.json").read_text())
    load_checkpoint(tmp_path / "plain")  # and it loads as the dense model it is

    factored = _factorize(tiny_model("llama"), FACTORIZED[:1], rank=16)
    setattr(factored.config, LOW_RANK_KEY, {"layers": {"model.layers.0.mlp.up_proj": 8}})
    write_dense(factored, None, tmp_path / "lr", dtype="float32")
    entry = json.loads((tmp_path / "lr" / "config.json").read_text())[LOW_RANK_KEY]
    assert entry == {"layers": {FACTORIZED[0]: 16}}


@pytest.mark.parametrize("entry,message", [
    ({"layers": {"model.layers.0.mlp.nothing": 8}}, "names 'model.layers.0.mlp.nothing', which the model does not"),
    ({"layers": {"model.layers.0.mlp.up_proj": "8"}}, "expected a linear layer and a positive integer rank"),
    ([8], "must hold"),
])
def test_bad_low_rank_entry_is_a_checkpoint_error_naming_the_file(entry, message, tmp_path):
    write_dense(_factorize(tiny_model("llama")), None, tmp_path / "c", dtype="float32")
    path = tmp_path / "c" / "config.json"
    config = json.loads(path.read_text())
    config[LOW_RANK_KEY] = entry
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path / "c")
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------------- ONNX
@pytest.fixture(scope="module")
def onnx_helpers():
    pytest.importorskip("onnxruntime")
    import test_onnx_export

    return test_onnx_export


@pytest.mark.parametrize("family,names", [("llama", FACTORIZED + ("lm_head",)), ("qwen2", FACTORIZED)])
def test_onnx_float32_runs_factors_as_two_linears(family, names, onnx_helpers, tmp_path):
    import onnx

    from export.onnx import OnnxOptions, write_onnx

    model = _factorize(_with_biases(tiny_model(family)), names)
    summary = write_onnx(model, None, tmp_path, OnnxOptions(weights="float32"))
    assert summary.float_layers == 15 + len(names)  # 14 decoder linears and the head, one more per factorized one
    weights = {i.name for i in onnx.load(str(tmp_path / "model.onnx")).graph.initializer}
    q = "model.layers.0.self_attn"
    assert {f"{q}.q_proj.first.weight", f"{q}.q_proj.second.weight", f"{q}.k_proj.weight"} <= weights
    assert (f"{q}.q_proj.second.bias" in weights) == (family == "qwen2")
    # no fusion across a factorized layer; the layers next to it still fuse
    assert f"{q}.qkv_proj.weight" not in weights and "model.layers.1.self_attn.qkv_proj.weight" in weights
    assert "model.layers.0.mlp.gate_up_proj.weight" in weights
    assert "model.layers.1.mlp.gate_up_proj.weight" not in weights
    ids = _ids(2, 40, seed=1)
    ref = onnx_helpers._torch_logits(model, ids)
    got = onnx_helpers._prefill_then_decode(tmp_path, ids, 24)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("weights,bits", [("int4", 4), ("int8", 8)])
def test_onnx_quantized_factors_carry_their_codes(weights, bits, onnx_helpers, tmp_path):
    """Calibrated codes of the factors reach MatMulNBits unchanged, like those of any other layer."""
    from export.onnx import OnnxOptions, write_onnx

    model = _quantize_all(_factorize(_with_biases(tiny_model("qwen2"))))
    summary = write_onnx(model, None, tmp_path, OnnxOptions(weights=weights, **onnx_helpers.EXACT))
    assert summary.carried_codes == 14 + 3 and summary.rounded_here == 0 and summary.requantized == []
    # layer 0: q (2) k v o gate_up down (2) = 8; layer 1: qkv o gate (2) up down = 6
    assert summary.operators["MatMulNBits"] == 14
    ids = _ids(1, 33, seed=2)
    ref = onnx_helpers._torch_logits(model, ids)
    got = onnx_helpers._prefill_then_decode(tmp_path, ids, 30)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_onnx_int4_rounds_float_factors_here(onnx_helpers, tmp_path):
    """Float factors (a factorized head's too) are rounded on the export's block grid, each on its own: the graph
    computes what the model with every factor rounded to nearest computes in torch."""
    import copy

    from export.onnx import OnnxOptions, write_onnx

    model = _factorize(tiny_model("llama"), FACTORIZED + ("lm_head",))
    reference = _quantize_all(copy.deepcopy(model), symmetric=False, under=("model.layers.", "lm_head."))
    summary = write_onnx(model, None, tmp_path, OnnxOptions(weights="int4", lm_head="int4", embedding="float",
                                                            activations="float"))
    assert summary.rounded_here == 14 + 3 + 2 and summary.carried_codes == 0
    assert summary.operators["MatMulNBits"] == 14 + 2  # the factorized head is two operators too
    ids = _ids(1, 24, seed=3)
    got = onnx_helpers._prefill_then_decode(tmp_path, ids, 20)
    ref = onnx_helpers._torch_logits(reference, ids)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


# ------------------------------------------------------------------------------------------------- GGUF
def test_gguf_refuses_factorized_layers_and_writes_them_merged(tokenizer_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from export.gguf import GGUFError, TypePlan, check_model, write_gguf
    from test_gguf_export import _llama_logits

    model = _factorize(tiny_model("llama"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(GGUFError, match="no factorized layers.*low_rank: merge"):
        check_model(model, TypePlan.of("q4_0"), "export[0].gguf")
    with pytest.raises(GGUFError, match="no factorized layers.*low_rank: merge"):
        write_gguf(model, tokenizer, tmp_path / "refused.gguf", "f32")
    assert not (tmp_path / "refused.gguf").exists()
    check_model(model, TypePlan.of("q4_0"), low_rank="merge")  # checked as the dense layers it will write

    path = tmp_path / "m.gguf"
    with merged(model):
        write_gguf(model, tokenizer, path, "f32")
    assert sorted(low_rank_layers(model)) == sorted(FACTORIZED)  # restored after the export
    ids = _ids(2, 48)
    ours = _llama_logits(path, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    assert (ours - ref).abs().max() / ref.abs().max() < 2e-3
