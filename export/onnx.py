"""ONNX export of decoder-only models with KV cache, as one graph of onnxruntime's fused operators.

The graph is written operator by operator (not traced): embedding -> per layer RMSNorm, QKV projection,
GroupQueryAttention (rotary, causal/sliding-window mask, KV cache append), output projection, skip+RMSNorm, MLP ->
final norm -> logits. These are the operators onnxruntime's own LLM builders emit for its fast CPU/GPU paths, so no
fusion pass has to rediscover them. Linear layers are `MatMulNBits` holding the calibrated codes of a quantize stage
(or codes rounded here for layers that have none) or plain `MatMul` for float exports. A factorized layer of a
low-rank stage (compressor.low_rank) is two such linears in a row, the bias on the second, and is never fused with
its neighbours.

Inputs and outputs follow the names optimum's ORTModelForCausalLM and onnxruntime-genai use: `input_ids`,
`attention_mask`, `position_ids`, `past_key_values.N.key/value` [batch, kv_heads, past, head_dim] -> `logits`,
`present.N.key/value`. Padding in a batch must be on the right (GroupQueryAttention reads lengths from the mask).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compressor.low_rank import LowRankLinear
from compressor.quant.tensor import QuantLinear, quantize_rtn

from .onnx_arch import DecoderSpec, rotary_tables, spec_for
from .onnx_weights import BlockWeights, block_weights, carries_exactly, concat_rows, container_bits

log = logging.getLogger("compressor")

OPSET = 21  # Gelu with tanh approximation needs 20
IR_VERSION = 10  # readable by onnxruntime >= 1.20
MS = "com.microsoft"
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf cannot serialize 2 GiB; stay clear of it
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_FLOAT = {"float32": np.float32, "float16": np.float16}
_BITS = {"int4": 4, "int8": 8}


class OnnxError(ValueError):
    """An export that cannot be done, with what would work."""


@dataclass(frozen=True)
class OnnxOptions:
    weights: str = "int4"  # float32 | float16 | int4 | int8: the decoder's linear layers
    block_size: int = 32  # blocks for weights rounded here (calibrated codes keep their own groups)
    symmetric: bool = False  # grid for weights rounded here
    lm_head: str | None = None  # float | int8 | int4 (default: float for float exports, else int8)
    embedding: str | None = None  # float | int8 | int4 (default: as lm_head)
    activations: str = "int8"  # float | int8: MatMulNBits quantizes activations to int8 on the fly (fast CPU path)
    dtype: str | None = None  # float32 | float16 for activations and unquantized tensors (default: from weights)
    external_data: bool | None = None  # None: only when the weights exceed what one protobuf file holds

    @property
    def float_dtype(self) -> str:
        return self.dtype or ("float16" if self.weights == "float16" else "float32")

    def head_kind(self) -> str:
        return self.lm_head or ("float" if self.weights in _FLOAT else "int8")

    def embedding_kind(self) -> str:
        return self.embedding or self.head_kind()


@dataclass
class OnnxSummary:
    carried_codes: int = 0  # linear layers whose calibrated codes were written unchanged
    rounded_here: int = 0  # float layers rounded to the block grid by the exporter
    requantized: list[str] = field(default_factory=list)  # calibrated layers that had to be rounded again
    float_layers: int = 0
    dequantized: int = 0  # calibrated layers written as float weights (a float export of a quantized model)
    own_width: dict[int, int] = field(default_factory=dict)  # operator bits -> layers kept at their own width
    operators: dict[str, int] = field(default_factory=dict)
    external_data: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_OPERATOR_DOMAINS = {"GroupQueryAttention": MS, "MatMulNBits": MS, "SkipSimplifiedLayerNormalization": MS,
                     "GatherBlockQuantized": MS, "SimplifiedLayerNormalization": ""}


def check_runtime(options: OnnxOptions) -> None:
    """Fail early when the installed onnxruntime lacks an operator this export would use."""
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:
        raise OnnxError("ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime") from None
    schemas = {(s.domain, s.name): s for s in C.get_all_operator_schema()}
    have = set(schemas)
    needed = {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"}
    if options.weights in _BITS or options.head_kind() in _BITS:
        needed.add("MatMulNBits")
    if options.embedding_kind() in _BITS:
        needed.add("GatherBlockQuantized")
    missing = sorted(n for n in needed if (_OPERATOR_DOMAINS[n], n) not in have)
    gqa = schemas.get((MS, "GroupQueryAttention"))
    if gqa is not None and len(gqa.inputs) < 10:
        missing.append("GroupQueryAttention with a position_ids input")
    if missing:
        raise OnnxError(f"onnxruntime {ort.__version__} lacks operator(s) {', '.join(missing)} that this export "
                        "uses; upgrade it (pip install -U onnxruntime)")


def check_model(model: nn.Module, options: OnnxOptions, where: str = "export.onnx") -> DecoderSpec:
    """Everything about the model that would stop the export, before any calibration work."""
    from .onnx_arch import ArchitectureError

    try:
        spec = spec_for(model)
    except ArchitectureError as e:
        raise OnnxError(f"{where}: {e}") from None
    if options.embedding_kind() in _BITS and spec.hidden % options.block_size:
        raise OnnxError(f"{where}.embedding: hidden size {spec.hidden} is not a multiple of block_size "
                        f"{options.block_size}; use embedding: float or another block_size")
    return spec


def write_onnx(model: nn.Module, tokenizer: Any, folder: Path, options: OnnxOptions,
               generation_config: Any = None, overwrite: bool = False) -> OnnxSummary:
    """Write `model.onnx` (+ `model.onnx.data` when large), config, generation config and tokenizer into `folder`.

    The folder appears only complete: it is written under a temporary name and renamed at the end, so a failure
    or an interrupt leaves nothing behind. An existing non-empty folder is replaced only with `overwrite`."""
    from compressor.fileio import atomic_dir

    check_runtime(options)
    spec = check_model(model, options)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise OnnxError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
    with atomic_dir(folder) as tmp:
        summary = _write(model, tokenizer, tmp, spec, options, generation_config)
    return summary


def _write(model: nn.Module, tokenizer: Any, folder: Path, spec: DecoderSpec, options: OnnxOptions,
           generation_config: Any) -> OnnxSummary:
    import onnx

    summary = OnnxSummary()
    graph = _DecoderGraph(model, spec, options, summary)
    proto = graph.build()
    summary.operators = dict(sorted(graph.g.op_counts.items()))
    weight_bytes = sum(t.ByteSize() for t in proto.graph.initializer)
    external = options.external_data if options.external_data is not None else weight_bytes > EXTERNAL_DATA_BYTES
    summary.external_data = external
    if external:
        onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(folder / MODEL_FILE))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    gen = generation_config or getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / "genai_config.json").write_text(json.dumps(genai_config(model, spec, options, gen), indent=2) + "\n")
    return summary


def genai_config(model: nn.Module, spec: DecoderSpec, options: OnnxOptions, gen: Any) -> dict[str, Any]:
    """The file onnxruntime-genai's generator reads to run the export (names of inputs/outputs, cache shape)."""
    c = model.config

    def token(name: str) -> Any:
        value = getattr(gen, name, None) if gen is not None else None
        return value if value is not None else getattr(c, name, None)

    context = int(getattr(c, "max_position_embeddings", 4096))
    return {
        "model": {
            "type": c.model_type, "context_length": context, "vocab_size": spec.vocab,
            "bos_token_id": token("bos_token_id"), "eos_token_id": token("eos_token_id"),
            "pad_token_id": token("pad_token_id") if token("pad_token_id") is not None else token("eos_token_id"),
            "decoder": {
                "filename": MODEL_FILE, "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": spec.head_dim, "hidden_size": spec.hidden, "num_attention_heads": spec.heads,
                "num_hidden_layers": spec.layers, "num_key_value_heads": spec.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": context, "num_beams": 1, "past_present_share_buffer": True},
    }


def describe_onnx(path: Path) -> dict[str, Any]:
    """What an exported ONNX model holds: format, operators, quantized layouts, inputs/outputs, bytes (weights stay
    on disk: external data is not read)."""
    import onnx

    from compressor.evaluate.onnx_runtime import model_file

    file = model_file(Path(path))
    proto = onnx.load(str(file), load_external_data=False)
    ops: dict[str, int] = {}
    layouts: dict[str, int] = {}
    by_bits: dict[int, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            bits = a.get("bits", 4)
            key = f"int{bits} block {a.get('block_size')} accuracy_level {a.get('accuracy_level', 0)}"
            layouts[key] = layouts.get(key, 0) + 1
            by_bits[bits] = by_bits.get(bits, 0) + 1
    if by_bits:
        fmt = f"onnx-int{max(by_bits, key=by_bits.get)}"  # the decoder's layers; the head may differ
    else:
        floats = {i.data_type for i in proto.graph.initializer if i.data_type in (1, 10)}
        fmt = "onnx-float16" if floats == {10} else "onnx-float32"
    files = [f for f in file.parent.iterdir() if f.name.startswith(file.name)]
    return {"path": str(file), "format": fmt, "operators": dict(sorted(ops.items())), "matmul_nbits": layouts,
            "inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output],
            "opsets": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
            "files_bytes": sum(f.stat().st_size for f in files)}


# ------------------------------------------------------------------------------------------------- graph
class _Graph:
    """Nodes and initializers with unique names; nothing model-specific."""

    def __init__(self) -> None:
        import onnx

        self.onnx = onnx
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.op_counts: dict[str, int] = {}
        self._names: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self._names:
            raise ValueError(f"duplicate initializer {name}")
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           **attrs: Any) -> Any:
        count = self.op_counts.get(op_type, 0)
        self.op_counts[op_type] = count + 1
        name = f"/{op_type}_{count}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None,
                                                     **attrs))
        return outputs[0] if len(outputs) == 1 else outputs


@dataclass
class _Matrix:
    """One linear layer's weight as the graph stores it: float [N, K] or block-quantized, plus bias."""

    n: int
    k: int
    float_weight: torch.Tensor | None = None
    block: BlockWeights | None = None
    bias: torch.Tensor | None = None


@dataclass
class _Factored:
    """A LowRankLinear: `first` [rank, K] then `second` [N, rank], which carries the bias."""

    first: _Matrix
    second: _Matrix

    @property
    def n(self) -> int:
        return self.second.n


class _DecoderGraph:
    def __init__(self, model: nn.Module, spec: DecoderSpec, options: OnnxOptions, summary: OnnxSummary) -> None:
        self.model, self.spec, self.opts, self.summary = model, spec, options, summary
        self.g = _Graph()
        self.dtype = _FLOAT[options.float_dtype]
        self.onnx_dtype = 1 if self.dtype == np.float32 else 10
        self.accuracy_level = 4 if options.activations == "int8" else 1
        self.shared_head = False
        self.names = {id(m): name for name, m in model.named_modules()}

    # ---- weights
    def matrix(self, module: nn.Module, name: str, kind: str) -> _Matrix | _Factored:
        """`kind`: float or int4/int8. Calibrated codes are written as they are where the block layout holds them."""
        if isinstance(module, LowRankLinear):  # each factor is a linear layer of its own, at the same kind
            return _Factored(self.matrix(module.first, f"{name}.first", kind),
                             self.matrix(module.second, f"{name}.second", kind))
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach().float()
        qt = module.qweight if isinstance(module, QuantLinear) else None
        n, k = (qt.shape if qt is not None else tuple(module.weight.shape))
        if kind in _FLOAT or kind == "float":
            self.summary.float_layers += 1
            self.summary.dequantized += qt is not None
            return _Matrix(n, k, float_weight=module.weight.detach().float(), bias=bias)
        bits = _BITS[kind]
        own = container_bits(qt.bits) if qt is not None else None
        if own is not None and own != bits and name.split(".")[0] != "lm_head" and carries_exactly(qt, own):
            bits = own  # a layer of another width (mixed precision) keeps it; the head follows its own option
            self.summary.own_width[bits] = self.summary.own_width.get(bits, 0) + 1
        if qt is not None and carries_exactly(qt, bits):
            self.summary.carried_codes += 1
            return _Matrix(n, k, block=block_weights(qt, bits, self.dtype), bias=bias)
        if qt is not None:
            self.summary.requantized.append(name)
        else:
            self.summary.rounded_here += 1
        dense = module.weight.detach().float()
        fitted = quantize_rtn(dense, bits, self.opts.block_size, self.opts.symmetric)
        return _Matrix(n, k, block=block_weights(fitted, bits, self.dtype), bias=bias)

    def linear(self, x: str, m: _Matrix | _Factored, name: str) -> str:
        g = self.g
        if isinstance(m, _Factored):
            return self.linear(self.linear(x, m.first, f"{name}.first"), m.second, f"{name}.second")
        bias = g.const(f"{name}.bias", m.bias.numpy().astype(self.dtype)) if m.bias is not None else ""
        if m.block is None and name == "lm_head" and self.shared_head:
            return g.op("MatMul", [x, g.op("Transpose", ["embed_tokens.weight"], perm=[1, 0])])
        if m.block is None:
            w = g.const(f"{name}.weight", m.float_weight.t().contiguous().numpy().astype(self.dtype))
            y = g.op("MatMul", [x, w])
            return g.op("Add", [y, bias]) if bias else y
        b = m.block
        if name == "lm_head" and self.shared_head:
            inputs = [x, "lm_head.qweight", "lm_head.scales", "lm_head.qzeros" if b.zero_points is not None else ""]
        else:
            inputs = [x, g.const(f"{name}.qweight", b.packed), g.const(f"{name}.scales", b.scales.astype(self.dtype)),
                      g.const(f"{name}.qzeros", b.zero_points) if b.zero_points is not None else ""]
        if bias:
            inputs += ["", bias]
        while inputs[-1] == "":
            inputs.pop()
        return g.op("MatMulNBits", inputs, domain=MS, K=b.k, N=b.n, bits=b.bits, block_size=b.block_size,
                    accuracy_level=self.accuracy_level)


    def norm_weight(self, module: nn.Module) -> np.ndarray:
        w = module.weight.detach().float()
        if self.spec.family.norm_plus_one:
            w = w + 1
        return w.numpy().astype(self.dtype)

    # ---- graph
    def build(self) -> Any:
        onnx = self.g.onnx
        helper, TP = onnx.helper, onnx.TensorProto
        s, g = self.spec, self.g
        inputs = [helper.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TP.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TP.FLOAT, ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kv}", self.onnx_dtype,
                    ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]))
                outputs.append(helper.make_tensor_value_info(
                    f"present.{i}.{kv}", self.onnx_dtype,
                    ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]))

        lengths = g.op("ReduceSum", ["attention_mask", g.const("one_axis", np.array([1], np.int64))], keepdims=0)
        seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.const("one_i64", np.array(1, np.int64))])],
                         to=TP.INT32)
        total = g.op("Cast", [g.op("Squeeze", [g.op("Shape", ["attention_mask"], start=1, end=2),
                                               g.const("zero_axis", np.array([0], np.int64))])], to=TP.INT32)
        rope = {}
        max_pos = int(getattr(self.model.config, "max_position_embeddings", 4096))
        for kind, (cos, sin) in rotary_tables(self.model, s, max_pos).items():
            rope[kind] = (g.const(f"cos_cache.{kind}", cos.numpy().astype(self.dtype)),
                          g.const(f"sin_cache.{kind}", sin.numpy().astype(self.dtype)))

        head = self.matrix(self.model.lm_head, "lm_head", self.opts.head_kind())
        x = self.embedding(head)
        residual, pending = x, None
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            h, residual = self.add_norm(pending, residual, layer.input_layernorm)
            attn = self.attention(i, layer.self_attn, h, seqlens_k, total, rope[s.rope_kind[i]])
            if s.family.sandwich:
                attn = self.norm(attn, layer.post_attention_layernorm)
                h, residual = self.add_norm(attn, residual, layer.pre_feedforward_layernorm)
            else:
                h, residual = self.add_norm(attn, residual, layer.post_attention_layernorm)
            mlp = self.mlp(i, layer.mlp, h)
            if s.family.sandwich:
                mlp = self.norm(mlp, layer.post_feedforward_layernorm)
            pending = mlp
        h, _ = self.add_norm(pending, residual, self.model.model.norm)
        logits = self.linear(h, head, "lm_head")
        if s.final_softcap:
            cap = g.const("final_softcap", np.array(s.final_softcap, self.dtype))
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
        if self.dtype != np.float32:
            logits = g.op("Cast", [logits], to=TP.FLOAT)
        g.op("Identity", [logits], ["logits"])

        graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="compressor")
        model.ir_version = IR_VERSION
        return model

    def embedding(self, head: _Matrix | _Factored) -> str:
        g, s = self.g, self.spec
        table = self.model.model.embed_tokens.weight.detach().float()
        kind = self.opts.embedding_kind()
        if kind in _BITS:
            bits = _BITS[kind]
            if self._shares_head(head, bits):
                # The linear's initializers are named here first; linear() finds them by name.
                self.shared_head = True
                q = head.block
                data = g.op("Reshape", [g.const("lm_head.qweight", q.packed),
                                        g.const("embed_tokens.rows", np.array([q.n, -1], np.int64))])
                scales = g.const("lm_head.scales", q.scales.astype(self.dtype))
                zeros = g.const("lm_head.qzeros", q.zero_points) if q.zero_points is not None else ""
            else:
                q = block_weights(quantize_rtn(table, bits, self.opts.block_size, self.opts.symmetric), bits,
                                  self.dtype)
                data = g.const("embed_tokens.qweight", q.packed.reshape(q.n, -1))
                scales = g.const("embed_tokens.scales", q.scales)
                zeros = g.const("embed_tokens.qzeros", q.zero_points) if q.zero_points is not None else ""
            inputs = [data, "input_ids", scales] + ([zeros] if zeros else [])
            x = g.op("GatherBlockQuantized", inputs, domain=MS, bits=bits, block_size=q.block_size,
                     gather_axis=0, quantize_axis=1)
        else:
            x = g.op("Gather", [g.const("embed_tokens.weight", table.numpy().astype(self.dtype)), "input_ids"])
            if self.spec.tied and isinstance(head, _Matrix) and head.float_weight is not None and head.bias is None \
                    and torch.equal(head.float_weight, table):
                self.shared_head = True  # one table in the file; onnxruntime folds the transpose when it loads
        if s.family.embed_scale:
            # transformers rounds the normalizer to the model dtype before multiplying
            x = g.op("Mul", [x, g.const("embed_scale", np.array(s.hidden ** 0.5, self.dtype))])
        return x

    def _shares_head(self, head: _Matrix | _Factored, bits: int) -> bool:
        """A tied output projection rounded here in the embedding's layout holds the same numbers as the
        embedding would: store them once."""
        return (self.spec.tied and isinstance(head, _Matrix) and not isinstance(self.model.lm_head, QuantLinear)
                and head.block is not None and head.block.bits == bits
                and head.block.block_size == self.opts.block_size and head.bias is None)

    def norm(self, x: str, module: nn.Module) -> str:
        w = self.g.const(f"{self.names[id(module)]}.weight", self.norm_weight(module))
        return self.g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=self.spec.eps, stash_type=1)

    def add_norm(self, pending: str | None, residual: str, module: nn.Module) -> tuple[str, str]:
        """(norm(residual + pending), residual + pending) in one operator."""
        if pending is None:
            return self.norm(residual, module), residual
        w = self.g.const(f"{self.names[id(module)]}.weight", self.norm_weight(module))
        out, total = self.g.op("SkipSimplifiedLayerNormalization", [pending, residual, w],
                               [f"/skipnorm_{len(self.g.nodes)}/out", "", "", f"/skipnorm_{len(self.g.nodes)}/sum"],
                               domain=MS, epsilon=self.spec.eps)[0::3]
        return out, total

    def attention(self, i: int, attn: nn.Module, h: str, seqlens_k: str, total: str,
                  rope: tuple[str, str]) -> str:
        g, s = self.g, self.spec
        prefix = f"model.layers.{i}.self_attn"
        mats = [self.matrix(getattr(attn, p), f"{prefix}.{p}", self.opts.weights) for p in ("q_proj", "k_proj",
                                                                                            "v_proj")]
        fused = _concat(mats)  # one kernel call instead of three where the layouts agree
        if fused is not None and not s.family.qk_norm:
            qkv_inputs = [self.linear(h, fused, f"{prefix}.qkv_proj"), "", ""]
        else:
            if fused is not None:
                q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
                sizes = g.const(f"{prefix}.qkv_split", np.array([q_size, kv_size, kv_size], np.int64))
                q, k, v = g.op("Split", [self.linear(h, fused, f"{prefix}.qkv_proj"), sizes], 3, axis=-1)
            else:
                q, k, v = (self.linear(h, m, f"{prefix}.{p}") for m, p in zip(mats, ("q_proj", "k_proj", "v_proj")))
            if s.family.qk_norm:
                q = self.head_norm(q, attn.q_norm, s.heads)
                k = self.head_norm(k, attn.k_norm, s.kv_heads)
            qkv_inputs = [q, k, v]
        window = s.windows[i]
        out = g.op("GroupQueryAttention",
                   [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens_k, total,
                    rope[0], rope[1], "position_ids"],
                   [f"{prefix}/attn_out", f"present.{i}.key", f"present.{i}.value"], domain=MS,
                   num_heads=s.heads, kv_num_heads=s.kv_heads, do_rotary=1, rotary_interleaved=0,
                   scale=s.attn_scale, softcap=s.attn_softcap,
                   local_window_size=window if window else -1)[0]
        return self.linear(out, self.matrix(attn.o_proj, f"{prefix}.o_proj", self.opts.weights), f"{prefix}.o_proj")

    def head_norm(self, x: str, module: nn.Module, heads: int) -> str:
        g, s = self.g, self.spec
        per_head = g.op("Reshape", [x, g.const(f"{self.names[id(module)]}.shape",
                                               np.array([0, 0, heads, s.head_dim], np.int64))])
        normed = self.norm(per_head, module)
        return g.op("Reshape", [normed, g.const(f"{self.names[id(module)]}.flat",
                                                np.array([0, 0, heads * s.head_dim], np.int64))])

    def mlp(self, i: int, mlp: nn.Module, h: str) -> str:
        g = self.g
        prefix = f"model.layers.{i}.mlp"
        mats = [self.matrix(getattr(mlp, p), f"{prefix}.{p}", self.opts.weights) for p in ("gate_proj", "up_proj")]
        fused = _concat(mats)  # one kernel call instead of two where the layouts agree
        if fused is not None:
            sizes = g.const(f"{prefix}.gate_up_split", np.array([mats[0].n, mats[1].n], np.int64))
            gate, up = g.op("Split", [self.linear(h, fused, f"{prefix}.gate_up_proj"), sizes], 2, axis=-1)
        else:
            gate, up = (self.linear(h, m, f"{prefix}.{p}") for m, p in zip(mats, ("gate_proj", "up_proj")))
        act = self.spec.activation
        if act == "silu":
            a = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        else:
            a = g.op("Gelu", [gate], approximate="tanh" if act == "gelu_tanh" else "none")
        return self.linear(g.op("Mul", [a, up]),
                           self.matrix(mlp.down_proj, f"{prefix}.down_proj", self.opts.weights),
                           f"{prefix}.down_proj")


def _concat(mats: list[_Matrix | _Factored]) -> _Matrix | None:
    """The matrices stacked along N (one projection of the same input), or None where their layouts differ."""
    if any(isinstance(m, _Factored) for m in mats):
        return None  # two operators in a row; stacking them with a neighbour would need a block-diagonal second
    first = mats[0]
    n = sum(m.n for m in mats)
    if all(m.bias is None for m in mats):
        bias = None
    else:
        bias = torch.cat([m.bias if m.bias is not None else torch.zeros(m.n) for m in mats])
    if all(m.block is None for m in mats):
        return _Matrix(n, first.k, float_weight=torch.cat([m.float_weight for m in mats]), bias=bias)
    merged = concat_rows([m.block for m in mats])
    return None if merged is None else _Matrix(n, first.k, block=merged, bias=bias)


