#!/usr/bin/env python
"""GPTQ of a Llama-shaped model whose float32 weights are twice the memory budget (issue 10's acceptance): peak
resident memory measured by `/usr/bin/time -v` around `compress run`.

    python benchmarks/bench_memory.py [--budget-gb 1.35] [--out benchmarks/out/memory]

Builds a random Llama-shaped model (hidden 2048, MLP 2816, 25 layers, 16 heads / 4 KV heads, vocabulary 8192:
0.73 B parameters, 2.91 GB in float32) as a safetensors folder with the python-docs tokenizer the tests use, then runs a
4-bit GPTQ recipe (g128, 8 x 512 calibration windows, GPTQ safetensors export, no evaluation) with
`memory_budget_gb`. Prints the weights' size, the budget, the run's own estimate and the measured peak.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def build_model(folder: Path) -> int:
    """The random model and a tokenizer; returns its float32 bytes. Runs in a child process so that building it
    does not count toward anything measured."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(hidden_size=2048, intermediate_size=2816, num_hidden_layers=25, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, 0.02)
model.save_pretrained({str(folder)!r})
print(sum(p.numel() for p in model.parameters()) * 4)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tok = _tokenizer()
    for f in tok.iterdir():
        shutil.copy(f, folder / f.name)
    return int(out.stdout.strip().splitlines()[-1])


def _tokenizer() -> Path:
    """A byte-level BPE of vocabulary 384 trained on the embedded python-docs text (as tests/conftest.py builds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT))
    from compressor.data import _python_docs

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_python_docs("train")[:20], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = Path("/tmp/bench_memory_tokenizer")
    fast.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-gb", type=float, default=1.35)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "memory")
    args = ap.parse_args()
    out = args.out.resolve()
    model_dir = out / "model"
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        shutil.rmtree(model_dir, ignore_errors=True)
        model_dir.mkdir(parents=True)
        t = time.perf_counter()
        build_model(model_dir)
        print(f"built the model in {time.perf_counter() - t:.0f}s")
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    recipe = {"model": str(model_dir),
              "calibration": {"source": "python-docs", "samples": 8, "seq_len": 512, "batch_size": 2},
              "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 128, "act_order": True}}],
              "export": [{"safetensors": {"format": "gptq"}}], "evaluate": None,
              "memory_budget_gb": args.budget_gb, "output": str(out / "run")}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    shutil.rmtree(out / "run", ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "compressor.cli", "run",
                           str(out / "recipe.yaml"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    (out / "run.log").write_text(proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        return 1
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    peak = peak_kb * 1024
    report = json.loads((out / "run" / "report.json").read_text())
    budget = args.budget_gb * 2**30
    print(f"weights (safetensors on disk, float32): {weights / 2**30:.2f} GiB")
    print(f"memory budget:                          {args.budget_gb:.2f} GiB  (weights / budget = "
          f"{weights / budget:.2f}x)")
    print(f"run's own estimate of its peak:         {report['memory']['estimated_peak_gb']:.2f} GiB "
          f"{report['memory']['parts_gb']}")
    print(f"measured peak resident (time -v):       {peak / 2**30:.2f} GiB  -> "
          f"{'UNDER' if peak <= budget else 'OVER'} the budget")
    print(f"wall time: {seconds:.0f}s; checkpoint: "
          f"{sum(f.stat().st_size for f in (out / 'run' / 'safetensors').iterdir()) / 2**20:.0f} MiB")
    (out / "result.json").write_text(json.dumps({"weights_bytes": weights, "budget_gb": args.budget_gb,
                                                 "peak_rss_bytes": peak, "seconds": seconds,
                                                 "estimate": report["memory"]}, indent=2))
    return 0 if peak <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
