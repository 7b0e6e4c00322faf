#!/usr/bin/env python
"""GGUF on SmolLM2-135M-Instruct, every file evaluated in llama.cpp (llama-cpp-python) on the same token ids.

Protocol (the GGUF issue's): baseline = float32 torch model dequantized from the bundled GGUF; WikiText-2 test,
16 windows x 2048 tokens; calibration (GPTQ and the importance matrix) 128 x 512 tokens of the WikiText-2 train
subset, seed 0. Variants:

  * F16 written by compressor (correctness: perplexity within 0.5% of torch float32)
  * llama.cpp's own Q4_0 / Q4_0+imatrix / IQ4_NL+imatrix / Q4_K_M+imatrix, quantized by llama_model_quantize from
    that F16 file, the importance matrix computed by compressor from the calibration windows
  * compressor GPTQ W4 g32 symmetric codes written as Q4_0 (embedding/output types chosen by llama.cpp's Q4_0 rules,
    as in llama.cpp's own Q4_0), without and with the importance matrix for those tensors

    python benchmarks/bench_gguf.py [--windows 16] [--gptq DIR] [--label "AWQ+GPTQ W4 g32 sym"] [--only REGEX]
    # DIR: a GPTQ/AWQ checkpoint from bench_gptq.py; --only keeps the variants whose name matches (the F16 file is
    # always written, it is the source of llama.cpp's own quantizations)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.activation_stats import mean_squared_inputs  # noqa: E402
from compressor.evaluate import speed  # noqa: E402
from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.evaluate.llama_cpp_runtime import LlamaCppRuntime  # noqa: E402
from compressor.recipe import SpeedConfig  # noqa: E402
from export.gguf import llama_cpp_module, llama_quantize_file, tensor_type_counts, write_gguf  # noqa: E402
from export.safetensors import load_checkpoint  # noqa: E402
from protocol import load_protocol  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gguf")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--gptq", type=Path, default=ROOT / "benchmarks/out/gptq/compressor-gptq-w4-g32-sym-act-order/gptq")
    ap.add_argument("--label", default="GPTQ W4 g32 sym", help="what the --gptq checkpoint holds, for the table")
    ap.add_argument("--only", default="", help="regex: evaluate only the variants whose name matches")
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llama_cpp = llama_cpp_module()

    proto = load_protocol(args.windows)
    baseline, tok, source_gguf, calib, windows = (proto.baseline, proto.tokenizer, proto.source_gguf,
                                                  proto.calibration, proto.windows)

    files: dict[str, Path] = {}
    notes: dict[str, str] = {}

    def fresh(name: str) -> Path:
        p = args.out / name
        p.unlink(missing_ok=True)
        return p

    t = time.perf_counter()
    files["compressor F16"] = fresh("f16.gguf")
    write_gguf(baseline, tok, files["compressor F16"], "f16", source_gguf=source_gguf)
    print(f"F16 written in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    imatrix_file = args.out / "imatrix-128x512.pt"
    if imatrix_file.is_file():
        imatrix = torch.load(imatrix_file, weights_only=True)
    else:
        t = time.perf_counter()
        imatrix = mean_squared_inputs(baseline, calib, batch_size=8)
        torch.save(imatrix, imatrix_file)
        print(f"importance matrix in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    def wanted(name: str) -> bool:
        return re.search(args.only, name) is not None

    for ftype, use_imatrix in (("Q4_0", False), ("Q4_0", True), ("IQ4_NL", True), ("Q4_K_M", True)):
        name = f"llama.cpp {ftype}" + (" + imatrix" if use_imatrix else "")
        if not wanted(name):
            continue
        files[name] = fresh(f"llama-{ftype.lower()}{'-imatrix' if use_imatrix else ''}.gguf")
        t = time.perf_counter()
        llama_quantize_file(files["compressor F16"], files[name], ftype, baseline.config,
                            imatrix if use_imatrix else None)
        notes[name] = f"quantized in {time.perf_counter() - t:.1f}s"

    if (args.gptq / "config.json").is_file():
        gptq_model, _ = load_checkpoint(args.gptq)
        for use_imatrix in (False, True):
            name = f"compressor {args.label} -> Q4_0" + (" (+ imatrix for embd/output)" if use_imatrix else "")
            if not wanted(name):
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", args.label.lower()).strip("-")
            files[name] = fresh(f"compressor-{slug}-q4_0{'-imatrix' if use_imatrix else ''}.gguf")
            summary = write_gguf(gptq_model, tok, files[name], "q4_0", source_gguf=source_gguf,
                                 imatrix=imatrix if use_imatrix else None)
            notes[name] = (f"{len(summary.carried_codes)} layers' GPTQ codes carried over, "
                           f"{len(summary.requantized)} re-quantized, max code error {summary.max_code_error}")
        del gptq_model
    else:
        print(f"no GPTQ checkpoint at {args.gptq}: run benchmarks/bench_gptq.py first; skipping", file=sys.stderr)

    if not wanted("compressor F16"):
        files.pop("compressor F16")
    runtimes = [LlamaCppRuntime(name, path, n_ctx=2048) for name, path in files.items()]
    t = time.perf_counter()
    metrics = compare(TorchRuntime("torch float32", baseline), runtimes, windows)
    print(f"evaluation in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    for rt in runtimes:
        rt.close()
    del runtimes

    speeds = {}
    if not args.no_speed:
        cfg = SpeedConfig(prompt_tokens=128, decode_tokens=64, prefill_tokens=512, repeats=5)
        for name in files:
            if "Q4_0" in name:
                speeds[name] = speed.measure("gguf", str(files[name]), cfg, "cpu")

    base = metrics["torch float32"]["perplexity"]
    lines = ["| file | ppl | vs torch fp32 | KL | top-1 | size MB | tensor types | decode ms/tok | prefill tok/s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| torch float32 baseline | {base:.3f} | - | - | - | - | - | - | - |"]
    for name, path in files.items():
        m = metrics[name]
        types = ", ".join(f"{k}:{v}" for k, v in tensor_type_counts(path).items())
        sp = speeds.get(name, {})
        lines.append(f"| {name} | {m['perplexity']:.3f} | {m['perplexity'] / base - 1:+.2%} | "
                     f"{m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | {path.stat().st_size / 1e6:.1f} | "
                     f"{types} | {sp.get('decode_ms_per_token', '-')} | {sp.get('prefill_tokens_per_second', '-')} |")
    table = "\n".join(lines)
    print(table)
    record = {"date": dt.date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "windows": int(windows.shape[0]), "seq_len": 2048, "metrics": metrics, "notes": notes,
              "speeds": speeds, "llama_cpp_python": getattr(llama_cpp, "__version__", "?"), "table": table}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
