#!/usr/bin/env python
"""GPTQ and RTN of compressor against GPTQModel and llm-compressor on SmolLM2-135M-Instruct.

Protocol (the foundation issue's): float32 baseline dequantized from the bundled GGUF; WikiText-2 test, 16 windows
of 2048 tokens (rows joined as the GPTQ paper does); calibration 128 x 512 tokens from the WikiText-2 train subset,
seed 0 -- the same token windows for every tool (written to a file the peers read). Every tool quantizes in a fresh
process of its own (time excludes model loading; peak RSS is that process's); every result is then scored here on
the same windows against the same baseline, window by window.

    python benchmarks/bench_gptq.py                   # all (peers need: bash benchmarks/peers/setup_venvs.sh)
    python benchmarks/bench_gptq.py --no-peers        # compressor only
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
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from compressor.data import calibration_windows, evaluation_windows  # noqa: E402
from compressor.evaluate.accuracy import TorchRuntime, compare  # noqa: E402
from compressor.recipe import CalibrationConfig, EvalDataConfig  # noqa: E402
from export.safetensors import load_checkpoint  # noqa: E402

OURS = [  # name, args
    ("compressor RTN W4 g32 sym", ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym"]),
    ("compressor GPTQ W4 g32 sym act-order", ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
                                              "--act-order"]),
    ("compressor GPTQ W4 g32 sym act-order float32 passes", ["--method", "gptq", "--bits", "4", "--group-size",
                                                             "32", "--sym", "--act-order", "--precision",
                                                             "float32"]),
    ("compressor GPTQ W4 g32 sym act-order one-pass", ["--method", "gptq", "--bits", "4", "--group-size", "32",
                                                       "--sym", "--act-order", "--no-sequential"]),
    ("compressor GPTQ W4 g32 sym act-order clip-search", ["--method", "gptq", "--bits", "4", "--group-size", "32",
                                                          "--sym", "--act-order", "--clip-search"]),
    ("compressor AWQ W4 g32 sym", ["--method", "awq", "--bits", "4", "--group-size", "32", "--sym"]),
    ("compressor AWQ+GPTQ W4 g32 sym act-order", ["--method", "gptq", "--awq-scales", "--bits", "4", "--group-size",
                                                 "32", "--sym", "--act-order"]),
    ("compressor RTN W3 g32 sym", ["--method", "rtn", "--bits", "3", "--group-size", "32", "--sym"]),
    ("compressor AWQ W3 g32 sym", ["--method", "awq", "--bits", "3", "--group-size", "32", "--sym"]),
    ("compressor RTN W8 per-channel sym", ["--method", "rtn", "--bits", "8", "--group-size", "-1", "--sym"]),
    ("compressor GPTQ W8 per-channel sym", ["--method", "gptq", "--bits", "8", "--group-size", "-1", "--sym",
                                            "--act-order"]),
    # The mixed plan at bench_mixed.py's Q4_0 size (5.3 bits per weight over 4/5/8-bit layers), with the sensitivity
    # pass and GPTQ in float32, then in bfloat16: what calibration.precision changes in the plan and its accuracy.
    ("compressor mixed GPTQ 4/5/8 at 5.3 bpw float32 passes", ["--method", "gptq", "--bits", "4", "--group-size",
                                                               "32", "--sym", "--act-order", "--mixed-target", "5.3",
                                                               "--mixed-choices", "4,5,8", "--precision", "float32"]),
    ("compressor mixed GPTQ 4/5/8 at 5.3 bpw bfloat16 passes", ["--method", "gptq", "--bits", "4", "--group-size",
                                                                "32", "--sym", "--act-order", "--mixed-target", "5.3",
                                                                "--mixed-choices", "4,5,8", "--precision",
                                                                "bfloat16"]),
]
PEERS = [  # name, venv, script, extra args
    ("GPTQModel GPTQ W4 g32 sym act-order", "gptqmodel", "run_gptqmodel.py", []),
    ("llm-compressor GPTQ W4 g32 sym act-order", "llmcompressor", "run_llmcompressor.py", []),
    # the peers on the model rounded to bfloat16 (their way to bfloat16 speed; ours keeps float32 weights)
    ("GPTQModel GPTQ W4 g32 sym act-order bfloat16", "gptqmodel", "run_gptqmodel.py", ["--dtype", "bfloat16"]),
    ("llm-compressor GPTQ W4 g32 sym act-order bfloat16", "llmcompressor", "run_llmcompressor.py",
     ["--dtype", "bfloat16"]),
]
PEER_ARGS = ["--bits", "4", "--group-size", "32", "--sym", "--act-order", "--damp", "0.01"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gptq")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", help="comma-separated exact variant names to run (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="score the outputs of earlier runs (OUT/<variant>/result.json) instead of quantizing again")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    hf = args.out / "smollm2-hf"
    if not (hf / "config.json").is_file():
        _run([sys.executable, str(ROOT / "benchmarks/peers/make_hf_checkpoint.py"), "--out", str(hf)])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    calib_cfg = CalibrationConfig(source=str(DATA / "wikitext-2-raw-v1/wiki.train.subset.raw"), line_records=True,
                                  samples=128, seq_len=512, seed=0)
    eval_cfg = EvalDataConfig(source=str(DATA / "wikitext-2-raw-v1/wiki.test.raw"), line_records=True,
                              windows=args.windows, seq_len=2048)
    calib_file = args.out / "calib_128x512.safetensors"
    save_file({"input_ids": calibration_windows(tok, calib_cfg).contiguous()}, str(calib_file))
    windows = evaluation_windows(tok, eval_cfg)

    variants = []
    for name, extra in OURS:
        variants.append((name, [sys.executable, str(ROOT / "benchmarks/quantize_ours.py")] + extra, "ours"))
    if not args.no_peers:
        for name, venv, script, extra in PEERS:
            py = ROOT / "benchmarks" / ".venvs" / venv / "bin" / "python"
            if not py.exists():
                print(f"skip {name}: {py} missing (run benchmarks/peers/setup_venvs.sh)", file=sys.stderr)
                continue
            variants.append((name, [str(py), str(ROOT / "benchmarks/peers" / script)] + PEER_ARGS + extra, "peer"))
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        unknown = set(keys) - {v[0] for v in variants}
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {[v[0] for v in variants]}")
        variants = [v for v in variants if v[0] in keys]

    results = {}
    for name, cmd, kind in variants:
        out = args.out / _slug(name)
        if args.reuse and (out / "result.json").is_file():
            res = json.loads((out / "result.json").read_text())
            results[name] = {"kind": kind, "dir": str(out), **res}
            continue
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", PYTHONPATH=str(ROOT))
        t = time.perf_counter()
        _run(cmd + ["--model", str(hf), "--calib", str(calib_file), "--out", str(out)], env=env)
        res = json.loads((out / "result.json").read_text())
        res["wall_seconds_with_load"] = round(time.perf_counter() - t, 1)
        results[name] = {"kind": kind, "dir": str(out), **res}

    baseline = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    runtimes = []
    for name, r in results.items():
        if r["kind"] == "ours":
            model, _ = load_checkpoint(Path(r["dir"]) / "gptq", materialize=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
            state = load_file(str(Path(r["dir"]) / "dense.safetensors"))
            missing = model.load_state_dict(state, strict=False)
            assert not missing.unexpected_keys, missing.unexpected_keys[:5]
        runtimes.append(TorchRuntime(name, model))
    metrics = compare(TorchRuntime("baseline", baseline), runtimes, windows)

    rows = [("baseline float32 (dequantized GGUF)", metrics["baseline"], {})]
    rows += [(n, metrics[n], results[n]) for n in results]
    lines = ["| variant | ppl | KL | top-1 | quantize s | peak RSS MB |", "|---|---|---|---|---|---|"]
    for name, m, r in rows:
        lines.append(f"| {name} | {m['perplexity']:.3f} | {m.get('kl_divergence', 0):.4f} | "
                     f"{m.get('top1_agreement', 1):.3f} | {r.get('seconds', '-')} | {r.get('peak_rss_mb', '-')} |")
    table = "\n".join(lines)
    print(table)
    record = {"date": dt.date.today().isoformat(), "machine": platform.platform(), "cpu_threads":
              torch.get_num_threads(), "windows": int(windows.shape[0]), "seq_len": 2048, "metrics": metrics,
              "results": results, "table": table}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.out / f"results-{stamp}.json").write_text(json.dumps(record, indent=2))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env)


if __name__ == "__main__":
    main()
