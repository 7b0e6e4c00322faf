"""Structured pruning stages: shrink every block's MLP and attention (prune_width), or drop whole blocks
(prune_depth). The result is an ordinary model of the same family with a smaller config, which every exporter and
runtime handles like any other.

Width: in each block, MLP intermediate channels are ranked by the output energy they feed into down_proj, and KV
groups by the energy their heads feed into o_proj (from the calibration inputs of those projections, collected by the
layer-by-layer runner, so each block is judged on the inputs the already-shrunk blocks before it produce). The lowest
ones go; down_proj / o_proj are then refitted on the kept channels by least squares.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms.structured import aligned_keep, block_influence, channel_energy, keep_top, reconstruct
from ..models import decoder_layers
from ..recipe import PruneDepthConfig, PruneWidthConfig
from ..sequential import HessianAccumulator, run_layerwise
from .base import ShapeError, StageContext, StageReport

log = logging.getLogger(__name__)

MLP = ("gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class BlockShape:
    """What the structured checks need of the model as earlier stages will have left it (checked before any stage
    runs, so chained stages are judged on the shapes they will really see)."""

    blocks: int
    mlp_width: int | None  # down_proj inputs; None when the blocks have no Llama-style MLP
    kv_heads: int | None
    head_group_width: int | None  # o_proj inputs per KV group


def block_shape(model: nn.Module) -> BlockShape:
    layers = decoder_layers(model)
    block = layers[0]
    mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
    has_mlp = mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP)
    has_attn = attn is not None and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION)
    kv = _kv_heads(attn) if has_attn else None
    return BlockShape(len(layers), mlp.down_proj.in_features if has_mlp else None, kv,
                      attn.o_proj.in_features // kv if has_attn else None)


def check_width(model: nn.Module, cfg: PruneWidthConfig, section: str = "prune_width",
                shape: BlockShape | None = None) -> BlockShape:
    """Refuse, before any long work, a model whose blocks do not have the projections this stage shrinks, and
    removals that would leave nothing; returns the shape after the stage. `shape`: the model as earlier stages
    leave it (default: as it is)."""
    shape = shape or block_shape(model)
    parts = ([("mlp", MLP, shape.mlp_width)] if cfg.mlp else []) + (
        [("self_attn", ATTENTION, shape.kv_heads)] if cfg.kv_groups else [])
    for part, names, present in parts:
        if present is None:
            raise ShapeError(f"{section}: the decoder blocks of this {model.config.model_type} model have no "
                             f"{part} with linear {', '.join(names)}; supported: Llama-style blocks (Llama, Mistral, "
                             "Qwen2/3, Gemma 1-3)")
    mlp_width, kv = shape.mlp_width, shape.kv_heads
    if cfg.mlp:
        if mlp_width < 2 * cfg.alignment:
            raise ShapeError(f"{section}.alignment {cfg.alignment}: the MLP width {mlp_width} cannot shrink in steps "
                             f"of {cfg.alignment} (choose an alignment of at most {mlp_width // 2})")
        mlp_width = aligned_keep(mlp_width, cfg.mlp, cfg.alignment)
    if cfg.kv_groups:
        if cfg.kv_groups >= kv:
            raise ShapeError(f"{section}.kv_groups {cfg.kv_groups}: the model has {kv} KV groups per block"
                             f"{' (after the earlier stages)' if kv != block_shape(model).kv_heads else ''}; "
                             f"remove at most {kv - 1}")
        kv -= cfg.kv_groups
    return BlockShape(shape.blocks, mlp_width, kv, shape.head_group_width)


def width_after(shape: BlockShape) -> dict[str, int]:
    """The input widths of down_proj and o_proj of a planned shape (what later quantization groups must fit)."""
    out = {}
    if shape.mlp_width is not None:
        out["down_proj"] = shape.mlp_width
    if shape.kv_heads is not None:
        out["o_proj"] = shape.kv_heads * shape.head_group_width
    return out


def apply_prune_width(cfg: PruneWidthConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    check_width(model, cfg)
    if ctx.calibration is None:
        raise ValueError("prune_width needs calibration windows")
    before = sum(p.numel() for p in decoder_layers(model).parameters())
    stage = _WidthStage(cfg)
    run_layerwise(model, ctx.calibration, stage, batch_size=ctx.batch_size, device=ctx.device, label="prune width",
                  compute_dtype=ctx.compute_dtype)
    config = model.config
    block = decoder_layers(model)[0]
    if cfg.mlp:
        config.intermediate_size = block.mlp.down_proj.in_features
    if cfg.kv_groups:
        attn = block.self_attn
        config.head_dim = attn.head_dim  # explicit: hidden_size / heads no longer gives it
        config.num_key_value_heads = _kv_heads(attn)
        config.num_attention_heads = attn.q_proj.out_features // attn.head_dim
    after = sum(p.numel() for p in decoder_layers(model).parameters())
    summary = {"mlp_width": getattr(config, "intermediate_size", None), "attention_heads": config.num_attention_heads,
               "kv_heads": config.num_key_value_heads, "block_parameters_before": before,
               "block_parameters_after": after, "block_parameters_removed": round(1 - after / before, 4)}
    return StageReport("prune_width", seconds=time.perf_counter() - start, summary=summary, layers=stage.rows)


def _kv_heads(attn: nn.Module) -> int:
    return attn.k_proj.out_features // attn.head_dim


class _WidthStage:
    """Collects the inputs of down_proj (MLP channels) and o_proj (attention heads) and shrinks the block."""

    def __init__(self, cfg: PruneWidthConfig) -> None:
        self.cfg = cfg
        self.rows: list[dict] = []

    def wants(self, name: str, module: nn.Module) -> bool:
        return (self.cfg.mlp > 0 and name.endswith("mlp.down_proj")) or \
            (self.cfg.kv_groups > 0 and name.endswith("self_attn.o_proj"))

    def accumulator(self, module: nn.Module) -> HessianAccumulator:
        return HessianAccumulator(module.in_features, module.weight.device)

    def process(self, block_index: int, block: nn.Module, group) -> None:
        name, (module, acc) = next(iter(group.items()))
        hessian = acc.hessian
        if name.endswith("down_proj"):
            mlp = block.mlp
            width = mlp.down_proj.in_features
            keep = keep_top(channel_energy(mlp.down_proj.weight, torch.diag(hessian)),
                            aligned_keep(width, self.cfg.mlp, self.cfg.alignment))
            row = {"block": block_index, "part": "mlp", "kept": f"{len(keep)}/{width}"}
            row.update(self._shrink_inputs(mlp, "down_proj", keep, hessian))
            for n in ("gate_proj", "up_proj"):
                setattr(mlp, n, _rows(getattr(mlp, n), keep))
        else:
            attn = block.self_attn
            hd, kv = attn.head_dim, _kv_heads(attn)
            per_group = attn.q_proj.out_features // (hd * kv)  # query heads that read one KV head
            energy = channel_energy(attn.o_proj.weight, torch.diag(hessian)).view(kv, per_group * hd).sum(dim=1)
            groups = keep_top(energy, kv - self.cfg.kv_groups)
            q_cols = (groups[:, None] * per_group * hd + torch.arange(per_group * hd, device=groups.device)).flatten()
            kv_rows = (groups[:, None] * hd + torch.arange(hd, device=groups.device)).flatten()
            row = {"block": block_index, "part": "attention", "kept": f"{len(groups)}/{kv} KV groups",
                   "groups_kept": groups.tolist()}
            row.update(self._shrink_inputs(attn, "o_proj", q_cols, hessian))
            attn.q_proj = _rows(attn.q_proj, q_cols)
            attn.k_proj = _rows(attn.k_proj, kv_rows)
            attn.v_proj = _rows(attn.v_proj, kv_rows)
        self.rows.append(row)

    def _shrink_inputs(self, parent: nn.Module, name: str, keep: torch.Tensor, hessian: torch.Tensor) -> dict:
        """Replace parent.name by a projection over the kept input channels (refitted if asked); returns the
        relative output error on the calibration inputs, before and after the refit."""
        old = getattr(parent, name)
        w = old.weight.detach().float()
        kept = w[:, keep]
        fitted = reconstruct(w, hessian, keep, self.cfg.damp) if self.cfg.reconstruct else kept
        total = float(torch.einsum("oi,ij,oj->", w, hessian, w))
        errors = {}
        for label, candidate in (("error_dropped", kept), ("error_refit", fitted)):
            full = torch.zeros_like(w)
            full[:, keep] = candidate.float()
            dw = w - full
            errors[label] = round(float(torch.einsum("oi,ij,oj->", dw, hessian, dw)) / max(total, 1e-30), 6)
        if not self.cfg.reconstruct:
            errors.pop("error_refit")
        new = nn.Linear(len(keep), old.out_features, bias=old.bias is not None, device=w.device,
                        dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(fitted)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, name, new)
        return errors


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


# ----------------------------------------------------------------------------------------------- depth
def check_depth(model: nn.Module, cfg: PruneDepthConfig, section: str = "prune_depth",
                shape: BlockShape | None = None) -> BlockShape:
    """Refuse removing every block; returns the shape after the stage (`shape`: as earlier stages leave it)."""
    shape = shape or block_shape(model)
    n = shape.blocks
    if cfg.blocks >= n:
        later = " (after the earlier stages)" if n != len(decoder_layers(model)) else ""
        raise ShapeError(f"{section}.blocks {cfg.blocks}: the model has {n} decoder blocks{later}; remove at most "
                         f"{n - 1}")
    return BlockShape(n - cfg.blocks, shape.mlp_width, shape.kv_heads, shape.head_group_width)


@torch.no_grad()
def apply_prune_depth(cfg: PruneDepthConfig, model: nn.Module, ctx: StageContext) -> StageReport:
    start = time.perf_counter()
    check_depth(model, cfg)
    if ctx.calibration is None:
        raise ValueError("prune_depth needs calibration windows")
    layers = decoder_layers(model)
    influence = _block_influence(model, layers, ctx)
    drop = set(torch.topk(influence, cfg.blocks, largest=False).indices.tolist())
    kept = [i for i in range(len(layers)) if i not in drop]
    rows = [{"block": i, "influence": round(float(influence[i]), 6), "removed": i in drop}
            for i in range(len(layers))]
    _keep_blocks(model, kept)
    log.info("prune depth: removed blocks %s of %d", sorted(drop), len(layers))
    summary = {"blocks_removed": sorted(drop), "blocks_left": len(kept)}
    return StageReport("prune_depth", seconds=time.perf_counter() - start, summary=summary, layers=rows)


def _block_influence(model: nn.Module, layers: nn.ModuleList, ctx: StageContext) -> torch.Tensor:
    """Mean over calibration tokens of 1 - cos(block input, block output), for every block, in one pass per batch."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    inputs: dict[int, torch.Tensor] = {}

    def pre(i):
        def hook(module, args, kwargs):
            inputs[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post(i):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            sums[i] += float(block_influence(inputs.pop(i), out).sum())
        return hook

    handles = [h for i, layer in enumerate(layers) for h in (layer.register_forward_pre_hook(pre(i), with_kwargs=True),
                                                              layer.register_forward_hook(post(i), with_kwargs=True))]
    try:
        for batch in ctx.calibration.split(ctx.batch_size):
            model(input_ids=batch.to(ctx.device), use_cache=False)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / tokens).float()


def _keep_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keep only the blocks `kept` (in order) and make the config and every per-layer setting agree."""
    config = model.config
    n = config.num_hidden_layers
    parent = model.model
    parent.layers = nn.ModuleList([parent.layers[i] for i in kept])
    for new_index, block in enumerate(parent.layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index  # the KV cache slot
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in kept))  # layer_types and other per-layer lists
    config.num_hidden_layers = len(kept)
