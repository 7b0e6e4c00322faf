#!/usr/bin/env python
"""Mixed precision against llama.cpp's K-quant mixes: one size/KL curve, every file evaluated in its own runtime.

Protocol (the mixed-precision issue's): SmolLM2-135M-Instruct, float32 torch baseline; WikiText-2 test, 16 windows
x 2048 tokens; calibration 128 x 512 tokens of the WikiText-2 train subset, seed 0 (the file bench_gptq.py writes).
Symmetric formats only (SmolLM2's weights already lie on an asymmetric 4-bit grid of 32, which would flatter Q4_1).

  * llama.cpp: Q3_K_M, Q4_0, IQ4_NL, Q4_K_M, Q5_K_M, Q6_K, Q8_0, all with the importance matrix of the calibration
    windows, quantized by llama_model_quantize from the F16 file bench_gguf.py writes.
  * compressor: GPTQ (act-order, groups of 32, symmetric) with a per-layer width plan (compressor.mixed) at a target
    derived from a llama.cpp file's size, written as GGUF (each layer Q4_0 / Q5_0 / Q8_0 with its calibrated codes)
    and, for the 3-bit class, as ONNX (MatMulNBits at 2 / 4 / 8 bits), evaluated in llama.cpp / onnxruntime.

    python benchmarks/bench_mixed.py [--windows 16] [--points q4_0-size,q5_k_m-size,onnx-3bit] [--reuse]

Quantization runs in a fresh process per point (benchmarks/quantize_ours.py), whose wall time is reported.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.activation_stats import mean_squared_inputs  # noqa: E402
from compressor.data import calibration_windows, evaluation_windows  # noqa: E402
from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.evaluate.llama_cpp_runtime import LlamaCppRuntime  # noqa: E402
from compressor.evaluate.onnx_runtime import OnnxRuntimeModel  # noqa: E402
from compressor.models import load, resolve  # noqa: E402
from compressor.recipe import ModelConfig, QuantizeConfig  # noqa: E402
from compressor.stages.quantize import select_linears  # noqa: E402
from export.gguf import llama_quantize_file, tensor_type_counts, write_gguf  # noqa: E402
from export.onnx import OnnxOptions, write_onnx  # noqa: E402
from export.safetensors import load_checkpoint  # noqa: E402
from protocol import CALIBRATION, evaluation_config  # noqa: E402

LLAMA_TYPES = ("Q3_K_M", "Q4_0", "IQ4_NL", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# Bits per weight of the GGUF types a tied embedding may take here (rows of 576 rule out K-quants).
EMBEDDING_BPW = {"Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5}
# name -> (size reference: a llama.cpp type, embedding type, widths, export)
POINTS = {
    "q4_0-size": ("Q4_0", "Q5_0", "4,5,8", "gguf"),
    "q5_k_m-size": ("Q5_K_M", "Q8_0", "4,5,8", "gguf"),
    "onnx-3bit": (None, None, "2,4,8", "onnx"),
}
ONNX_3BIT_TARGET = 3.5  # average bits per weight of the linear layers, scales included


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "mixed")
    ap.add_argument("--gguf-dir", type=Path, default=ROOT / "benchmarks" / "out" / "gguf")
    ap.add_argument("--calib", type=Path, default=ROOT / "benchmarks" / "out" / "gptq" / "calib_128x512.safetensors")
    ap.add_argument("--hf", type=Path, default=ROOT / "benchmarks" / "out" / "gptq" / "smollm2-hf")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--llama-types", default=",".join(LLAMA_TYPES))
    ap.add_argument("--reuse", action="store_true", help="keep quantized checkpoints from an earlier run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    f16 = args.gguf_dir / "f16.gguf"
    imatrix_file = args.gguf_dir / "imatrix-128x512.pt"
    model_cfg = ModelConfig(id="smollm2-135m-instruct")
    src = resolve(model_cfg)
    source_gguf = Path(src.path) / src.gguf_file
    baseline, tok, _ = load(model_cfg)
    windows = evaluation_windows(tok, evaluation_config(args.windows))
    imatrix = _prerequisites(args, baseline, tok, source_gguf, f16, imatrix_file)

    def llama_file(ftype: str) -> Path:
        path = args.out / f"llama-{ftype.lower()}-imatrix.gguf"
        path.unlink(missing_ok=True)
        llama_quantize_file(f16, path, ftype, baseline.config, imatrix)
        return path

    files: dict[str, Path] = {}
    info: dict[str, dict] = {}
    for ftype in [t for t in args.llama_types.split(",") if t]:
        name = f"llama.cpp {ftype} + imatrix"
        files[name] = llama_file(ftype)
        info[name] = {"runtime": "llama.cpp", "types": tensor_type_counts(files[name])}

    linear_weights = sum(m.weight.numel() for m in select_linears(baseline, QuantizeConfig()).values())
    embedding_weights = baseline.get_input_embeddings().weight.numel()
    for point in [p for p in args.points.split(",") if p]:
        ref_type, embd_type, choices, kind = POINTS[point]
        if ref_type is None:
            target = ONNX_3BIT_TARGET
        else:
            ref = args.out / f"llama-{ref_type.lower()}-imatrix.gguf"
            ref = ref if ref.is_file() else llama_file(ref_type)
            q4_0 = args.out / "llama-q4_0-imatrix.gguf"
            q4_0_bytes = (q4_0 if q4_0.is_file() else llama_file("Q4_0")).stat().st_size
            # Same file as uniform Q4_0 except the linear layers and the embedding: spend the reference's extra bytes
            # (and what a smaller embedding frees) on the linear layers.
            extra_bits = (ref.stat().st_size - q4_0_bytes) * 8 + \
                (EMBEDDING_BPW["Q8_0"] - EMBEDDING_BPW[embd_type]) * embedding_weights
            target = 4.5 + extra_bits / linear_weights
        folder = args.out / f"compressor-{point}"
        ckpt = folder / "gptq"
        if not (args.reuse and (ckpt / "config.json").is_file()):
            _quantize(args, folder, target, choices)
        result = json.loads((folder / "result.json").read_text())
        model, _ = load_checkpoint(ckpt)
        name = f"compressor mixed GPTQ {point} ({choices.replace(',', '/')} bits, target {target:.3f})"
        if kind == "gguf":
            files[name] = folder / "model.gguf"
            files[name].unlink(missing_ok=True)
            summary = write_gguf(model, tok, files[name], "q4_0", embedding_type=embd_type, output_type=embd_type,
                                 source_gguf=source_gguf, imatrix=imatrix)
            info[name] = {"runtime": "llama.cpp", "types": summary.tensor_types,
                          "carried": len(summary.carried_codes), "requantized": len(summary.requantized)}
        else:
            import shutil

            files[name] = folder / "onnx"
            shutil.rmtree(files[name], ignore_errors=True)
            summary = write_onnx(model, tok, files[name], OnnxOptions(weights="int4", lm_head="int4",
                                                                      embedding="int4"))
            info[name] = {"runtime": "onnxruntime", "types": {f"{b}-bit": n for b, n in summary.own_width.items()},
                          "carried": summary.carried_codes, "requantized": len(summary.requantized)}
        info[name].update(quantize_seconds=result["seconds"], target_bits=round(target, 4),
                          widths=result["stage"]["summary"]["mixed"]["widths"],
                          predicted_kl=result["stage"]["summary"]["mixed"]["predicted_kl"])
        del model

    runtimes = [OnnxRuntimeModel(n, p) if info[n]["runtime"] == "onnxruntime" else LlamaCppRuntime(n, p, n_ctx=2048)
                for n, p in files.items()]
    start = time.perf_counter()
    metrics = compare(TorchRuntime("torch float32", baseline), runtimes, windows)
    print(f"evaluation in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    for rt in runtimes:
        if hasattr(rt, "close"):
            rt.close()

    base = metrics["torch float32"]["perplexity"]
    lines = ["| file | runtime | size MB | ppl | vs fp32 | KL | top-1 | types / widths | quantize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, path in files.items():
        m, i = metrics[name], info[name]
        size = _size(path)
        rows.append((name, size, m["kl_divergence"], i["runtime"]))
        shown = i.get("widths") or i["types"]
        lines.append(f"| {name} | {i['runtime']} | {size / 1e6:.1f} | {m['perplexity']:.3f} | "
                     f"{m['perplexity'] / base - 1:+.2%} | {m['kl_divergence']:.4f} | {m['top1_agreement']:.3f} | "
                     f"{', '.join(f'{k}:{v}' for k, v in shown.items())} | {i.get('quantize_seconds', '-')} |")
    table = "\n".join(lines)
    print(table)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    _plot(rows, args.out / f"size-kl-{stamp}.png")
    record = {"date": dt.date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "windows": int(windows.shape[0]), "seq_len": 2048, "metrics": metrics, "info": info,
              "sizes": {n: _size(p) for n, p in files.items()}, "table": table}
    (args.out / f"results-{stamp}.json").write_text(json.dumps(record, indent=2, default=str))


def _prerequisites(args, baseline, tok, source_gguf: Path, f16: Path, imatrix_file: Path) -> dict:
    """The files bench_gptq.py / bench_gguf.py write (same protocol), made here when missing, so that this benchmark
    runs alone on a fresh machine. Returns the importance matrix."""
    if not (args.hf / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks/peers/make_hf_checkpoint.py"), "--out", str(args.hf)],
                       check=True)
    if not args.calib.is_file():
        args.calib.parent.mkdir(parents=True, exist_ok=True)
        calib = calibration_windows(tok, CALIBRATION)
        save_file({"input_ids": calib.contiguous()}, str(args.calib))
    args.gguf_dir.mkdir(parents=True, exist_ok=True)
    if not f16.is_file():
        write_gguf(baseline, tok, f16, "f16", source_gguf=source_gguf)
    if not imatrix_file.is_file():
        calib = load_file(str(args.calib))["input_ids"]
        torch.save(mean_squared_inputs(baseline, calib, batch_size=8), imatrix_file)
    return torch.load(imatrix_file, weights_only=True)


def _quantize(args, folder: Path, target: float, choices: str) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quantize_ours.py"), "--model", str(args.hf), "--calib",
           str(args.calib), "--out", str(folder), "--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
           "--act-order", "--mixed-target", f"{target:.6f}", "--mixed-choices", choices]
    print("$ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model.onnx"))
    return path.stat().st_size


def _plot(rows: list[tuple[str, int, float, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for marker, who in (("o", "llama.cpp"), ("s", "compressor")):
        pts = sorted((s / 1e6, kl, n) for n, s, kl, _ in rows if n.startswith(who))
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if who == "llama.cpp" else "",
                label=who + (" (+ imatrix)" if who == "llama.cpp" else " mixed GPTQ"))
        for x, y, n in pts:
            label = n.split()[1] if who == "llama.cpp" else n.split()[3]
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("KL divergence to float32 (nats/token, log scale)")
    ax.set_title("SmolLM2-135M, WikiText-2 test 16 x 2048: size vs KL, each file in its runtime")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
