import json

import pytest
import torch

from compressor.data import DataError, calibration_windows, evaluation_windows, load_records, load_text, same_text
from compressor.recipe import CalibrationConfig, DataConfig, EvalDataConfig


class CharTokenizer:
    """One token per byte: enough to test windowing without a model."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([list(text.encode())])

        return Out()


def test_python_docs_splits_are_disjoint_and_substantial():
    train = load_records(DataConfig(), "train")
    test = load_records(DataConfig(), "test")
    assert not set(train) & set(test)
    assert sum(map(len, test)) > 100_000  # enough held-out text for 8 x 1024-token windows


def test_line_records_follow_the_wikitext_convention(tmp_path):
    p = tmp_path / "w.raw"
    p.write_text(" \n = Title = \n \n Body text .\n")
    text = load_text(DataConfig(source=str(p), line_records=True), "test")
    # rows "", " = Title = \n", "", " Body text .\n" joined by a blank line, as HF datasets rows are
    assert text == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Body text .\n"
    assert load_text(DataConfig(source=str(p)), "test") == p.read_text()


def test_jsonl_records_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert load_records(DataConfig(source=str(p)), "train") == ["a", "b"]
    assert load_text(DataConfig(source=str(p), join=" "), "train") == "a b"
    with pytest.raises(DataError, match=r"d.jsonl:1: no field 'body' \(has \['text'\]\)"):
        load_records(DataConfig(source=str(p), field="body"), "train")
    p.write_text("{not json\n")
    with pytest.raises(DataError, match="d.jsonl:1: not a JSON object"):
        load_records(DataConfig(source=str(p)), "train")


def test_missing_source_names_the_choices(tmp_path):
    with pytest.raises(DataError, match="no such file.*python-docs"):
        load_records(DataConfig(source=str(tmp_path / "nope.txt")), "train")


def test_calibration_windows_are_seeded(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghijklmnopqrstuvwxyz" * 20)
    cfg = CalibrationConfig(source=str(p), samples=5, seq_len=16, seed=3)
    a, b = calibration_windows(CharTokenizer(), cfg), calibration_windows(CharTokenizer(), cfg)
    assert a.shape == (5, 16) and torch.equal(a, b)
    c = calibration_windows(CharTokenizer(), cfg.model_copy(update={"seed": 4}))
    assert not torch.equal(a, c)


def test_evaluation_windows_are_consecutive_and_checked(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("x" * 100)
    w = evaluation_windows(CharTokenizer(), EvalDataConfig(source=str(p), windows=3, seq_len=30))
    assert w.shape == (3, 30)
    assert evaluation_windows(CharTokenizer(), EvalDataConfig(source=str(p), windows=None, seq_len=30)).shape[0] == 3
    with pytest.raises(DataError, match="enough for 3 windows of 30, not 4"):
        evaluation_windows(CharTokenizer(), EvalDataConfig(source=str(p), windows=4, seq_len=30))
    with pytest.raises(DataError, match="fewer than seq_len"):
        calibration_windows(CharTokenizer(), CalibrationConfig(source=str(p), seq_len=200))


def test_same_text_detection(tmp_path):
    assert not same_text(DataConfig(), DataConfig())  # built-in: train vs test split
    assert same_text(DataConfig(split="test"), DataConfig())
    assert same_text(DataConfig(source="a.txt"), DataConfig(source="a.txt"))
    assert not same_text(DataConfig(source="a.txt"), DataConfig(source="b.txt"))


def test_data_free_calibration_samples_from_the_model(tokenizer_dir, model_dir_factory, tmp_path):
    """`source: model` draws seeded sequences from the model itself; a run calibrates GPTQ on them; evaluation
    refuses generated text."""
    from transformers import AutoTokenizer

    from compressor.data import generated_windows
    from compressor.recipe import Recipe, RecipeError
    from compressor.run import run

    from conftest import tiny_model, tiny_recipe

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = tiny_model("llama")
    cfg = CalibrationConfig(source="model", samples=5, seq_len=12, seed=3)
    a = generated_windows(model, tok, cfg, batch_size=2)
    assert a.shape == (5, 12) and a.dtype == torch.long and int(a.max()) < 384
    assert torch.equal(a, generated_windows(model, tok, cfg, batch_size=2))
    assert not torch.equal(a, generated_windows(model, tok, cfg.model_copy(update={"seed": 4}), batch_size=2))
    assert not set(a[:, 0].tolist()) & set(tok.all_special_ids)

    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "run",
                         calibration={"source": "model", "samples": 4, "seq_len": 32, "batch_size": 4})
    result = run(Recipe.from_dict(recipe))
    assert "sampled from the model itself" in result.report["calibration"]["description"]
    assert result.report["stages"][0]["summary"]["method"] == "gptq"
    with pytest.raises(RecipeError, match="for calibration only"):
        Recipe.from_dict({**recipe, "evaluate": {"data": {"source": "model"}}})
