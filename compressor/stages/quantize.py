"""The quantize stage: choose the linear layers, check their shapes, and quantize them (RTN or GPTQ)."""
from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..algorithms.awq import search_scales
from ..algorithms.gptq import factorize, gptq_quantize
from ..awq_maps import fold, maps_for
from ..mixed import MixedPrecisionError, check_target, plan_summary, plan_widths
from ..quant.tensor import QuantizedTensor, QuantLinear, quantize_rtn
from ..recipe import QuantizeConfig
from ..sequential import HessianAccumulator, run_layerwise
from .base import ShapeError, StageContext, StageReport, select_linears, set_submodule

__all__ = ["ShapeError", "apply_quantize", "check_shapes", "select_linears", "stage_widths"]

log = logging.getLogger(__name__)


def stage_widths(cfg: QuantizeConfig) -> list[tuple[int, int]]:
    """Every (bits, group_size) the stage may give a layer."""
    return cfg.mixed.widths(cfg.group_size) if cfg.mixed is not None else [(cfg.bits, cfg.group_size)]


def check_shapes(targets: dict[str, nn.Linear], cfg: QuantizeConfig, packed_export: bool) -> None:
    """Refuse, before any long work, group sizes and packings that a layer's shape cannot hold, and a
    mixed-precision target that the allowed widths cannot meet."""
    problems = []
    for bits, group_size in stage_widths(cfg):
        for name, module in targets.items():
            out_f, in_f = module.weight.shape
            if group_size != -1 and in_f % group_size:
                divisors = [g for g in (32, 64, 128, 256) if in_f % g == 0] or ["-1 (per channel)"]
                problems.append(f"{name}: in_features {in_f} is not a multiple of group_size {group_size} "
                                f"(group sizes that fit: {', '.join(map(str, divisors))})")
            elif packed_export and ((in_f * bits) % 32 or (out_f * bits) % 32):
                problems.append(f"{name}: shape {out_f}x{in_f} cannot be packed into 32-bit words at {bits} bits "
                                f"for the GPTQ format; export format: dense can hold it")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShapeError("quantize: " + "; ".join(problems[:5]) + more)
    if cfg.mixed is not None:
        try:
            check_target({n: tuple(m.weight.shape) for n, m in targets.items() if n != "lm_head"}, cfg)
        except MixedPrecisionError as e:
            raise ShapeError(str(e)) from None


def apply_quantize(cfg: QuantizeConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    targets = select_linears(model, cfg)
    report = StageReport("quantize", summary={"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
                                              "symmetric": cfg.symmetric, "act_order": cfg.act_order,
                                              "layers": len(targets)})
    head = targets.pop("lm_head", None)
    awq = None
    if cfg.uses_awq:
        if ctx.calibration is None:
            raise ValueError("AWQ needs calibration windows")
        awq = _AWQStage(model, cfg, set(targets))
        run_layerwise(model, ctx.calibration, awq, batch_size=ctx.batch_size, device=ctx.device, label="awq scales",
                      sequential=cfg.sequential, compute_dtype=ctx.compute_dtype)
        report.summary["awq_scaled_groups"] = sum(1 for r in awq.groups if r["alpha"] is not None)
        report.summary["awq_groups"] = len(awq.groups)
    widths = {name: (cfg.bits, cfg.group_size) for name in targets}
    plan = {}
    if cfg.mixed is not None:
        if ctx.calibration is None:
            raise ValueError("mixed precision needs calibration windows")
        plan = {r["name"]: r for r in plan_widths(model, targets, cfg, ctx.calibration, ctx.batch_size, ctx.device,
                                                  ctx.compute_dtype)}
        widths = {name: (r["bits"], r["group_size"]) for name, r in plan.items()}
        report.summary["mixed"] = plan_summary(list(plan.values()), cfg)
    if cfg.method == "awq":
        for i, (name, module) in enumerate(targets.items()):
            bits, group_size = widths[name]
            qt = quantize_rtn(module.weight.detach().cpu(), bits, group_size, cfg.symmetric,
                              clip_search=True, importance=awq.importance[name].cpu())
            _replace(model, name, module, qt, report, loss=None, damp=None)
            if (i + 1) % 50 == 0 or i + 1 == len(targets):
                log.info("quantize awq: %d/%d layers rounded (activation-aware clipping)", i + 1, len(targets))
    elif cfg.method == "rtn":
        for i, (name, module) in enumerate(targets.items()):
            _replace(model, name, module, _rtn(module, cfg, widths[name]), report, loss=None, damp=None)
            if (i + 1) % 50 == 0 or i + 1 == len(targets):
                log.info("quantize rtn: %d/%d layers", i + 1, len(targets))
    else:
        if ctx.calibration is None:
            raise ValueError("quantize gptq needs calibration windows")
        targets.clear()  # no reference to the layers the pass replaces: each one's float weight is freed as it goes
        # An AWQ pass before this one keeps no checkpoints: on resume it runs again and folds the same scales.
        gptq = _GPTQStage(model, cfg, widths, report)
        try:
            run_layerwise(model, ctx.calibration, gptq, batch_size=ctx.batch_size, device=ctx.device,
                          label="quantize gptq", sequential=cfg.sequential, checkpoints=ctx.checkpoints("gptq", report),
                          stream=ctx.stream, compute_dtype=ctx.compute_dtype)
        finally:
            gptq.release()
    if awq is not None:
        rows = {r["name"]: r for r in report.layers}
        for g in awq.groups:
            for name in g["names"]:
                if name in rows:
                    rows[name]["awq_alpha"] = g["alpha"]
                    rows[name]["awq_loss_ratio"] = g["loss_ratio"]
    for row in report.layers:
        if row["name"] in plan:
            row["predicted_kl"] = plan[row["name"]]["predicted_kl"]
    if head is not None:
        # The head sees the final hidden states, which the block-wise runner never collects: round to nearest.
        _replace(model, "lm_head", head, _rtn(head, cfg, (cfg.bits, cfg.group_size)), report, loss=None, damp=None)
        model.config.tie_word_embeddings = False
    report.seconds = time.perf_counter() - start
    return report


def _rtn(module: nn.Linear, cfg: QuantizeConfig, width: tuple[int, int]) -> QuantizedTensor:
    return quantize_rtn(module.weight.detach().cpu(), width[0], width[1], cfg.symmetric, cfg.clip_search)


def _replace(model: nn.Module, name: str, module: nn.Linear, qt: QuantizedTensor, report: StageReport,
             loss: float | None, damp: float | None) -> QuantLinear:
    device = module.weight.device
    bias = module.bias.detach() if module.bias is not None else None
    qt = QuantizedTensor(qt.codes.to(device), qt.scales.to(device), qt.zeros.to(device), qt.bits, qt.group_size,
                         qt.symmetric)
    layer = QuantLinear(qt, bias)
    set_submodule(model, name, layer)
    row = {"name": name, "shape": list(qt.shape), "bits": qt.bits, "group_size": qt.group_size}
    if loss is not None:
        row["gptq_loss"] = round(loss, 6)
        row["damp"] = damp
    report.layers.append(row)
    return layer


class _HessianStage:
    """A layerwise stage over the chosen linears (`self.names`) that needs each input group's second moment."""

    names: set[str]

    def wants(self, name: str, module: nn.Module) -> bool:
        return name in self.names

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator(module.in_features, module.weight.device)


class _AWQStage(_HessianStage):
    """Searches and folds AWQ scales group by group; the weights stay float (quantized afterwards). Keeps each
    layer's mean squared input after scaling, which the activation-aware clipping of method awq weighs errors by."""

    def __init__(self, model: nn.Module, cfg: QuantizeConfig, names: set[str]) -> None:
        self.model, self.cfg, self.names = model, cfg, names
        self.prefixes = {id(m): n for n, m in model.named_modules()}
        self.importance: dict[str, torch.Tensor] = {}
        self.groups: list[dict] = []


    def process(self, block_index: int, block: nn.Module, group) -> None:
        cfg = self.cfg
        prefix = self.prefixes[id(block)]
        names = list(group)
        hessian = next(iter(group.values()))[1].hessian
        rel = {n[len(prefix) + 1:] for n in names}
        scale_map = next((m for m in maps_for(self.model, block) if set(m.linears) == rel), None)
        row = {"names": names, "alpha": None, "loss_ratio": None}
        scales = torch.ones(hessian.shape[0], device=hessian.device)
        if scale_map is not None:
            def rtn(w: torch.Tensor) -> torch.Tensor:
                return quantize_rtn(w, cfg.bits, cfg.group_size, cfg.symmetric).dequantize().to(w.device)

            res = search_scales([block.get_submodule(n).weight.detach() for n in scale_map.linears], hessian, rtn,
                                grid=cfg.awq_grid, duo_scaling=cfg.duo_scaling, group_size=cfg.group_size)
            row["alpha"] = res.alpha
            row["loss_ratio"] = round(res.loss / res.loss_unscaled, 4) if res.loss_unscaled else None
            if res.alpha is not None:
                fold(self.model, block, scale_map, res.scales)
                scales = res.scales
        self.groups.append(row)
        diag = torch.diag(hessian) / scales.to(hessian.device) ** 2  # the inputs are divided by the scales now
        for n in names:
            self.importance[n] = diag


class _GPTQStage(_HessianStage):
    keeps_to_its_group = True  # changes only the layers it is given (compressor.sequential may fold)

    def __init__(self, model: nn.Module, cfg: QuantizeConfig, widths: dict[str, tuple[int, int]],
                 report: StageReport) -> None:
        self.model, self.cfg, self.widths, self.report = model, cfg, widths, report
        self.names = set(widths)
        # The finished layers of the current block keep their dequantized weights: the block's later passes call
        # each of them once per batch, and dequantizing every time took 1.8 s of a 41 s six-block SmolLM2 profile.
        self.materialized: list[QuantLinear] = []
        self.block: int | None = None

    def release(self) -> None:
        for m in self.materialized:
            m.dematerialize()
        self.materialized = []

    def process(self, block_index: int, block: nn.Module, group) -> None:
        cfg = self.cfg
        if block_index != self.block:
            self.release()
            self.block = block_index
        _, acc = next(iter(group.values()))
        factor = factorize(acc.hessian, cfg.act_order, cfg.damp)  # shared by the group: one input, one Hessian
        by_width: dict[tuple[int, int], list[str]] = {}
        for name in group:
            by_width.setdefault(self.widths[name], []).append(name)
        for (bits, group_size), names in by_width.items():
            # GPTQ treats rows independently: layers that share the Hessian and the grid are solved as one stacked
            # weight, so the per-column loop runs once for q/k/v (or gate/up) instead of once per layer
            stacked = torch.cat([group[n][0].weight.detach() for n in names])
            res = gptq_quantize(stacked, None, bits, group_size, cfg.symmetric, act_order=cfg.act_order,
                                block_size=cfg.block_size, clip_search=cfg.clip_search, factor=factor)
            start = 0
            for name in names:
                module = group[name][0]
                rows = slice(start, start + module.out_features)
                start = rows.stop
                quantized = _replace(self.model, name, module, res.qweight.rows(rows), self.report,
                                     loss=float(res.row_loss[rows].sum()), damp=res.damp)
                quantized.materialize(module.weight.dtype)  # the dtype the block's passes run in
                self.materialized.append(quantized)
