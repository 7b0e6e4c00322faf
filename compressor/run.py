"""Orchestration of `compress run`: check, load, compress, export, evaluate, report. No math lives here."""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import platform
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from . import __version__, data, models
from .evaluate import speed
from .evaluate.accuracy import TorchRuntime, compare
from .quant.tensor import QuantLinear
from .fileio import atomic_dir, atomic_write_text, file_hashes, replace_dir, sha256
from .recipe import DistillStage, LowRankStage, PruneDepthStage, PruneStage, PruneWidthStage, QuantizeStage, Recipe
from .report import budget_failures, markdown
from .sequential import calibration_dtype
from .stages import StageContext, apply_stage
from .stages.low_rank import check_low_rank, low_rank_targets, planned_ranks
from .stages.prune import check_prune_shapes
from .stages.structured import block_shape, check_depth, check_width, width_after
from .stages.quantize import check_shapes, select_linears, stage_widths

log = logging.getLogger("compressor")


class RunError(RuntimeError):
    """A run that cannot start or finish, with what to do about it."""


@dataclass
class RunResult:
    output: Path
    report: dict[str, Any]
    passed: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class _Timings:
    values: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("%s ...", name)
        yield
        self.values[name] = round(time.perf_counter() - start, 3)
        log.info("%s done in %.1fs", name, self.values[name])


def preflight(recipe: Recipe, overwrite: bool = False) -> Path:
    """Everything that can be checked before the model is loaded."""
    out = Path(recipe.output)
    if out.exists() and not out.is_dir():
        raise RunError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunError(f"output {out} already holds a run; pass --overwrite to replace it, or set another output")
    texts = [("calibration", recipe.calibration, "train"),
             ("evaluate.data", recipe.evaluate.data if recipe.evaluate else None, "test")]
    texts += [(f"stages[{i}].distill.data", s.distill.data, "train") for i, s in enumerate(recipe.stages)
              if isinstance(s, DistillStage)]
    for section, cfg, split in texts:
        if cfg is not None and cfg.source != data.MODEL_SOURCE:
            try:
                data.load_text(cfg, split)
            except data.DataError as e:
                raise RunError(f"{section}: {e}") from None
    if recipe.calibration and recipe.evaluate and data.same_text(recipe.calibration, recipe.evaluate.data):
        log.warning("calibration and evaluation read the same text (%s); the reported accuracy will be optimistic",
                    recipe.calibration.source)
    models.resolve(recipe.model)
    _preflight_gguf(recipe)
    _preflight_onnx(recipe)
    return out


def _preflight_onnx(recipe: Recipe) -> None:
    from export.onnx import OnnxError, check_runtime
    from export.onnx_weights import container_bits, supported_block

    quant = recipe.quantize_configs()
    for i, target in enumerate(recipe.export):
        cfg = getattr(target, "onnx", None)
        if cfg is None:
            continue
        try:
            check_runtime(cfg.options())
        except OnnxError as e:
            raise RunError(f"export[{i}].onnx: {e}") from None
        if not quant or cfg.weights in ("float32", "float16"):
            continue
        q = quant[0]
        width = {"int4": 4, "int8": 8}[cfg.weights]
        if q.bits > width or not supported_block(q.group_size if q.group_size != -1 else 0):
            log.warning("export[%d].onnx: MatMulNBits (%s, blocks of powers of two >= 16) cannot hold the quantize "
                        "stage's %d-bit codes in groups of %s: those layers will be rounded a second time", i,
                        cfg.weights, q.bits, q.group_size)
        elif container_bits(q.bits) != width:
            log.info("export[%d].onnx: %d-bit codes are stored in %s blocks (exactly, with unused bits)", i, q.bits,
                     cfg.weights)


def _preflight_gguf(recipe: Recipe) -> None:
    import importlib.util

    from export.gguf import GGUFError
    from export.gguf_types import BLOCK_GRIDS

    quant = recipe.quantize_configs()
    for i, target in enumerate(recipe.export):
        cfg = getattr(target, "gguf", None)
        if cfg is None:
            continue
        try:
            needs = cfg.plan().needs_llama
        except GGUFError as e:
            raise RunError(f"export[{i}].{e}") from None
        if (needs or recipe.evaluate) and importlib.util.find_spec("llama_cpp") is None:
            why = "its llama.cpp types" if needs else "checking it in llama.cpp (evaluate)"
            raise RunError(f"export[{i}].gguf: {why} needs llama-cpp-python: "
                           "CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python")
        if quant and cfg.type in BLOCK_GRIDS:
            q = quant[0]
            if (q.bits, q.symmetric, q.group_size) not in ((*BLOCK_GRIDS[cfg.type], 32),):
                log.warning("export[%d].gguf: %s holds %d-bit %s groups of 32, the quantize stage makes %d-bit %s "
                            "groups of %d: its weights will be rounded a second time", i, cfg.type,
                            BLOCK_GRIDS[cfg.type][0], "symmetric" if BLOCK_GRIDS[cfg.type][1] else "asymmetric",
                            q.bits, "symmetric" if q.symmetric else "asymmetric", q.group_size)
        elif quant and cfg.type not in ("F32", "F16", "BF16"):
            log.warning("export[%d].gguf: llama.cpp's %s cannot hold the calibrated codes; it re-quantizes the "
                        "dequantized weights", i, cfg.type)


@dataclass
class SharedWork:
    """What several runs (a sweep's variants) can share, computed by the first run that needs it: the loaded model,
    calibration and evaluation windows, the model after an identical list of stages (with the statistics its exports
    computed), and the baseline's speed. Values are handed out as copies where a run would change them."""

    values: dict[tuple[str, str], Any] = field(default_factory=dict)
    made: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    keep_latest: tuple[str, ...] = ("compressed model", "export statistics")  # whole models: only the latest stays
    cost: dict[tuple[str, str], float] = field(default_factory=dict)  # seconds each value took to make
    seconds_made: dict[str, float] = field(default_factory=dict)
    seconds_saved: dict[str, float] = field(default_factory=dict)  # what re-making the reused values would have cost

    def once(self, kind: str, key: Any, make: Any, copied: bool = False) -> Any:
        k = (kind, json.dumps(key, sort_keys=True, default=str))
        if k in self.values:
            self.reused[kind] = self.reused.get(kind, 0) + 1
            self.seconds_saved[kind] = self.seconds_saved.get(kind, 0.0) + self.cost.get(k, 0.0)
            log.info("%s: reused from an earlier variant", kind)
        else:
            if kind in self.keep_latest:  # a sweep runs variants with equal stages back to back: one is enough
                for old in [key for key in self.values if key[0] == kind]:
                    del self.values[old]
            start = time.perf_counter()
            self.values[k] = make()
            self.cost[k] = time.perf_counter() - start
            self.made[kind] = self.made.get(kind, 0) + 1
            self.seconds_made[kind] = self.seconds_made.get(kind, 0.0) + self.cost[k]
        return copy.deepcopy(self.values[k]) if copied else self.values[k]

    def has(self, kind: str, key: Any) -> bool:
        return (kind, json.dumps(key, sort_keys=True, default=str)) in self.values

    def summary(self) -> dict[str, dict[str, float]]:
        return {kind: {"computed": n, "reused": self.reused.get(kind, 0),
                       "seconds_computing": round(self.seconds_made.get(kind, 0.0), 1),
                       "seconds_saved": round(self.seconds_saved.get(kind, 0.0), 1)} for kind, n in self.made.items()}

    def total_saved(self) -> float:
        return sum(self.seconds_saved.values())


def stages_inputs(recipe: Recipe) -> list[Any]:
    """What the model after the recipe's stages depends on: runs equal in these share it (a sweep orders by them)."""
    r = recipe.to_dict()
    return [r["model"], r["calibration"], r["stages"], r["seed"]]


def _once(shared: SharedWork | None, kind: str, key: Any, make: Any, copied: bool = False) -> Any:
    return make() if shared is None else shared.once(kind, key, make, copied)


def run(recipe: Recipe, *, overwrite: bool = False, shared: SharedWork | None = None,
        resume: bool = False) -> RunResult:
    """Run a recipe end to end; the run folder appears at `recipe.output` only when everything is written. With
    `shared`, work another run already did with the same inputs is reused (see SharedWork). Finished stages and
    blocks are checkpointed beside the output while the run goes (compressor.resume); with `resume`, the
    checkpoints an interrupted run of the same recipe left are used instead of redoing that work."""
    from . import resume as checkpoints
    from .distributed import world

    rank, size = world()
    if size > 1:
        _check_data_parallel(recipe)
        if rank > 0:  # a helper of rank 0: calibrates its share of the batches, writes nothing
            return _help_calibrate(recipe)
    out = preflight(recipe, overwrite)
    resume_dir = checkpoints.folder_for(out)
    if resume_dir.exists():
        if resume:
            log.info("resuming from %s: %s", resume_dir, checkpoints.describe(resume_dir))
        elif overwrite:
            shutil.rmtree(resume_dir)
        else:
            raise RunError(f"output {out}: an interrupted run of it left checkpoints in {resume_dir} "
                           f"({checkpoints.describe(resume_dir)}); pass --resume to continue from them, or "
                           "--overwrite to start afresh")
    elif resume:
        log.info("--resume: no checkpoints at %s; starting from the beginning", resume_dir)
    device = _device(recipe.device)
    torch.manual_seed(recipe.seed)
    timings = _Timings()
    work = out.with_name(f".{out.name}.partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    try:
        result = _run_in(recipe, work, device, timings, shared, resume_dir if size == 1 else None)
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if resume_dir.exists():
            log.warning("the finished stages and blocks are kept in %s: `compress run --resume` continues from "
                        "them", resume_dir)
        raise
    shutil.rmtree(resume_dir, ignore_errors=True)
    result.output = out
    return result


def _check_data_parallel(recipe: Recipe) -> None:
    """Under torchrun every process runs the stages on its share of the calibration batches, and statistics are
    summed before each layer changes; stages that train or rank layers on their own data would diverge."""
    for i, stage in enumerate(recipe.stages):
        mixed = isinstance(stage, QuantizeStage) and stage.quantize.mixed is not None
        if not isinstance(stage, (QuantizeStage, PruneStage)) or mixed:
            kind = "quantize with mixed" if mixed else type(stage).__name__.removesuffix("Stage").lower()
            raise RunError(f"stages[{i}]: {kind} does not run data-parallel; start one process (not torchrun) for "
                           "this recipe. Data-parallel calibration covers quantize (rtn, gptq, awq) and prune")


def _stage_context(recipe: Recipe, model: torch.nn.Module, calib: torch.Tensor | None, device: str,
                   **extra: Any) -> StageContext:
    cfg = recipe.calibration
    dtype = calibration_dtype(cfg.precision, model, device) if cfg is not None else None
    if dtype is not None:
        log.info("calibration passes multiply in %s (calibration.precision: %s)", str(dtype).removeprefix("torch."),
                 cfg.precision)
    return StageContext(calibration=calib, batch_size=cfg.batch_size if cfg else 8, device=device,
                        compute_dtype=dtype, **extra)


def _calibration_windows(cfg: Any, model: torch.nn.Module, tokenizer: Any, device: str) -> torch.Tensor:
    if cfg.source == data.MODEL_SOURCE:
        return data.generated_windows(model, tokenizer, cfg, device)
    return data.calibration_windows(tokenizer, cfg)


def _help_calibrate(recipe: Recipe) -> RunResult:
    """A data-parallel helper process: the same model, windows and stages as rank 0, no files, no evaluation."""
    device = _device(recipe.device)
    torch.manual_seed(recipe.seed)
    model, tokenizer, _ = models.load(recipe.model, device=device)
    cfg = recipe.calibration
    # the windows rank 0 draws (seeded): the runner then takes this process's share
    calib = _calibration_windows(cfg, model, tokenizer, device) if cfg is not None else None
    ctx = _stage_context(recipe, model, calib, device)
    reports = [apply_stage(stage, model, ctx).to_dict() for stage in recipe.stages]
    return RunResult(output=Path(recipe.output), report={"stages": reports, "helper": True}, passed=True)


def _check_finite(model: torch.nn.Module, model_id: str) -> None:
    """NaN or infinite weights poison every statistic and score computed after them: refuse them by name."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad.append(f"{name} ({n} non-finite of {t.numel()})")
    if bad:
        raise RunError(f"model {model_id!r}: {len(bad)} tensor(s) hold NaN or infinite values: "
                       + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
                       + "; the checkpoint is damaged or was saved from a diverged training run")


def _cached_stages(recipe: Recipe, model: torch.nn.Module, ctx: StageContext, baseline: torch.nn.Module | None,
                   distill_windows: dict[int, torch.Tensor], device: str, timings: _Timings,
                   resume_dir: Path | None = None) -> list[dict[str, Any]]:
    """The stages' reports, with `model` changed by them. A stage whose exact result is stored (the interrupted
    run's checkpoints in `resume_dir`, then the disk cache, compressor.stage_cache) is loaded, not computed; each
    computed stage is stored in both, and its layer-wise passes checkpoint their finished blocks."""
    from . import stage_cache

    from .distributed import world

    roots = [] if resume_dir is None else [resume_dir / "stages"]
    if stage_cache.enabled():
        roots.append(stage_cache.default_root())
    # Under data parallelism every process must calibrate: one loading from the cache would leave the others waiting.
    if not (roots and stage_cache.cacheable(recipe)) or world()[1] > 1:
        return _apply_stages(recipe, model, ctx, baseline, distill_windows, device, timings)
    with timings.phase("stage cache: look up"):
        digests = stage_cache.keys(recipe, model, ctx.calibration, device, ctx.compute_dtype)
        config_before = model.config.to_dict()
        reports: list[dict[str, Any]] = []
        for done in range(len(digests), 0, -1):  # the longest stored prefix of the stage list
            root = next((r for r in roots if (r / digests[done - 1] / "meta.json").is_file()), None)
            if root is not None:
                reports = stage_cache.load(root, digests[done - 1], model)
                if resume_dir is not None and root == roots[0]:
                    reports = [{**{k: v for k, v in r.items() if k != "from_cache"}, "resumed": True}
                               for r in reports]
                break
    for i in range(len(reports), len(recipe.stages)):
        stage_ctx = ctx if resume_dir is None else \
            dataclasses.replace(ctx, checkpoint_dir=resume_dir / "blocks" / digests[i])
        reports += _apply_stages(recipe, model, stage_ctx, baseline, distill_windows, device, timings, only=i)
        for root in roots:
            try:
                with timings.phase("stage cache: store"):
                    stage_cache.save(root, digests[i], model, config_before,
                                     [{k: v for k, v in r.items() if k != "resumed"} for r in reports])
            except OSError as e:  # a full or read-only disk costs the cache, not the run
                log.warning("stage result not stored in %s (%s)", root, e)
        if resume_dir is not None:
            shutil.rmtree(resume_dir / "blocks" / digests[i], ignore_errors=True)  # the stage entry covers them
    return reports


def _apply_stages(recipe: Recipe, model: torch.nn.Module, ctx: StageContext, baseline: torch.nn.Module | None,
                  distill_windows: dict[int, torch.Tensor], device: str, timings: _Timings,
                  only: int | None = None) -> list[dict[str, Any]]:
    """Apply the recipe's stages (or stage `only`) to `model`; their reports."""
    teachers_needed = {s.distill.teacher_stage for s in recipe.stages if isinstance(s, DistillStage)}
    teachers: dict[int, torch.nn.Module] = {}
    stage_reports = []
    for i, stage in enumerate(recipe.stages):
        if only is not None and i != only:
            continue
        if i in teachers_needed:  # the model before this stage teaches a later distill stage
            teachers[i] = baseline if i == 0 and baseline is not None else _teacher_copy(model, i, recipe, device)
        kind = type(stage).__name__.removesuffix("Stage").lower()
        stage_ctx = ctx
        if isinstance(stage, DistillStage):
            stage_ctx = dataclasses.replace(ctx, teacher=teachers[stage.distill.teacher_stage],
                                            distill_windows=distill_windows.get(i))
        with timings.phase(f"stage {i + 1}/{len(recipe.stages)}: {kind}"):
            stage_reports.append(apply_stage(stage, model, stage_ctx).to_dict())
    return stage_reports


def _teacher_copy(model: torch.nn.Module, stage: int, recipe: Recipe, device: str) -> torch.nn.Module:
    """A copy of the model before `stage`, kept on the CPU when every distill stage it teaches precomputes its
    targets (its blocks then visit the device one at a time), so the device never holds it beside the student."""
    users = [s.distill for s in recipe.stages if isinstance(s, DistillStage) and s.distill.teacher_stage == stage]
    if device == "cpu" or any(d.teacher == "live" for d in users):
        return copy.deepcopy(model)
    model.to("cpu")  # copy from the CPU: the device never holds two models at once
    try:
        return copy.deepcopy(model)
    finally:
        model.to(device)


def _device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("device: cuda requested but no CUDA GPU is visible to torch; use device: auto or cpu")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _run_in(recipe: Recipe, work: Path, device: str, timings: _Timings, shared: SharedWork | None = None,
            resume_dir: Path | None = None) -> RunResult:
    if recipe.memory_budget_gb is not None and _needs_streaming(recipe, device):
        return _run_streamed(recipe, work, device, timings)
    model_key = [recipe.model.model_dump(mode="json"), device]
    with timings.phase("load model"):
        loaded, tokenizer, source = _once(shared, "model", model_key, lambda: models.load(recipe.model, device=device))
        # the stages change the model in place; a shared one stays as loaded (and serves as the baseline)
        model = copy.deepcopy(loaded) if shared is not None else loaded
    params = models.parameter_count(model)
    log.info("model: %s (%s, %.1fM parameters)", recipe.model.id, model.config.model_type, params / 1e6)

    _check_finite(model, recipe.model.id)
    _check_stages(recipe, model)
    quant = recipe.quantize_configs()
    if quant:
        packed = any(getattr(e, "safetensors", None) and e.safetensors.format == "gptq" for e in recipe.export)
        check_shapes(select_linears(model, quant[0]), quant[0], packed_export=packed)
        if quant[0].uses_awq:
            from .awq_maps import ScaleMapError, maps_for

            try:
                maps_for(model, models.decoder_layers(model)[0])
            except ScaleMapError as e:
                raise RunError(f"stages: {e}") from None
    for i, target in enumerate(recipe.export):
        if getattr(target, "gguf", None):
            from export.gguf import check_model

            check_model(model, target.gguf.plan(), f"export[{i}].gguf", low_rank=target.gguf.low_rank)
        if getattr(target, "onnx", None):
            from export.onnx import OnnxError, check_model as check_onnx

            try:
                check_onnx(model, target.onnx.options(), f"export[{i}].onnx")
            except OnnxError as e:
                raise RunError(str(e)) from None
    _check_lengths(recipe, model)

    with timings.phase("prepare data"):
        def windows_for(cfg):
            return _once(shared, "calibration windows", [model_key, cfg.model_dump(mode="json")],
                         lambda: _calibration_windows(cfg, model, tokenizer, device))

        calib = windows_for(recipe.calibration) if recipe.calibration else None
        windows = _once(shared, "evaluation windows", [model_key, recipe.evaluate.data.model_dump(mode="json")],
                        lambda: data.evaluation_windows(tokenizer, recipe.evaluate.data)) if recipe.evaluate else None
        distill_windows = {i: windows_for(s.distill.data) for i, s in enumerate(recipe.stages)
                           if isinstance(s, DistillStage) and s.distill.data is not None}
    baseline = (loaded if shared is not None else copy.deepcopy(model)) if recipe.evaluate else None

    ctx = _stage_context(recipe, model, calib, device)
    stages_key = [device, *stages_inputs(recipe)]
    reused = shared is not None and shared.has("compressed model", stages_key)
    with timings.phase("stages (reused from an earlier variant)" if reused else "stages"):
        model, stage_reports = _once(
            shared, "compressed model", stages_key,
            lambda: (model, _cached_stages(recipe, model, ctx, baseline, distill_windows, device, timings,
                                           resume_dir)),
            copied=True)
    # computed once per compressed model, shared by the exports (of every variant) that need them
    stats: dict[str, Any] = _once(shared, "export statistics", stages_key, dict)
    artifacts = []
    for i, target in enumerate(recipe.export):
        name = recipe.export_name(i)
        with timings.phase(f"export {name}"):
            artifacts.append(_export(target, name, work, model, tokenizer, source, quant, calib, ctx, stats))

    report = _report_head(recipe, source, model, params, stage_reports, ctx, artifacts)
    if reused:
        report["notes"].append("the stages' result (and their reports) came from an earlier run of the sweep with "
                               "the same model, calibration, stages and seed")
    resumed = [i + 1 for i, r in enumerate(stage_reports) if r.get("resumed")]
    if resumed:
        report["notes"].append(f"stage(s) {', '.join(map(str, resumed))} (and their reports) came from the "
                               "checkpoints of an interrupted run of this recipe (--resume)")
    cached = {r["from_cache"] for r in stage_reports if r.get("from_cache")}
    if cached:
        report["notes"].append(f"the stages' result (and their reports) came from the stage cache ({cached.pop()}): "
                               "an earlier run with the same model weights, calibration, stages, seed and code")
    failures: list[str] = []
    if recipe.evaluate:
        _evaluate(recipe, report, work, baseline, model, windows, device, params, timings, tokenizer, shared)
        for art in report["artifacts"]:
            art["budget_failures"] = budget_failures(recipe.evaluate.budget, report["baseline"], art)
            failures += art["budget_failures"]
    report["passed"] = not failures
    report["failures"] = failures
    report["timings"] = timings.values
    _write_run_files(work, recipe, report, device, source, calib)
    return RunResult(work, report, not failures, failures)


def _report_head(recipe: Recipe, source: models.ModelSource, model: torch.nn.Module, params: int,
                 stage_reports: list[dict[str, Any]], ctx: StageContext,
                 artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """What every run's report.json starts with."""
    return {
        "compressor_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"id": recipe.model.id, "source": source.describe(), "model_type": model.config.model_type,
                  "parameters": params},
        "stages": stage_reports,
        "calibration": _describe_calibration(recipe, ctx, next(model.parameters()).dtype),
        "artifacts": artifacts,
        "notes": [],
    }


def _write_run_files(work: Path, recipe: Recipe, report: dict[str, Any], device: str, source: models.ModelSource,
                     calib: torch.Tensor | None) -> None:
    atomic_write_text(work / "report.json", _json(report))
    atomic_write_text(work / "report.md", markdown(report) if recipe.evaluate else "")
    atomic_write_text(work / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    atomic_write_text(work / "run.json", _json(_run_record(recipe, report, device, source, calib)))


# ------------------------------------------------------------------------------------- larger than memory
BASE_RSS = 0.5 * 2**30  # Python, torch and transformers imported: ~0.4 GB measured, with a margin


def _needs_streaming(recipe: Recipe, device: str) -> bool:
    """Whether the model, as the ordinary path holds it (the model, a baseline copy for the evaluation, the stages'
    work), exceeds `memory_budget_gb`."""
    from .lazy import model_bytes

    weights = model_bytes(recipe.model)
    copies = 2 if recipe.evaluate else 1
    need = BASE_RSS + copies * weights * 1.2
    budget = recipe.memory_budget_gb * 2**30
    log.info("memory: the model's float32 weights take %.2f GB; held whole, the run needs about %.2f GB of the "
             "%.2f GB budget", weights / 2**30, need / 2**30, budget / 2**30)
    if need > budget and device != "cpu":
        raise RunError(f"memory_budget_gb {recipe.memory_budget_gb}: the model held whole needs about "
                       f"{need / 2**30:.2f} GB; the block-by-block path runs on the CPU so far: set device: cpu")
    return need > budget


def _check_streamable(recipe: Recipe) -> None:
    """What the block-by-block path runs; anything else stops the run before it starts."""
    why = []
    quant = recipe.quantize_configs()
    if len(recipe.stages) != 1 or not quant or quant[0].method != "gptq" or quant[0].mixed is not None \
            or quant[0].lm_head:
        why.append("stages: exactly one quantize stage with method gptq (no mixed precision, lm_head false)")
    if any(not getattr(e, "safetensors", None) or e.safetensors.format != "gptq" for e in recipe.export):
        why.append("export: safetensors with format gptq only")
    if recipe.evaluate is not None:
        why.append("evaluate: null (the uncompressed baseline would have to be held in memory)")
    if recipe.calibration is None or recipe.calibration.source == data.MODEL_SOURCE:
        why.append("calibration: a text source (the model cannot generate its own calibration text block by block)")
    if why:
        raise RunError(f"model {recipe.model.id!r} does not fit memory_budget_gb {recipe.memory_budget_gb} when "
                       "held whole; the block-by-block path it needs supports: " + "; ".join(why))


def _streamed_need(model: torch.nn.Module, recipe: Recipe, spill: bool = False) -> dict[str, float]:
    """Peak resident bytes of the block-by-block path, by part; with `spill`, the calibration activations live in
    files and memory holds one batch of them."""
    layers = models.decoder_layers(model)
    inside = {id(p) for p in layers.parameters()}
    outer = sum(p.numel() * 4 for p in model.parameters() if id(p) not in inside)  # tied: counted once
    block = max(sum(p.numel() for p in b.parameters()) for b in layers) * 4
    widest = max(m.in_features for b in layers for m in b.modules() if isinstance(m, torch.nn.Linear))
    # float64 sum, float32 batch product, the Hessian and its transposed half, GPTQ's factor and two work copies
    hessian = widest * widest * (8 + 4 + 4 + 4 + 4 * 3)
    cal = recipe.calibration
    cfg = model.config
    hidden = cfg.hidden_size
    # every window's block inputs, the attention's replayed output and the MLP's recorded intermediate (the runner
    # replays children from them; spilled, it keeps none), plus one batch's attention scores (eager attention: scores
    # and probabilities) and MLP intermediates
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    held = cal.batch_size * cal.seq_len * hidden * 4 * 3 if spill else cal.samples * cal.seq_len * 4 * (
        2 * hidden + max(hidden, inter))
    activations = held + cal.batch_size * 4 * (2 * cfg.num_attention_heads * cal.seq_len ** 2 + 3 * cal.seq_len * inter)
    quant = recipe.quantize_configs()[0]
    blocks_params = sum(sum(p.numel() for p in b.parameters()) for b in layers)
    packed = blocks_params * (quant.bits / 8 + 2 * 2 / max(quant.group_size if quant.group_size > 0 else 4096, 1))
    export = packed + outer / 2  # the checkpoint's tensors (fp16 outside the blocks) before they are written
    return {"runtime": BASE_RSS, "embeddings and head": outer, "one block": block, "GPTQ Hessians": hessian,
            "calibration activations": activations, "export tensors": export}


def _run_streamed(recipe: Recipe, work: Path, device: str, timings: _Timings) -> RunResult:
    """GPTQ of a model larger than the memory budget: blocks read from the weight files one at a time, spilled once
    quantized, and read back one at a time for the export (compressor.lazy)."""
    from . import lazy

    _check_streamable(recipe)
    with timings.phase("load model (all but the decoder blocks)"):
        model, tokenizer, source, files = lazy.load_lazy(recipe.model)
    params = models.parameter_count(model)
    budget = recipe.memory_budget_gb * 2**30

    def peak(parts: dict[str, float]) -> float:  # the GPTQ work and the export do not overlap
        return parts["runtime"] + parts["embeddings and head"] + max(
            parts["one block"] + parts["GPTQ Hessians"] + parts["calibration activations"], parts["export tensors"])

    spill_activations = False
    parts = _streamed_need(model, recipe)
    if peak(parts) > budget:  # the calibration activations to disk, one batch in memory at a time
        spill_activations = True
        parts = _streamed_need(model, recipe, spill=True)
    need = peak(parts)
    detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
    if need > budget:
        raise RunError(f"memory_budget_gb {recipe.memory_budget_gb}: even block by block, with the calibration "
                       f"activations on disk, the run needs about {need / 2**30:.2f} GB ({detail} GB); raise the "
                       "budget or use a smaller calibration batch_size")
    log.info("memory: block by block%s, about %.2f GB of the %.2f GB budget (%s GB)",
             ", calibration activations on disk" if spill_activations else "", need / 2**30, budget / 2**30, detail)
    quant = recipe.quantize_configs()[0]
    check_shapes(select_linears(model, quant), quant, packed_export=True)
    _check_lengths(recipe, model)
    with timings.phase("prepare data"):
        calib = data.calibration_windows(tokenizer, recipe.calibration)
    spill = work.with_name(work.name + ".spill")
    shutil.rmtree(spill, ignore_errors=True)  # left by a killed run
    stream = lazy.StreamedBlocks(model, files, spill / "blocks")
    if spill_activations:
        stream.activations = spill / "activations"
    ctx = _stage_context(recipe, model, calib, device, stream=stream)
    try:
        stage_reports = _apply_stages(recipe, model, ctx, None, {}, device, timings)
        artifacts = []
        for i, target in enumerate(recipe.export):  # GPTQ safetensors only (_check_streamable): block by block
            name = recipe.export_name(i)
            with timings.phase(f"export {name}"):
                artifacts.append(_export(target, name, work, model, tokenizer, source, [quant], calib, ctx, {}))
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    report = _report_head(recipe, source, model, params, stage_reports, ctx, artifacts)
    report.update({
        "memory": {"budget_gb": recipe.memory_budget_gb, "estimated_peak_gb": round(need / 2**30, 3),
                   "parts_gb": {k: round(v / 2**30, 3) for k, v in parts.items()}, "mode": "block by block",
                   "activations_on_disk": spill_activations},
        "notes": ["the model did not fit the memory budget whole: its blocks were read, quantized and written one "
                  "at a time; no evaluation ran"],
        "passed": True, "failures": [], "timings": timings.values})
    _write_run_files(work, recipe, report, device, source, calib)
    return RunResult(work, report, True, [])


def _export(target: Any, name: str, work: Path, model: torch.nn.Module, tokenizer: Any, source: models.ModelSource,
            quant: list[Any], calib: torch.Tensor | None, ctx: StageContext, stats: dict[str, Any]) -> dict[str, Any]:
    from .low_rank import low_rank_layers, merged
    from .recipe import GGUFExport

    cfg = next(getattr(target, k) for k in ("onnx", "gguf", "safetensors") if getattr(target, k, None) is not None)
    if cfg.low_rank == "merge" and low_rank_layers(model):
        with merged(model) as names:
            log.warning("export %s: %d factorized layer(s) merged into dense matrices%s", name, len(names),
                        " (the file is not smaller for the factorization)" if isinstance(target, GGUFExport) else "")
            return _export_as_is(target, name, work, model, tokenizer, source, quant, calib, ctx, stats)
    return _export_as_is(target, name, work, model, tokenizer, source, quant, calib, ctx, stats)


def _export_as_is(target: Any, name: str, work: Path, model: torch.nn.Module, tokenizer: Any,
                  source: models.ModelSource, quant: list[Any], calib: torch.Tensor | None, ctx: StageContext,
                  stats: dict[str, Any]) -> dict[str, Any]:
    from .recipe import GGUFExport, OnnxExport

    if isinstance(target, OnnxExport):
        from export.onnx import write_onnx

        cfg = target.onnx
        summary = write_onnx(model, tokenizer, work / name, cfg.options())
        if summary.requantized:
            log.warning("export %s: %d calibrated layer(s) did not fit MatMulNBits and were rounded again: %s", name,
                        len(summary.requantized), ", ".join(summary.requantized[:5]))
        if summary.dequantized:
            log.info("export %s: %d calibrated layer(s) written as %s weights (dequantized codes)", name,
                     summary.dequantized, cfg.weights)
        return {"name": name, "format": f"onnx-{cfg.weights}", "path": name, "runtime": "onnxruntime",
                "files": file_hashes(work / name), "onnx": summary.to_dict()}
    if isinstance(target, GGUFExport):
        from export.gguf import gguf_file_name, write_gguf

        cfg = target.gguf
        plan = cfg.plan()
        imatrix = None
        use_imatrix = cfg.imatrix if cfg.imatrix is not None else calib is not None
        if use_imatrix and plan.needs_llama:
            if "imatrix" not in stats:
                from .activation_stats import mean_squared_inputs

                stats["imatrix"] = mean_squared_inputs(model, calib, ctx.batch_size, ctx.device, ctx.compute_dtype)
            imatrix = stats["imatrix"]
        source_gguf = Path(source.path) / source.gguf_file if source.gguf_file and source.kind != "hub" else None
        with atomic_dir(work / name) as tmp:
            summary = write_gguf(model, tokenizer, tmp / gguf_file_name(model, cfg.type), plan, imatrix=imatrix,
                                 source_gguf=source_gguf)
        for line in summary.notes:
            log.warning("export %s: %s", name, line)
        return {"name": name, "format": f"gguf-{cfg.type}", "path": name, "runtime": "llama.cpp (llama-cpp-python)",
                "files": file_hashes(work / name), "gguf": summary.to_dict()}

    from export.safetensors import write_dense, write_gptq

    cfg = target.safetensors
    with atomic_dir(work / name) as tmp:
        if cfg.format == "gptq":
            write_gptq(model, tokenizer, tmp, dtype=cfg.dtype, stream=ctx.stream,
                       extra_config={"damp_percent": quant[0].damp if quant else None})
        else:
            write_dense(model, tokenizer, tmp, dtype=cfg.dtype)
    return {"name": name, "format": f"safetensors-{cfg.format}", "path": name, "runtime": "torch (transformers)",
            "files": file_hashes(work / name)}


def _check_stages(recipe: Recipe, model: torch.nn.Module) -> None:
    """What each pruning stage can be checked for before calibration. Width pruning's new widths do not depend on
    the data, so a later quantize stage's group sizes are checked against them too."""
    shape = block_shape(model)  # as the stages so far will leave the model
    widths: dict[str, int] = {}  # projection kind -> input width after the width stages so far
    ranks: dict[str, int] = {}  # "low_rank stage i" -> what every rank it computes is a multiple of
    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, PruneStage):
            section = f"stages[{i}].prune"
            check_prune_shapes(select_linears(model, stage.prune, section=section), stage.prune, section=section)
        elif isinstance(stage, PruneWidthStage):
            shape = check_width(model, stage.prune_width, section=f"stages[{i}].prune_width", shape=shape)
            widths = width_after(shape)
        elif isinstance(stage, PruneDepthStage):
            shape = check_depth(model, stage.prune_depth, section=f"stages[{i}].prune_depth", shape=shape)
        elif isinstance(stage, LowRankStage):
            cfg, section = stage.low_rank, f"stages[{i}].low_rank"
            targets = low_rank_targets(model, cfg, section=section)
            check_low_rank(targets, cfg, section=section)
            planned = planned_ranks(targets, cfg)
            ranks[f"stages[{i}].low_rank"] = (cfg.rank if cfg.rank is not None and planned and any(planned.values())
                                              else cfg.alignment)
        elif isinstance(stage, QuantizeStage) and ranks:
            for bits, group in stage_widths(stage.quantize):
                bad = {k: r for k, r in ranks.items() if group != -1 and r % group}
                if bad:
                    raise RunError(f"stages[{i}].quantize.group_size {group}: the ranks of " + ", ".join(
                        f"{k} are multiples of {r}" for k, r in bad.items()) + ", and a rank is the input width of "
                        "the second factor; make the low_rank alignment (or rank) a multiple of the group size")
        if isinstance(stage, QuantizeStage) and widths:
            for bits, group in stage_widths(stage.quantize):
                bad = {k: w for k, w in widths.items() if group != -1 and w % group}
                if bad:
                    raise RunError(f"stages[{i}].quantize.group_size {group}: after width pruning the inputs of "
                                   + ", ".join(f"{k} are {w} wide" for k, w in bad.items())
                                   + f", not a multiple of {group}; set the prune_width alignment to a multiple of "
                                   "the group size")
    gguf = [i for i, e in enumerate(recipe.export) if getattr(e, "gguf", None)]
    heads_removed = sum(s.prune_width.kv_groups for s in recipe.stages if isinstance(s, PruneWidthStage))
    if gguf and heads_removed:
        from export.gguf import GGUFError, check_attention

        config = copy.copy(model.config)
        kv = config.num_key_value_heads
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.num_attention_heads = config.num_attention_heads // kv * (kv - heads_removed)
        config.num_key_value_heads = kv - heads_removed
        try:
            check_attention(config)
        except (GGUFError, ValueError) as e:
            raise RunError(f"export[{gguf[0]}].gguf: {e}") from None
    odd = {k: w for k, w in widths.items() if w % 32}
    if odd and gguf:
        raise RunError("export gguf: after width pruning the inputs of " + ", ".join(
            f"{k} are {w} wide" for k, w in odd.items()) + ", but GGUF blocks hold 32 weights; use an alignment "
            "that is a multiple of 32")


def _check_lengths(recipe: Recipe, model: torch.nn.Module) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    for field_name, cfg in (("calibration.seq_len", recipe.calibration),
                            ("evaluate.data.seq_len", recipe.evaluate.data if recipe.evaluate else None)):
        if cfg is not None and cfg.seq_len > limit:
            raise RunError(f"{field_name} {cfg.seq_len} exceeds the model's context of {limit} tokens")


def _describe_calibration(recipe: Recipe, ctx: StageContext, model_dtype: torch.dtype) -> dict[str, Any] | None:
    if ctx.calibration is None or recipe.calibration is None:
        return None
    c = recipe.calibration
    split = c.split or "train"
    where = ("sampled from the model itself (data-free)" if c.source == data.MODEL_SOURCE
             else f"from {c.source} ({split})")
    dtype = str(ctx.compute_dtype or model_dtype).removeprefix("torch.")
    return {"source": c.source, "split": split, "samples": c.samples, "seq_len": c.seq_len, "seed": c.seed,
            "precision": dtype, "description": f"{c.samples} x {c.seq_len} tokens {where}, seed {c.seed}"}


def _evaluate(recipe: Recipe, report: dict[str, Any], work: Path, baseline: torch.nn.Module,
              compressed: torch.nn.Module, windows: torch.Tensor, device: str, params: int,
              timings: _Timings, tokenizer: Any = None, shared: SharedWork | None = None) -> None:
    from export.safetensors import load_checkpoint

    ev = recipe.evaluate
    d = ev.data
    report["evaluation"] = {
        "source": d.source, "split": d.split or "test", "windows": int(windows.shape[0]), "seq_len": d.seq_len,
        "tokens_scored": int(windows.shape[0] * (d.seq_len - 1)), "metrics": list(ev.metrics),
        "description": f"{windows.shape[0]} windows x {d.seq_len} tokens of {d.source} ({d.split or 'test'}), "
                       f"same windows for every model",
    }
    report["speed_protocol"] = (f"batch 1 on {device}, {torch.get_num_threads()} threads; decode = ms per generated "
                                f"token after a {ev.speed.prompt_tokens}-token prompt ({ev.speed.decode_tokens} "
                                f"tokens); prefill = tokens/s on a {ev.speed.prefill_tokens}-token prompt; peak RSS "
                                f"of a fresh process that loads the artifact and runs both; median of "
                                f"{ev.speed.repeats}")
    is_gguf = recipe.model.id.endswith(".gguf") or models.resolve(recipe.model).gguf_file
    report["baseline"] = {
        "name": "baseline", "runtime": "torch (transformers)",
        "description": f"{recipe.model.id} in float32" + (" (dequantized from its GGUF file)" if is_gguf else ""),
        "size": {"bytes": params * 4, "bits_per_weight": 32.0, "note": "float32 parameters in memory"},
    }
    runtimes = []
    if report["artifacts"]:
        for art in report["artifacts"]:
            with timings.phase(f"load {art['name']} for evaluation"):
                if art["format"].startswith("gguf"):
                    from .evaluate.llama_cpp_runtime import LlamaCppRuntime

                    runtimes.append(LlamaCppRuntime(art["name"], _gguf_file(work / art["path"]), d.seq_len,
                                                    ev.speed.threads))
                    continue
                if art["format"].startswith("onnx"):
                    from .evaluate.onnx_runtime import OnnxRuntimeModel

                    runtimes.append(OnnxRuntimeModel(art["name"], work / art["path"], ev.speed.threads, device))
                    continue
                loaded, _ = load_checkpoint(work / art["path"], device=device, materialize=device == "cpu")
            runtimes.append(TorchRuntime(art["name"], loaded, device))
    else:
        report["artifacts"].append({"name": "in-memory", "format": "torch", "runtime": "torch (in memory)"})
        if device == "cpu":
            for m in compressed.modules():
                if isinstance(m, QuantLinear):
                    m.materialize()
        runtimes.append(TorchRuntime("in-memory", compressed, device))

    metrics = set(ev.metrics)
    if metrics & {"perplexity", "kl_divergence", "top1_agreement"}:
        with timings.phase("evaluate accuracy"):
            acc = compare(TorchRuntime("baseline", baseline, device), runtimes, windows, ev.batch_size)
        base_ppl = acc["baseline"]["perplexity"]
        report["baseline"]["accuracy"] = acc["baseline"]
        for art in report["artifacts"]:
            a = acc[art["name"]]
            a["perplexity_increase"] = a["perplexity"] / base_ppl - 1
            art["accuracy"] = {k: v for k, v in a.items() if _wanted(k, metrics)}
    for rt in runtimes:
        if hasattr(rt, "close"):
            rt.close()
    del runtimes
    for art in report["artifacts"]:
        if art["format"].startswith("gguf") and tokenizer is not None:
            from .evaluate.llama_cpp_runtime import tokenizer_agreement

            texts = _sample_texts(d)
            art["tokenizer_check"] = tokenizer_agreement(_gguf_file(work / art["path"]), tokenizer, texts)
            check = art["tokenizer_check"]
            if check["identical"] != check["texts"]:
                report["notes"].append(f"{art['name']}: llama.cpp tokenizes {check['texts'] - check['identical']} of "
                                       f"{check['texts']} sample texts differently from the HF tokenizer (accuracy "
                                       "above was measured on the same token ids, so it is unaffected)")

    for art in report["artifacts"]:
        if art["format"].startswith("onnx") and baseline is not None:
            reference = compressed if compressed is not None else baseline
            with timings.phase(f"greedy generation check of {art['name']}"):
                art["generation_check"] = _generation_check(work / art["path"], reference, windows, device,
                                                            ev.speed.threads)
                art["generation_check"]["reference"] = ("the compressed model in torch" if compressed is not None
                                                        else "the baseline in torch")
    for art in report["artifacts"]:
        if "files" in art:
            weights = sum((work / art["path"] / f).stat().st_size for f in art["files"]
                          if f.endswith((".safetensors", ".gguf", ".onnx", ".onnx.data")))
            art["size"] = {"bytes": speed.directory_bytes(work / art["path"]), "weights_bytes": weights,
                           "bits_per_weight": weights * 8 / params,
                           "compression_vs_fp16": params * 2 / weights if weights else None}
    if metrics & {"latency", "memory"} and "cpu" in ev.targets:
        with timings.phase("measure speed and memory (fresh process per model)"):
            report["baseline"]["speed"] = _once(
                shared, "baseline speed", [recipe.model.model_dump(mode="json"), ev.speed.model_dump(mode="json"),
                                           device],
                lambda: speed.measure("model", recipe.model.model_dump_json(), ev.speed, device), copied=True)
            for art in report["artifacts"]:
                if art["format"].startswith("gguf"):
                    art["speed"] = speed.measure("gguf", str(_gguf_file(work / art["path"])), ev.speed, "cpu")
                elif art["format"].startswith("onnx"):
                    art["speed"] = speed.measure("onnx", str(work / art["path"]), ev.speed, device)
                elif "files" in art:
                    art["speed"] = speed.measure("checkpoint", str(work / art["path"]), ev.speed, device)
        if report["baseline"]["speed"]["decode_ms_per_token"]:
            for art in report["artifacts"]:
                if "speed" in art and art["speed"]["decode_ms_per_token"]:
                    art["speed"]["decode_speedup"] = (report["baseline"]["speed"]["decode_ms_per_token"]
                                                      / art["speed"]["decode_ms_per_token"])
        report["notes"].append(_CPU_NOTE)
    with timings.phase("resource profile"):
        _resource_profiles(report, ev, baseline, compressed)
    if "cuda" in ev.targets:
        from .evaluate import cuda_target

        with timings.phase("cuda target: the torch model on the GPU"):
            report["targets"] = {"cuda": cuda_target.measure(
                baseline, compressed, windows, prompt_tokens=ev.speed.prompt_tokens,
                decode_tokens=ev.speed.decode_tokens, prefill_tokens=ev.speed.prefill_tokens,
                repeats=ev.speed.repeats, batch_size=ev.batch_size, price_per_hour=ev.price_per_hour)}


def _resource_profiles(report: dict[str, Any], ev: Any, baseline: torch.nn.Module,
                       compressed: torch.nn.Module | None) -> None:
    """FLOPs, speed, memory, download bytes, energy and cost of the baseline and of every artifact."""
    from .evaluate import resources

    context = ev.speed.prompt_tokens + ev.speed.decode_tokens // 2  # the mean position of the timed decode
    base_flops = resources.flops_per_token(baseline, context)
    art_flops = resources.flops_per_token(compressed, context) if compressed is not None else base_flops
    report["baseline"]["resources"] = resources.profile(report["baseline"], base_flops, ev.price_per_hour)
    for art in report["artifacts"]:
        art["resources"] = resources.profile(art, art_flops, ev.price_per_hour)


def _generation_check(folder: Path, reference: torch.nn.Module, windows: torch.Tensor, device: str,
                      threads: int | None, prompt_tokens: int = 32, new_tokens: int = 32) -> dict[str, Any]:
    """Greedy continuations of the start of the first evaluation window, by the exported model in torch and by
    the export in onnxruntime: how many generated tokens agree before the first difference."""
    from .evaluate.onnx_runtime import open_decoder

    prompt = windows[0, :prompt_tokens].tolist()
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    got = open_decoder(folder, threads, device).generate(prompt, new_tokens)
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "identical_prefix": same,
            "identical": same == len(ref)}


def _gguf_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise RunError(f"{folder}: expected one .gguf file, found {len(files)}")
    return files[0]


def _sample_texts(cfg: Any, count: int = 16, chars: int = 400) -> list[str]:
    """Pieces of the evaluation text for the tokenizer check: whole records where short, else their start."""
    records = [r for r in data.load_records(cfg, "test") if r.strip()]
    step = max(1, len(records) // count)
    return [r[:chars] for r in records[::step][:count]]


_CPU_NOTE = ("On CPU the torch runtime dequantizes GPTQ layers once when it loads them (PyTorch has no fast low-bit "
             "CPU kernel), so its decode speed is that of float32 and its memory includes the dequantized weights; "
             "the file size is the deployable gain. Low-bit speed comes with the GGUF/ONNX runtimes and GPU kernels.")


def _wanted(key: str, metrics: set[str]) -> bool:
    if key in ("perplexity", "perplexity_increase"):
        return "perplexity" in metrics
    if key in ("kl_divergence", "top1_agreement"):
        return key in metrics
    return True


def _run_record(recipe: Recipe, report: dict[str, Any], device: str, source: models.ModelSource | None = None,
                calib: torch.Tensor | None = None) -> dict[str, Any]:
    """What reproduces this run: the recipe, seed, versions of everything that computes, the thread count (GPTQ's
    float32 sums depend on it), hashes of the inputs and of the compressor's code, and of every file written."""
    import importlib.metadata as md

    import transformers

    from .stage_cache import code_fingerprint, tensor_bytes

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    inputs: dict[str, Any] = {}
    if source is not None:
        inputs["model"] = source.describe()
        folder = Path(source.path)
        files = [folder / source.gguf_file] if source.gguf_file else \
            sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".json", ".model", ".gguf"))
        if source.kind != "hub":
            inputs["model_files"] = {p.name: sha256(p) for p in files if p.is_file()}
    if calib is not None:
        inputs["calibration_tokens_sha256"] = hashlib.sha256(tensor_bytes(calib)).hexdigest()
    return {
        "recipe": recipe.to_dict(),
        "seed": recipe.seed,
        "device": device,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "versions": {"compressor": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     **{d: version(d) for d in ("safetensors", "numpy", "onnx", "onnxruntime", "llama_cpp_python")}},
        "code_sha256": code_fingerprint(),
        "inputs": inputs,
        "platform": platform.platform(),
        "timings_seconds": report["timings"],
        "artifacts": {a["name"]: a.get("files", {}) for a in report["artifacts"]},
    }


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str) + "\n"


# ------------------------------------------------------------------------------------- standalone checks
def evaluate_artifact(path: str | Path, model: str | None = None, evaluate: dict[str, Any] | None = None,
                      device: str = "auto") -> dict[str, Any]:
    """Evaluate an exported checkpoint against a baseline. Defaults come from the run folder the artifact sits in
    (its run.json): the same baseline model and the same evaluation windows as the run."""
    from .recipe import EvaluateConfig, ModelConfig, RecipeError

    path = Path(path)
    if path.suffix in (".gguf", ".onnx") and path.is_file():
        path = path.parent
    if not (path / "config.json").is_file() and not list(path.glob("*.gguf")):
        raise RunError(f"{path}: not an exported artifact (a checkpoint folder with config.json, an ONNX export "
                       "folder, a GGUF file, or a folder holding one)")
    record_file = path.parent / "run.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    if model is None:
        if record is None:
            raise RunError(f"{path}: no run.json beside it to name the baseline; pass --baseline MODEL")
        model_cfg = ModelConfig.model_validate(record["recipe"]["model"])
    else:
        model_cfg = ModelConfig(id=model)
    ev_data = dict((record or {}).get("recipe", {}).get("evaluate") or {})
    ev_data.update(evaluate or {})
    try:
        ev = EvaluateConfig.model_validate(ev_data)
    except Exception as e:
        raise RecipeError(f"evaluate options: {e}") from None
    device = _device(device)
    timings = _Timings()
    with timings.phase("load baseline"):
        baseline, tokenizer, source = models.load(model_cfg, device=device)
    windows = data.evaluation_windows(tokenizer, ev.data)
    params = models.parameter_count(baseline)
    recipe = Recipe(model=model_cfg, evaluate=ev, output=str(path.parent))
    report: dict[str, Any] = {
        "compressor_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"id": model_cfg.id, "source": source.describe(), "model_type": baseline.config.model_type,
                  "parameters": params},
        "stages": [], "calibration": None, "notes": [],
        "artifacts": [{"name": path.name, "format": _format_of(path), "path": path.name,
                       "runtime": _runtime_of(_format_of(path)), "files": file_hashes(path)}],
    }
    _evaluate(recipe, report, path.parent, baseline, None, windows, device, params, timings, tokenizer)
    failures = budget_failures(ev.budget, report["baseline"], report["artifacts"][0])
    report["passed"], report["failures"], report["timings"] = not failures, failures, timings.values
    return report


def _runtime_of(fmt: str) -> str:
    return {"gguf": "llama.cpp (llama-cpp-python)", "onnx": "onnxruntime"}.get(fmt.split("-")[0],
                                                                              "torch (transformers)")


def _format_of(path: Path) -> str:
    from export.safetensors import read_quantization_config

    if list(path.glob("*.onnx")):
        from export.onnx import describe_onnx

        return describe_onnx(path)["format"]
    if not (path / "config.json").is_file() and list(path.glob("*.gguf")):
        from export.gguf import file_type_of

        return f"gguf-{file_type_of(_gguf_file(path))}"
    q = read_quantization_config(path)
    return "safetensors-dense" if q is None else f"safetensors-{q.get('quant_method')}"


def inspect_artifact(path: str | Path) -> dict[str, Any]:
    """What a checkpoint folder holds: format, architecture, quantization settings, per-layer layout, sizes."""
    from safetensors import safe_open

    from export.safetensors import read_quantization_config

    from .low_rank import LOW_RANK_KEY

    path = Path(path)
    if (path / "report.json").is_file() and not (path / "config.json").is_file():
        return json.loads((path / "report.json").read_text())
    if path.suffix == ".onnx" or (path.is_dir() and list(path.glob("*.onnx"))):
        from export.onnx import describe_onnx

        return describe_onnx(path)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").is_file() and list(path.glob("*.gguf"))):
        from export.gguf import describe_gguf

        return describe_gguf(path if path.suffix == ".gguf" else _gguf_file(path))
    if not (path / "config.json").is_file():
        raise RunError(f"{path}: neither a run folder (report.json) nor a checkpoint folder (config.json)")
    config = json.loads((path / "config.json").read_text())
    q = read_quantization_config(path)
    layers: dict[str, dict[str, Any]] = {}
    sparse: dict[str, float] = {}  # dense weights with exact zeros (pruned): fraction of zeros
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                sl = sf.get_slice(key)
                shape = sl.get_shape()
                module, _, kind = key.rpartition(".")
                n = 1
                for s in shape:
                    n *= s
                total += n * {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1}.get(
                    sl.get_dtype(), 4)
                layers.setdefault(module, {})[kind] = {"shape": shape, "dtype": sl.get_dtype()}
                if kind == "weight" and len(shape) == 2 and ".layers." in f".{key}":
                    zeros = float((sf.get_tensor(key) == 0).float().mean())
                    if zeros >= 0.01:  # a dense layer has ~no exact zeros; a pruned one has its sparsity
                        sparse[module] = round(zeros, 4)
    quantized = sorted(m for m, t in layers.items() if "qweight" in t)
    low_rank = config.get(LOW_RANK_KEY, {}).get("layers", {})
    return {
        "path": str(path), "format": _format_of(path), "model_type": config.get("model_type"),
        "architectures": config.get("architectures"), "num_hidden_layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"), "quantization_config": q,
        "quantized_layers": len(quantized), "tensors_bytes": total,
        "files_bytes": speed.directory_bytes(path),
        "layers": {m: layers[m] for m in quantized} if quantized else {},
        "sparse_layers": sparse,
        "low_rank_layers": low_rank,
    }
