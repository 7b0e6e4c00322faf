"""GPTQ-format and dense safetensors checkpoints: exact round trips on tiny models of several families."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.quant.tensor import QuantLinear
from compressor.recipe import QuantizeConfig, QuantizeStage
from compressor.stages import StageContext, apply_stage
from compressor.stages.quantize import ShapeError, check_shapes, select_linears
from conftest import FAMILIES, tiny_model
from export.safetensors import CheckpointError, load_checkpoint, write_dense, write_gptq


def _quantized(family, method="gptq", **q):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (4, 48))
    cfg = QuantizeConfig(method=method, **{"bits": 4, "group_size": 32, **q})
    apply_stage(QuantizeStage(quantize=cfg), model, StageContext(calibration=ids, batch_size=2))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_roundtrip_is_exact(family, tmp_path):
    model = _quantized(family, act_order=True)
    # GPTQ keeps a layer's dequantized weight only while its block is calibrated, not in the quantized model
    assert not any("dense" in m._buffers for m in model.modules() if isinstance(m, QuantLinear))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    write_gptq(model, None, tmp_path / "ckpt", dtype="float32")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("bits,sym,group", [(2, False, 32), (3, True, 64), (3, False, -1), (8, True, -1)])
def test_gptq_roundtrip_bits_and_groups(bits, sym, group, tmp_path):
    model = _quantized("llama", bits=bits, symmetric=sym, group_size=group, lm_head=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    write_gptq(model, None, tmp_path / "c", dtype="float32")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "gptq" and q["bits"] == bits and q["sym"] == sym and q["group_size"] == group
    assert q["checkpoint_format"] == "gptq" and q["desc_act"] is False and q["lm_head"] is True
    assert config["tie_word_embeddings"] is False  # a quantized head cannot share the embedding
    loaded, _ = load_checkpoint(tmp_path / "c")
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_gptq_tensors_follow_the_format(tmp_path):
    model = _quantized("llama", method="rtn", bits=4, symmetric=True)
    write_gptq(model, None, tmp_path / "c")
    t = load_file(tmp_path / "c" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # in 128, out 64
    assert t[f"{name}.qweight"].dtype == torch.int32 and t[f"{name}.qweight"].shape == (128 * 4 // 32, 64)
    assert t[f"{name}.qzeros"].shape == (128 // 32, 64 * 4 // 32)
    assert t[f"{name}.scales"].dtype == torch.float16 and t[f"{name}.scales"].shape == (4, 64)
    assert torch.equal(t[f"{name}.g_idx"], (torch.arange(128) // 32).to(torch.int32))
    # symmetric 4-bit: zero point 8 stored as 7 in every nibble (v1 format)
    assert (t[f"{name}.qzeros"] == 0x77777777).all()
    assert t["model.norm.weight"].dtype == torch.float16  # non-quantized tensors in the export dtype
    assert "lm_head.weight" not in t  # tied to the embedding, stored once


def test_fp16_export_stays_close(tmp_path):
    model = _quantized("qwen2", act_order=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    write_gptq(model, None, tmp_path / "c", dtype="float16")
    loaded, _ = load_checkpoint(tmp_path / "c")
    ref = _logits(model, ids)
    assert torch.allclose(_logits(loaded, ids), ref, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_dense_export_loads_in_plain_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _quantized(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    write_dense(model, None, tmp_path / "d", dtype="float32")
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert torch.allclose(_logits(plain, ids), _logits(model, ids), atol=1e-5)


def test_loader_reads_act_order_checkpoints_with_permuted_groups(tmp_path):
    """GPTQ checkpoints written with desc_act (by other tools) carry a non-trivial g_idx."""
    model = _quantized("llama", method="rtn")
    write_gptq(model, None, tmp_path / "c", dtype="float32")
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    module = model.get_submodule(name)
    perm = torch.randperm(64)
    # Shuffle the group assignment: the same weights, now described through g_idx.
    qt = module.qweight
    g_idx = perm % 2
    codes = torch.zeros_like(qt.codes)
    dense = qt.dequantize()
    scales = qt.scales.float()
    zeros = qt.zeros.float()
    for col in range(64):
        g = g_idx[col]
        codes[:, col] = torch.clamp(torch.round(dense[:, col] / scales[:, g]) + zeros[:, g], 0, 15).to(torch.uint8)
    from compressor.quant.packing import pack

    tensors[f"{name}.qweight"] = pack(codes.t(), 4, 0)
    tensors[f"{name}.g_idx"] = g_idx.to(torch.int32)
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"))
    loaded, _ = load_checkpoint(tmp_path / "c")
    got = loaded.get_submodule(name).qweight
    assert got.g_idx is not None
    expect = torch.stack([(codes[:, c].float() - zeros[:, g_idx[c]]) * scales[:, g_idx[c]] for c in range(64)], 1)
    assert torch.allclose(got.dequantize(), expect)


def test_shape_checks_run_before_any_work():
    model = tiny_model("llama")
    cfg = QuantizeConfig(method="rtn", group_size=48)
    with pytest.raises(ShapeError, match="not a multiple of group_size 48.*group sizes that fit: 32, 64"):
        check_shapes(select_linears(model, cfg), cfg, packed_export=True)
    cfg = QuantizeConfig(method="rtn", include=("nothing-matches",))
    with pytest.raises(ShapeError, match="no linear layer matches"):
        select_linears(model, cfg)


def test_include_exclude_select_layers():
    model = tiny_model("llama")
    cfg = QuantizeConfig(method="rtn", exclude=(r"\.mlp\.",), include=(r"layers\.1\.",))
    assert sorted(select_linears(model, cfg)) == [f"model.layers.1.self_attn.{p}_proj" for p in "koqv"]


def test_broken_checkpoints_give_clear_errors(tmp_path):
    model = _quantized("llama", method="rtn")
    write_gptq(model, None, tmp_path / "c")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path)
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(tmp_path / "c")
    weights.unlink()
    (tmp_path / "c" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickle checkpoints are not read"):
        load_checkpoint(tmp_path / "c")


def test_write_gptq_needs_quantized_layers(tmp_path):
    with pytest.raises(CheckpointError, match="no quantized layer"):
        write_gptq(copy.deepcopy(tiny_model("llama")), None, tmp_path / "x")
