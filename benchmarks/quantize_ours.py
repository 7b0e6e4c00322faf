#!/usr/bin/env python
"""Quantize an HF checkpoint with compressor on given calibration windows; the same CLI as the peers' runners.

Writes OUT/gptq (a GPTQ-format checkpoint, float16 for the non-quantized tensors) and OUT/result.json with the
quantization time (model load excluded), the peak RSS of this process, and a round-trip check: the checkpoint,
loaded back by compressor's loader, must give the same logits as the in-memory quantized model.
"""
from __future__ import annotations

import argparse
import logging
import json
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from compressor.models import load
from compressor.quant.tensor import QuantLinear
from compressor.recipe import ModelConfig, QuantizeConfig, QuantizeStage
from compressor.sequential import calibration_dtype
from compressor.stages import StageContext, apply_stage
from export.safetensors import load_checkpoint, write_gptq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--method", default="gptq", choices=["gptq", "rtn", "awq"])
    ap.add_argument("--awq-scales", action=argparse.BooleanOptionalAction, default=False,
                    help="gptq: AWQ scales first")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="calibration.precision: what the calibration passes multiply in")
    ap.add_argument("--mixed-target", type=float, default=None,
                    help="mixed precision: average stored bits per weight over the quantized layers")
    ap.add_argument("--mixed-choices", default="2,3,4,5,8", help="mixed precision: comma-separated widths")
    ap.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=True,
                    help="--no-sequential: one statistics pass per block (quantize.sequential: false)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # stage progress, on stderr

    model, tokenizer, _ = load(ModelConfig(id=args.model))
    calib = load_file(args.calib)["input_ids"]
    cfg = QuantizeConfig(method=args.method, bits=args.bits, group_size=args.group_size, symmetric=args.sym,
                         act_order=args.act_order and args.method == "gptq", damp=args.damp,
                         clip_search=args.clip_search, awq_scales=args.awq_scales, sequential=args.sequential,
                         mixed=None if args.mixed_target is None else {
                             "target_bits": args.mixed_target,
                             "choices": [int(c) if c.strip().isdigit() else c.strip()
                                         for c in args.mixed_choices.split(",")]})
    start = time.perf_counter()
    dtype = calibration_dtype(args.precision, model, "cpu")
    report = apply_stage(QuantizeStage(quantize=cfg), model,
                         StageContext(calibration=calib, batch_size=args.batch_size, compute_dtype=dtype))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    args.out.mkdir(parents=True, exist_ok=True)
    write_gptq(model, tokenizer, args.out / "gptq", dtype="float16")
    loaded, _ = load_checkpoint(args.out / "gptq")
    for m in model.modules():  # what the checkpoint stores for the non-quantized tensors
        if not isinstance(m, QuantLinear):
            for p in m.parameters(recurse=False):
                p.data = p.data.half().float()
    ids = calib[:1, :256]
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max().item()
    result = {"peer": "compressor", "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
              "precision": str(dtype or next(model.parameters()).dtype).removeprefix("torch."),
              "roundtrip_max_abs_logit_diff": diff, "settings": cfg.model_dump(mode="json"),
              "stage": report.to_dict()}
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "stage"}))


if __name__ == "__main__":
    main()
