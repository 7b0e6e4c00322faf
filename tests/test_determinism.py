"""The same recipe, seed and versions give byte-identical artifacts, and run.json records what reproduces a run."""
from __future__ import annotations

import json

import torch

from compressor.fileio import file_hashes, sha256
from compressor.recipe import Recipe


def test_the_same_recipe_twice_gives_the_same_bytes_and_says_how(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import run

    model_dir = model_dir_factory("qwen2")
    spec = tiny_recipe(model_dir, tmp_path / "a", export=[
        {"safetensors": {"format": "gptq"}}, {"gguf": {"type": "q4_0"}}])
    spec["stages"] = [{"prune": {"method": "sparsegpt", "sparsity": 0.3}},
                      {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True,
                                    "act_order": True}}]
    spec["evaluate"]["metrics"] = ["perplexity"]
    first = run(Recipe.from_dict(spec))
    second = run(Recipe.from_dict({**spec, "output": str(tmp_path / "b")}))
    for folder in ("safetensors", "gguf"):
        hashes = file_hashes(first.output / folder)
        assert hashes and hashes == file_hashes(second.output / folder)

    record = json.loads((first.output / "run.json").read_text())
    assert record["seed"] == 0 and record["threads"] == torch.get_num_threads()
    assert len(record["code_sha256"]) == 64
    assert record["versions"]["torch"] and record["versions"]["safetensors"]
    inputs = record["inputs"]
    assert inputs["model_files"]["model.safetensors"] == sha256(model_dir / "model.safetensors")
    assert len(inputs["calibration_tokens_sha256"]) == 64
    assert record["inputs"] == json.loads((second.output / "run.json").read_text())["inputs"]
    assert record["artifacts"]["safetensors"] == file_hashes(first.output / "safetensors")
