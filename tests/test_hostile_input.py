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
