"""Resuming an interrupted run (compressor.resume): finished stages and blocks are reused, and the artifacts equal
those of a run that was never interrupted, byte for byte."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compressor.fileio import sha256
from compressor.recipe import Recipe


def _model_dir(tmp_path: Path, tokenizer_dir: Path, layers: int, hidden: int = 64) -> Path:
    from conftest import tiny_model

    d = tmp_path / f"model-{layers}x{hidden}"
    if not d.exists():
        tiny_model("llama", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden,
                   head_dim=hidden // 4).save_pretrained(d)
        for f in tokenizer_dir.iterdir():
            shutil.copy(f, d / f.name)
    return d


def _artifact_hashes(run_dir: Path) -> dict[str, str]:
    files = sorted(p for p in (run_dir / "safetensors").rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    return {str(p.relative_to(run_dir)): sha256(p) for p in files}


def _spec(model_dir: Path, output: Path) -> dict:
    from conftest import tiny_recipe

    spec = tiny_recipe(model_dir, output, stages=[
        {"prune": {"method": "wanda", "pattern": "2:4"}},
        {"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}])
    spec["evaluate"]["metrics"] = ["perplexity"]
    return spec


def test_a_run_that_failed_mid_stage_resumes_from_its_finished_blocks(tmp_path, tokenizer_dir, monkeypatch):
    from compressor.run import RunError, run
    from compressor.stages import quantize

    model_dir = _model_dir(tmp_path, tokenizer_dir, layers=4)
    whole = run(Recipe.from_dict(_spec(model_dir, tmp_path / "whole")))

    real = quantize._GPTQStage.process
    processed: list[int] = []

    def crash_at_block_2(self, block_index, block, group):
        if block_index == 2:
            raise RuntimeError("simulated crash in block 3 of 4")
        processed.append(block_index)
        return real(self, block_index, block, group)

    monkeypatch.setattr(quantize._GPTQStage, "process", crash_at_block_2)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(Recipe.from_dict(_spec(model_dir, out)))
    assert not out.exists()  # no half-written run folder
    kept = tmp_path / ".resumed.resume"
    assert len(list(kept.glob("stages/*/meta.json"))) == 1  # the prune stage finished
    assert sorted(p.name for p in kept.glob("blocks/*/gptq/*")) == ["block-0000.safetensors", "block-0001.safetensors"]

    with pytest.raises(RunError, match="--resume"):  # never silently thrown away, nor silently reused
        run(Recipe.from_dict(_spec(model_dir, out)))

    def counting(self, block_index, block, group):
        processed.append(block_index)
        return real(self, block_index, block, group)

    monkeypatch.setattr(quantize._GPTQStage, "process", counting)
    processed.clear()
    resumed = run(Recipe.from_dict(_spec(model_dir, out)), resume=True)
    assert sorted(set(processed)) == [2, 3]  # blocks 1 and 2 were loaded, not recomputed; the prune stage too
    assert _artifact_hashes(out) == _artifact_hashes(tmp_path / "whole")
    assert not kept.exists()  # a finished run leaves no checkpoints
    assert resumed.report["stages"][0].get("resumed") is True
    assert any("interrupted run" in n for n in resumed.report["notes"])
    for a, b in zip(whole.report["stages"], resumed.report["stages"]):
        assert a["layers"] == b["layers"] and a["summary"] == b["summary"]


def test_overwrite_discards_the_checkpoints_of_an_interrupted_run(tmp_path, tokenizer_dir):
    from compressor.run import run

    model_dir = _model_dir(tmp_path, tokenizer_dir, layers=2)
    stale = tmp_path / ".out.resume" / "blocks" / ("0" * 64) / "gptq"
    stale.mkdir(parents=True)
    (stale / "block-0000.safetensors").write_bytes(b"not a checkpoint")
    run(Recipe.from_dict(_spec(model_dir, tmp_path / "out")), overwrite=True)
    assert not (tmp_path / ".out.resume").exists()
    assert (tmp_path / "out" / "report.json").is_file()


def test_sigkill_in_the_middle_of_the_blocks_then_resume_gives_the_same_artifacts(tmp_path, tokenizer_dir):
    """The acceptance test of issue 10: `compress run` killed with SIGKILL (no cleanup of any kind) while it is
    quantizing, then `compress run --resume`."""
    model_dir = _model_dir(tmp_path, tokenizer_dir, layers=8, hidden=128)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESSOR_CACHE": "off"}  # the same threads for both runs

    def cli(spec: dict, *extra: str) -> subprocess.Popen:
        path = tmp_path / f"{Path(spec['output']).name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return subprocess.Popen([sys.executable, "-m", "compressor.cli", "run", str(path), "--quiet", *extra],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    spec = _spec(model_dir, tmp_path / "whole")
    spec["stages"] = spec["stages"][1:]  # GPTQ alone: the kill lands among its blocks
    spec["calibration"]["samples"] = 16
    whole = cli(spec)
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err[-2000:]

    killed_spec = {**spec, "output": str(tmp_path / "killed")}
    proc = cli(killed_spec)
    blocks = tmp_path / ".killed.resume" / "blocks"
    deadline = time.monotonic() + 600
    while not list(blocks.glob("*/gptq/block-0002.safetensors")):
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = sorted(p.name for p in blocks.glob("*/gptq/block-*.safetensors"))
    assert not (tmp_path / "killed").exists()
    assert 3 <= len(done) < 8, done  # killed among the blocks, not before or after them

    resumed = cli(killed_spec, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert _artifact_hashes(tmp_path / "killed") == _artifact_hashes(tmp_path / "whole")
