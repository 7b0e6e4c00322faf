"""safetensors checkpoints: the GPTQ format (packed codes that GPTQ-format loaders read) and dense (plain weights).

GPTQ format, per quantized linear ``<name>``:
  ``<name>.qweight`` int32 [in·bits/32, out]  codes packed along the input dimension
  ``<name>.qzeros``  int32 [groups, out·bits/32]  zero points minus one ("v1", the format AutoGPTQ wrote)
  ``<name>.scales``  float16 [groups, out]
  ``<name>.g_idx``   int32 [in]  group of each input column
and ``quantization_config`` (quant_method gptq) in config.json plus a ``quantize_config.json`` for older loaders.
Layers at another width than the checkpoint's (mixed precision) are listed in ``dynamic`` as GPTQModel and vLLM read
it: ``{"+:^<name>$": {"bits": b, "group_size": g}}``.

A factorized layer of a low-rank stage (compressor.low_rank) is stored as its two factors, ``<name>.first.*`` and
``<name>.second.*``, each plain or in the GPTQ layout above, with the ranks in config.json under ``LOW_RANK_KEY``;
only this project's loader reads such a checkpoint (for other tools, merge the factors into a dense export).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from compressor import __version__
from compressor.low_rank import LOW_RANK_KEY, install, ranks_config
from compressor.quant.packing import pack, unpack
from compressor.quant.tensor import QuantizedTensor, QuantLinear

WEIGHTS = "model.safetensors"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint this project cannot write or read, with the reason."""


# ------------------------------------------------------------------------------------------------ writing
def write_gptq(model: nn.Module, tokenizer: Any, directory: Path, dtype: str = "float16",
               extra_config: dict[str, Any] | None = None, stream: Any = None) -> None:
    """Write `model` (whose quantized layers are QuantLinear) as a GPTQ-format checkpoint into `directory`.

    With `stream` (compressor.lazy.StreamedBlocks: the model's processed blocks are spilled to disk), the blocks are
    read back one at a time and only their packed tensors are kept."""
    dt = _DTYPES[dtype]
    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, tuple[int, int, int, bool]] = {}  # name: bits, group_size, in_features, symmetric
    for prefix, part in _parts(model, stream):
        quantized = {prefix + n: m for n, m in part.named_modules()
                     if isinstance(m, QuantLinear) and not m.codes.is_meta}
        # ties never cross a part (and a dropped block's ids may be reused): each part dedupes its own
        tensors.update(_plain_tensors(part, skip={n[len(prefix):] for n in quantized}, dtype=dt, prefix=prefix))
        for name, m in quantized.items():
            tensors.update(gptq_tensors(name, m.qweight))
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.detach().to(torch.float16).contiguous()
            settings[name] = (m.bits, m.group_size, m.in_features, m.symmetric)
    if not settings:
        raise CheckpointError("GPTQ format: the model has no quantized layer")
    symmetric = next(iter(settings.values()))[3]
    for name, (_, _, _, sym) in settings.items():
        if sym != symmetric:
            raise CheckpointError(f"GPTQ format: {name} is {'' if sym else 'a'}symmetric, others are not; "
                                  "one checkpoint holds one setting")
    # A layer with a single group per output channel fits both "-1" and "groups of in_features": it takes the
    # checkpoint's setting where that fits it, so only real differences go to `dynamic`.
    fixed = {name: (b, g) for name, (b, g, inp, _) in settings.items() if g != inp}
    counts: dict[tuple[int, int], int] = {}
    for w in fixed.values() or [(b, -1) for b, _, _, _ in settings.values()]:
        counts[w] = counts.get(w, 0) + 1
    base_bits, group_size = max(counts, key=lambda w: (counts[w], w))  # the most common width; others in dynamic
    widths = {name: fixed.get(name) or (b, group_size if group_size in (-1, inp) else -1)
              for name, (b, _, inp, _) in settings.items()}
    dynamic = {f"+:^{re.escape(name)}$": {"bits": b, "group_size": g} for name, (b, g) in widths.items()
               if (b, g) != (base_bits, group_size)}
    qconfig = {
        "quant_method": "gptq",
        "bits": base_bits,
        "group_size": group_size,
        "desc_act": False,  # act_order ran with static groups: columns stay in order, g_idx is trivial
        "sym": symmetric,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "lm_head": any(n == "lm_head" or n.startswith("lm_head.") for n in settings),  # or a factor of it
        "meta": {"quantizer": [f"compressor:{__version__}"]},
        **({"dynamic": dynamic} if dynamic else {}),
        **(extra_config or {}),
    }
    _write(model, tokenizer, directory, tensors, dtype, qconfig)
    (directory / "quantize_config.json").write_text(json.dumps(qconfig, indent=2) + "\n")


def _parts(model: nn.Module, stream: Any):
    """(name prefix, module) pairs that together hold every tensor: the model itself, or with `stream` each decoder
    block in turn (read back from its spill file, dropped after use) and then the model (its blocks empty)."""
    if stream is None:
        yield "", model
        return
    from compressor.models import decoder_layers

    prefix = {id(m): n for n, m in model.named_modules()}
    for index, block in enumerate(decoder_layers(model)):
        stream.reload(index, block)
        yield prefix[id(block)] + ".", block
        stream.drop(block)
    yield "", model


def gptq_tensors(name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    out_f, in_f = qt.shape
    groups = qt.scales.shape[1]
    if groups > 1 and qt.group_size * (groups - 1) >= in_f or in_f % qt.group_size and qt.g_idx is None:
        raise CheckpointError(f"{name}: GPTQ format needs group_size to divide in_features ({in_f})")
    # v1 stores zero-1; a zero of 0 would wrap and is kept out of the grid by compressor.quant.grid.
    zeros = qt.zeros.to(torch.int64) - 1
    if (zeros < 0).any():
        raise CheckpointError(f"{name}: a zero point of 0 cannot be stored in the GPTQ v1 format")
    return {
        f"{name}.qweight": pack(qt.codes.t().cpu(), qt.bits, dim=0),
        f"{name}.qzeros": pack(zeros.t().cpu(), qt.bits, dim=1),
        f"{name}.scales": qt.scales.t().to(torch.float16).contiguous().cpu(),
        f"{name}.g_idx": qt.group_index().to(torch.int32).cpu(),
    }


def write_dense(model: nn.Module, tokenizer: Any, directory: Path, dtype: str = "float16") -> None:
    """Write `model` with every quantized layer dequantized: a checkpoint plain transformers loads."""
    tensors = _plain_tensors(model, skip=set(), dtype=_DTYPES[dtype])
    _write(model, tokenizer, directory, tensors, dtype, None)


def _plain_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of `model` but those of the modules in `skip` (quantized layers dequantized), keys prefixed;
    tensors on the meta device (a block not in memory) are left out."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        if mod_name in skip:
            continue
        if isinstance(module, QuantLinear):
            if not module.codes.is_meta:
                tensors[f"{prefix}{mod_name}.weight"] = \
                    module.qweight.dequantize(torch.float32).to(dtype).contiguous()
                if module.bias is not None:
                    tensors[f"{prefix}{mod_name}.bias"] = module.bias.detach().to(dtype).contiguous()
            continue
        for pname, param in module.named_parameters(recurse=False):
            key = f"{prefix}{mod_name}.{pname}" if mod_name else prefix + pname
            if id(param) in seen or param.is_meta:  # tied weights are stored once; the config says they are tied
                continue
            seen[id(param)] = key
            tensors[key] = param.detach().to(dtype).contiguous().cpu()
    return tensors


def _write(model: nn.Module, tokenizer: Any, directory: Path, tensors: dict[str, torch.Tensor], dtype: str,
           qconfig: dict[str, Any] | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    if qconfig is not None:
        config["quantization_config"] = qconfig
    _record_low_rank(model, config)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _record_low_rank(model: nn.Module, config: dict[str, Any]) -> None:
    """The ranks of the model's factorized layers, never an entry inherited from the config it was loaded with."""
    config.pop(LOW_RANK_KEY, None)
    ranks = ranks_config(model)
    if ranks is None:
        return
    config[LOW_RANK_KEY] = ranks
    if "lm_head" in ranks["layers"]:
        config["tie_word_embeddings"] = False  # a factorized head no longer shares the embedding table


# ------------------------------------------------------------------------------------------------ reading
def read_quantization_config(directory: Path) -> dict[str, Any] | None:
    config = json.loads((directory / "config.json").read_text())
    q = config.get("quantization_config")
    if q is None and (directory / "quantize_config.json").is_file():
        q = json.loads((directory / "quantize_config.json").read_text())
    return q


def load_checkpoint(directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                    materialize: bool = False):
    """Load a dense or GPTQ-format checkpoint into a transformers model (GPTQ layers become QuantLinear).

    With `materialize`, quantized layers also keep their dequantized weights (see QuantLinear.materialize).
    Returns (model, tokenizer); tokenizer is None when the folder has none.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory}: no config.json; not a checkpoint folder")
    qconfig = read_quantization_config(directory)
    tensors = _read_tensors(directory)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our loader, not transformers' quantizers, builds the quantized layers
    low_rank = getattr(config, LOW_RANK_KEY, None)
    if hasattr(config, LOW_RANK_KEY):
        delattr(config, LOW_RANK_KEY)  # the model's own layers say it from now on; a copy could go stale
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if low_rank is not None:  # before the GPTQ layers: a factor can itself be quantized
        _install_low_rank(model, low_rank, directory / "config.json")
    if qconfig is not None:
        if qconfig.get("quant_method") != "gptq":
            raise CheckpointError(f"{directory}: quantization method {qconfig.get('quant_method')!r} is not "
                                  "supported; this loader reads gptq and dense checkpoints")
        _install_gptq_layers(model, tensors, qconfig)
    missing = model.load_state_dict(tensors, strict=False, assign=True)
    if missing.unexpected_keys:
        raise CheckpointError(f"{directory}: tensors that fit no parameter: {missing.unexpected_keys[:5]}")
    if config.tie_word_embeddings and "lm_head.weight" not in tensors:
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{directory}: missing tensors: {still_meta[:5]}")
    model.to(dtype=dtype)
    for m in model.modules():  # scales stay as stored (Module.to leaves the integer codes alone)
        if isinstance(m, QuantLinear):
            m.scales = m.scales.to(torch.float16)
    model.eval().to(device)
    model.requires_grad_(False)
    if materialize:
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.materialize(dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS} (or sharded index); pickle checkpoints are not read")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(directory / f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = sf.get_tensor(key)
        except Exception as e:  # safetensors raises SafetensorError and OSError for damaged files
            raise CheckpointError(f"{directory / f}: unreadable safetensors file ({e})") from e
    return tensors


def _install_low_rank(model: nn.Module, entry: Any, where: Path) -> None:
    try:
        install(model, entry, where=str(where))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _install_gptq_layers(model: nn.Module, tensors: dict[str, torch.Tensor], qconfig: dict[str, Any]) -> None:
    from compressor.stages.base import set_submodule

    sym = bool(qconfig.get("sym", True))
    v2 = qconfig.get("checkpoint_format", "gptq") == "gptq_v2"
    names = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
    for name in names:
        layer = _layer_setting(qconfig, name)
        bits, group_size = int(layer["bits"]), int(layer.get("group_size", -1))
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"{name}: quantized tensors for a {type(module).__name__}, expected a Linear")
        out_f, in_f = module.out_features, module.in_features
        codes = unpack(tensors.pop(f"{name}.qweight"), bits, dim=0, count=in_f).t()
        scales = tensors.pop(f"{name}.scales").t().contiguous()
        groups = scales.shape[1]
        zeros = unpack(tensors.pop(f"{name}.qzeros"), bits, dim=1, count=out_f).t().to(torch.int64)
        if not v2:
            zeros = (zeros + 1) & ((1 << bits) - 1)
        g_idx = tensors.pop(f"{name}.g_idx", None)
        gs = in_f if group_size == -1 else group_size
        if -(-in_f // gs) != groups:
            raise CheckpointError(f"{name}: {groups} groups of scales for {in_f} columns in groups of {gs}")
        trivial = g_idx is None or torch.equal(g_idx.long(), torch.arange(in_f) // gs)
        qt = QuantizedTensor(codes.contiguous(), scales.to(torch.float16), zeros.to(torch.uint8).contiguous(),
                             bits, gs, sym, None if trivial else g_idx.to(torch.int32))
        bias = tensors.pop(f"{name}.bias", None)
        set_submodule(model, name, QuantLinear(qt, bias.float() if bias is not None else None))


def _layer_setting(qconfig: dict[str, Any], name: str) -> dict[str, Any]:
    """The checkpoint's bits/group_size for layer `name`, with the first matching `dynamic` override applied."""
    setting = {"bits": qconfig["bits"], "group_size": qconfig.get("group_size", -1)}
    for pattern, override in (qconfig.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                raise CheckpointError(f"{name}: quantized tensors for a layer that `dynamic` excludes ({pattern})")
            continue
        if re.match(pattern.removeprefix("+:"), name):
            return {**setting, **{k: v for k, v in override.items() if k in ("bits", "group_size")}}
    return setting
