"""A disk cache of what a recipe's stages produce, so that a later run (another sweep, the same sweep extended by an
export) does not redo hours of calibration.

An entry is keyed by the SHA-256 of everything the result depends on: the loaded model's weights, the calibration
windows, the stages, the seed, the device, the torch version and the compressor's own source code (any code change
starts afresh). Every prefix of the stage list has its own entry, so recipes that begin with the same stages share
them. An entry holds the model's state (safetensors), which of its layers are quantized and how, the config fields
the stages changed, and the stage reports. Only stage lists that keep the model's module layout (quantize, prune)
are cached; structured pruning, low-rank and distillation are always recomputed.

Location: ``$COMPRESSOR_CACHE_DIR`` (default ``~/.cache/compressor/stages``); size cap ``$COMPRESSOR_CACHE_MAX_GB``
(default 20): the least recently used entries go first. ``COMPRESSOR_CACHE=off`` (or ``--no-cache``) disables it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .quant.tensor import QuantizedTensor, QuantLinear
from .recipe import PruneStage, QuantizeStage, Recipe

log = logging.getLogger(__name__)

CACHEABLE = (QuantizeStage, PruneStage)  # stages that keep every module's place and shape
_CODE = Path(__file__).resolve().parent
_EXPORT = _CODE.parent / "export"


def enabled() -> bool:
    return os.environ.get("COMPRESSOR_CACHE", "on").lower() not in ("off", "0", "false", "no")


def default_root() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE_DIR") or Path.home() / ".cache" / "compressor" / "stages")


def max_bytes() -> int:
    return int(float(os.environ.get("COMPRESSOR_CACHE_MAX_GB", "20")) * 2**30)


def cacheable(recipe: Recipe) -> bool:
    return bool(recipe.stages) and all(isinstance(s, CACHEABLE) for s in recipe.stages)


def keys(recipe: Recipe, model: nn.Module, calibration: torch.Tensor | None, device: str,
         compute_dtype: torch.dtype | None = None) -> list[str]:
    """One key per prefix of the stage list: ``keys[i]`` names the model after stages 0..i, so recipes that share
    their first stages (a 2:4 prune, then 4 or 8 bits) share those stages' result. `compute_dtype` is what the
    recipe's calibration.precision resolved to on this machine (auto differs between CPUs)."""
    from .run import stages_inputs

    model_cfg, calib_cfg, stages, seed = stages_inputs(recipe)
    h = hashlib.sha256()
    h.update(json.dumps([model_cfg, calib_cfg, seed, device, torch.__version__, str(compute_dtype)], sort_keys=True,
                        default=str).encode())
    h.update(code_fingerprint().encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    if calibration is not None:
        h.update(tensor_bytes(calibration))
    out = []
    for stage in stages:
        h.update(json.dumps(stage, sort_keys=True, default=str).encode())
        out.append(h.copy().hexdigest())
    return out


def load(root: Path, digest: str, model: nn.Module) -> list[dict[str, Any]] | None:
    """Put a cached result into `model` (as loaded, before any stage); its stage reports, or None on a miss."""
    entry = root / digest
    if not (entry / "meta.json").is_file():
        return None
    from safetensors.torch import load_file

    meta = json.loads((entry / "meta.json").read_text())
    device = next(model.parameters()).device
    install_quantized(model, meta["quantized"], device)
    for field_name, value in meta["config"].items():
        setattr(model.config, field_name, value)
    state = load_file(entry / "state.safetensors", device=str(device))
    model.load_state_dict(state, strict=True)
    os.utime(entry / "meta.json")  # recently used: evicted last
    log.info("stage cache: reused %s (made %s)", entry, meta.get("created"))
    return [{**r, "from_cache": str(entry)} for r in meta["stage_reports"]]


def save(root: Path, digest: str, model: nn.Module, config_before: dict[str, Any],
         stage_reports: list[dict[str, Any]]) -> None:
    """Store `model` (after the stages) under `digest`, atomically; then evict down to the size cap."""
    from safetensors.torch import save_file

    quantized = quantized_layout(model)
    after = model.config.to_dict()
    config = {k: v for k, v in after.items() if config_before.get(k) != v}
    # Tied weights share storage, which safetensors refuses: each name gets its own copy (loading re-ties them).
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{digest}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(state, tmp / "state.safetensors")
        (tmp / "meta.json").write_text(json.dumps({
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "quantized": quantized, "config": config,
            "stage_reports": stage_reports}, default=str))
        if (root / digest).exists():  # another run stored the same result meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, root / digest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("stage cache: stored %s", root / digest)
    evict(root, max_bytes())


def quantized_layout(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Which submodules of `module` are QuantLinear and their shapes and settings: with a state dict, all that is
    needed to rebuild them (`install_quantized`) without pickling."""
    return {name: {"out": m.out_features, "in": m.in_features, "groups": m.scales.shape[1], "bits": m.bits,
                   "group_size": m.group_size, "symmetric": m.symmetric, "g_idx": m.g_idx is not None,
                   "bias": m.bias is not None}
            for name, m in module.named_modules() if isinstance(m, QuantLinear)}


def install_quantized(module: nn.Module, layout: dict[str, dict[str, Any]], device: torch.device | str) -> None:
    """Put empty QuantLinear shells where `layout` says (names relative to `module`), ready for load_state_dict."""
    for name, q in layout.items():
        shell = QuantizedTensor(
            torch.zeros(q["out"], q["in"], dtype=torch.uint8), torch.zeros(q["out"], q["groups"], dtype=torch.float16),
            torch.zeros(q["out"], q["groups"], dtype=torch.uint8), q["bits"], q["group_size"], q["symmetric"],
            torch.zeros(q["in"], dtype=torch.int32) if q["g_idx"] else None)
        bias = torch.zeros(q["out"]) if q["bias"] else None
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, QuantLinear(shell, bias).to(device))


def evict(root: Path, cap: int) -> list[Path]:
    """Remove the least recently used entries until the cache holds at most `cap` bytes."""
    entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").exists()]
    sizes = {p: sum(f.stat().st_size for f in p.iterdir()) for p in entries}
    total = sum(sizes.values())
    removed = []
    for p in sorted(entries, key=lambda p: (p / "meta.json").stat().st_mtime):
        if total <= cap:
            break
        shutil.rmtree(p, ignore_errors=True)
        total -= sizes[p]
        removed.append(p)
        log.info("stage cache: removed %s (over the %.1f GB cap)", p, cap / 2**30)
    return removed


def tensor_bytes(t: torch.Tensor) -> Any:
    """The tensor's bytes as a buffer (no copy for a contiguous CPU tensor)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


_FINGERPRINT: str | None = None


def code_fingerprint() -> str:
    global _FINGERPRINT
    if _FINGERPRINT is None:
        h = hashlib.sha256()
        for folder in (_CODE, _EXPORT):
            for f in sorted(folder.rglob("*.py")):
                h.update(str(f.relative_to(folder.parent)).encode())
                h.update(f.read_bytes())
        _FINGERPRINT = h.hexdigest()
    return _FINGERPRINT
