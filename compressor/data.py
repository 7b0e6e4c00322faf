"""Text for calibration and evaluation, turned into token windows.

Sources: the embedded ``python-docs`` corpus (CPython's own documentation topics, present on every machine), a plain
text file, a JSONL file (one record a line, text under ``field``), or a folder written by ``datasets.save_to_disk``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .recipe import CalibrationConfig, DataConfig, EvalDataConfig

log = logging.getLogger(__name__)

BUILTIN_SOURCES = ("python-docs",)
# The built-in corpus has no published split; a fixed cut by sorted topic name keeps calibration and evaluation apart.
_PYDOC_TRAIN_FRACTION = 0.7


class DataError(ValueError):
    """Text that cannot be read or is too short for what the recipe asks."""


def load_records(cfg: DataConfig, default_split: str) -> list[str]:
    split = cfg.split or default_split
    if cfg.source in BUILTIN_SOURCES:
        records = _python_docs(split)
    else:
        path = Path(cfg.source).expanduser()
        if not path.exists():
            raise DataError(f"data source {cfg.source!r}: no such file or folder; use a text file, a .jsonl file, a "
                            f"saved HF dataset folder, or a built-in corpus ({', '.join(BUILTIN_SOURCES)})")
        fmt = cfg.format if cfg.format != "auto" else _guess_format(path)
        if fmt == "text":
            records = _text_records(path, cfg.line_records)
        elif fmt == "jsonl":
            records = _jsonl_records(path, cfg.field)
        else:
            records = _hf_dataset_records(path, cfg.field, split)
    if cfg.max_records:
        records = records[: cfg.max_records]
    return records


def load_text(cfg: DataConfig, default_split: str) -> str:
    text = cfg.join.join(load_records(cfg, default_split))
    if not text.strip():
        raise DataError(f"data source {cfg.source!r}: no text")
    return text


def _guess_format(path: Path) -> str:
    if path.is_dir():
        return "hf-dataset"
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    return "text"


def _python_docs(split: str) -> list[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(len(names) * _PYDOC_TRAIN_FRACTION)
    if split == "train":
        chosen = names[:cut]
    elif split == "test":
        chosen = names[cut:]
    else:
        raise DataError(f"python-docs: split must be train or test, got {split!r}")
    return [topics[n] for n in chosen]


def _text_records(path: Path, line_records: bool) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not line_records:
        return [text]
    # A whitespace-only line is an empty record; other lines keep their newline, as HF's line-based loaders do.
    return ["" if not line.strip() else line + "\n" for line in text.split("\n")[: -1 if text.endswith("\n") else None]]


def _jsonl_records(path: Path, field: str) -> list[str]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno}: no field {field!r} (has {keys}); set `field` in the recipe")
            if not isinstance(obj[field], str):
                raise DataError(f"{path}:{lineno}: field {field!r} is {type(obj[field]).__name__}, not text")
            records.append(obj[field])
    return records


def _hf_dataset_records(path: Path, field: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved HF dataset needs `pip install datasets`") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r}; it has {ds.column_names}")
    return list(ds[field])


# ---------------------------------------------------------------------------------------------- windows
def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, tokenized once (the convention of published perplexity numbers)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.to(torch.long)


def calibration_windows(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at random offsets (seeded), shape [samples, seq_len]."""
    ids = tokenize(tokenizer, load_text(cfg, "train"))
    if ids.numel() <= cfg.seq_len:
        raise DataError(f"calibration: {cfg.source!r} has {ids.numel()} tokens, fewer than seq_len "
                        f"{cfg.seq_len}; use more text or a shorter calibration.seq_len")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seq_len, (cfg.samples,), generator=gen)
    return torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])


def evaluation_windows(tokenizer, cfg: EvalDataConfig) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text, shape [windows, seq_len]."""
    ids = tokenize(tokenizer, load_text(cfg, "test"))
    available = ids.numel() // cfg.seq_len
    if available == 0:
        raise DataError(f"evaluate.data: {cfg.source!r} has {ids.numel()} tokens, fewer than one window of "
                        f"{cfg.seq_len}; use more text or a shorter evaluate.data.seq_len")
    count = available if cfg.windows is None else cfg.windows
    if count > available:
        raise DataError(f"evaluate.data: {cfg.source!r} has {ids.numel()} tokens, enough for {available} windows of "
                        f"{cfg.seq_len}, not {count}; lower evaluate.data.windows or seq_len")
    return ids[: count * cfg.seq_len].view(count, cfg.seq_len)


def same_text(calibration: DataConfig, evaluation: DataConfig) -> bool:
    """Whether calibration reads the evaluation text (which would inflate the reported accuracy)."""
    if calibration.source != evaluation.source:
        return False
    path = Path(calibration.source)
    has_splits = calibration.source in BUILTIN_SOURCES or path.is_dir()
    return not has_splits or (calibration.split or "train") == (evaluation.split or "test")
