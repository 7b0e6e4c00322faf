#!/usr/bin/env python
"""Low-rank factorization on SmolLM2-135M-Instruct: plain against activation-aware SVD at the same parameter count,
and whether low-rank + distillation + 4-bit quantization beats 4-bit alone as an ONNX deployable.

Protocol (the low-rank issue's): float32 baseline dequantized from the bundled GGUF; calibration 128 x 512 tokens of
the WikiText-2 train subset, seed 0; WikiText-2 test, 16 windows x 2048 tokens. Every linear layer of the decoder
blocks is factorized (embedding and tied head stay) with `--ratio` of their parameters removed; ranks are multiples
of 32 (so 4-bit groups of 32 fit the second factor).

Part 1 scores each variant in torch. Part 2 (`--pipeline`) takes the activation-aware model, distills it against
the baseline for `--distill-minutes`, quantizes it with GPTQ (W4 g32, symmetric, act-order) and exports ONNX int4;
the baseline quantized the same way and exported the same way is the comparison. Perplexity, KL and top-1 of both
are measured in onnxruntime on the same windows, and decode ms/token in a fresh onnxruntime process each.

    python benchmarks/bench_low_rank.py [--ratio 0.2 | --ratio mlp=0.1] [--windows 16] [--only "SVD,activation-aware"]
                                        [--pipeline [--distill-minutes 20]]
"""
from __future__ import annotations

import argparse
import copy
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.evaluate import speed  # noqa: E402
from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.evaluate.onnx_runtime import OnnxRuntimeModel  # noqa: E402
from compressor.recipe import DistillConfig, LowRankConfig, QuantizeConfig, SpeedConfig  # noqa: E402
from compressor.stages import StageContext  # noqa: E402
from compressor.stages.distill import apply_distill  # noqa: E402
from compressor.stages.low_rank import apply_low_rank  # noqa: E402
from compressor.stages.quantize import apply_quantize  # noqa: E402
from export.onnx import OnnxOptions, write_onnx  # noqa: E402
from protocol import load_protocol, save_results  # noqa: E402

GPTQ = QuantizeConfig(method="gptq", bits=4, group_size=32, symmetric=True, act_order=True)
ACTIVATION_AWARE = "activation-aware"


def parse_ratio(text: str) -> float | dict[str, float]:
    """`0.2` (every linear) or `mlp=0.1,self_attn=0.2` ({regex on the layer name: ratio}; others stay dense)."""
    if "=" not in text:
        return float(text)
    return {k.strip(): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}


def variants(ratio: float | dict[str, float]) -> dict[str, LowRankConfig]:
    scope: dict = {"ratio": ratio}
    if isinstance(ratio, dict) and len(set(ratio.values())) == 1:  # one ratio for some kinds: a sensitivity budget too
        scope = {"ratio": next(iter(ratio.values())), "include": tuple(ratio)}
    chosen = {
        "SVD": LowRankConfig(method="svd", **scope),
        "SVD + refit": LowRankConfig(method="svd", update=True, **scope),
        ACTIVATION_AWARE: LowRankConfig(method="activation_aware", **scope),
    }
    if isinstance(scope["ratio"], float):
        chosen["activation-aware, sensitivity"] = LowRankConfig(method="activation_aware", allocation="sensitivity",
                                                                **scope)
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "low_rank")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ratio", type=parse_ratio, default=0.2, help="fraction of the factorized layers' parameters "
                    "removed: 0.2 for every linear of the blocks, or per kind, e.g. mlp=0.1 (other layers stay dense)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--pipeline", action="store_true", help="also low-rank + distill + GPTQ W4 -> ONNX int4 against "
                    "GPTQ W4 -> ONNX int4")
    ap.add_argument("--distill-minutes", type=float, default=20.0)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # stage progress, on stderr
    args.out.mkdir(parents=True, exist_ok=True)

    chosen = variants(args.ratio)
    if args.only:
        keep = [k.strip() for k in args.only.split(",")]
        unknown = set(keep) - set(chosen)
        if unknown:
            sys.exit(f"unknown variants {sorted(unknown)}; known: {list(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in keep}
    if args.pipeline and ACTIVATION_AWARE not in chosen:
        chosen[ACTIVATION_AWARE] = variants(args.ratio)[ACTIVATION_AWARE]

    proto = load_protocol(args.windows)
    baseline, calib, windows = proto.baseline, proto.calibration, proto.windows
    ctx = StageContext(calibration=calib, batch_size=8)
    models: dict[str, torch.nn.Module] = {}
    info: dict[str, dict] = {}
    for name, cfg in chosen.items():
        model = copy.deepcopy(baseline)
        report = apply_low_rank(cfg, model, ctx)
        s = report.summary
        info[name] = {"seconds": round(report.seconds, 1), "removed": s["parameters_removed_ratio"],
                      "factorized": s["factorized"], "left_dense": len(s["left_dense"]),
                      "predicted_error": s["mean_predicted_error"]}
        print(f"{name}: {info[name]}", file=sys.stderr)
        models[name] = model
    metrics = compare(TorchRuntime("torch float32", baseline), [TorchRuntime(n, m) for n, m in models.items()],
                      windows)
    base = metrics["torch float32"]["perplexity"]
    scope = "every linear of the decoder blocks" if isinstance(args.ratio, float) else "the linears matching"
    lines = [f"Factorized: {scope}, ratio {args.ratio}", "",
             "| variant | params removed | layers factorized / dense | ppl | vs fp32 | KL | top-1 | stage s |",
             "|---|---|---|---|---|---|---|---|", f"| torch float32 baseline | 0 | - | {base:.3f} | - | - | - | - |"]
    for name in models:
        m, i = metrics[name], info[name]
        lines.append(f"| {name} | {i['removed']:.1%} | {i['factorized']} / {i['left_dense']} | {m['perplexity']:.3f} "
                     f"| {m['perplexity'] / base - 1:+.1%} | {m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | "
                     f"{i['seconds']} |")
    record = {"windows": int(windows.shape[0]), "ratio": args.ratio, "metrics": metrics, "info": info}
    if args.pipeline:
        save_results(args.out, "\n".join(lines), **record)  # part 1 is kept even if part 2 fails
        lines += [""] + _pipeline(args, baseline, proto.tokenizer, models[ACTIVATION_AWARE], ctx, windows, record)
    save_results(args.out, "\n".join(lines), **record)


def _pipeline(args, baseline, tokenizer, factorized, ctx, windows, record: dict) -> list[str]:
    student = copy.deepcopy(factorized)
    cfg = DistillConfig(steps=1_000_000, max_minutes=args.distill_minutes, lr=args.distill_lr, batch_size=8,
                        seq_len=128, eval_every=25, holdout=16)
    distill = apply_distill(cfg, student, StageContext(calibration=ctx.calibration, teacher=baseline))
    record["distill"] = {"seconds": round(distill.seconds, 1), **distill.summary}
    print(f"distill: {record['distill']}", file=sys.stderr)
    quantized = {}
    for name, model in (("GPTQ W4", copy.deepcopy(baseline)), ("low-rank + distill + GPTQ W4", student)):
        start = time.perf_counter()
        apply_quantize(GPTQ, model, ctx)
        record.setdefault("quantize_seconds", {})[name] = round(time.perf_counter() - start, 1)
        quantized[name] = model
    files: dict[str, Path] = {}
    for name, model in quantized.items():
        path = args.out / (name.lower().replace(" + ", "-").replace(" ", "-") + "-onnx-int4")
        shutil.rmtree(path, ignore_errors=True)
        write_onnx(model, tokenizer, path, OnnxOptions(weights="int4"))
        files[name] = path
    torch_metrics = compare(TorchRuntime("torch float32", baseline),
                            [TorchRuntime("low-rank + distill (float)", student)], windows)
    ort = compare(TorchRuntime("torch float32", baseline),
                  [OnnxRuntimeModel(name, path) for name, path in files.items()], windows)
    speed_cfg = SpeedConfig(prompt_tokens=128, decode_tokens=64, prefill_tokens=512, repeats=5)
    speeds = {name: speed.measure("onnx", str(path), speed_cfg) for name, path in files.items()}
    record.update(pipeline_metrics={**torch_metrics, **ort}, speeds=speeds,
                  files={n: str(p) for n, p in files.items()})
    base = ort["torch float32"]["perplexity"]
    d = record["distill"]
    removed = record["info"][ACTIVATION_AWARE]["removed"]
    lines = [f"Pipeline: activation-aware low-rank (ratio {args.ratio}, {removed:.1%} of the factorized parameters) "
             f"-> distill "
             f"({d['steps']} steps, {d['seconds']:.0f} s, held-out KL {d['holdout_kl_before']:.4f} -> "
             f"{d['holdout_kl_after']:.4f}; float ppl {torch_metrics['low-rank + distill (float)']['perplexity']:.3f})"
             " -> GPTQ W4 g32 -> ONNX int4, against GPTQ W4 g32 -> ONNX int4", "",
             "| ONNX int4 model | size MB | ppl (onnxruntime) | vs fp32 | KL | top-1 | decode ms/token | speedup |",
             "|---|---|---|---|---|---|---|---|"]
    ref_ms = speeds["GPTQ W4"].get("decode_ms_per_token")
    for name, path in files.items():
        m, ms = ort[name], speeds[name].get("decode_ms_per_token")
        lines.append(f"| {name} | {speed.directory_bytes(path) / 1e6:.1f} | {m['perplexity']:.3f} | "
                     f"{m['perplexity'] / base - 1:+.1%} | {m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | "
                     f"{ms if ms is None else round(ms, 2)} | "
                     f"{'-' if not (ms and ref_ms) else f'{ref_ms / ms:.3f}x'} |")
    return lines


if __name__ == "__main__":
    main()
