"""Data-parallel calibration: two gloo processes, each with half of the calibration batches, give the codes one
process gives on all of them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from compressor.quant.tensor import QuantLinear
from compressor.recipe import PruneConfig, QuantizeConfig
from compressor.stages import StageContext
from compressor.stages.prune import apply_prune
from compressor.stages.quantize import apply_quantize

TESTS = Path(__file__).resolve().parent


def _compress(kind: str):
    sys.path.insert(0, str(TESTS))
    from conftest import tiny_model

    torch.set_num_threads(1)  # the same GEMM blocking in every process: the same float32 products per batch
    model = tiny_model("llama", num_hidden_layers=3)
    calib = torch.randint(0, 384, (12, 48), generator=torch.Generator().manual_seed(3))
    ctx = StageContext(calibration=calib, batch_size=2, device="cpu")
    if kind == "gptq":
        apply_quantize(QuantizeConfig(method="gptq", bits=4, group_size=32, act_order=True), model, ctx)
        return {n: torch.cat([m.codes.flatten(), m.scales.float().flatten()])
                for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    apply_prune(PruneConfig(method=kind, pattern="2:4"), model, ctx)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}


def _worker(rank: int, world: int, rendezvous: str, kind: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        result = _compress(kind)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["gptq", "sparsegpt", "wanda"])
def test_two_gloo_processes_give_what_one_process_gives(kind, tmp_path):
    alone = _compress(kind)
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), kind, str(tmp_path / "result")), nprocs=2, join=True)
    for rank in (0, 1):
        together = torch.load(tmp_path / f"result.{rank}", weights_only=True)
        assert together.keys() == alone.keys()
        for name in alone:
            assert torch.equal(together[name], alone[name]), f"rank {rank}: {name} differs"


def test_one_process_without_a_process_group_takes_every_batch():
    from compressor.distributed import shard, world

    assert world() == (0, 1)
    batches = list(torch.arange(10).split(3))
    assert shard(batches) == batches


def _run_worker(rank: int, world: int, rendezvous: str, recipe: dict) -> None:
    import torch.distributed as dist

    from compressor.recipe import Recipe
    from compressor.run import run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        run(Recipe.from_dict(recipe))
    finally:
        dist.destroy_process_group()


def test_a_run_under_two_processes_writes_the_checkpoint_one_process_writes(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.fileio import sha256
    from compressor.recipe import Recipe
    from compressor.run import run

    spec = tiny_recipe(model_dir_factory("llama"), tmp_path / "one",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}])
    spec["calibration"]["batch_size"] = 1
    spec["evaluate"]["metrics"] = ["perplexity"]
    torch.set_num_threads(1)
    run(Recipe.from_dict(spec))
    two = {**spec, "output": str(tmp_path / "two")}
    mp.spawn(_run_worker, args=(2, str(tmp_path / "rendezvous"), two), nprocs=2, join=True)
    weights = sorted((tmp_path / "one" / "safetensors").glob("*.safetensors"))
    assert weights
    for f in weights:  # rank 0 wrote the run; its checkpoint is byte for byte the single process's
        assert sha256(f) == sha256(tmp_path / "two" / "safetensors" / f.name)


def test_stages_that_cannot_run_data_parallel_are_refused():
    from compressor.recipe import Recipe
    from compressor.run import RunError, _check_data_parallel

    with pytest.raises(RunError, match=r"stages\[1\]: distill does not run data-parallel"):
        _check_data_parallel(Recipe.from_dict({"model": "m", "calibration": {"source": "python-docs"},
                                               "stages": [{"prune": {"method": "wanda", "pattern": "2:4"}},
                                                          {"distill": {"steps": 2}}]}))
    _check_data_parallel(Recipe.from_dict({"model": "m", "calibration": {"source": "python-docs"},
                                           "stages": [{"prune": {"method": "wanda", "pattern": "2:4"}},
                                                      {"quantize": {"method": "gptq", "bits": 4}}]}))


def test_torchrun_compress_run(model_dir_factory, tmp_path):
    """The user-facing form: `torchrun --nproc_per_node 2 -m compressor.cli run recipe.yaml`."""
    import os
    import subprocess

    import yaml
    from conftest import tiny_recipe

    spec = tiny_recipe(model_dir_factory("qwen2"), tmp_path / "run",
                       stages=[{"quantize": {"method": "gptq", "bits": 4, "group_size": 32}}])
    spec["evaluate"]["metrics"] = ["perplexity"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "compressor.cli",
                           "run", str(tmp_path / "r.yaml"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "report.json").is_file()
    assert not list(tmp_path.glob(".run*"))  # the helper wrote nothing
