"""`compress run` end to end on tiny models: run folder, report, budget gate, safety of outputs, eval, inspect."""
import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from compressor.cli import EXIT_BUDGET, main
from compressor.fileio import sha256
from compressor.recipe import Recipe
from compressor.run import RunError, run
from conftest import tiny_recipe


def _write(tmp_path, recipe: dict):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_run_writes_checked_artifact_and_report(family, model_dir_factory, tmp_path):
    out = tmp_path / "run"
    recipe = Recipe.from_dict(tiny_recipe(model_dir_factory(family), out))
    result = run(recipe)
    assert result.output == out and result.passed
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml", "report.json", "report.md", "run.json",
                                                     "safetensors"]
    report = json.loads((out / "report.json").read_text())
    base, art = report["baseline"], report["artifacts"][0]
    assert art["format"] == "safetensors-gptq"
    assert base["accuracy"]["tokens"] == art["accuracy"]["tokens"] == 3 * 63
    assert art["accuracy"]["kl_divergence"] > 0 and 0 < art["accuracy"]["top1_agreement"] <= 1
    assert art["accuracy"]["perplexity"] > 1
    assert 4 < art["size"]["bits_per_weight"] < 32
    layers = report["stages"][0]["layers"]
    assert len(layers) == 14 and all("gptq_loss" in row for row in layers)
    # calibration.precision auto: bfloat16 products for this float32 model where the CPU has AMX
    assert report["calibration"]["precision"] == ("bfloat16" if torch.cpu._is_amx_tile_supported() else "float32")
    record = json.loads((out / "run.json").read_text())
    assert record["versions"]["torch"] and record["seed"] == 0
    for name, digest in record["artifacts"]["safetensors"].items():
        assert sha256(out / "safetensors" / name) == digest
    assert "| artifact |" in (out / "report.md").read_text()
    assert not list(tmp_path.glob(".run*"))  # no temporary folders left


def test_existing_output_is_refused_before_loading(model_dir_factory, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    recipe = Recipe.from_dict(tiny_recipe(tmp_path / "no-such-model", out))
    with pytest.raises(RunError, match="already holds a run; pass --overwrite"):
        run(recipe)
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_data_is_refused_before_loading(tmp_path):
    recipe = Recipe.from_dict(tiny_recipe(tmp_path / "no-such-model", tmp_path / "run",
                                          calibration={"source": str(tmp_path / "missing.txt")}))
    with pytest.raises(RunError, match="calibration: data source .*missing.txt.*no such file"):
        run(recipe)


def test_interrupt_leaves_no_run_folder_and_keeps_the_old_one(model_dir_factory, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    recipe = Recipe.from_dict(tiny_recipe(model_dir_factory("llama"), out))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("export.safetensors.write_gptq", boom)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, overwrite=True)
    assert (out / "old.txt").read_text() == "previous run"
    # No partial run folder; the finished quantize stage is kept for `--resume` (tests/test_resume.py)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.resume", "run"]
    assert list((tmp_path / ".run.resume" / "stages").glob("*/state.safetensors"))


def test_budget_gate_fails_the_cli_with_reason(model_dir_factory, tmp_path):
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run",
                         stages=[{"quantize": {"method": "rtn", "bits": 2, "group_size": -1}}])
    recipe["evaluate"]["budget"] = {"max_kl_divergence": 1e-6}
    res = CliRunner().invoke(main, ["run", str(_write(tmp_path, recipe)), "--quiet"])
    assert res.exit_code == EXIT_BUDGET, res.output
    assert "budget exceeded" in res.output and "KL divergence" in res.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is False and report["failures"]


def test_cli_run_json_then_eval_and_inspect(model_dir_factory, tmp_path):
    recipe = tiny_recipe(model_dir_factory("mistral"), tmp_path / "run",
                         export=[{"safetensors": {"format": "gptq"}}, {"safetensors": {"format": "dense"}}])
    res = CliRunner().invoke(main, ["run", str(_write(tmp_path, recipe)), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    names = [a["name"] for a in report["artifacts"]]
    assert names == ["safetensors", "safetensors-dense"]
    gptq, dense = report["artifacts"]
    # the dense export holds the same quantized weights, so it scores the same
    assert gptq["accuracy"]["perplexity"] == pytest.approx(dense["accuracy"]["perplexity"], rel=1e-2)
    assert dense["size"]["bits_per_weight"] > gptq["size"]["bits_per_weight"]

    res = CliRunner().invoke(main, ["eval", str(tmp_path / "run" / "safetensors"), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)["artifacts"][0]["accuracy"]
    assert again["perplexity"] == pytest.approx(gptq["accuracy"]["perplexity"], rel=1e-6)

    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "run" / "safetensors")])
    assert res.exit_code == 0 and "quantized_layers: 14" in res.output and '"bits": 4' in res.output
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "run")])
    assert res.exit_code == 0 and "safetensors-dense" in res.output


def test_rtn_without_calibration_and_in_memory_evaluation(model_dir_factory, tmp_path):
    recipe = tiny_recipe(model_dir_factory("gemma"), tmp_path / "run", calibration=None, export=[],
                         stages=[{"quantize": {"method": "rtn", "bits": 8, "group_size": -1}}])
    result = run(Recipe.from_dict(recipe))
    art = result.report["artifacts"][0]
    assert art["name"] == "in-memory"
    assert art["accuracy"]["top1_agreement"] > 0.9  # 8-bit per channel barely changes a model


def test_speed_and_memory_are_measured_in_a_fresh_process(model_dir_factory, tmp_path):
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run")
    recipe["evaluate"]["metrics"] = ["perplexity", "latency", "memory", "size"]
    recipe["evaluate"]["speed"] = {"prompt_tokens": 16, "decode_tokens": 4, "prefill_tokens": 32, "repeats": 1}
    recipe["evaluate"]["price_per_hour"] = 3.6
    report = run(Recipe.from_dict(recipe)).report
    for row in (report["baseline"], report["artifacts"][0]):
        s = row["speed"]
        assert s["decode_ms_per_token"] > 0 and s["prefill_tokens_per_second"] > 0 and s["peak_rss_mb"] > 50
        r = row["resources"]  # the resource profile: computation, memory, energy, money, network
        assert r["flops_per_token"] > 0 and r["flops_context"] == 16 + 2
        assert r["cost_per_million_tokens"] == pytest.approx(s["decode_ms_per_token"])  # 3.6/h = 1e-3 per s
        assert r["download_bytes"] == row["size"]["bytes"]
        energy = r["energy_j_per_token"]
        assert (isinstance(energy, float) and energy > 0) or energy.startswith("not measurable here")
    assert "kl_divergence" not in report["artifacts"][0]["accuracy"]
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Resources" in md and "Cost: at 3.6 per hour" in md


def test_cuda_target_without_a_gpu_is_reported_as_skipped(model_dir_factory, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the report of a machine without a GPU")
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run", calibration=None, export=[],
                         stages=[{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}])
    recipe["evaluate"]["metrics"] = ["perplexity", "latency"]
    recipe["evaluate"]["targets"] = ["cuda"]  # no cpu: the fresh-process speed phase does not run
    result = run(Recipe.from_dict(recipe))
    assert result.passed
    report = result.report
    assert report["targets"]["cuda"] == {"skipped": "no CUDA GPU visible to torch"}
    assert "speed" not in report["baseline"]
    assert "## Target: cuda" in (tmp_path / "run" / "report.md").read_text()
