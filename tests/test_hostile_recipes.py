"""Property-based: malformed recipes and sweeps end in a clear validation error, never a traceback of another kind."""
from __future__ import annotations

import copy
import math

import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from compressor.recipe import Recipe, RecipeError  # noqa: E402
from compressor.sweep import SweepError, sweep_from_dict  # noqa: E402

VALID = {
    "model": "smollm2-135m-instruct",
    "calibration": {"source": "python-docs", "samples": 8, "seq_len": 128, "seed": 0},
    "stages": [
        {"prune": {"method": "wanda", "pattern": "2:4"}},
        {"distill": {"steps": 10, "lr": 1e-4}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "act_order": True}},
    ],
    "export": [{"safetensors": {"format": "gptq"}}, {"gguf": {"type": "q4_0"}}, {"onnx": {"weights": "int4"}}],
    "evaluate": {"data": {"source": "python-docs", "windows": 2, "seq_len": 256},
                 "metrics": ["perplexity", "kl_divergence"], "budget": {"max_perplexity_increase": 0.2},
                 "targets": ["cpu", "cuda"], "price_per_hour": 2.0},
    "output": "runs/x",
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["gptq", "rtn", "awq", "q4_0", "int4", "2:4", "-1", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(values)
        else:
            parent.append(draw(values))
    return data


def _only_recipe_errors(data) -> None:
    try:
        recipe = Recipe.from_dict(data)
    except RecipeError as e:
        assert str(e).strip()  # a message that says something
        return
    # What validates must be usable: serializable back into an equal recipe.
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recipes())
def test_mutated_recipes_fail_only_with_recipe_errors(data):
    _only_recipe_errors(data)


@settings(max_examples=150, deadline=None)
@given(values)
def test_arbitrary_documents_fail_only_with_recipe_errors(data):
    _only_recipe_errors(data)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_fails_only_with_recipe_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("y") / "r.yaml"
    path.write_text(text)
    try:
        Recipe.from_yaml(path)
    except RecipeError as e:
        assert str(path) in str(e) or "recipe" in str(e)


@settings(max_examples=150, deadline=None)
@given(grid=st.dictionaries(st.sampled_from(["stages.0.quantize.bits", "stages.0.quantize.method", "export",
                                             "stages.9.quantize", "evaluate.metrics", "nope", "output", ""]),
                            values, max_size=3),
       gates=st.one_of(st.none(), values))
def test_malformed_sweeps_fail_only_with_sweep_errors(grid, gates):
    spec = {"base": copy.deepcopy(VALID), "grid": grid}
    if gates is not None:
        spec["gates"] = gates
    try:
        sweep_from_dict(spec)
    except SweepError as e:
        assert str(e).strip()


def test_the_starting_recipe_is_valid():
    assert Recipe.from_dict(copy.deepcopy(VALID)).quantize_configs()[0].bits == 4
    assert not math.isnan(Recipe.from_dict(copy.deepcopy(VALID)).evaluate.price_per_hour)
    yaml.safe_dump(VALID)
