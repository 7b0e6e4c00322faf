"""The benchmark protocol shared by the scripts in this folder: SmolLM2-135M-Instruct dequantized from the bundled
GGUF as the float32 baseline, calibration 128 x 512 tokens of the WikiText-2 train subset (seed 0), evaluation on
consecutive 2048-token windows of WikiText-2 test."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

from compressor.data import calibration_windows, evaluation_windows  # noqa: E402
from compressor.models import load, resolve  # noqa: E402
from compressor.recipe import CalibrationConfig, EvalDataConfig, ModelConfig  # noqa: E402

CALIBRATION = CalibrationConfig(source=str(DATA / "wikitext-2-raw-v1/wiki.train.subset.raw"), line_records=True,
                                samples=128, seq_len=512, seed=0)


def evaluation_config(windows: int = 16) -> EvalDataConfig:
    return EvalDataConfig(source=str(DATA / "wikitext-2-raw-v1/wiki.test.raw"), line_records=True, windows=windows,
                          seq_len=2048)


@dataclass
class Protocol:
    baseline: torch.nn.Module
    tokenizer: object
    source_gguf: Path  # the bundled GGUF (tokenizer metadata for GGUF exports)
    calibration: torch.Tensor  # [128, 512]
    windows: torch.Tensor  # [windows, 2048]


def load_protocol(windows: int = 16) -> Protocol:
    model_cfg = ModelConfig(id="smollm2-135m-instruct")
    src = resolve(model_cfg)
    baseline, tok, _ = load(model_cfg)
    return Protocol(baseline, tok, Path(src.path) / src.gguf_file, calibration_windows(tok, CALIBRATION),
                    evaluation_windows(tok, evaluation_config(windows)))


def save_results(out: Path, table: str, **record) -> Path:
    """Print the table and keep it, with the run's figures and where it ran, in OUT/results-<time>.json."""
    import datetime as dt
    import json
    import platform

    print(table)
    path = out / f"results-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"date": dt.date.today().isoformat(), "machine": platform.platform(),
                                "threads": torch.get_num_threads(), "seq_len": 2048, **record, "table": table},
                               indent=2, default=str))
    return path
