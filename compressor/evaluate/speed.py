"""Decode latency, prefill throughput and peak memory, each artifact measured in a fresh process of its own so
that its memory figure is its own and not what earlier work in the run left behind."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..recipe import SpeedConfig

log = logging.getLogger(__name__)


def measure(kind: str, path: str, cfg: SpeedConfig, device: str = "cpu", timeout: float = 1800) -> dict[str, Any]:
    """`kind` is "model" (`path` is a ModelConfig as JSON: the baseline), "checkpoint" (a safetensors folder),
    "gguf" (a GGUF file, run in llama.cpp) or "onnx" (an export folder, run in onnxruntime)."""
    cmd = [sys.executable, "-m", "compressor.evaluate.speed_worker", "--kind", kind, "--path", path,
           "--device", device, "--config", cfg.model_dump_json()]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        raise RuntimeError(f"speed measurement of {path} failed: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
