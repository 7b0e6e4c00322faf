"""GGUF files for llama.cpp (and Ollama, LM Studio): metadata, tokenizer and tensors.

Two steps. (1) This module writes every tensor it can itself: float types, and the legacy block types (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0), where the calibrated integer codes of a quantized layer are carried over exactly when its grid
matches the block type. (2) Only when a tensor needs a type that llama.cpp alone implements (the K-quants, IQ types,
or llama.cpp's own choice for the embedding and output tensors), the file from step 1 goes through llama.cpp's
quantizer (`llama_model_quantize`), which copies tensors already in their final type and quantizes the rest,
optionally guided by an importance matrix from the run's calibration data.

GGUF architectures have no factorized layer: a model with low-rank layers (compressor.low_rank) is refused unless
the caller merges them first (`compressor.low_rank.merged`, the recipe's `low_rank: merge`).
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor import __version__
from compressor.low_rank import LowRankLinear, low_rank_layers
from compressor.quant.tensor import QuantLinear

from .gguf_arch import Arch, ArchitectureError, arch_for, extra_tensors, gguf_tensor_name, hyperparameters, \
    to_gguf_layout
from .gguf_blocks import BLOCK, BLOCK_TYPES, encode_codes, encode_dense, mismatch
from .gguf_types import DIRECT_TYPES, FILE_TYPE_BITS, FILE_TYPES, FLOAT_TYPES, LAYER_TYPES, LLAMA_FILE_TYPES, \
    TENSOR_TYPES

log = logging.getLogger(__name__)


class GGUFError(ValueError):
    """A GGUF export that cannot be done, with the reason and what would work."""


@dataclass
class GGUFSummary:
    file_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGUF type -> tensor count in the final file
    carried_codes: list[str] = field(default_factory=list)  # layers whose calibrated codes were written as they are
    requantized: list[str] = field(default_factory=list)  # quantized layers whose grid did not fit: re-quantized
    refit: list[str] = field(default_factory=list)  # codes re-chosen because a float16 offset moved
    max_code_error: float = 0.0  # largest |written - calibrated| weight among carried codes
    llama_quantizer: bool = False
    layer_types: dict[str, int] = field(default_factory=dict)  # own-width layers (mixed precision): type -> count
    imatrix_entries: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise GGUFError("this needs llama-cpp-python (llama.cpp's quantizer/runtime): "
                        "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python") from None
    return llama_cpp


@dataclass(frozen=True)
class TypePlan:
    """Which GGUF type each tensor gets: per-tensor overrides (regex on the GGUF name, first match wins), then the
    embedding/output choices, then the file type. None for embedding/output leaves them to llama.cpp's rules."""

    file_type: str
    embedding: str | None = None
    output: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, file_type: str, embedding_type: str | None = None, output_type: str | None = None,
           tensor_types: dict[str, str] | None = None) -> "TypePlan":
        plan = cls(file_type.upper(), _up(embedding_type), _up(output_type),
                   tuple((p, t.upper()) for p, t in (tensor_types or {}).items()))
        if plan.file_type not in FILE_TYPES:
            raise GGUFError(f"gguf.type {file_type!r} is not supported; choose one of {', '.join(FILE_TYPES)}")
        for key, t in [("embedding_type", plan.embedding), ("output_type", plan.output),
                       *((f"tensor_types[{p!r}]", t) for p, t in plan.overrides)]:
            if t is not None and t not in TENSOR_TYPES:
                raise GGUFError(f"gguf.{key} {t!r} is not supported; choose one of {', '.join(TENSOR_TYPES)}")
        if plan.file_type in FLOAT_TYPES and any(t not in DIRECT_TYPES for _, t in plan.overrides):
            raise GGUFError(f"gguf.tensor_types: llama.cpp applies its own per-tensor types only in quantized files, "
                            f"not in {plan.file_type}; use one of {', '.join(DIRECT_TYPES)} there")
        for p, _ in plan.overrides:
            try:
                re.compile(p)
            except re.error as e:
                raise GGUFError(f"gguf.tensor_types: invalid regular expression {p!r}: {e}") from None
        return plan

    def requested(self, gguf_name: str) -> str | None:
        for pattern, t in self.overrides:
            if re.search(pattern, gguf_name):
                return t
        if gguf_name.startswith("token_embd."):
            return self.embedding
        if gguf_name.startswith("output."):
            return self.output
        return None

    @property
    def needs_llama(self) -> bool:
        """Whether any tensor needs llama.cpp's quantizer (a type only it implements, or its own choice)."""
        if self.file_type in LLAMA_FILE_TYPES:
            return True
        explicit = [self.embedding, self.output, *(t for _, t in self.overrides)]
        if any(t is not None and t not in DIRECT_TYPES for t in explicit):
            return True
        if self.file_type in FLOAT_TYPES:
            return False
        return any(self.requested(n) is None for n in ("token_embd.weight", "output.weight"))


def check_model(model: nn.Module, plan: TypePlan, where: str = "gguf", low_rank: str = "refuse") -> None:
    """Everything about `model` that would make the export fail, checked before any long work. `low_rank`: "merge"
    when the caller will merge the factorized layers before writing (then checked as the dense layers they become)."""
    if low_rank != "merge":
        check_low_rank(model, where)
    try:
        arch = arch_for(model.config)
        check_attention(model.config)
    except ArchitectureError as e:
        raise GGUFError(f"{where}: {e}") from None
    if plan.needs_llama:
        return  # llama.cpp falls back per tensor to a type whose blocks fit
    odd = []
    for name, shape in _weight_shapes(model):
        gname = gguf_tensor_name(name, arch) or name
        wanted = plan.requested(gname) or plan.file_type
        if len(shape) == 2 and wanted in BLOCK_TYPES and shape[-1] % BLOCK:
            odd.append(f"{gname} ({wanted}, rows of {shape[-1]})")
    if odd:
        raise GGUFError(f"{where}: block types store rows in blocks of {BLOCK}, but {odd[0]} is not a multiple of "
                        f"{BLOCK}; use F16/BF16/F32 for it (tensor_types) or a llama.cpp type such as Q4_K_M, which "
                        "falls back per tensor")


def check_low_rank(model: nn.Module, where: str = "gguf") -> None:
    """Refuse factorized layers rather than merge them here: merging gives up the size they save, which the caller
    (the recipe's `low_rank: merge`) chooses knowingly."""
    layers = low_rank_layers(model)
    if layers:
        raise GGUFError(f"{where}: the model has {len(layers)} factorized (low-rank) layer(s), e.g. "
                        f"{next(iter(layers))}, and GGUF architectures have no factorized layers; the recipe option "
                        "`low_rank: merge` on the gguf export merges each into one dense matrix (the file is then not "
                        "smaller for them)")


def _weight_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Shapes of the tensors the file would hold: quantized and factorized layers as the dense matrix they apply."""
    layers = {n: (m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, (QuantLinear, LowRankLinear))}
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, LowRankLinear))
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if not n.startswith(inside)]
    shapes += [(f"{n}.weight", shape) for n, shape in layers.items() if not n.startswith(inside)]
    return shapes


def gguf_file_name(model: nn.Module, file_type: str) -> str:
    base = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    base = base.removesuffix(".gguf").split(".")[0] or "model"
    return f"{base}-{file_type.upper()}.gguf"


def write_gguf(model: nn.Module, tokenizer: Any, path: Path, file_type: str | TypePlan, *,
               embedding_type: str | None = None, output_type: str | None = None,
               tensor_types: dict[str, str] | None = None, imatrix: dict[str, torch.Tensor] | None = None,
               source_gguf: Path | None = None, threads: int | None = None) -> GGUFSummary:
    """Write `model` to the GGUF file `path` (which must not exist yet); the file appears only when complete.

    `imatrix` maps linear layer names (transformers names, e.g. model.layers.0.mlp.up_proj) to the mean squared
    activation of each input column; it guides llama.cpp's quantizer. `source_gguf`, when the model was loaded from a
    GGUF file, supplies the tokenizer metadata verbatim.
    """
    plan = file_type if isinstance(file_type, TypePlan) else TypePlan.of(file_type, embedding_type, output_type,
                                                                          tensor_types)
    check_low_rank(model)
    config = model.config
    arch = arch_for(config)
    check_attention(config)
    own = layer_overrides(model, plan, arch)
    plan = TypePlan(plan.file_type, plan.embedding, plan.output, plan.overrides + tuple(own.items()))
    two_step = plan.needs_llama
    llama_cpp = llama_cpp_module() if two_step else None
    summary = GGUFSummary(plan.file_type, llama_quantizer=two_step)
    for t in own.values():
        summary.layer_types[t] = summary.layer_types.get(t, 0) + 1

    if path.exists():
        raise GGUFError(f"{path} already exists; not overwriting it")
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        first = Path(tmp) / "step1.gguf"
        settled = _write_step1(model, tokenizer, first, plan, arch, source_gguf, summary, defer_to_llama=two_step)
        final = first
        if two_step:
            final = Path(tmp) / "step2.gguf"
            tied_head = "output.weight" not in {t.name for t in _reader(first).tensors}
            summary.imatrix_entries = _llama_quantize(llama_cpp, first, final, plan, settled,
                                                      _imatrix_by_gguf_name(imatrix, arch, tied_head), threads)
        os.replace(final, path)  # published only when complete
    if summary.requantized:
        summary.notes.append(f"{len(summary.requantized)} quantized layer(s) could not keep their codes in "
                             f"{plan.file_type} and were re-quantized from their dequantized weights (e.g. "
                             f"{summary.requantized[0]})")
    if summary.refit:
        summary.notes.append(f"{len(summary.refit)} layer(s): the block offset m = -scale*zero is stored in float16, "
                             f"so codes were re-chosen against it (largest weight change {summary.max_code_error:.3g})")
    summary.tensor_types = tensor_type_counts(path)
    return summary


def layer_overrides(model: nn.Module, plan: TypePlan, arch: Arch) -> dict[str, str]:
    """{exact GGUF name pattern: type} for quantized layers whose code width differs from the file type's (a
    mixed-precision plan): each keeps its own width (LAYER_TYPES). The recipe's own tensor_types win over these."""
    file_bits = FILE_TYPE_BITS.get(plan.file_type)
    if file_bits is None:
        return {}  # a float file: quantized layers are written dequantized, as asked
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantLinear) or m.bits == file_bits:
            continue
        gname = gguf_tensor_name(f"{name}.weight", arch)
        if gname is None or plan.requested(gname) is not None:
            continue
        out[f"^{re.escape(gname)}$"] = LAYER_TYPES[(m.bits, m.symmetric)]
    return out


def _up(t: str | None) -> str | None:
    return t.upper() if t else None


def check_attention(config: Any) -> None:
    """Attention shapes and scales that llama.cpp computes differently from transformers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = head_dim * config.num_attention_heads
    if arch_for(config).query_is_hidden_wide and width != config.hidden_size:
        raise ArchitectureError(f"GGUF export: llama.cpp's {config.model_type} architecture needs attention heads x "
                                f"head_dim = hidden_size, here {config.num_attention_heads} x {head_dim} = {width} != "
                                f"{config.hidden_size} (attention heads were pruned); prune only MLP channels for "
                                "a GGUF export of this family")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is None:
        return
    if scalar not in (head_dim, config.hidden_size // config.num_attention_heads):
        raise ArchitectureError(f"GGUF export: query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; "
                                "llama.cpp scales attention by the head size and would compute another model")


# ------------------------------------------------------------------------------------------------ step 1
def _write_step1(model: nn.Module, tokenizer: Any, path: Path, plan: TypePlan, arch: Arch, source_gguf: Path | None,
                 summary: GGUFSummary, defer_to_llama: bool) -> dict[str, str]:
    """Write the file with every tensor this module can type itself; returns {GGUF name: type} of the 2-D tensors
    already in their final type (llama.cpp must leave those alone)."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch.gguf_name)
    try:
        writer.add_name(getattr(config, "_name_or_path", "") or config.model_type)
        writer.add_string("general.quantized_by", f"compressor {__version__}")
        for key, value in hyperparameters(config, arch).items():
            _add_value(writer, f"{arch.gguf_name}.{key}", value)
        step1_type = plan.file_type if plan.file_type in DIRECT_TYPES else "F16"
        writer.add_file_type(_ftype(step1_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, config, source_gguf)

        quantized = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in quantized
        state = {k: v for k, v in model.state_dict().items() if not k.endswith((".codes", ".scales", ".zeros",
                                                                                 ".g_idx", ".dense"))}
        for name in quantized:
            state[name] = None  # placeholder: resolved from the QuantLinear below
        settled: dict[str, str] = {}
        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue
            gname = gguf_tensor_name(hf_name, arch)
            if gname is None:
                raise ArchitectureError(f"GGUF export: no GGUF name for tensor {hf_name} of {config.model_type}")
            shape = tuple(tensor.shape) if tensor is not None else (quantized[hf_name].out_features,
                                                                     quantized[hf_name].in_features)
            target, final = _target_type(gname, shape, plan, defer_to_llama)
            data, raw_type = _encode(hf_name, tensor, quantized.get(hf_name), target, config, arch, summary)
            writer.add_tensor(gname, data, raw_dtype=raw_type)
            if final and len(shape) == 2:
                settled[gname] = target
        for gname, t in extra_tensors(config).items():
            writer.add_tensor(gname, t.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return settled


def _target_type(gguf_name: str, shape: tuple[int, ...], plan: TypePlan, defer_to_llama: bool) -> tuple[str, bool]:
    """(type written in step 1, whether that is final). Tensors that llama.cpp will type are written as F16."""
    if len(shape) < 2:
        return "F32", True  # norms and biases: llama.cpp keeps 1-D tensors in float32
    chosen = plan.requested(gguf_name)
    if chosen is None:
        if defer_to_llama and gguf_name.startswith(("token_embd.", "output.")):
            return "F16", False  # llama.cpp's rules for the file type decide
        chosen = plan.file_type
    if chosen not in DIRECT_TYPES:
        return "F16", False  # a type only llama.cpp implements
    if chosen in BLOCK_TYPES and shape[-1] % BLOCK:
        if defer_to_llama:
            return "F16", False
        raise GGUFError(f"{gguf_name} (rows of {shape[-1]}) cannot be stored as {chosen}: rows must be multiples of "
                        f"{BLOCK}; give it F16/BF16 in tensor_types or use a llama.cpp type")
    return chosen, True


def _encode(hf_name: str, tensor: torch.Tensor | None, qlinear: QuantLinear | None, target: str, config: Any,
            arch: Arch, summary: GGUFSummary) -> tuple[np.ndarray, Any]:
    import gguf

    gtype = gguf.GGMLQuantizationType[target]
    module = hf_name.removesuffix(".weight")
    if qlinear is not None and target in BLOCK_TYPES and mismatch(qlinear.qweight, BLOCK_TYPES[target]) is None:
        enc = encode_codes(_permuted(qlinear.qweight, hf_name, config, arch), BLOCK_TYPES[target])
        summary.carried_codes.append(module)
        summary.max_code_error = max(summary.max_code_error, enc.max_abs_error)
        if enc.refit:
            summary.refit.append(module)
        return enc.data, gtype
    if qlinear is not None:
        tensor = qlinear.qweight.dequantize(torch.float32)
        if target in BLOCK_TYPES:
            summary.requantized.append(f"{module} ({mismatch(qlinear.qweight, BLOCK_TYPES[target])})")
        elif target == "F16" and summary.file_type not in FLOAT_TYPES:
            summary.requantized.append(f"{module} (llama.cpp quantizes the dequantized weights to its type)")
    w = to_gguf_layout(hf_name, tensor.detach().float().cpu(), config, arch)
    if target == "F32":
        return w.numpy(), gtype
    if target == "F16":
        return w.half().numpy(), gtype
    if target == "BF16":
        return w.bfloat16().view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), gtype
    return encode_dense(w, BLOCK_TYPES[target]), gtype


def _permuted(qt, hf_name: str, config: Any, arch: Arch):
    """Llama's q/k rows reordered for llama.cpp's rotary layout; codes, scales and zeros move row by row."""
    from compressor.quant.tensor import QuantizedTensor

    if not (arch.rope_interleaved and hf_name.endswith(("q_proj.weight", "k_proj.weight"))):
        return qt
    f = lambda t: to_gguf_layout(hf_name, t, config, arch)  # noqa: E731
    return QuantizedTensor(f(qt.codes), f(qt.scales), f(qt.zeros), qt.bits, qt.group_size, qt.symmetric, qt.g_idx)


def _ftype(type_name: str) -> int:
    import gguf

    return int(gguf.LlamaFileType.ALL_F32 if type_name == "F32" else gguf.LlamaFileType[f"MOSTLY_{type_name}"])


def _add_value(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot store {type(value).__name__}")


# --------------------------------------------------------------------------------------------- tokenizer
def write_tokenizer(writer: Any, tokenizer: Any, config: Any, source_gguf: Path | None) -> None:
    """Tokenizer metadata: copied verbatim from the source GGUF when there is one, else converted from the
    transformers tokenizer (byte-level BPE as `gpt2`, SentencePiece-style BPE as `llama`)."""
    if source_gguf is not None:
        _copy_tokenizer(writer, source_gguf)
        return
    from .gguf_tokenizer import add_hf_tokenizer

    add_hf_tokenizer(writer, tokenizer, config)


def _copy_tokenizer(writer: Any, source: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[1] if len(f.types) > 1 else None
            values = [_field_item(f, i, sub) for i in f.data]
            writer.add_key_value(key, values, vtype, sub_type=sub)
        else:
            writer.add_key_value(key, _field_item(f, f.data[0], vtype), vtype)


def _field_item(f: Any, index: int, vtype: Any) -> Any:
    import gguf

    part = f.parts[index]
    if vtype == gguf.GGUFValueType.STRING:
        return bytes(part)
    return part.tolist()[0] if len(part) == 1 else part.tolist()


# -------------------------------------------------------------------------------------- llama.cpp step
def llama_quantize_file(src: Path, dst: Path, file_type: str, config: Any,
                        imatrix: dict[str, torch.Tensor] | None = None, threads: int | None = None) -> None:
    """llama.cpp's own quantization of the GGUF file `src` (e.g. an F16 export of the model whose transformers
    `config` is given) into `dst`, which must not exist; `imatrix` is keyed by transformers layer names, as
    compressor.activation_stats.mean_squared_inputs computes it. For reference files in benchmarks and tests."""
    if dst.exists():
        raise GGUFError(f"{dst} already exists; not overwriting it")
    tied_head = "output.weight" not in {t.name for t in _reader(src).tensors}
    by_name = _imatrix_by_gguf_name(imatrix, arch_for(config), tied_head)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.") as tmp:
        part = Path(tmp) / dst.name
        _llama_quantize(llama_cpp_module(), src, part, TypePlan.of(file_type), {}, by_name, threads)
        os.replace(part, dst)


def _imatrix_by_gguf_name(imatrix: dict[str, torch.Tensor] | None, arch: Arch,
                          tied_head: bool) -> dict[str, np.ndarray]:
    """Keyed by GGUF tensor name. With tied embeddings llama.cpp multiplies by token_embd for the output, so the
    output projection's statistics belong to token_embd."""
    if not imatrix:
        return {}
    out = {}
    for hf_name, values in imatrix.items():
        gname = gguf_tensor_name(f"{hf_name}.weight", arch)
        if gname == "output.weight" and tied_head:
            gname = "token_embd.weight"
        if gname is not None:
            out[gname] = values.detach().float().cpu().numpy().astype(np.float32)
    return out


def _reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def _llama_quantize(llama_cpp: Any, src: Path, dst: Path, plan: TypePlan, settled: dict[str, str],
                    imatrix: dict[str, np.ndarray], threads: int | None) -> int:
    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(plan.file_type)
    params.nthread = threads or os.cpu_count() or 1
    # Tensors already in their final type are pinned to it (llama.cpp then copies them byte for byte instead of
    # applying its mixing rules, which would try to re-quantize, e.g. early ffn_down to Q4_1); the recipe's
    # overrides for types only llama.cpp writes follow, in order.
    rules = [(f"^{re.escape(name)}$", t) for name, t in settled.items()]
    rules += [(p, t) for p, t in plan.overrides if t not in DIRECT_TYPES]
    if plan.embedding and "token_embd.weight" not in settled:
        params.token_embedding_type = int(gguf.GGMLQuantizationType[plan.embedding])
    if plan.output and "output.weight" not in settled:
        params.output_tensor_type = int(gguf.GGMLQuantizationType[plan.output])
    overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
    for i, (pattern, t) in enumerate(rules):
        overrides[i].pattern = pattern.encode()
        overrides[i].type = int(gguf.GGMLQuantizationType[t])
    if rules:
        params.tt_overrides = overrides
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    arrays = []  # the C side reads these during the call; keep them alive
    for i, (name, values) in enumerate(imatrix.items()):
        arr = np.ascontiguousarray(values, dtype=np.float32)
        arrays.append(arr)
        entries[i].name = name.encode()
        entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = arr.size
    if imatrix:
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        dst.unlink(missing_ok=True)
        raise GGUFError(f"llama.cpp's quantizer failed on {src.name} (status {rc}); see its log above")
    return len(imatrix)


def file_type_of(path: Path) -> str:
    """The file type a GGUF header declares (general.file_type), as a name such as Q4_0 or Q4_K_M."""
    import gguf

    field = _reader(path).fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = gguf.LlamaFileType(int(field.parts[field.data[0]][0]))
    return "F32" if value == gguf.LlamaFileType.ALL_F32 else value.name.removeprefix("MOSTLY_")


def describe_gguf(path: Path) -> dict[str, Any]:
    """What a GGUF file holds: architecture, file type, hyperparameters, tensor types and sizes."""
    reader = _reader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    hparams = {}
    for key, f in reader.fields.items():
        if key.startswith(f"{arch}.") and f.types and f.types[0].name != "ARRAY":
            hparams[key.removeprefix(f"{arch}.")] = f.parts[f.data[0]].tolist()[0]
    tokenizer = reader.fields.get("tokenizer.ggml.model")
    return {"path": str(path), "format": f"gguf-{file_type_of(path)}", "architecture": arch,
            "hyperparameters": hparams,
            "tokenizer_model": bytes(tokenizer.parts[-1]).decode() if tokenizer else None,
            "tensor_types": tensor_type_counts(path), "tensors": len(reader.tensors),
            "tensors_bytes": int(sum(t.n_bytes for t in reader.tensors)), "file_bytes": path.stat().st_size}


def tensor_type_counts(path: Path) -> dict[str, int]:

    counts: dict[str, int] = {}
    for t in _reader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))
