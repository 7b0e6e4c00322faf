#!/usr/bin/env python
"""Structured pruning on SmolLM2-135M-Instruct: does removing MLP channels or whole blocks speed up decoding in
llama.cpp and onnxruntime by what the smaller weights promise?

Protocol (the pruning issue's): float32 baseline dequantized from the bundled GGUF; calibration 128 x 512 tokens of
the WikiText-2 train subset, seed 0; accuracy on WikiText-2 test, 16 windows x 2048 tokens, in torch. Each model is
exported to GGUF (F16 and Q4_0) and ONNX (float32 and int4, int8 activations), and decode ms/token (128-token prompt,
64 tokens, median of 5) is measured in a fresh process per file, the unpruned model in the same format in the same
run. Decode reads every weight once per token (the tied embedding table too, as the output head), so the ideal
speedup is the ratio of weight bytes before and after; the table shows measured / ideal.

    python benchmarks/bench_structured.py [--windows 16] [--variants "MLP -25%,3 blocks"] [--no-speed]
                                          [--distill-minutes 20] [--distill-steps N]   # distillation budget
                                          [--distill-precision bfloat16] [--distill-data FILE]
    python benchmarks/bench_structured.py --distill-only --distill-minutes 20   # distill the latest run's models
"""
from __future__ import annotations

import argparse
import copy
import json
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
from compressor.data import calibration_windows  # noqa: E402
from compressor.recipe import (CalibrationConfig, DistillConfig, PruneDepthConfig, PruneWidthConfig,  # noqa: E402
                               SpeedConfig)
from compressor.stages import StageContext  # noqa: E402
from compressor.stages.distill import apply_distill  # noqa: E402
from compressor.stages.structured import apply_prune_depth, apply_prune_width  # noqa: E402
from export.gguf import write_gguf  # noqa: E402
from export.onnx import OnnxOptions, write_onnx  # noqa: E402
from protocol import load_protocol, save_results  # noqa: E402

VARIANTS = {
    "MLP -25%": [PruneWidthConfig(mlp=0.25)],
    "3 blocks": [PruneDepthConfig(blocks=3)],
}
FORMATS = {  # name -> (kind, writer)
    "GGUF F16": ("gguf", lambda m, tok, p, src: write_gguf(m, tok, p, "f16", source_gguf=src)),
    "GGUF Q4_0": ("gguf", lambda m, tok, p, src: write_gguf(m, tok, p, "q4_0", source_gguf=src)),
    "ONNX float32": ("onnx", lambda m, tok, p, src: write_onnx(m, tok, p, OnnxOptions(weights="float32"))),
    "ONNX int4": ("onnx", lambda m, tok, p, src: write_onnx(m, tok, p, OnnxOptions(weights="int4"))),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "structured")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--distill-steps", type=int, default=0, help="also distill each pruned model (teacher: unpruned)"
                    " for this many steps of 8 x 128 calibration tokens")
    ap.add_argument("--distill-minutes", type=float, default=None, help="also distill each pruned model for this "
                    "wall-clock budget (with --distill-steps as well: whichever ends first)")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-schedule", default="cosine", choices=["cosine", "linear", "constant"])
    ap.add_argument("--distill-batch", type=int, default=8, help="windows per step")
    ap.add_argument("--distill-seq-len", type=int, default=128, help="tokens per window (the 512-token calibration "
                    "windows are cut into pieces of this length)")
    ap.add_argument("--distill-teacher", default="live", choices=["live", "precomputed"])
    ap.add_argument("--distill-precision", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: autocast training passes (fast on CPUs with AMX or AVX512-BF16)")
    ap.add_argument("--distill-data", default="", help="more training text beside the calibration windows: files "
                    "(comma-separated, as calibration sources are given; never the test split)")
    ap.add_argument("--distill-samples", type=int, default=2048, help="windows of --distill-seq-len tokens drawn "
                    "from each --distill-data file (seed 0)")
    ap.add_argument("--speed-only", action="store_true", help="measure the files of the latest run in --out again "
                    "(e.g. on a quiet machine) and print the tables with its accuracy figures")
    ap.add_argument("--distill-only", action="store_true", help="distill the pruned models of the latest run in --out "
                    "(reloaded from its GGUF F16 files) and report how much of the perplexity gap that closes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # stage progress, on stderr
    args.out.mkdir(parents=True, exist_ok=True)
    if args.distill_only:
        return _distill_only(args)
    if args.speed_only:
        runs = [r for r in sorted(args.out.glob("results-*.json"))
                if json.loads(r.read_text()).get("kind") != "distill-only"]
        if not runs:
            sys.exit(f"--speed-only: no results-*.json of a pruning run in {args.out}; run without it first")
        earlier = json.loads(runs[-1].read_text())
        metrics, info = earlier["metrics"], earlier["info"]
        files = {tuple(k.split(" | ")): Path(v) for k, v in earlier["files"].items()}
        windows_n = earlier["windows"]
        wanted = set(args.formats.split(","))
        files = {k: v for k, v in files.items() if k[1] in wanted}
    else:
        metrics, info, files, windows_n = _prune_and_export(args)
    speeds = {}
    if not args.no_speed:
        cfg = SpeedConfig(prompt_tokens=128, decode_tokens=64, prefill_tokens=512, repeats=5)
        for (name, fmt), path in files.items():
            speeds[f"{name} | {fmt}"] = speed.measure(FORMATS[fmt][0], str(path), cfg)
            print(f"{name} {fmt}: {speeds[f'{name} | {fmt}']}", file=sys.stderr)

    base_ppl = metrics["torch float32"]["perplexity"]
    lines = ["| model | ppl | vs unpruned | KL | top-1 | block params removed | prune s |",
             "|---|---|---|---|---|---|---|", f"| unpruned | {base_ppl:.3f} | - | - | - | - | - |"]
    for name in [n for n in info if n != "unpruned"]:
        m = metrics[name]
        removed = next((s.get("block_parameters_removed") for s in info[name]["summaries"]
                        if "block_parameters_removed" in s), None)
        removed = removed if removed is not None else ", ".join(
            f"blocks {s['blocks_removed']}" for s in info[name]["summaries"] if "blocks_removed" in s)
        lines.append(f"| {name} | {m['perplexity']:.3f} | {m['perplexity'] / base_ppl - 1:+.1%} | "
                     f"{m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | {removed} | {info[name]['seconds']} |")
    lines += ["", "| model | format | size MB | decode ms/token | speedup | ideal (bytes ratio) | speedup / ideal | "
                  "gain / ideal gain |", "|---|---|---|---|---|---|---|---|"]
    for (name, fmt), path in files.items():
        size = speed.directory_bytes(path) if path.is_dir() else path.stat().st_size
        base_path = files[("unpruned", fmt)]
        base_size = speed.directory_bytes(base_path) if base_path.is_dir() else base_path.stat().st_size
        ms = speeds.get(f"{name} | {fmt}", {}).get("decode_ms_per_token")
        base_ms = speeds.get(f"unpruned | {fmt}", {}).get("decode_ms_per_token")
        ideal = base_size / size
        if ms and base_ms:
            got = base_ms / ms
            lines.append(f"| {name} | {fmt} | {size / 1e6:.1f} | {ms:.2f} | {got:.3f}x | {ideal:.3f}x | "
                         f"{got / ideal:.0%} | {(got - 1) / (ideal - 1):.0%} |" if name != "unpruned" else
                         f"| {name} | {fmt} | {size / 1e6:.1f} | {ms:.2f} | - | - | - | - |")
        else:
            lines.append(f"| {name} | {fmt} | {size / 1e6:.1f} | - | - | {ideal:.3f}x | - | - |")
    for name in [n for n in info if n.endswith(" + distill")]:
        pruned = name.removesuffix(" + distill")
        gap, left = metrics[pruned]["perplexity"] - base_ppl, metrics[name]["perplexity"] - base_ppl
        lines.append(f"\n{name}: closes {1 - left / gap:.0%} of the perplexity gap pruning opened, in "
                     f"{info[name]['seconds']} s")
    save_results(args.out, "\n".join(lines), windows=windows_n, metrics=metrics, info=info, speeds=speeds,
                 files={f"{n} | {f}": str(p) for (n, f), p in files.items()})


def _distill_config(args) -> DistillConfig:
    return DistillConfig(steps=args.distill_steps or 1_000_000, max_minutes=args.distill_minutes, lr=args.distill_lr,
                         schedule=args.distill_schedule, batch_size=args.distill_batch, seq_len=args.distill_seq_len,
                         teacher=args.distill_teacher, precision=args.distill_precision, eval_every=25, holdout=16)


def _distill_context(args, tok, calib: torch.Tensor, teacher: torch.nn.Module) -> StageContext:
    """The calibration windows cut into --distill-seq-len pieces, plus --distill-samples windows of that length from
    each --distill-data file."""
    seq = args.distill_seq_len
    parts = [calib[:, : calib.shape[1] // seq * seq].reshape(-1, seq)]
    for source in [f for f in args.distill_data.split(",") if f]:
        cfg = CalibrationConfig(source=source, line_records=source.endswith(".raw"), samples=args.distill_samples,
                                seq_len=seq, seed=0)
        parts.append(calibration_windows(tok, cfg))
        print(f"distill data: {len(parts[-1])} windows of {seq} tokens from {source}", file=sys.stderr)
    return StageContext(calibration=calib, teacher=teacher, distill_windows=torch.cat(parts))


def _distill_only(args) -> None:
    """Distillation as its own measurement: the pruned models come back from the F16 GGUF files of the latest run
    (float16-rounded; re-scored here, so the gap is measured on exactly the model that is distilled)."""
    from compressor.models import load
    from compressor.recipe import ModelConfig

    runs = [r for r in sorted(args.out.glob("results-*.json"))
            if json.loads(r.read_text()).get("kind") != "distill-only"]
    if not runs:
        sys.exit(f"--distill-only: no results-*.json of a pruning run in {args.out}; run without it first")
    earlier = json.loads(runs[-1].read_text())
    files = {tuple(k.split(" | ")): Path(v) for k, v in earlier["files"].items()}
    proto = load_protocol(args.windows)
    baseline, calib, windows = proto.baseline, proto.calibration, proto.windows
    cfg = _distill_config(args)
    distill_ctx = _distill_context(args, proto.tokenizer, calib, baseline)
    pruned, distilled, info = {}, {}, {}
    for (name, fmt), path in files.items():
        if name == "unpruned" or fmt != "GGUF F16" or name not in args.variants.split(","):
            continue
        pruned[name], _, _ = load(ModelConfig(id=str(path)))
        student = copy.deepcopy(pruned[name])
        report = apply_distill(cfg, student, distill_ctx)
        info[name + " + distill"] = {"seconds": round(report.seconds, 1), **report.summary}
        print(f"{name} + distill: {info[name + ' + distill']}", file=sys.stderr)
        distilled[name + " + distill"] = student
    metrics = compare(TorchRuntime("torch float32", baseline),
                      [TorchRuntime(n, m) for n, m in {**pruned, **distilled}.items()], windows)
    base = metrics["torch float32"]["perplexity"]
    lines = [f"Distillation: {cfg.max_minutes} min budget, lr {cfg.lr} ({cfg.schedule}), {cfg.batch_size} x "
             f"{cfg.seq_len} tokens per step, teacher: unpruned ({cfg.teacher})",
             "", "| model | ppl | KL | top-1 | steps | seconds | gap closed |", "|---|---|---|---|---|---|---|",
             f"| unpruned | {base:.3f} | - | - | - | - | - |"]
    for name in pruned:
        d = name + " + distill"
        gap = metrics[name]["perplexity"] - base
        for row, extra in ((name, "| - | - | - |"), (d, f"| {info[d]['steps']} | {info[d]['seconds']} | "
                                                       f"{1 - (metrics[d]['perplexity'] - base) / gap:.0%} |")):
            m = metrics[row]
            lines.append(f"| {row} | {m['perplexity']:.3f} | {m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} "
                         + extra)
    save_results(args.out, "\n".join(lines), windows=int(windows.shape[0]), metrics=metrics, info=info,
                 files=earlier["files"], kind="distill-only")


def _prune_and_export(args) -> tuple[dict, dict, dict[tuple[str, str], Path], int]:
    proto = load_protocol(args.windows)
    baseline, tok, source_gguf, calib, windows = (proto.baseline, proto.tokenizer, proto.source_gguf,
                                                  proto.calibration, proto.windows)
    ctx = StageContext(calibration=calib, batch_size=8)

    models: dict[str, torch.nn.Module] = {"unpruned": baseline}
    info: dict[str, dict] = {"unpruned": {}}
    for name in [v for v in args.variants.split(",") if v]:
        model = copy.deepcopy(baseline)
        start = time.perf_counter()
        reports = [(apply_prune_width if isinstance(c, PruneWidthConfig) else apply_prune_depth)(c, model, ctx)
                   for c in VARIANTS[name]]
        info[name] = {"seconds": round(time.perf_counter() - start, 1),
                      "summaries": [r.summary for r in reports]}
        print(f"{name}: pruned in {info[name]['seconds']}s: {info[name]['summaries']}", file=sys.stderr)
        models[name] = model

    distilled: dict[str, torch.nn.Module] = {}
    if args.distill_steps or args.distill_minutes:
        cfg = _distill_config(args)
        distill_ctx = _distill_context(args, tok, calib, baseline)
        for name in list(models)[1:]:
            student = copy.deepcopy(models[name])
            start = time.perf_counter()
            report = apply_distill(cfg, student, distill_ctx)
            info[name + " + distill"] = {"seconds": round(time.perf_counter() - start, 1),
                                         "summaries": [report.summary]}
            print(f"{name} + distill: {info[name + ' + distill']}", file=sys.stderr)
            distilled[name + " + distill"] = student
    metrics = compare(TorchRuntime("torch float32", baseline),
                      [TorchRuntime(n, m) for n, m in {**models, **distilled}.items() if n != "unpruned"], windows)

    files: dict[tuple[str, str], Path] = {}
    for fmt in [f for f in args.formats.split(",") if f]:
        kind, writer = FORMATS[fmt]
        for name, model in models.items():
            slug = f"{name}-{fmt}".lower().replace(" ", "-").replace("%", "").replace("+", "")
            path = args.out / (slug + (".gguf" if kind == "gguf" else ""))
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            writer(model, tok, path, source_gguf)
            files[(name, fmt)] = path
    return metrics, info, files, int(windows.shape[0])


if __name__ == "__main__":
    main()
