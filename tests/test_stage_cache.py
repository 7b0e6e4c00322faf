"""The stage cache: a second run with the same inputs takes the stages' result from disk, identical to recomputing."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model, tiny_recipe

from compressor import stage_cache
from compressor.recipe import Recipe
from compressor.run import run
from compressor.stages import StageContext, apply_stage


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPRESSOR_CACHE", "on")
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_run_reuses_the_stages_and_reports_the_same(cache_dir, model_dir_factory, tmp_path):
    spec = tiny_recipe(model_dir_factory("llama"), tmp_path / "first",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}])
    first = run(Recipe.from_dict(spec)).report
    assert len(list(cache_dir.iterdir())) == 1
    second = run(Recipe.from_dict({**spec, "output": str(tmp_path / "second")})).report
    assert any("stage cache" in n for n in second["notes"]) and not any("stage cache" in n for n in first["notes"])
    a, b = first["artifacts"][0], second["artifacts"][0]
    assert a["accuracy"] == b["accuracy"]  # bit-identical model: identical numbers
    for f in a["files"]:  # the exported checkpoint is byte for byte the same
        assert (tmp_path / "first" / a["path"] / f).read_bytes() == (tmp_path / "second" / b["path"] / f).read_bytes()
    assert second["stages"][0]["layers"] == first["stages"][0]["layers"]
    # Anything the result depends on changes the key: here the seed.
    run(Recipe.from_dict({**spec, "output": str(tmp_path / "third"), "seed": 1}))
    assert len(list(cache_dir.iterdir())) == 2


def test_recipes_that_begin_with_the_same_stages_share_them(cache_dir, model_dir_factory, tmp_path, monkeypatch):
    prune = {"prune": {"method": "sparsegpt", "pattern": "2:4"}}
    spec = tiny_recipe(model_dir_factory("llama"), tmp_path / "w4",
                       stages=[prune, {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}])
    run(Recipe.from_dict(spec))
    assert len(list(cache_dir.iterdir())) == 2  # after the prune, and after both stages
    w8 = {**spec, "output": str(tmp_path / "w8"),
          "stages": [prune, {"quantize": {"method": "rtn", "bits": 8, "group_size": 32}}]}
    report = run(Recipe.from_dict(w8)).report
    assert "from_cache" in report["stages"][0] and "from_cache" not in report["stages"][1]
    assert len(list(cache_dir.iterdir())) == 3
    monkeypatch.setenv("COMPRESSOR_CACHE", "off")  # computed from scratch: the same numbers
    alone = run(Recipe.from_dict({**w8, "output": str(tmp_path / "w8-alone")})).report
    assert alone["artifacts"][0]["accuracy"] == report["artifacts"][0]["accuracy"]


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_restored_models_compute_what_the_stages_made(cache_dir, family, tmp_path):
    """AWQ (scales folded into norms), a quantized head (untied from the embedding), act-order and 2:4 pruning."""
    base = tiny_model(family)
    calib = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe.from_dict({"model": "unused", "calibration": {"source": "python-docs", "samples": 4,
                                                                  "seq_len": 32},
                               "stages": [{"prune": {"method": "wanda", "pattern": "2:4"}},
                                          {"quantize": {"method": "awq", "bits": 4, "group_size": 32,
                                                        "lm_head": True}}]})
    model = copy.deepcopy(base)
    digest = stage_cache.keys(recipe, model, calib, "cpu")[-1]
    before = model.config.to_dict()
    ctx = StageContext(calibration=calib, batch_size=2, device="cpu")
    reports = [apply_stage(s, model, ctx).to_dict() for s in recipe.stages]
    stage_cache.save(cache_dir, digest, model, before, reports)
    restored = copy.deepcopy(base)
    got = stage_cache.load(cache_dir, digest, restored)
    assert [r["kind"] for r in got] == [r["kind"] for r in reports]
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, model(ids).logits)
    assert restored.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert stage_cache.load(cache_dir, "0" * 64, copy.deepcopy(base)) is None  # a miss changes nothing


def test_only_layout_keeping_stages_are_cached_and_the_switch_turns_it_off(monkeypatch):
    quant = {"quantize": {"method": "rtn", "bits": 4}}
    assert stage_cache.cacheable(Recipe.from_dict({"model": "m", "stages": [quant]}))
    assert not stage_cache.cacheable(Recipe.from_dict({"model": "m", "stages": [
        {"low_rank": {"method": "svd", "ratio": 0.2}}, quant]}))
    assert not stage_cache.cacheable(Recipe.from_dict({"model": "m"}))
    monkeypatch.setenv("COMPRESSOR_CACHE", "off")
    assert not stage_cache.enabled()


def test_least_recently_used_entries_go_over_the_cap(tmp_path):
    import os
    import time

    for i, name in enumerate(["old", "mid", "new"]):
        d = tmp_path / name
        d.mkdir()
        (d / "state.safetensors").write_bytes(b"x" * 1000)
        (d / "meta.json").write_text(json.dumps({}))
        os.utime(d / "meta.json", (time.time() - 100 + i, time.time() - 100 + i))
    removed = stage_cache.evict(tmp_path, cap=2100)
    assert [p.name for p in removed] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mid", "new"]
