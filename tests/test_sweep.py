"""Sweeps: expanding a base recipe into variants, early errors, shared work done once, and resuming."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_recipe

from compressor.cli import main
from compressor.run import run
from compressor.recipe import Recipe
from compressor.sweep import SweepError, load_sweep, run_sweep, sweep_from_dict


def _base(tmp_path):
    return tiny_recipe(tmp_path / "model", tmp_path / "unused",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}])


def test_a_grid_is_every_combination_and_variants_are_added(tmp_path):
    (tmp_path / "model").mkdir()
    spec = {"base": _base(tmp_path), "output": str(tmp_path / "sw"),
            "grid": {"stages.0.quantize.method": ["rtn", "gptq"], "stages.0.quantize.bits": [4, 8]},
            "variants": [{"name": "g64", "set": {"stages.0.quantize.group_size": 64}},
                         {"set": {"export.0": {"safetensors": {"format": "dense"}}}}]}
    s = sweep_from_dict(spec)
    names = [v.name for v in s.variants]
    assert names[:4] == ["rtn-4", "rtn-8", "gptq-4", "gptq-8"] and names[4] == "g64"
    assert names[5].startswith("safetensors")
    q = {v.name: v.recipe.quantize_configs()[0] for v in s.variants}
    assert (q["rtn-8"].method, q["rtn-8"].bits, q["gptq-4"].method) == ("rtn", 8, "gptq")
    assert q["g64"].group_size == 64 and q["g64"].method == "gptq"
    assert s.variants[5].recipe.export[0].safetensors.format == "dense"
    assert all(v.recipe.output == str(tmp_path / "sw" / "variants" / v.name) for v in s.variants)

    labelled = sweep_from_dict({"base": _base(tmp_path), "grid": {
        "stages.0.quantize": {"rtn-w8": {"method": "rtn", "bits": 8}, "gptq-w4": {"method": "gptq", "bits": 4}},
        "export": {"dense": [{"safetensors": {"format": "dense"}}], "gptq": [{"safetensors": {"format": "gptq"}}]}}})
    assert [v.name for v in labelled.variants] == ["rtn-w8-dense", "rtn-w8-gptq", "gptq-w4-dense", "gptq-w4-gptq"]
    assert labelled.variants[1].recipe.quantize_configs()[0].bits == 8


@pytest.mark.parametrize("change, message", [
    ({"grid": {}}, "grid: a mapping of dotted recipe paths"),
    ({"grid": {"stages.0.quantize.bits": []}}, "grid.stages.0.quantize.bits: a non-empty list"),
    ({"grid": None, "variants": None}, "no variants"),
    ({"grid": {"stages.0.quantize.bitz": [4]}}, "bitz"),
    ({"grid": {"stages.3.quantize.bits": [4]}}, "stages.3: the list has 1 item(s)"),
    ({"grid": {"output": ["elsewhere"]}}, "output is set by the sweep"),
    ({"grid": {"stages.0.quantize.bits": [4, 4]}}, "variant names repeat"),
    ({"grid": {"stages.0.quantize.bits": [9]}},
     "(set {'stages.0.quantize.bits': 9}): 1 problem(s):\n  - stages[0].quantize.bits: Input should be"),
    ({"gates": {"max_ppl": 1}}, "gates: unknown gate 'max_ppl'; valid gates: max_perplexity_increase"),
    ({"runs": 3}, "unknown key(s) ['runs']"),
    ({"base": "missing.yaml"}, "base: recipe file not found"),
])
def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, change, message):
    (tmp_path / "model").mkdir()
    spec = {"base": _base(tmp_path), "grid": {"stages.0.quantize.bits": [4, 8]}, **change}
    spec = {k: v for k, v in spec.items() if v is not None}
    with pytest.raises(SweepError) as e:
        sweep_from_dict(spec, base_dir=tmp_path)
    assert message in str(e.value)


def test_a_sweep_shares_work_matches_runs_alone_and_resumes(model_dir_factory, tmp_path):
    base = tiny_recipe(model_dir_factory("llama"), tmp_path / "unused",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}])
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": "base.yaml", "output": str(tmp_path / "sw"),
        "grid": {"stages.0.quantize.bits": [4, 8],
                 "export.0": [{"safetensors": {"format": "gptq"}}, {"safetensors": {"format": "dense"}}]}}))
    record = run_sweep(load_sweep(sweep_file))
    assert [r["status"] for r in record["variants"]] == ["done"] * 4
    shared = record["shared"]
    counts = {kind: (v["computed"], v["reused"]) for kind, v in shared.items()}
    assert counts["model"] == (1, 3)
    assert counts["compressed model"] == (2, 2)  # the two exports of each bit width
    # What the reuses saved is what the first computations cost, once per reuse.
    cm = shared["compressed model"]
    assert 0 < cm["seconds_saved"] <= cm["seconds_computing"] * 1.01
    assert record["seconds_if_run_alone_estimate"] > record["seconds"]
    assert shared["calibration windows"]["computed"] == 1
    reports = {r["name"]: json.loads((tmp_path / "sw" / "variants" / r["name"] / "report.json").read_text())
               for r in record["variants"]}
    assert sum(any("earlier run of the sweep" in n for n in rep["notes"]) for rep in reports.values()) == 2

    # a variant run alone gives the same numbers as inside the sweep
    name = next(n for n in reports if n.endswith("-8") and "dense" in n)  # (safe_dump sorted the grid keys)
    alone = Recipe.from_dict({**yaml.safe_load((tmp_path / "sw" / "variants" / name / "recipe.yaml").read_text()),
                              "output": str(tmp_path / "alone")})
    solo = run(alone).report["artifacts"][0]["accuracy"]
    swept = reports[name]["artifacts"][0]["accuracy"]
    assert solo["perplexity"] == pytest.approx(swept["perplexity"], rel=1e-6)
    assert solo["kl_divergence"] == pytest.approx(swept["kl_divergence"], rel=1e-5, abs=1e-7)

    audit = json.loads((tmp_path / "sw" / "audit.json").read_text())
    assert len(audit["rows"]) == 4 and (tmp_path / "sw" / "audit.html").is_file()

    spec = yaml.safe_load(sweep_file.read_text())
    spec["gates"] = {"max_kl": 1e-9}  # nothing quantized to 4 bits is that close
    sweep_file.write_text(yaml.safe_dump(spec))
    again = CliRunner().invoke(main, ["sweep", str(sweep_file), "--json", "--quiet"])
    assert again.exit_code == 3, again.output
    record, _ = json.JSONDecoder().raw_decode(again.output)  # then the error line
    assert [r["status"] for r in record["variants"]] == ["resumed"] * 4
    assert record["audit"]["passed"] is False and record["audit"]["best"] is None

    spec = yaml.safe_load(sweep_file.read_text())
    spec["grid"] = {"stages.0.quantize.bits": [4], "export.0": [{"safetensors": {"format": "gptq"}}]}
    spec["base"] = {**base, "calibration": {**base["calibration"], "samples": 4}}
    sweep_file.write_text(yaml.safe_dump(spec))
    clash = CliRunner().invoke(main, ["sweep", str(sweep_file)])
    assert clash.exit_code == 2 and "hold a run of another recipe" in clash.output and "--overwrite" in clash.output


def _accuracies(record, root):
    return {r["name"]: json.loads((root / "variants" / r["name"] / "report.json").read_text())
            ["artifacts"][0]["accuracy"] for r in record["variants"]}


@pytest.mark.parametrize("backend", ["process", "ray"])
def test_parallel_backends_give_the_local_results(backend, model_dir_factory, tmp_path):
    if backend == "ray":
        pytest.importorskip("ray", reason="Ray is an optional extra (pip install ray)")
    base = tiny_recipe(model_dir_factory("qwen2"), tmp_path / "unused",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}])
    spec = {"base": base, "grid": {"stages.0.quantize.bits": [4, 8]}}
    local = run_sweep(sweep_from_dict({**spec, "output": str(tmp_path / "local")}))
    record = run_sweep(sweep_from_dict({**spec, "output": str(tmp_path / backend)}), backend=backend, workers=2)
    assert record["backend"] == backend and record["groups"] == 2 and record["workers"] == 2
    assert [r["status"] for r in record["variants"]] == ["done", "done"]
    assert [r["name"] for r in record["variants"]] == [r["name"] for r in local["variants"]]
    want, got = _accuracies(local, tmp_path / "local"), _accuracies(record, tmp_path / backend)
    for name in want:  # the same variants compute the same numbers wherever they run
        assert got[name]["perplexity"] == pytest.approx(want[name]["perplexity"], rel=1e-5)
        assert got[name]["kl_divergence"] == pytest.approx(want[name]["kl_divergence"], rel=1e-4, abs=1e-7)
    assert (tmp_path / backend / "audit.html").is_file() and (tmp_path / backend / "sweep.json").is_file()
    # finished variants are not run again, whatever the backend
    again = run_sweep(sweep_from_dict({**spec, "output": str(tmp_path / backend)}), backend=backend, workers=2)
    assert [r["status"] for r in again["variants"]] == ["resumed", "resumed"]
    if backend == "ray":
        import ray

        ray.shutdown()


def test_unknown_backend_is_refused(tmp_path):
    (tmp_path / "model").mkdir()
    s = sweep_from_dict({"base": _base(tmp_path), "grid": {"stages.0.quantize.bits": [4]}})
    with pytest.raises(SweepError, match="backend 'dask'"):
        run_sweep(s, backend="dask")
