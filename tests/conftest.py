"""Shared fixtures: tiny random models of several families with a small real tokenizer (fast, no download)."""
from __future__ import annotations

from pathlib import Path

import importlib.util
import os

import pytest
import torch

# Tests start from nothing: the stage cache (compressor.stage_cache) is on only in the tests that turn it on.
os.environ["COMPRESSOR_CACHE"] = "off"

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    # Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter (tests/test_kernels.py); it
    # must be on before any kernel is defined.
    from compressor.kernels import interpreter

    interpreter.enable()

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")
VOCAB = 384


def tiny_config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, head_dim=16,
                  tie_word_embeddings=True)
    common.update(over)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig,
           "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig}[family]
    if family in ("gemma2", "gemma3_text"):
        common.setdefault("sliding_window", 16)  # shorter than test windows so local layers really differ
        common.setdefault("query_pre_attn_scalar", common["head_dim"])  # as in real Gemma (llama.cpp assumes it)
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over))
    # Random init leaves outputs nearly uniform; larger weights give the model a real next-token distribution.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the embedded python-docs text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compressor.data import _python_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_python_docs("train")[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory, tokenizer_dir):
    """Save a tiny model of a family (with the tokenizer) once per session; returns its folder."""
    import shutil

    cache: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in cache:
            d = tmp_path_factory.mktemp(f"model-{family}")
            tiny_model(family).save_pretrained(d)
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, d / f.name)
            cache[family] = d
        return cache[family]

    return make


def tiny_recipe(model_dir: Path, output: Path, **over) -> dict:
    recipe = {
        "model": str(model_dir),
        "calibration": {"source": "python-docs", "samples": 8, "seq_len": 64, "batch_size": 4},
        "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}}],
        "export": [{"safetensors": {"format": "gptq"}}],
        "evaluate": {"data": {"source": "python-docs", "windows": 3, "seq_len": 64},
                     "metrics": ["perplexity", "kl_divergence", "top1_agreement", "size"]},
        "output": str(output),
    }
    recipe.update(over)
    return recipe
