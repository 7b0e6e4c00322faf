"""memory_budget_gb: a model that does not fit is quantized block by block (compressor.lazy), with the result the
ordinary path gives; what cannot run within the budget stops before any work."""
from __future__ import annotations

import shutil

import pytest

from compressor.fileio import file_hashes
from compressor.recipe import Recipe
from compressor.run import BASE_RSS, RunError, run

MB = 2**20


def _model(tmp_path, tokenizer_dir, family="llama"):
    from conftest import tiny_model

    d = tmp_path / f"model-{family}"
    tiny_model(family, num_hidden_layers=16, hidden_size=128, intermediate_size=256, head_dim=32,
               tie_word_embeddings=family != "llama").save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def _spec(model_dir, output, **over):
    spec = {"model": str(model_dir),
            "calibration": {"source": "python-docs", "samples": 8, "seq_len": 64, "batch_size": 4},
            "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}],
            "export": [{"safetensors": {"format": "gptq"}}], "evaluate": None, "output": str(output)}
    spec.update(over)
    return spec


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_block_by_block_gives_the_checkpoint_the_whole_model_gives(family, tmp_path, tokenizer_dir, caplog):
    model_dir = _model(tmp_path, tokenizer_dir, family)
    whole = run(Recipe.from_dict(_spec(model_dir, tmp_path / "whole")))
    # The model holds ~10 MB of float32 weights: a budget 8 MB above the runtime's own share is too small to hold
    # it whole, large enough for one block at a time.
    budget = (BASE_RSS + 8 * MB) / 2**30
    with caplog.at_level("INFO"):
        streamed = run(Recipe.from_dict(_spec(model_dir, tmp_path / "streamed", memory_budget_gb=budget)))
    assert streamed.report["memory"]["mode"] == "block by block"
    assert streamed.report["memory"]["estimated_peak_gb"] <= budget + 5e-4  # rounded to 3 decimals
    assert "block 16/16 done" in caplog.text
    assert file_hashes(streamed.output / "safetensors") == file_hashes(whole.output / "safetensors")
    assert not list(tmp_path.glob(".streamed*"))  # the spilled blocks are gone
    layers = [r["name"] for r in streamed.report["stages"][0]["layers"]]
    assert layers == [r["name"] for r in whole.report["stages"][0]["layers"]] and len(layers) == 16 * 7


def test_what_cannot_run_within_the_budget_stops_before_any_work(tmp_path, tokenizer_dir):
    model_dir = _model(tmp_path, tokenizer_dir)
    budget = (BASE_RSS + 8 * MB) / 2**30
    with pytest.raises(RunError, match=r"evaluate: null"):
        run(Recipe.from_dict(_spec(model_dir, tmp_path / "a", memory_budget_gb=budget,
                                   evaluate={"data": {"source": "python-docs", "windows": 2, "seq_len": 64}})))
    with pytest.raises(RunError, match=r"exactly one quantize stage with method gptq"):
        run(Recipe.from_dict(_spec(model_dir, tmp_path / "b", memory_budget_gb=budget,
                                   stages=[{"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}])))
    with pytest.raises(RunError, match=r"even block by block, with the calibration activations on disk, the run"):
        run(Recipe.from_dict(_spec(model_dir, tmp_path / "c", memory_budget_gb=(BASE_RSS + 1 * MB) / 2**30)))
    assert not [p for p in tmp_path.iterdir() if p.name[0] in ".abc"]  # nothing written
    # a budget the whole model fits takes the ordinary path
    ok = run(Recipe.from_dict(_spec(model_dir, tmp_path / "d", memory_budget_gb=4.0)))
    assert "memory" not in ok.report


def test_calibration_activations_go_to_disk_when_they_would_not_fit(tmp_path, tokenizer_dir):
    model_dir = _model(tmp_path, tokenizer_dir)
    more = {"source": "python-docs", "samples": 96, "seq_len": 64, "batch_size": 4}  # ~9 MB of block inputs
    whole = run(Recipe.from_dict(_spec(model_dir, tmp_path / "whole", calibration=more)))
    budget = (BASE_RSS + 8 * MB) / 2**30
    streamed = run(Recipe.from_dict(_spec(model_dir, tmp_path / "streamed", calibration=more,
                                          memory_budget_gb=budget)))
    assert streamed.report["memory"]["activations_on_disk"] is True
    assert file_hashes(streamed.output / "safetensors") == file_hashes(whole.output / "safetensors")
    assert not list(tmp_path.glob(".streamed*"))


def test_paging_out_a_file_backed_tensor_changes_no_data(tmp_path):
    """page_out reclaims the pages of weights read from a file mapping; the data, should anything still use the
    tensor, reads back unchanged. Memory of the heap is left alone."""
    import torch

    from compressor.memory import page_out

    values = torch.randn(1 << 20)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=values.numel())
    assert not mapped.untyped_storage().resizable()  # the kind of storage page_out acts on
    assert torch.equal(mapped, values)
    heap = values.clone()
    page_out([mapped, heap])
    assert torch.equal(mapped, values) and torch.equal(heap, values)


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_discarding_the_dead_tail_of_a_buffer_returns_its_pages_and_keeps_the_rest():
    """The runner's recorded MLP intermediates ([tokens, 1536] for SmolLM2) are overwritten in place by the MLP's
    narrower outputs ([tokens, 576]); the buffer's tail is dead but stays resident until the buffer is freed unless
    its pages are given back."""
    import torch

    from compressor.memory import discard_from

    buffer = torch.ones(64 * MB // 4)  # touched: every page resident
    head = 16 * MB
    before = _rss_anon_mb()
    discard_from(buffer, head)
    assert before - _rss_anon_mb() > 40  # 48 MB of the tail, less what other threads allocate meanwhile
    assert bool((buffer[: head // 4] == 1).all())
    discard_from(torch.from_file(__file__, size=8), 0)  # not heap memory: left alone (page_out's case)
