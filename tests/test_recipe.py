from pathlib import Path

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.recipe import Recipe, RecipeError

RECIPES = sorted(p for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml")
                 if not p.name.endswith(".sweep.yaml"))
SWEEPS = sorted((Path(__file__).parent.parent / "recipes").glob("*.sweep.yaml"))


def test_there_are_example_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipes_validate(path):
    recipe = Recipe.from_yaml(path)
    assert recipe.model.id
    # Every example that quantizes with GPTQ must say what it calibrates on.
    if any(q.method == "gptq" for q in recipe.quantize_configs()):
        assert recipe.calibration is not None


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_example_sweeps_validate_every_variant(path):
    from compressor.sweep import load_sweep

    sweep = load_sweep(path)
    assert len(sweep.variants) >= 2 and all(v.recipe.model.id for v in sweep.variants)


def _error(data) -> str:
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict(data)
    return str(e.value)


def test_unknown_key_names_path_and_allowed_keys():
    msg = _error({"model": "x", "stages": [{"quantize": {"bitz": 4}}]})
    assert "stages[0].quantize.bitz: unknown key" in msg
    assert "group_size" in msg  # the allowed keys are listed


def test_wrong_value_names_allowed_values():
    msg = _error({"model": "x", "stages": [{"quantize": {"method": "rtn", "bits": 6}}]})
    assert "stages[0].quantize.bits" in msg and "2, 3, 4, 5 or 8" in msg and "got 6" in msg
    msg = _error({"model": "x", "export": [{"gguf": {"type": "q4_9"}}]})
    assert "export[0].gguf.type" in msg and "q4_k_m" in msg and "q4_9" in msg
    msg = _error({"model": "x", "export": [{"gguf": {"typo": 1}}]})
    assert "export[0].gguf.typo: unknown key" in msg and "embedding_type" in msg


def test_cross_field_checks_for_exports():
    five = {"method": "rtn", "bits": 5, "group_size": 32}
    msg = _error({"model": "x", "stages": [{"quantize": five}], "export": [{"safetensors": {"format": "gptq"}}]})
    assert "2, 3, 4 or 8-bit" in msg and "gguf" in msg
    assert "calibration" in _error({"model": "x", "export": [{"gguf": {"type": "q4_k_m", "imatrix": True}}]})
    assert "same folder" in _error({"model": "x", "export": [{"gguf": {}}, {"gguf": {"type": "f16"}}]})
    r = Recipe.from_dict({"model": "x", "stages": [{"quantize": five}], "export": [{"gguf": {"type": "Q5_0"}}]})
    assert r.export[0].gguf.type == "Q5_0" and r.export_name(0) == "gguf"


def test_unknown_stage_kind_lists_kinds():
    assert "allowed: ['prune', 'prune_width', 'prune_depth', 'low_rank', 'distill', 'quantize']" in _error(
        {"model": "x", "stages": [{"sparsify": {}}]})


def test_unknown_top_level_key():
    assert "outputs: unknown key" in _error({"model": "x", "outputs": "y"})


@pytest.mark.parametrize("data, needle", [
    ({"model": "x", "stages": [{"quantize": {"method": "gptq"}}]}, "needs a `calibration` section"),
    ({"model": "x", "export": [{"safetensors": {"format": "gptq"}}]}, "needs a quantize stage"),
    ({"model": "x", "stages": [{"quantize": {"method": "rtn", "act_order": True}}]}, "act_order applies to"),
    ({"model": "x", "stages": [{"quantize": {"method": "rtn", "group_size": 4}}]}, "group_size must be -1"),
    ({"model": "x", "stages": [{"quantize": {"method": "rtn"}}, {"quantize": {"method": "rtn"}}]}, "at most one"),
    ({"model": "x", "evaluate": {"metrics": ["perplexity"], "budget": {"min_top1_agreement": 0.9}}},
     "needs the metric 'top1_agreement'"),
    ({"model": "x", "stages": [{"quantize": {"method": "rtn"}}],
      "export": [{"safetensors": {}}, {"safetensors": {"format": "gptq"}}]}, "same folder"),
    ({"model": "x", "calibration": {"samples": 0}}, "calibration.samples"),
])
def test_cross_field_and_range_rules(data, needle):
    assert needle in _error(data)


def test_not_a_mapping():
    assert "a recipe is a mapping" in _error([1, 2])


def test_yaml_syntax_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml(p)


def test_shorthands_are_expanded():
    r = Recipe.from_dict({"model": "some/model", "stages": ["quantize"], "calibration": {}})
    assert r.model.id == "some/model"
    assert r.quantize_configs()[0].method == "gptq"


def test_cli_validate_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nstages:\n  - quantize: {bits: 7}\n")
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "stages[0].quantize.bits" in res.output
    good = RECIPES[0]
    res = CliRunner().invoke(main, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "valid" in res.output


def test_validate_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from compressor.recipe import Recipe; "
            f"Recipe.from_yaml({str(RECIPES[0])!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
