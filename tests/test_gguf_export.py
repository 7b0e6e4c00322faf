"""GGUF export checked in llama.cpp itself (llama-cpp-python), on tiny models of every supported family."""
from __future__ import annotations

import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from compressor.evaluate.accuracy import TorchRuntime, compare
from compressor.evaluate.llama_cpp_runtime import LlamaCppRuntime, tokenizer_agreement
from compressor.recipe import QuantizeConfig, QuantizeStage
from compressor.stages import StageContext, apply_stage
from export.gguf import GGUFError, TypePlan, check_model, llama_quantize_file, write_gguf
from export.gguf_arch import ArchitectureError

from conftest import FAMILIES, tiny_model


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _ids(n: int = 2, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, seq), generator=torch.Generator().manual_seed(seed))


def _llama_logits(path, ids: torch.Tensor) -> torch.Tensor:
    rt = LlamaCppRuntime("gguf", path, n_ctx=64)
    try:
        return rt.logits(ids)
    finally:
        rt.close()


def _score(model: torch.nn.Module, path) -> dict:
    """Metrics of the GGUF file in llama.cpp (name "gguf") against `model` in torch on the same windows."""
    rt = LlamaCppRuntime("gguf", path, n_ctx=64)
    try:
        return compare(TorchRuntime("torch", model), [rt], _ids())
    finally:
        rt.close()


def _quantized(family: str, method: str = "rtn", **cfg) -> torch.nn.Module:
    model = tiny_model(family)
    q = QuantizeConfig(method=method, bits=cfg.pop("bits", 4), group_size=cfg.pop("group_size", 32), **cfg)
    calib = _ids(8, 64, seed=1) if method == "gptq" else None
    apply_stage(QuantizeStage(quantize=q), model, StageContext(calibration=calib, batch_size=4))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_file_computes_the_same_logits_in_llama_cpp(family, tokenizer, tmp_path):
    model = tiny_model(family)
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tokenizer, path, "f32")
    assert not summary.llama_quantizer and summary.tensor_types == {"F32": summary.tensor_types["F32"]}
    ids = _ids()
    ours = _llama_logits(path, ids)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel < 2e-3, f"{family}: llama.cpp logits differ from torch by {rel:.2e} of their range"
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97  # near-ties may flip


@pytest.mark.parametrize("file_type,tolerance", [("f16", 5e-3), ("bf16", 3e-2), ("q8_0", 0.1)])
def test_16_and_8_bit_files(file_type, tolerance, tokenizer, tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "m.gguf"
    summary = write_gguf(model, tokenizer, path, file_type, embedding_type=file_type, output_type=file_type)
    assert file_type.upper() in summary.tensor_types and not summary.llama_quantizer
    ours = _llama_logits(path, _ids())
    with torch.no_grad():
        ref = model(input_ids=_ids(), use_cache=False).logits
    assert (ours - ref).abs().max() / ref.abs().max() < tolerance


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_calibrated_q4_0_codes_reach_llama_cpp_unchanged(family, tokenizer, tmp_path):
    model = _quantized(family, "gptq", symmetric=True, act_order=True)
    path = tmp_path / "q.gguf"
    summary = write_gguf(model, tokenizer, path, "q4_0", embedding_type="q8_0", output_type="q8_0")
    n_linear = 7 * model.config.num_hidden_layers
    assert len(summary.carried_codes) == n_linear and not summary.requantized and not summary.notes
    assert summary.max_code_error == 0.0
    # The file's Q4_0 tensors decode to exactly the weights of the in-memory quantized model.
    from export.gguf_arch import arch_for, gguf_tensor_name, to_gguf_layout

    arch = arch_for(model.config)
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            t = tensors[gguf_tensor_name(f"{name}.weight", arch)]
            assert t.tensor_type.name == "Q4_0"
            decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(module.out_features, -1)
            expected = to_gguf_layout(f"{name}.weight", module.qweight.dequantize(), model.config, arch)
            assert np.array_equal(decoded, expected.numpy()), name
    # And llama.cpp runs them like torch does (llama.cpp also rounds activations to 8 bits, hence a tolerance).
    res = _score(model, path)
    assert res["gguf"]["kl_divergence"] < 0.01 and res["gguf"]["top1_agreement"] > 0.9


def test_llama_cpp_picks_embedding_and_output_types_and_keeps_our_codes(tokenizer, tmp_path):
    model = _quantized("llama", symmetric=True)
    mine = tmp_path / "mine.gguf"
    auto = tmp_path / "auto.gguf"
    write_gguf(model, tokenizer, mine, "q4_0", embedding_type="q8_0", output_type="q8_0")
    summary = write_gguf(model, tokenizer, auto, "q4_0")  # embedding/output left to llama.cpp's rules
    assert summary.llama_quantizer
    a = {t.name: t for t in gguf.GGUFReader(str(mine)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(auto)).tensors}
    assert set(a) == set(b)
    for name in a:
        if name.startswith("blk.") and a[name].tensor_type.name == "Q4_0":
            assert b[name].tensor_type.name == "Q4_0" and np.array_equal(a[name].data, b[name].data), name
    # tied embeddings: llama.cpp quantizes token_embd as its output matrix (Q6_K, or Q8_0 where rows do not fit)
    assert b["token_embd.weight"].tensor_type.name in ("Q6_K", "Q8_0")


def test_k_quant_with_importance_matrix(tokenizer, tmp_path):
    from compressor.activation_stats import mean_squared_inputs

    model = tiny_model("qwen3", hidden_size=256, intermediate_size=512, head_dim=64)
    imatrix = mean_squared_inputs(model, _ids(4, 64, seed=2))
    assert set(imatrix) >= {"model.layers.0.mlp.down_proj", "lm_head"}
    plain, guided = tmp_path / "k.gguf", tmp_path / "k-imatrix.gguf"
    write_gguf(model, tokenizer, plain, "q4_k_m")
    summary = write_gguf(model, tokenizer, guided, "q4_k_m", imatrix=imatrix)
    assert summary.llama_quantizer and summary.imatrix_entries == 7 * 2 + 1
    assert summary.tensor_types["Q4_K"] >= 10 and "Q6_K" in summary.tensor_types and "F32" in summary.tensor_types
    a = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(guided)).tensors}
    assert not np.array_equal(a["blk.0.ffn_up.weight"].data, b["blk.0.ffn_up.weight"].data)  # the matrix was used
    res = _score(model, guided)
    # A random tiny model has a nearly flat next-token distribution, so 4 bits move top-1 a lot; the real-model
    # figures are in benchmarks/bench_gguf.py.
    assert res["gguf"]["kl_divergence"] < 0.5 and res["gguf"]["top1_agreement"] > 0.5

    # The same quantization from an F16 file (how benchmarks make llama.cpp's reference files): same tensors.
    f16, again = tmp_path / "f16.gguf", tmp_path / "again.gguf"
    write_gguf(model, tokenizer, f16, "f16")
    llama_quantize_file(f16, again, "q4_k_m", model.config, imatrix)
    c = {t.name: t for t in gguf.GGUFReader(str(again)).tensors}
    assert np.array_equal(c["blk.0.ffn_up.weight"].data, b["blk.0.ffn_up.weight"].data)
    with pytest.raises(GGUFError, match="already exists"):
        llama_quantize_file(f16, again, "q4_k_m", model.config, imatrix)


def test_codes_that_do_not_fit_are_requantized_and_reported(tokenizer, tmp_path):
    model = _quantized("llama", group_size=64, symmetric=True)
    summary = write_gguf(model, tokenizer, tmp_path / "g64.gguf", "q4_0", embedding_type="q8_0",
                         output_type="q8_0")
    assert len(summary.requantized) == 14 and "groups of 64" in summary.requantized[0]
    assert "re-quantized" in summary.notes[0]
    asym = _quantized("llama", symmetric=False)
    summary = write_gguf(asym, tokenizer, tmp_path / "asym.gguf", "q4_1", embedding_type="q8_0",
                         output_type="q8_0")
    assert len(summary.carried_codes) == 14 and summary.max_code_error < 1e-3


def test_per_tensor_types(tokenizer, tmp_path):
    """Overrides by GGUF tensor name: direct types written here, llama.cpp types applied by its quantizer; the
    GPTQ codes of the other layers are still carried over unchanged."""
    model = _quantized("llama", symmetric=True)
    path = tmp_path / "mixed.gguf"
    summary = write_gguf(model, tokenizer, path, "q4_0", embedding_type="q8_0",
                         tensor_types={r"blk\.0\.ffn_down": "f16", "attn_v": "q6_k", "^output": "q5_0"})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_v.weight"] in ("Q6_K", "Q8_0")  # Q8_0 where rows do not fill 256-wide K blocks
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.attn_q.weight"] == "Q4_0"
    assert len(summary.carried_codes) == 14 - 1 - 2  # ffn_down of block 0 and both attn_v were not Q4_0
    with pytest.raises(GGUFError, match="only in quantized files"):
        TypePlan.of("f16", tensor_types={"attn_v": "q6_k"})


def test_tokenizer_metadata_reproduces_hf_ids(tokenizer, tmp_path):
    path = tmp_path / "t.gguf"
    write_gguf(tiny_model("llama"), tokenizer, path, "f16")
    texts = ["The quick brown fox: 12345 jumps!", "def f(x):\n    return x ** 2\n", "  spaces   and\ttabs"]
    check = tokenizer_agreement(path, tokenizer, texts)
    assert check["identical"] == len(texts), check["first_difference"]


def test_bad_input_is_refused_before_writing(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama", hidden_size=48, head_dim=12, intermediate_size=96)
    with pytest.raises(GGUFError, match="multiple of 32"):
        check_model(model, TypePlan.of("q4_0", "q8_0", "q8_0"))
    check_model(model, TypePlan.of("q4_k_m"))  # llama.cpp falls back per tensor: allowed
    # rows of 48 in the attention; the MLP's down projection has rows of 96 (3 blocks): only it may be Q4_0
    check_model(model, TypePlan.of("f16", tensor_types={"ffn_down": "q4_0"}))
    with pytest.raises(GGUFError, match="tensor_types"):
        check_model(model, TypePlan.of("f16", tensor_types={"ffn_(up|gate)": "q4_0"}))
    other = tiny_model("llama")
    other.config.model_type = "gpt_neox"
    with pytest.raises(GGUFError, match="supported: gemma"):
        check_model(other, TypePlan.of("f16"))
    with pytest.raises(ArchitectureError):
        write_gguf(other, tokenizer, tmp_path / "x.gguf", "f16")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(GGUFError, match="pip install llama-cpp-python"):
        write_gguf(tiny_model("llama"), tokenizer, tmp_path / "y.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tokenizer, tmp_path, monkeypatch):
    import export.gguf_blocks as blocks

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("export.gguf.encode_codes", boom)
    with pytest.raises(KeyboardInterrupt):
        write_gguf(_quantized("llama", symmetric=True), tokenizer, tmp_path / "z.gguf", "q4_0",
                   embedding_type="q8_0", output_type="q8_0")
    assert blocks  # module still importable after the patch is undone
    assert [p.name for p in tmp_path.iterdir()] == []


def test_run_exports_gguf_and_checks_it_in_llama_cpp(model_dir_factory, tmp_path):
    """`compress run` with a GGUF target: the GPTQ codes go into Q4_0, llama.cpp scores the file on the same windows,
    the tokenizer check passes; then the GGUF is imported as a model, compressed again and exported back."""
    import json

    from compressor.recipe import Recipe
    from compressor.run import run

    from conftest import tiny_recipe

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("qwen2"), out, export=[
        {"gguf": {"type": "q4_0", "embedding_type": "q8_0", "output_type": "q8_0"}},
        {"gguf": {"type": "q4_k_m", "name": "k"}},
        {"gguf": {"type": "f32", "name": "f32"}},
        {"safetensors": {"format": "dense", "dtype": "float32"}}])
    recipe["stages"][0]["quantize"]["symmetric"] = True
    result = run(Recipe.from_dict(recipe))
    report = json.loads((out / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    q4 = arts["gguf"]
    assert q4["format"] == "gguf-Q4_0" and q4["runtime"].startswith("llama.cpp")
    assert len(q4["gguf"]["carried_codes"]) == 14 and q4["gguf"]["tensor_types"]["Q4_0"] == 14
    assert q4["tokenizer_check"]["identical"] == q4["tokenizer_check"]["texts"] > 0
    assert 0 < q4["accuracy"]["kl_divergence"] < 0.5 and q4["accuracy"]["tokens"] == 3 * 63
    assert arts["k"]["gguf"]["imatrix_entries"] > 0  # calibration present: the importance matrix is used
    # the dequantized model at float32 in llama.cpp scores like the same weights in torch
    torch_kl = arts["safetensors-dense"]["accuracy"]["kl_divergence"]
    assert abs(arts["f32"]["accuracy"]["kl_divergence"] - torch_kl) < 0.01 * torch_kl + 1e-4
    assert result.passed and [p.name for p in (out / "gguf").iterdir()][0].endswith("-Q4_0.gguf")

    gguf_file = next((out / "f32").glob("*.gguf"))
    again = tiny_recipe(str(gguf_file), tmp_path / "again", export=[{"gguf": {"type": "q8_0", "embedding_type": "q8_0",
                                                                              "output_type": "q8_0"}}])
    again["stages"][0]["quantize"].update(bits=8, symmetric=True, method="rtn", act_order=False)
    res2 = run(Recipe.from_dict(again))
    art = res2.report["artifacts"][0]
    assert art["tokenizer_check"]["identical"] == art["tokenizer_check"]["texts"]
    assert art["accuracy"]["top1_agreement"] > 0.9


def test_corrupt_gguf_model_gets_a_clear_error(tmp_path):
    from compressor.models import ModelError, load
    from compressor.recipe import ModelConfig

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="broken.gguf"):
        load(ModelConfig(id=str(bad)))
