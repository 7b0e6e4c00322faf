"""Models larger than the memory budget: the weights stay in their safetensors files and each decoder block is read
when a layer-wise pass reaches it, then written to a spill folder once it is processed and dropped from memory.

The model object is built on PyTorch's ``meta`` device (shapes, no storage). Everything outside the decoder blocks
(embeddings, final norm, head, rotary tables) is loaded for real: the calibration pass needs it. Each file is opened
(memory-mapped) only while a block's tensors are copied out of it, so mapped pages do not pile up in the process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from .models import ModelError, ModelSource, decoder_layers, load_config, parameter_count, resolve
from .memory import return_freed_memory_to_the_system
from .recipe import ModelConfig
from .resume import BlockCheckpoints

log = logging.getLogger(__name__)


class WeightFiles:
    """Where each tensor of a safetensors checkpoint (one file or an index of shards) lives."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            self.where = {name: folder / f for name, f in mapping.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise ModelError(f"model {folder}: no safetensors weights; loading block by block reads safetensors")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    self.where.update({k: f for k in st.keys()})

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (float32 where floating), each file mapped only while it is read."""
        from safetensors import safe_open

        missing = [n for n in names if n not in self.where]
        if missing:
            raise ModelError(f"weights file has no tensor {missing[0]!r} (and {len(missing) - 1} more missing)")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as st:
                for k in keys:
                    t = st.get_tensor(k)  # a copy that owns its memory: the file is unmapped after this block
                    t = t.to(torch.float32, copy=True) if t.is_floating_point() else t.clone()
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise ModelError(f"model: tensor {k} in {f} holds NaN or infinite values; the checkpoint is "
                                         "damaged or was saved from a diverged training run")
                    out[k] = t
        return out


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, recurse: bool = True) -> None:
    """Replace `module`'s parameters and meta buffers named `prefix` + local name in `tensors` by those tensors."""
    for kind, store in (("parameters", "_parameters"), ("buffers", "_buffers")):
        for name, t in list(getattr(module, f"named_{kind}")(recurse=recurse)):
            if prefix + name not in tensors or (kind == "buffers" and not t.is_meta):
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = tensors[prefix + name]
            getattr(owner, store)[leaf] = nn.Parameter(value, requires_grad=False) if kind == "parameters" else value


class StreamedBlocks:
    """Reads decoder blocks from the weight files and spills processed ones, for the layer-wise runner."""

    def __init__(self, model: nn.Module, files: WeightFiles, spill: Path) -> None:
        self.files = files
        self.prefix = {id(b): n for n, b in model.named_modules()}
        self.spill = BlockCheckpoints(spill, [])
        self.activations: Path | None = None  # set: the runner keeps calibration activations in files here
        return_freed_memory_to_the_system()

    def load(self, index: int, block: nn.Module) -> None:
        prefix = self.prefix[id(block)] + "."
        names = [prefix + n for n, _ in block.named_parameters()]
        _assign(block, self.files.read(names), prefix)
        meta = [n for n, b in block.named_buffers() if b.is_meta]
        if meta:
            raise ModelError(f"block {index}: buffers {meta[:3]} are neither stored nor computable when loading block "
                             "by block")

    def release(self, index: int, block: nn.Module) -> None:
        """Spill the processed block to disk and drop its tensors."""
        self.spill.store(index, block, self.prefix[id(block)])
        block.to("meta")
        return_freed_memory_to_the_system()

    def reload(self, index: int, block: nn.Module) -> None:
        """A spilled block back in memory (for export)."""
        if not self.spill.restore(index, block):
            raise ModelError(f"block {index} was never processed: no spilled copy in {self.spill.folder}")

    def drop(self, block: nn.Module) -> None:
        block.to("meta")
        return_freed_memory_to_the_system()


def load_lazy(cfg: ModelConfig):
    """(model with its blocks on the meta device, tokenizer, source, weight files) for a local safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src: ModelSource = resolve(cfg)
    if src.kind != "folder":
        raise ModelError(f"model {cfg.id!r}: loading block by block (memory_budget_gb) needs a local folder with "
                         f"safetensors weights, not a {src.kind} source")
    config = load_config(cfg)
    files = WeightFiles(Path(src.path))
    tokenizer = AutoTokenizer.from_pretrained(src.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code,
                                                 dtype=torch.float32)
    layers = decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        own = [p for p, _ in module.named_parameters(recurse=False)]
        if own:
            prefix = f"{name}." if name else ""
            wanted = [prefix + p for p in own if prefix + p in files.where]
            _assign(module, files.read(wanted), prefix, recurse=False)
        if any(b.is_meta for b in module.buffers(recurse=False)):
            # rotary tables and the like are computed from the config, not stored
            try:
                with torch.device("cpu"):
                    fresh = type(module)(config=config)
            except Exception as e:
                raise ModelError(f"{name}: cannot rebuild {type(module).__name__} outside the model for block-by-"
                                 f"block loading: {e}") from e
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, fresh)
    model.tie_weights()  # a tied head stored once takes the embedding's tensor
    blocks = _layers_prefix(model) + "."
    still = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(blocks)]
    if still:
        raise ModelError(f"model {cfg.id!r}: tensors {still[:3]} are not in the weight files")
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer, src, files


def _layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


def model_bytes(cfg: ModelConfig) -> int:
    """float32 bytes of the model's parameters, from its config alone."""
    from transformers import AutoModelForCausalLM

    config = load_config(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return parameter_count(model) * 4
