#!/usr/bin/env python
"""ONNX on SmolLM2-135M, every model evaluated in onnxruntime (CPU) on the same token ids as torch.

Protocol (the ONNX issue's): baseline = float32 torch model; WikiText-2 test, 16 windows x 2048 tokens; speed with
2 threads, batch 1: decode ms/token after a 128-token prompt (64 tokens, greedy, KV cache), prefill tokens/s on 512
tokens, median of 3, each model in a fresh process. Variants:

  * compressor float32 export (check: perplexity within 0.1% of torch, greedy text identical)
  * compressor int4 export of GPTQ W4 g32 codes (bench_gptq.py's checkpoint), defaults (int8 activations, int8
    head/embedding), and an exact variant (float activations, float head); reference: the same GPTQ model in torch
  * onnxruntime's own round-to-nearest int4 (MatMulNBitsQuantizer, block 32, symmetric, accuracy_level 4) of the
    float32 export
  * onnxruntime-genai's model builder int4 (peer; made by benchmarks/peers/run_ortgenai_builder.sh)

    python benchmarks/bench_onnx.py [--windows 16] [--gptq DIR] [--genai DIR] [--no-speed]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from compressor.data import evaluation_windows  # noqa: E402
from compressor.evaluate import speed  # noqa: E402
from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.evaluate.onnx_runtime import OnnxRuntimeModel, open_decoder  # noqa: E402
from compressor.recipe import EvalDataConfig, ModelConfig, SpeedConfig  # noqa: E402
from export.onnx import OnnxOptions, write_onnx  # noqa: E402
from export.safetensors import load_checkpoint  # noqa: E402


PEER_PY = ROOT / "benchmarks/.venvs/ortgenai/bin/python"


def ort_rtn_int4(src: Path, dst: Path) -> None:
    """onnxruntime's own weight-only int4 quantizer applied to our float32 export, in the peer venv (it needs
    onnx-ir): bash benchmarks/peers/setup_venvs.sh ortgenai."""
    import subprocess

    if not PEER_PY.is_file():
        raise SystemExit(f"{PEER_PY} missing: run bash benchmarks/peers/setup_venvs.sh ortgenai")
    subprocess.run([str(PEER_PY), str(ROOT / "benchmarks/peers/run_ort_rtn.py"), str(src), str(dst)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "onnx")
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks/out/gptq/smollm2-hf")
    ap.add_argument("--gptq", type=Path, default=ROOT / "benchmarks/out/gptq/compressor-gptq-w4-g32-sym-act-order/gptq")
    ap.add_argument("--genai", type=Path, default=ROOT / "benchmarks/out/onnx/genai-int4")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    baseline = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    gptq, _ = load_checkpoint(args.gptq, materialize=True)
    windows = evaluation_windows(tok, EvalDataConfig(source=str(DATA / "wikitext-2-raw-v1/wiki.test.raw"),
                                                     line_records=True, windows=args.windows, seq_len=2048))
    exports = {
        "compressor fp32": (baseline, OnnxOptions(weights="float32")),
        "compressor GPTQ int4": (gptq, OnnxOptions(weights="int4")),
        "compressor GPTQ int4 exact": (gptq, OnnxOptions(weights="int4", activations="float", lm_head="float",
                                                         embedding="float")),
    }
    folders: dict[str, Path] = {}
    export_s: dict[str, float] = {}
    for name, (model, opts) in exports.items():
        folder = args.out / name.replace(" ", "-")
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        write_onnx(model, tok, folder, opts)
        export_s[name] = round(time.perf_counter() - t, 1)
        folders[name] = folder
    rtn = args.out / "ort-rtn-int4"
    shutil.rmtree(rtn, ignore_errors=True)
    t = time.perf_counter()
    ort_rtn_int4(folders["compressor fp32"], rtn)
    export_s["onnxruntime RTN int4"] = round(time.perf_counter() - t, 1)
    folders["onnxruntime RTN int4"] = rtn
    if (args.genai / "model.onnx").is_file():
        folders["onnxruntime-genai builder int4"] = args.genai
    else:
        print(f"no {args.genai}/model.onnx: run benchmarks/peers/run_ortgenai_builder.sh first; peer skipped")

    runtimes = [TorchRuntime("torch GPTQ int4", gptq)]
    runtimes += [OnnxRuntimeModel(name, folder, args.threads) for name, folder in folders.items()]
    t = time.perf_counter()
    metrics = compare(TorchRuntime("torch float32", baseline), runtimes, windows)
    eval_s = round(time.perf_counter() - t, 1)
    del runtimes

    prompt = windows[0, :128].tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = baseline.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                                do_sample=False)[0, 128:].tolist()
    greedy = {name: open_decoder(folder, args.threads).generate(prompt, 64) == ref
              for name, folder in folders.items() if "fp32" in name}
    if PEER_PY.is_file():  # the same export driven by onnxruntime-genai's generator (its genai_config.json)
        import subprocess

        proc = subprocess.run([str(PEER_PY), str(ROOT / "benchmarks/peers/genai_generate.py"),
                               str(folders["compressor fp32"]), json.dumps(prompt), "64"],
                              capture_output=True, text=True, check=True)
        greedy["compressor fp32 in onnxruntime-genai"] = json.loads(proc.stdout.strip().splitlines()[-1]) == ref

    speeds = {}
    if not args.no_speed:
        cfg = SpeedConfig(prompt_tokens=128, decode_tokens=64, prefill_tokens=512, repeats=3, threads=args.threads)
        speeds["torch float32"] = speed.measure("model", ModelConfig(id=str(args.model)).model_dump_json(), cfg)
        for name, folder in folders.items():
            speeds[name] = speed.measure("onnx", str(folder), cfg)

    base = metrics["torch float32"]["perplexity"]
    gptq_ppl = metrics["torch GPTQ int4"]["perplexity"]
    print(f"\n{args.windows} x 2048 tokens of WikiText-2 test; {args.threads} threads; {platform.processor()}")
    print(f"{'model':34} {'ppl':>8} {'vs torch':>9} {'KL':>7} {'top-1':>6} {'MB':>7} {'decode ms':>9} "
          f"{'prefill t/s':>11} {'RSS MB':>7}")
    for name, m in metrics.items():
        folder = folders.get(name)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 1e6 \
            if folder else float("nan")
        ref_ppl = gptq_ppl if "GPTQ" in name else base
        s = speeds.get(name, {})
        print(f"{name:34} {m['perplexity']:8.3f} {m['perplexity'] / ref_ppl - 1:+9.3%} "
              f"{m.get('kl_divergence', 0):7.4f} {m.get('top1_agreement', 1):6.3f} {size:7.1f} "
              f"{s.get('decode_ms_per_token', float('nan')):9.2f} "
              f"{s.get('prefill_tokens_per_second', float('nan')):11.0f} "
              f"{s.get('peak_rss_mb', float('nan')):7.0f}")
    print("('vs torch': GPTQ rows against the same GPTQ model in torch, the others against torch float32)")
    print("greedy 64 tokens identical to torch float32:", greedy)
    print("export seconds:", export_s, "| evaluation seconds:", eval_s)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"date": stamp, "machine": platform.platform(), "threads": args.threads, "windows": args.windows,
              "metrics": metrics, "speed": speeds, "greedy_identical": greedy, "export_seconds": export_s,
              "evaluation_seconds": eval_s}
    (args.out / f"results-{stamp}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
