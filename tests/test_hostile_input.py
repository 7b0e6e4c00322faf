"""Broken and hostile inputs end in a clear error that names the file or tensor, before any work is spent."""
from __future__ import annotations

import shutil

import pytest
from conftest import tiny_recipe

from compressor.models import ModelError
from compressor.recipe import Recipe
from compressor.run import RunError, run


def _copy_model(model_dir_factory, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(model_dir_factory("llama"), d)
    return d, next(d.glob("*.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file_is_named(damage, model_dir_factory, tmp_path):
    d, weights = _copy_model(model_dir_factory, tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ModelError) as e:
        run(Recipe.from_dict(tiny_recipe(d, tmp_path / "run")))
    assert str(d) in str(e.value) and "cannot load" in str(e.value)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_before_the_stages(bad, model_dir_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    d, weights = _copy_model(model_dir_factory, tmp_path)
    state = load_file(weights)
    name = next(k for k in state if k.endswith("layers.1.mlp.down_proj.weight"))
    state[name][3, 5] = bad
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(RunError) as e:
        run(Recipe.from_dict(tiny_recipe(d, tmp_path / "run")))
    assert "model.layers.1.mlp.down_proj.weight" in str(e.value) and "1 non-finite" in str(e.value)
    assert not (tmp_path / "run").exists()


class _Payload:
    """Unpickling this runs code: it creates the file `marker` names."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weights_are_refused_unless_allowed_and_never_run(model_dir_factory, tmp_path):
    import pickle

    import torch
    from transformers import AutoModelForCausalLM

    from compressor.models import load
    from compressor.recipe import ModelConfig

    d, weights = _copy_model(model_dir_factory, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(d)
    weights.unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the plain transformers pickle checkpoint
    with pytest.raises(ModelError, match=r"pickle files \(pytorch_model.bin\).*allow_pickle"):
        run(Recipe.from_dict(tiny_recipe(d, tmp_path / "run")))
    assert not (tmp_path / "run").exists()
    loaded, _, _ = load(ModelConfig(id=str(d), allow_pickle=True))  # the user's explicit choice
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    marker = tmp_path / "code-ran"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ModelError, match="pickle"):
        load(ModelConfig(id=str(d)))
    assert not marker.exists()


def test_remote_code_in_a_model_folder_does_not_run_unless_the_recipe_allows_it(model_dir_factory, tmp_path):
    import json

    d, _ = _copy_model(model_dir_factory, tmp_path)
    marker = tmp_path / "code-ran"
    (d / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    cfg["model_type"] = "evil"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        run(Recipe.from_dict(tiny_recipe(d, tmp_path / "run")))
    assert str(d) in str(e.value) and "trust_remote_code" in str(e.value)
    assert not marker.exists()
