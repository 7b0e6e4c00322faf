#!/usr/bin/env python
"""Kill a GPTQ run of SmolLM2 with SIGKILL in the middle of its blocks, resume it, and compare its artifacts with
those of a run that was never interrupted (issue 10's resume acceptance, on the real model).

    python benchmarks/bench_resume.py [--kill-at-block 15] [--out benchmarks/out/resume]

Three `compress run` processes on the same recipe (4-bit GPTQ g32 act-order, 32 x 512 calibration windows, a GPTQ
safetensors checkpoint and a GGUF file, perplexity only): uninterrupted; killed (SIGKILL) once block
`--kill-at-block` is checkpointed; then `--resume`. Prints the time of each, how many blocks the resumed run loaded,
and the SHA-256 of every artifact file of both finished runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

RECIPE = {
    "model": "smollm2-135m-instruct",
    "calibration": {"source": "python-docs", "samples": 32, "seq_len": 512, "seed": 0},
    "stages": [{"quantize": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True, "act_order": True}}],
    "export": [{"safetensors": {"format": "gptq"}}, {"gguf": {"type": "q4_0"}}],
    "evaluate": {"data": {"source": "python-docs", "windows": 4, "seq_len": 512}, "metrics": ["perplexity", "size"]},
}


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifacts(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): sha(p) for folder in ("safetensors", "gguf")
            for p in sorted((run_dir / folder).rglob("*")) if p.is_file()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kill-at-block", type=int, default=15, help="kill once this block (1-based) is checkpointed")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "resume")
    args = ap.parse_args()
    out = args.out.resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = {**os.environ, "COMPRESSOR_CACHE": "off"}

    def start(name: str, *extra: str) -> tuple[subprocess.Popen, float]:
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**RECIPE, "output": str(out / name)}))
        log = open(out / f"{name}{'-resume' if extra else ''}.log", "w")
        cmd = [sys.executable, "-m", "compressor.cli", "run", str(path), *extra]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()

    rows = []
    proc, t0 = start("whole")
    assert proc.wait() == 0, (out / "whole.log").read_text()[-3000:]
    total = int(re.findall(r"block \d+/(\d+) done", (out / "whole.log").read_text())[-1])
    rows.append(("uninterrupted", time.perf_counter() - t0, f"{total} computed"))

    proc, t0 = start("killed")
    target = f"block-{args.kill_at_block - 1:04d}.safetensors"
    blocks = out / ".killed.resume" / "blocks"
    while not list(blocks.glob(f"*/gptq/{target}")):
        if proc.poll() is not None:
            print("the run ended before the kill:", (out / "killed.log").read_text()[-3000:])
            return 1
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = len(list(blocks.glob("*/gptq/block-*.safetensors")))
    rows.append(("killed (SIGKILL)", time.perf_counter() - t0, f"{kept} checkpointed"))

    proc, t0 = start("killed", "--resume")
    assert proc.wait() == 0, (out / "killed-resume.log").read_text()[-3000:]
    log = (out / "killed-resume.log").read_text()
    restored = len(re.findall(r"restored from the interrupted run", log))
    rows.append(("resumed (--resume)", time.perf_counter() - t0, f"{restored} loaded, {total - restored} computed"))

    a, b = artifacts(out / "whole"), artifacts(out / "killed")
    same = a == b
    print(f"{'run':24} {'seconds':>8}  blocks")
    for name, secs, note in rows:
        print(f"{name:24} {secs:8.1f}  {note}")
    print()
    print(f"{'artifact file':48} {'uninterrupted sha256':20} {'killed+resumed':20} same")
    for k in sorted(set(a) | set(b)):
        print(f"{k:48} {a.get(k, '-')[:16]:20} {b.get(k, '-')[:16]:20} {a.get(k) == b.get(k)}")
    print(f"\nall artifacts byte-identical: {same}")
    (out / "result.json").write_text(json.dumps({"rows": rows, "uninterrupted": a, "resumed": b, "same": same},
                                                indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
