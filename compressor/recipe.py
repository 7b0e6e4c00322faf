"""Recipes: the YAML a user writes, validated before any model is loaded.

Every error names the field path (``stages[0].quantize.bits``) and what would be valid. Unknown keys are errors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, \
    model_validator


class RecipeError(ValueError):
    """A recipe that cannot be run, with every problem listed by field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    """Where the model comes from: a bundled name, a local HF folder, a ``.gguf`` file or a hub id."""

    id: str = Field(min_length=1, description="bundled name, local folder, .gguf file, or hub id")
    gguf_file: str | None = Field(None, description="file name inside `id` when `id` is a folder holding GGUF files")
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="run Python code shipped with a hub model; off unless asked")


# ----------------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    """A text corpus: the embedded ``python-docs``, a text file, a JSONL file, or a saved HF dataset folder."""

    source: str = Field("python-docs", min_length=1)
    format: Literal["auto", "text", "jsonl", "hf-dataset"] = "auto"
    field: str = Field("text", description="record field holding the text (JSONL, HF dataset)")
    split: str | None = Field(None, description="built-in corpora and HF datasets: train or test (default: train "
                                                "for calibration, test for evaluation)")
    line_records: bool = Field(False, description="text files: each line is a record (WikiText-style raw files)")
    join: str = Field("\n\n", description="separator placed between records")
    max_records: int | None = Field(None, gt=0)


class CalibrationConfig(DataConfig):
    samples: int = Field(128, gt=0, le=100_000, description="number of calibration windows")
    seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per window")
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="windows per forward pass while calibrating")


class EvalDataConfig(DataConfig):
    windows: int | None = Field(8, gt=0, description="number of non-overlapping windows (null: all)")
    seq_len: int = Field(1024, ge=8, le=1_048_576)


# ----------------------------------------------------------------------------------------------- stages
QuantMethod = Literal["rtn", "gptq", "awq"]


class QuantizeConfig(_Strict):
    """Weight-only quantization of linear layers."""

    method: QuantMethod = "gptq"
    bits: Literal[2, 3, 4, 5, 8] = Field(4, description="2, 3, 4 and 8 fit the GPTQ format; 5 fits GGUF Q5_0/Q5_1")
    group_size: int = Field(128, description="weights sharing one scale along the input dimension; -1: per channel")
    symmetric: bool = True
    act_order: bool = Field(False, description="GPTQ: process columns by decreasing Hessian diagonal "
                                               "(groups stay static, so exports need no column reordering)")
    damp: float = Field(0.01, gt=0, le=1, description="GPTQ: fraction of the mean Hessian diagonal added to it")
    block_size: int = Field(128, gt=0, description="GPTQ: columns updated together")
    clip_search: bool = Field(False, description="search a clipping ratio per group that minimizes the "
                                                 "quantization error instead of using the full range")
    include: tuple[str, ...] = Field((), description="regexes; only linear layers whose name matches are quantized")
    exclude: tuple[str, ...] = Field((), description="regexes; matching linear layers stay in full precision")
    lm_head: bool = Field(False, description="also quantize the output projection (round to nearest)")
    awq_scales: bool = Field(False, description="gptq: search AWQ scales first (folded into the preceding norm or "
                                                "linear), then run GPTQ on the scaled weights")
    awq_grid: int = Field(20, ge=1, le=200, description="AWQ: exponents tried for the scales (alpha = i/grid)")
    duo_scaling: bool = Field(True, description="AWQ: scales from activations and weights "
                                                "(rms(x)^a / mean|w|^(1-a)); false: activations only")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError("group_size must be -1 (per channel) or an integer >= 8, such as 32, 64 or 128")
        return v

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
        return v

    @model_validator(mode="after")
    def _method_options(self) -> "QuantizeConfig":
        if self.method != "gptq" and self.act_order:
            raise ValueError("act_order applies to method gptq only")
        if self.awq_scales and self.method != "gptq":
            raise ValueError("awq_scales adds AWQ scales before GPTQ (method gptq); AWQ with round to nearest is "
                             "method: awq")
        return self

    @property
    def uses_awq(self) -> bool:
        return self.method == "awq" or self.awq_scales

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")


class QuantizeStage(_Strict):
    quantize: QuantizeConfig


STAGE_KINDS = ("quantize",)


# ----------------------------------------------------------------------------------------------- export
class SafetensorsExportConfig(_Strict):
    format: Literal["gptq", "dense"] = Field("gptq", description="gptq: packed codes that GPTQ loaders read; "
                                                                 "dense: dequantized weights plain transformers loads")
    dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the tensors that are not quantized (and of dense weights)")
    name: str | None = Field(None, description="folder name inside the run folder (default: safetensors or "
                                               "safetensors-dense)")


class SafetensorsExport(_Strict):
    safetensors: SafetensorsExportConfig


def _gguf_type(value: Any, allowed: tuple[str, ...], what: str) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in allowed:
        raise ValueError(f"{what} {value!r} is not a GGUF type this exporter writes; allowed: "
                         f"{', '.join(t.lower() for t in allowed)}")
    return value.upper()


class GGUFExportConfig(_Strict):
    type: str = Field("Q4_0", description="file type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 (written here, "
                                          "calibrated codes kept when their grid matches) or a llama.cpp mix such "
                                          "as q4_k_m (quantized by llama.cpp)")
    embedding_type: str | None = Field(None, description="type of token_embd (default: llama.cpp's choice)")
    output_type: str | None = Field(None, description="type of the output projection (default: llama.cpp's choice)")
    tensor_types: dict[str, str] = Field({}, description="per-tensor types: regex on the GGUF tensor name -> type "
                                                         "(first match wins), e.g. {'ffn_down': q8_0}")
    imatrix: bool | None = Field(None, description="guide llama.cpp's quantizer with an importance matrix from the "
                                                   "calibration data (default: when there is calibration data)")
    name: str | None = Field(None, description="folder name inside the run folder (default: gguf)")

    @field_validator("type")
    @classmethod
    def _type(cls, v: Any) -> Any:
        from export.gguf_types import FILE_TYPES

        return _gguf_type(v, FILE_TYPES, "type")

    @field_validator("embedding_type", "output_type")
    @classmethod
    def _tensor_type(cls, v: Any) -> Any:
        from export.gguf_types import TENSOR_TYPES

        return _gguf_type(v, TENSOR_TYPES, "tensor type")


    @field_validator("tensor_types")
    @classmethod
    def _tensor_types(cls, v: dict[str, Any]) -> dict[str, str]:
        import re

        from export.gguf_types import TENSOR_TYPES

        for pattern, t in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None
            _gguf_type(t, TENSOR_TYPES, f"tensor type for {pattern!r}")
        return {p: t.upper() for p, t in v.items()}

    def plan(self) -> Any:
        """The export.gguf.TypePlan of these options."""
        from export.gguf import TypePlan

        return TypePlan.of(self.type, self.embedding_type, self.output_type, self.tensor_types)


class GGUFExport(_Strict):
    gguf: GGUFExportConfig


class OnnxExportConfig(_Strict):
    weights: Literal["float32", "float16", "int4", "int8"] = Field(
        "int4", description="linear layers: float, or MatMulNBits blocks holding the quantize stage's codes "
                            "(layers without codes are rounded to nearest here)")
    block_size: int = Field(32, description="block of weights rounded here (power of two >= 16); calibrated codes "
                                            "keep their own group size")
    symmetric: bool = Field(False, description="grid of weights rounded here")
    lm_head: Literal["float", "int4", "int8"] | None = Field(
        None, description="output projection (default: float for float exports, int8 otherwise)")
    embedding: Literal["float", "int4", "int8"] | None = Field(
        None, description="token embedding table, quantized through GatherBlockQuantized (default: as lm_head; a "
                          "tied table in the output projection's layout is stored once)")
    activations: Literal["float", "int8"] = Field(
        "int8", description="int8: MatMulNBits quantizes activations per block on the fly (onnxruntime's fast CPU "
                            "path); float: exact float activations (slower on CPU)")
    dtype: Literal["float32", "float16"] | None = Field(
        None, description="activations and unquantized tensors (default: float16 for weights float16, else "
                          "float32)")
    external_data: bool | None = Field(None, description="weights in model.onnx.data (default: only above ~1.8 GB, "
                                                         "which one protobuf file cannot hold)")
    name: str | None = Field(None, description="folder name inside the run folder (default: onnx)")

    @field_validator("block_size")
    @classmethod
    def _block(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("block_size must be a power of two >= 16 (MatMulNBits blocks), such as 32, 64 or 128")
        return v

    def options(self) -> Any:
        """The export.onnx.OnnxOptions of these settings."""
        from export.onnx import OnnxOptions

        return OnnxOptions(**self.model_dump(exclude={"name"}))


class OnnxExport(_Strict):
    onnx: OnnxExportConfig


EXPORT_KINDS = ("safetensors", "gguf", "onnx")
# Items arrive as one-key mappings (see _one_key_item); the key picks the model, so errors speak of that one only.


def _export_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next(iter(value)) if len(value) == 1 else None
    return {GGUFExport: "gguf", OnnxExport: "onnx"}.get(type(value), "safetensors")


Export = Annotated[Union[Annotated[SafetensorsExport, Tag("safetensors")], Annotated[GGUFExport, Tag("gguf")],
                         Annotated[OnnxExport, Tag("onnx")]],
                   Discriminator(_export_kind)]


# ----------------------------------------------------------------------------------------------- evaluate
Metric = Literal["perplexity", "kl_divergence", "top1_agreement", "latency", "size", "memory"]
ALL_METRICS: tuple[str, ...] = ("perplexity", "kl_divergence", "top1_agreement", "latency", "size", "memory")


class SpeedConfig(_Strict):
    prompt_tokens: int = Field(128, gt=0, description="prompt length before timing decode")
    decode_tokens: int = Field(32, gt=0, description="tokens generated one at a time with the KV cache")
    prefill_tokens: int = Field(512, gt=0, description="prompt length for the prefill throughput")
    repeats: int = Field(3, gt=0, description="timed repetitions; the median is reported")
    threads: int | None = Field(None, gt=0, description="CPU threads (default: torch's default)")


class BudgetConfig(_Strict):
    max_perplexity_increase: float | None = Field(None, ge=0, description="relative, e.g. 0.15 = +15%")
    max_kl_divergence: float | None = Field(None, ge=0)
    min_top1_agreement: float | None = Field(None, ge=0, le=1)
    max_size_mb: float | None = Field(None, gt=0)


class EvaluateConfig(_Strict):
    data: EvalDataConfig = EvalDataConfig()
    metrics: tuple[Metric, ...] = ALL_METRICS
    speed: SpeedConfig = SpeedConfig()
    budget: BudgetConfig | None = None
    batch_size: int = Field(1, gt=0, description="evaluation windows per forward pass")

    @model_validator(mode="after")
    def _budget_needs_metric(self) -> "EvaluateConfig":
        if self.budget is None:
            return self
        needs = {"max_perplexity_increase": "perplexity", "max_kl_divergence": "kl_divergence",
                 "min_top1_agreement": "top1_agreement", "max_size_mb": "size"}
        for key, metric in needs.items():
            if getattr(self.budget, key) is not None and metric not in self.metrics:
                raise ValueError(f"budget.{key} needs the metric {metric!r} in evaluate.metrics")
        return self


# ----------------------------------------------------------------------------------------------- recipe
class Recipe(_Strict):
    model: ModelConfig
    calibration: CalibrationConfig | None = None
    stages: tuple[QuantizeStage, ...] = ()
    export: tuple[Export, ...] = ()
    evaluate: EvaluateConfig | None = EvaluateConfig()
    output: str = Field("runs/run", min_length=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"id": data["model"]}}
        if isinstance(data, dict):
            for key, kinds in (("stages", STAGE_KINDS), ("export", EXPORT_KINDS)):
                items = data.get(key)
                if isinstance(items, list):
                    data = {**data, key: [_one_key_item(key, i, item, kinds) for i, item in enumerate(items)]}
        return data

    @model_validator(mode="after")
    def _cross_field(self) -> "Recipe":
        quant = self.quantize_configs()
        if len(quant) > 1:
            raise ValueError("stages: at most one quantize stage per recipe (got %d)" % len(quant))
        for q in quant:
            if q.needs_calibration and self.calibration is None:
                raise ValueError(f"stages: method {q.method} needs a `calibration` section (text to calibrate on)")
        for i, exp in enumerate(self.export):
            if isinstance(exp, GGUFExport):
                if exp.gguf.imatrix and self.calibration is None:
                    raise ValueError(f"export[{i}].gguf.imatrix needs a `calibration` section (the text whose "
                                     "activations weigh the quantization error)")
                continue
            if isinstance(exp, OnnxExport):
                continue
            fmt = exp.safetensors.format
            if fmt == "gptq" and not quant:
                raise ValueError(f"export[{i}].safetensors.format gptq needs a quantize stage; "
                                 "use format: dense to export an unquantized model")
            if fmt == "gptq" and quant[0].bits not in (2, 3, 4, 8):
                raise ValueError(f"export[{i}].safetensors.format gptq holds 2, 3, 4 or 8-bit codes, the quantize "
                                 f"stage makes {quant[0].bits}-bit ones; use format: dense or a gguf export")
        names = [self.export_name(i) for i in range(len(self.export))]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"export: two targets would write the same folder {sorted(dup)}; set `name` on one")
        return self

    # -------------------------------------------------------------------------------------------- helpers
    def quantize_configs(self) -> list[QuantizeConfig]:
        return [s.quantize for s in self.stages if isinstance(s, QuantizeStage)]

    def export_name(self, index: int) -> str:
        target = self.export[index]
        if isinstance(target, GGUFExport):
            return target.gguf.name or "gguf"
        if isinstance(target, OnnxExport):
            return target.onnx.name or "onnx"
        cfg = target.safetensors
        if cfg.name:
            return cfg.name
        return "safetensors" if cfg.format == "gptq" else "safetensors-dense"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping with keys {sorted(cls.model_fields)}; "
                              f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(format_validation_error(e, source)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _one_key_item(section: str, index: int, item: Any, kinds: tuple[str, ...]) -> Any:
    """`- quantize: {...}` items must name exactly one known kind; say which kinds exist otherwise."""
    if isinstance(item, str) and item in kinds:
        return {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"{section}[{index}]: each item is a mapping with exactly one key, one of {list(kinds)}; "
                         f"got {item!r}")
    kind = next(iter(item))
    if kind not in kinds:
        raise ValueError(f"{section}[{index}]: unknown kind {kind!r}; allowed: {list(kinds)}")
    if item[kind] is None:
        return {kind: {}}
    return item


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} problem(s):"]
    for err in error.errors():
        loc = _loc_path(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key" + _allowed_keys_hint(error, err["loc"])
        elif err["type"].startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        got = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden", "value_error") and not isinstance(got, (dict, list)):
            msg += f" (got {got!r})"
        lines.append(f"  - {loc or '<recipe>'}: {msg}")
    return "\n".join(lines)


def _loc_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(_user_loc(loc)):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _user_loc(loc: tuple[Any, ...]) -> list[Any]:
    """The error location without what pydantic adds for unions: member class names and discriminator tags (a tag
    repeats the one key of a `- kind: {...}` item)."""
    parts = [p for p in loc if not (isinstance(p, str) and (p.endswith("Stage") or p.endswith("Export")))]
    return [p for i, p in enumerate(parts) if not (isinstance(p, str) and i + 1 < len(parts) and parts[i + 1] == p)]


def _allowed_keys_hint(error: ValidationError, loc: tuple[Any, ...]) -> str:
    model = _model_at(Recipe, tuple(_user_loc(loc))[:-1])
    if model is None:
        return ""
    return f"; allowed keys: {', '.join(sorted(model.model_fields))}"


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    candidates: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        fields = [c.model_fields[part] for c in candidates if part in c.model_fields]
        if not fields:
            return None
        candidates = _models_in(fields[0].annotation)
    return candidates[0] if len(candidates) == 1 else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models an annotation may hold (through Optional, unions, tuples, Annotated)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found
