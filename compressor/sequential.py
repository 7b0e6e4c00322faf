"""The layer-by-layer calibration runner shared by every calibration-driven stage.

It captures the inputs of decoder block 0 for all calibration windows, then for each block: collects the statistics
a stage asks for on the inputs of the block's linear layers, lets the stage change the block, and runs the changed
block to produce the inputs of the next one. Only the current block needs to be on the compute device.

Within a block, linear layers that read the same tensor (q/k/v, gate/up) form one *input group* with one statistic.
Groups are processed in execution order ("true sequential"): the statistics of a later group are collected after the
earlier groups were changed, so each layer is calibrated on the inputs it will really see. Collecting a group's
statistics stops the block's forward pass right after that group's input is seen, and a group inside the same child
module as the previous one (down after gate/up in `mlp`) runs only that child on its recorded inputs, which keeps
the cost of this to about one extra forward pass per block.

The runner knows no algorithm: a stage says which linears it wants, what to accumulate, and what to do with a group.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .distributed import shard, world
from .models import decoder_layers
from .resume import BlockCheckpoints

if TYPE_CHECKING:
    from .lazy import StreamedBlocks

log = logging.getLogger(__name__)


class Accumulator(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class LayerwiseStage(Protocol):
    """What a calibration-driven stage gives the runner."""

    def wants(self, name: str, module: nn.Module) -> bool:
        """Whether the linear `name` (qualified, e.g. model.layers.3.mlp.down_proj) is calibrated by this stage."""

    def accumulator(self, module: nn.Module) -> Accumulator:
        """A fresh statistic for the inputs of `module` (shared by the modules of its input group)."""

    def process(self, block_index: int, block: nn.Module, group: dict[str, tuple[nn.Module, Accumulator]]) -> None:
        """Change the layers of one input group (names are qualified) given their shared statistic."""


class HessianAccumulator:
    """H = 2/n Σ x xᵀ over all n input rows (tokens) on the input's device.

    Each batch's product is computed in float32 and added to a float64 sum: the sum then hardly depends on the order
    of the batches, so processes that each took some batches (compressor.distributed) and add their sums get the
    float32 Hessian one process gets."""

    CHUNKS = 4  # xᵀx is symmetric: computing only block rows' upper parts costs (CHUNKS+1)/(2·CHUNKS) of a GEMM

    def __init__(self, features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(features, features, device=device, dtype=torch.float64)
        self._batch = torch.zeros(features, features, device=device)
        self.rows = 0
        step = -(-features // self.CHUNKS)
        self.bounds = [(a, min(a + step, features)) for a in range(0, features, step)]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self._batch is None:
            self._batch = torch.zeros_like(self.sum, dtype=torch.float32)
        for a, b in self.bounds:  # upper triangle by block rows; the lower one is mirrored when read
            self._batch[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=0)
            self.sum[a:b, a:] += self._batch[a:b, a:]
        self.rows += x.shape[0]

    def all_reduce(self) -> None:
        from .distributed import all_reduce_sum

        all_reduce_sum(self.sum)
        self.rows = int(all_reduce_sum(torch.tensor([self.rows], dtype=torch.float64, device=self.sum.device)))

    @property
    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("no calibration tokens reached this layer")
        self._batch = None  # the per-batch buffer is not needed once the sums are read (a later add remakes it)
        # in place where possible: for a 4096-wide layer each temporary is 67 MB
        s = self.sum.float()
        lower = torch.triu(s, diagonal=1).t()
        s.triu_()
        s += lower
        del lower
        return s.mul_(2.0 / self.rows)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


class SpilledBatches:
    """Per-batch tensors kept in files instead of memory (the block inputs of a model run within a memory budget):
    iterating reads one batch at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.device: torch.device | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, t: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.device = t.device
        save_file({"t": t.detach().to("cpu").contiguous()}, str(self.folder / f"{self.count:05d}.safetensors"))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        from safetensors.torch import load_file

        if not 0 <= i < self.count:
            raise IndexError(i)
        return load_file(str(self.folder / f"{i:05d}.safetensors"))["t"].to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(self.count))

    def sibling(self, name: str) -> "SpilledBatches":
        return SpilledBatches(self.folder.parent / name)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class _Captured:
    hidden: list[torch.Tensor] | SpilledBatches  # per batch: the input of the current block
    kwargs: list[list[dict[str, Any]]]  # per block, per batch: keyword arguments the model passed that block

    def advance(self, block: nn.Module, index: int) -> None:
        """Replace the inputs of block `index` by its outputs (the next block's inputs)."""
        spilled = isinstance(self.hidden, SpilledBatches)
        outputs: Any = self.hidden.sibling(f"block-{index + 1:04d}") if spilled else []
        with torch.no_grad():
            for h, kw in zip(self.hidden, self.kwargs[index]):
                outputs.append(_output(block(h, **kw)))
        if spilled:
            self.hidden.remove()
        self.hidden = outputs


def run_layerwise(model: nn.Module, windows: torch.Tensor, stage: LayerwiseStage, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", label: str = "calibrate", sequential: bool = True,
                  checkpoints: BlockCheckpoints | None = None, stream: StreamedBlocks | None = None) -> None:
    """Run `stage` over every decoder block of `model` on calibration `windows` [n, seq_len].

    With `sequential` false, all groups of a block collect their statistics in one forward pass of the unchanged
    block before any is processed: about 2 block forwards per block instead of 3 to 4, at the price of calibrating
    later groups on inputs the earlier groups' changes have not reached yet.

    With `checkpoints`, each finished block is stored, and a block an interrupted run already finished is loaded
    instead of processed (the calibration inputs still pass through it, to reach the next block).

    With `stream` (a model larger than memory, compressor.lazy), each block is read from the weight files when its
    turn comes and spilled to disk once processed."""
    layers = decoder_layers(model)
    spill = getattr(stream, "activations", None)
    captured = _capture_inputs(model, layers, windows, batch_size, device,
                               SpilledBatches(spill / "block-0000") if spill is not None else None)
    start = time.perf_counter()
    known: dict[tuple[str, ...], list[list[str]]] = {}  # blocks of one layout share their input groups
    for index, block in enumerate(layers):
        prefix = _prefix(model, block)
        if stream is not None:
            stream.load(index, block)
        home = next(block.parameters()).device
        block.to(device)
        if checkpoints is not None and checkpoints.restore(index, block):
            log.info("%s: block %d/%d restored from the interrupted run", label, index + 1, len(layers))
            captured.advance(block, index)
            block.to(home)
            continue
        wanted = tuple(n for n, m in block.named_modules()
                       if isinstance(m, nn.Linear) and stage.wants(f"{prefix}.{n}", m))
        if wanted not in known:
            known[wanted] = [[n[len(prefix) + 1:] for n in g] for g in
                             _input_groups(block, prefix, captured.hidden[0], captured.kwargs[index][0], stage)]
        groups = [[f"{prefix}.{n}" for n in g] for g in known[wanted]]
        if sequential:
            resume: list[_Resume] = []  # at most one; a list so that a pass that cannot use it drops it first
            for names in groups:
                _process_group(block, prefix, names, captured, index, stage, resume)
            resume.clear()
        else:
            _process_block(block, prefix, groups, captured, index, stage)
        if checkpoints is not None:
            checkpoints.store(index, block, prefix)
        captured.advance(block, index)
        block.to(home)
        if stream is not None:
            stream.release(index, block)
        elapsed = time.perf_counter() - start
        done = index + 1 - (checkpoints.restored if checkpoints is not None else 0)
        eta = elapsed / max(done, 1) * (len(layers) - index - 1)
        log.info("%s: block %d/%d done, elapsed %.0fs, ETA %.0fs", label, index + 1, len(layers), elapsed, eta)


def _combine(acc: Accumulator) -> None:
    """Sum a statistic over the processes of a data-parallel run, so that each changes the layer identically."""
    if world()[1] == 1:
        return
    if not hasattr(acc, "all_reduce"):
        raise RuntimeError(f"{type(acc).__name__}: this statistic cannot be combined across processes; run this "
                           "stage in one process")
    acc.all_reduce()


def _prefix(model: nn.Module, block: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is block:
            return name
    raise ValueError("block is not part of the model")


def _capture_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                    device: torch.device | str, spilled: SpilledBatches | None = None) -> _Captured:
    """Run the model's embedding and mask/rotary preparation for every batch, recording what each block receives;
    the blocks themselves are replaced by pass-throughs so nothing else is computed. With `spilled`, the inputs of
    block 0 go to its files."""
    captured = _Captured(hidden=spilled if spilled is not None else [], kwargs=[[] for _ in layers])
    embed = model.get_input_embeddings()
    moved = [m for m in (embed, getattr(model.model, "rotary_emb", None)) if m is not None]
    homes = [next(m.parameters(), torch.empty(0)).device for m in moved]
    for m in moved:
        m.to(device)

    def recorder(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
            kwargs["use_cache"] = False
            captured.kwargs[index].append(kwargs)
            if index == 0:
                captured.hidden.append(hidden)
            if index == len(layers) - 1:
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = _passthrough  # instance attribute: hooks still run, the block's math does not
    try:
        with torch.no_grad():
            for batch in shard(list(windows.split(batch_size))):  # this process's batches (all of them alone)
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            del layer.forward
        for m, home in zip(moved, homes):
            m.to(home)
    return captured


def _passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def _input_groups(block: nn.Module, prefix: str, hidden: torch.Tensor, kwargs: dict[str, Any],
                  stage: LayerwiseStage) -> list[list[str]]:
    """Wanted linears grouped by the input tensor they read, in execution order (found on one batch)."""
    seen: list[tuple[str, torch.Tensor, int]] = []
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and stage.wants(f"{prefix}.{name}", module):
            def hook(mod, args, _name=f"{prefix}.{name}"):
                seen.append((_name, args[0], args[0]._version))
            handles.append(module.register_forward_pre_hook(hook))
    if not handles:
        return []
    try:
        with torch.no_grad():
            block(hidden, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last: tuple[torch.Tensor, int] | None = None
    for name, tensor, version in seen:
        if last is not None and tensor is last[0] and version == last[1]:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = (tensor, version)
    return groups


def _process_block(block: nn.Module, prefix: str, groups: list[list[str]], captured: _Captured, index: int,
                   stage: LayerwiseStage) -> None:
    """Every group's statistic from one pass of the block as it is, then every group processed."""
    modules = [{n: block.get_submodule(n[len(prefix) + 1 :]) for n in names} for names in groups]
    accs = [stage.accumulator(next(iter(m.values()))) for m in modules]
    handles = [next(iter(m.values())).register_forward_pre_hook(lambda mod, args, acc=acc: acc.add(args[0]))
               for m, acc in zip(modules, accs)]
    try:
        with torch.no_grad():
            for h, kw in zip(captured.hidden, captured.kwargs[index]):
                block(h, **kw)
    finally:
        for h in handles:
            h.remove()
    for m, acc in zip(modules, accs):
        _combine(acc)
        stage.process(index, block, {n: (mod, acc) for n, mod in m.items()})


@dataclass
class _Resume:
    """The inputs of one child of a block (e.g. `mlp`) for every batch, recorded while collecting a group inside
    it: the next group inside the same child is collected by running only that child again, not the whole block.
    Valid because the earlier group's change lies inside the child, after the point where its input is computed."""

    child: str
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


def _process_group(block: nn.Module, prefix: str, names: list[str], captured: _Captured, index: int,
                   stage: LayerwiseStage, holder: list[_Resume]) -> None:
    """Collect one group's statistic and let the stage change the group; `holder` passes recorded child inputs
    from one group to the next (and is emptied before a pass that cannot use them, so memory holds one set)."""
    modules = {n: block.get_submodule(n[len(prefix) + 1 :]) for n in names}
    first = modules[names[0]]
    child_name = names[0][len(prefix) + 1 :].split(".")[0]
    child = block.get_submodule(child_name)
    acc = stage.accumulator(first)
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []

    def stop(mod, args):
        acc.add(args[0])
        raise _Stop

    def record(mod, args, kwargs):
        calls[-1].append((args, kwargs))

    handles = [first.register_forward_pre_hook(stop)]
    # spilled inputs: no recorded copy of a child's inputs either (the next group re-runs the block instead)
    if child is not first and not isinstance(captured.hidden, SpilledBatches):
        handles.append(child.register_forward_pre_hook(record, with_kwargs=True))
    resume = holder.pop() if holder else None
    reuse = resume is not None and resume.child == child_name
    if not reuse:
        resume = None
    try:
        with torch.no_grad():
            inputs = resume.calls if reuse else zip(captured.hidden, captured.kwargs[index])
            for a, kw in inputs:
                calls.append([])
                try:
                    if reuse:
                        child(*a, **kw)
                    else:
                        block(a, **kw)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    del resume, inputs
    _combine(acc)
    stage.process(index, block, {n: (m, acc) for n, m in modules.items()})
    if child is not first and all(len(c) == 1 for c in calls):  # else: no shortcut for the next group
        holder.append(_Resume(child_name, [c[0] for c in calls]))
