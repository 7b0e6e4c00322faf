#!/usr/bin/env python
"""Unstructured and N:M pruning on SmolLM2-135M-Instruct: magnitude, Wanda and SparseGPT at 50% and 2:4.

Protocol (the pruning issue's): float32 baseline dequantized from the bundled GGUF; WikiText-2 test, 16 windows x
2048 tokens; calibration 128 x 512 tokens of the WikiText-2 train subset, seed 0. Every linear layer of the decoder
blocks is pruned (embedding and tied head stay whole), as in the Wanda and SparseGPT papers. Each variant is pruned
from a fresh copy of the baseline in this process (wall time of the stage alone), then all are scored on the same
windows against the same baseline. `+ GPTQ` variants quantize the pruned model (W4 g32 sym act-order) and check that
the zeros survived.

    python benchmarks/bench_prune.py [--windows 16] [--only "SparseGPT 50%,Wanda 2:4"] [--with-gptq]
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.recipe import PruneConfig, QuantizeConfig  # noqa: E402
from compressor.stages import StageContext  # noqa: E402
from compressor.stages.prune import apply_prune  # noqa: E402
from compressor.stages.quantize import apply_quantize  # noqa: E402
from protocol import load_protocol, save_results  # noqa: E402

METHODS = {"magnitude": "Magnitude", "wanda": "Wanda", "sparsegpt": "SparseGPT"}
AMOUNTS = {"50%": {"sparsity": 0.5}, "2:4": {"pattern": "2:4"}}
GPTQ = QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=True, act_order=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "prune")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", default="", help="comma-separated variant names, e.g. 'SparseGPT 50%%,Wanda 2:4'")
    ap.add_argument("--with-gptq", action="store_true", help="also quantize the SparseGPT variants with GPTQ W4")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # stage progress, on stderr
    args.out.mkdir(parents=True, exist_ok=True)

    proto = load_protocol(args.windows)
    baseline, calib, windows = proto.baseline, proto.calibration, proto.windows
    ctx = StageContext(calibration=calib, batch_size=8)
    variants = [(f"{label} {amount}", PruneConfig(method=method, **kw))
                for amount, kw in AMOUNTS.items() for method, label in METHODS.items()]
    if args.only:
        keep = {k.strip() for k in args.only.split(",")}
        unknown = keep - {n for n, _ in variants}
        if unknown:
            sys.exit(f"unknown variants {sorted(unknown)}; known: {[n for n, _ in variants]}")
        variants = [v for v in variants if v[0] in keep]

    models: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    for name, cfg in variants:
        model = copy.deepcopy(baseline)
        start = time.perf_counter()
        report = apply_prune(cfg, model, ctx)
        seconds = time.perf_counter() - start
        print(f"{name}: pruned in {seconds:.1f}s, sparsity {report.summary['measured_sparsity']:.4f}",
              file=sys.stderr)
        models[name] = model
        info[name] = {"seconds": round(seconds, 1), "sparsity": report.summary["measured_sparsity"]}
        if args.with_gptq and cfg.method == "sparsegpt":
            q = copy.deepcopy(model)
            zeros = {n: m.weight == 0 for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)
                     and "layers" in n}
            start = time.perf_counter()
            apply_quantize(GPTQ, q, ctx)
            kept = all(bool((q.get_submodule(n).weight[z] == 0).all()) for n, z in zeros.items())
            models[name + " + GPTQ W4 g32"] = q
            info[name + " + GPTQ W4 g32"] = {"seconds": round(time.perf_counter() - start, 1),
                                             "sparsity": _linear_sparsity(q), "zeros_kept": kept}

    start = time.perf_counter()
    metrics = compare(TorchRuntime("torch float32", baseline), [TorchRuntime(n, m) for n, m in models.items()],
                      windows)
    print(f"evaluation in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    base = metrics["torch float32"]["perplexity"]
    lines = ["| variant | sparsity | ppl | vs fp32 | KL | top-1 | stage s |", "|---|---|---|---|---|---|---|",
             f"| torch float32 baseline | 0 | {base:.3f} | - | - | - | - |"]
    for name in models:
        m, i = metrics[name], info[name]
        lines.append(f"| {name} | {i['sparsity']:.3f} | {m['perplexity']:.3f} | {m['perplexity'] / base - 1:+.1%} | "
                     f"{m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | {i['seconds']} |")
    save_results(args.out, "\n".join(lines), windows=int(windows.shape[0]), metrics=metrics, info=info)


def _linear_sparsity(model: torch.nn.Module) -> float:
    layers = [m.weight for n, m in model.named_modules() if hasattr(m, "weight") and "layers" in n
              and getattr(m, "weight", None) is not None and m.weight.dim() == 2]
    zeros = sum(float((w == 0).sum()) for w in layers)
    return round(zeros / sum(w.numel() for w in layers), 6)


if __name__ == "__main__":
    main()
