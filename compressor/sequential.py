"""The layer-by-layer calibration runner shared by every calibration-driven stage.

It captures the inputs of decoder block 0 for all calibration windows, then for each block: collects the statistics
a stage asks for on the inputs of the block's linear layers, lets the stage change the block, and runs the changed
block to produce the inputs of the next one. Only the current block needs to be on the compute device.

Within a block, linear layers that read the same tensor (q/k/v, gate/up) form one *input group* with one statistic.
Groups are processed in execution order ("true sequential"): the statistics of a later group are collected after the
earlier groups were changed, so each layer is calibrated on the inputs it will really see. Done naively that costs
a forward pass per group; instead each operation of the block runs about once per batch:
- collecting a group's statistics stops the forward pass right after that group's input is seen;
- a group inside the same child module as the previous one (down after gate/up in `mlp`) runs only that child on
  its recorded inputs;
- a child whose output is its last linear's output (`self_attn` ends in o_proj, `mlp` in down_proj) is *replayed*
  once that linear is changed: its output is the changed linear applied to the input recorded while collecting the
  linear's statistics, so later passes and the pass that produces the next block's inputs skip the child's work.
  Those inputs (down_proj's: 3-4x wider than the block inputs) are recorded only while they fit in the size of the
  block inputs (TAIL_RECORDING_LIMIT); for the other batches the child runs again once its linear is changed.
Recorded inputs stay valid only while a stage changes nothing but the group it is given; when it changes anything
else in the block (AWQ folds scales into a norm), they are dropped and later passes run the whole block again.
- a replayed child on a residual branch (the block adds its output to the block input and uses neither otherwise,
  checked on one row) is *folded*: its outputs are added into the recorded block inputs and it returns zeros from
  then on, so the block inputs and the child's outputs take one buffer instead of two. Only for stages that keep to
  their group: a folded input cannot be unfolded.
- a block whose calibrated children are all folded, and which then returns its input unchanged (checked on one row),
  needs no pass to produce the next block's inputs: they are the folded ones.

The runner knows no algorithm: a stage says which linears it wants, what to accumulate, and what to do with a group.

With a `compute_dtype` (bfloat16 where the hardware multiplies it fast, see `calibration_dtype`), the block's matrix
products in these passes run in it through autocast: weights and the residual stream stay in the model's dtype, and
a stage's `process` (the algorithm) runs with autocast off.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .distributed import shard, world
from .models import decoder_layers
from .memory import discard_from, page_out, trim_heap
from .resume import BlockCheckpoints

if TYPE_CHECKING:
    from .lazy import StreamedBlocks

log = logging.getLogger(__name__)

# Recorded inputs of a child's last linear take at most this many times the bytes of the block inputs: the runner's
# activations stay near twice the block inputs (on an 8B Llama with 128 x 2048 windows, down_proj's inputs would be
# 15 GB against 4.3 GB). Not applied where running the child again would mean running the block before it too.
TAIL_RECORDING_LIMIT = 1.0


class Accumulator(Protocol):
    def add(self, x: torch.Tensor) -> None: ...


class LayerwiseStage(Protocol):
    """What a calibration-driven stage gives the runner. A stage whose `process` changes nothing but the modules of
    the group it is given may say so with a class attribute `keeps_to_its_group = True`: the runner may then fold a
    replayed child's outputs into the recorded block inputs (see `_fold`), which it could not undo for a stage that
    later changed, say, a norm in front of an earlier group."""

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
        self._batch: torch.Tensor | None = None  # made by the first add (and dropped once the sum is read)
        self.rows = 0
        step = -(-features // self.CHUNKS)
        self.bounds = [(a, min(a + step, features)) for a in range(0, features, step)]

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self._batch is None:
            self._batch = torch.zeros_like(self.sum, dtype=torch.float32)
        with _products_like_autocast(x.device):
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


class StopForward(Exception):
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
    hidden: _Rows | SpilledBatches  # per batch: the input of the current block
    kwargs: list[list[dict[str, Any]]]  # per block, per batch: keyword arguments the model passed that block

    def advance(self, block: nn.Module, index: int, replays: dict[str, Any] | None = None) -> None:
        """Replace the inputs of block `index` by its outputs (the next block's inputs), in place in memory;
        children with a replay return their recorded outputs instead of running."""
        kwargs = self.kwargs[index]
        with torch.no_grad(), _replaying(block, replays or {}) as cursor:
            def run(i: int, h: torch.Tensor) -> torch.Tensor:
                cursor[0] = i
                return _output(block(h, **kwargs[i]))

            if isinstance(self.hidden, _Rows):
                self.hidden.map_(run)
                return
            outputs = self.hidden.sibling(f"block-{index + 1:04d}")
            for i, h in enumerate(self.hidden):
                outputs.append(run(i, h))
        self.hidden.remove()
        self.hidden = outputs


def run_layerwise(model: nn.Module, windows: torch.Tensor, stage: LayerwiseStage, *, batch_size: int = 8,
                  device: torch.device | str = "cpu", label: str = "calibrate", sequential: bool = True,
                  checkpoints: BlockCheckpoints | None = None, stream: StreamedBlocks | None = None,
                  compute_dtype: torch.dtype | None = None) -> None:
    """Run `stage` over every decoder block of `model` on calibration `windows` [n, seq_len].

    With `sequential` false, all groups of a block collect their statistics in one forward pass of the unchanged
    block before any is processed: about 2 block forwards per block instead of 3 to 4, at the price of calibrating
    later groups on inputs the earlier groups' changes have not reached yet.

    With `checkpoints`, each finished block is stored, and a block an interrupted run already finished is loaded
    instead of processed (the calibration inputs still pass through it, to reach the next block).

    With `stream` (a model larger than memory, compressor.lazy), each block is read from the weight files when its
    turn comes and spilled to disk once processed.

    With `compute_dtype`, the blocks' matrix products run in that dtype (see the module docstring)."""
    layers = decoder_layers(model)
    spill = getattr(stream, "activations", None)
    captured = _capture_inputs(model, layers, windows, batch_size, device,
                               SpilledBatches(spill / "block-0000") if spill is not None else None)
    inside = {id(p) for p in layers.parameters()}  # the embedding is not read again until calibration ends
    page_out([p for p in model.parameters() if id(p) not in inside])
    start = time.perf_counter()
    known: dict[tuple[str, ...], _Layout] = {}  # blocks of one layout share their input groups
    for index, block in enumerate(layers):
        with computing_in(device, compute_dtype):
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
                known[wanted] = _layout(block, prefix, captured.hidden[0], captured.kwargs[index][0], stage)
            groups = [[f"{prefix}.{n}" for n in g] for g in known[wanted].groups]
            state = _BlockState(known[wanted])
            if sequential:
                for names in groups:
                    _process_group(block, prefix, names, captured, index, stage, state)
                state.resume = None
            else:
                _process_block(block, prefix, groups, captured, index, stage)
            if checkpoints is not None:
                checkpoints.store(index, block, prefix)
            if not _passes_through(block, captured, index, state.replays):
                captured.advance(block, index, state.replays)
            del state  # the replayed outputs: freed before the next block starts
            trim_heap()  # without it, holes left by one block's tensors add up over the blocks (~10 MB per block)
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


def calibration_dtype(setting: str, model: nn.Module, device: torch.device | str) -> torch.dtype | None:
    """The dtype the calibration passes multiply in for a recipe's `calibration.precision`, or None for the
    model's own. `auto` picks bfloat16 for a float32 model where bfloat16 products are much faster than float32 ones
    (CPUs with AMX, CUDA GPUs that support it) and the model's own dtype elsewhere, where bfloat16 would be slower."""
    model_dtype = next(model.parameters()).dtype
    kind = torch.device(device).type
    if setting == "auto":
        if model_dtype != torch.float32:
            return None
        fast = (torch.cuda.is_bf16_supported() if kind == "cuda" else
                kind == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
        return torch.bfloat16 if fast else None
    dtype = getattr(torch, setting)
    if dtype == model_dtype:
        return None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"calibration.precision: {setting} needs a cpu or cuda device, not {kind}; use auto")
    return dtype


@contextmanager
def computing_in(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """Matrix products in `dtype` (autocast) for a calibration pass; None: the model's own dtype."""
    if dtype is None:
        yield
        return
    # no cache of cast weights: a stage may change a weight in place (pruning), and a cached copy would not follow;
    # the casts it would save were not measurable on SmolLM2
    with torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False):
        yield


@contextmanager
def _full_precision(block: nn.Module) -> Iterator[None]:
    """Autocast off: a stage's algorithm (a Cholesky factor, GPTQ's error updates) needs the model's precision."""
    kind = next(block.parameters()).device.type
    if kind not in ("cpu", "cuda") or not torch.is_autocast_enabled(kind):
        yield
        return
    with torch.autocast(kind, enabled=False):
        yield


@contextmanager
def _products_like_autocast(device: torch.device) -> Iterator[None]:
    """While the block's products run in bfloat16 on a CPU (autocast), float32 matrix products too multiply
    bfloat16-rounded inputs (oneDNN, AMX), but add them up and return them in float32: a statistic such as xᵀx then
    stays as positive semi-definite as a float32 one (a product returned in bfloat16 does not: GPTQ needed up to
    100x the dampening on SmolLM2's attention outputs), at 3x the speed of float32."""
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)  # absent in older torch: plain float32 products
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu") or mkldnn is None or \
            torch.get_autocast_dtype("cpu") != torch.bfloat16 or getattr(mkldnn, "fp32_precision", None) != "none":
        yield
        return
    mkldnn.fp32_precision = "bf16"
    try:
        yield
    finally:
        mkldnn.fp32_precision = "none"


def _capture_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, batch_size: int,
                    device: torch.device | str, spilled: SpilledBatches | None = None) -> _Captured:
    """Run the model's embedding and mask/rotary preparation for every batch, recording what each block receives;
    the blocks themselves are replaced by pass-throughs so nothing else is computed. With `spilled`, the inputs of
    block 0 go to its files."""
    batches = shard(list(windows.split(batch_size)))  # this process's batches (all of them alone)
    # one allocation for all batches: see _Rows
    captured = _Captured(hidden=spilled if spilled is not None else _Rows([b.numel() for b in batches]),
                         kwargs=[[] for _ in layers])
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
            if index == 0 and captured.hidden.append(hidden) is False:
                raise RuntimeError(f"the model gave block 0 inputs of shape {tuple(hidden.shape)} for calibration "
                                   f"batch {len(captured.hidden.shapes) + 1}; the runner expects one row per token")
            if index == len(layers) - 1:
                raise StopForward
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = _passthrough  # instance attribute: hooks still run, the block's math does not
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except StopForward:
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


@dataclass
class _Layout:
    """How a block's wanted linears are arranged (names relative to the block), found on one batch."""

    groups: list[list[str]]  # linears grouped by the input tensor they read, in execution order
    tails: dict[str, tuple[str, int]]  # child -> (its last wanted linear, whose output is the child's output;
    #                                    the length of the tuple the child returns, 0 for a bare tensor)


def _layout(block: nn.Module, prefix: str, hidden: torch.Tensor, kwargs: dict[str, Any],
            stage: LayerwiseStage) -> _Layout:
    seen: list[tuple[str, torch.Tensor, int]] = []
    linear_out: dict[str, list[torch.Tensor]] = {}
    child_out: dict[str, list[Any]] = {}
    wanted = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and stage.wants(f"{prefix}.{n}", m)]
    if not wanted:
        return _Layout([], {})
    handles = []
    for name in wanted:
        def pre(mod, args, _name=name):
            seen.append((_name, args[0], args[0]._version))

        def post(mod, args, out, _name=name):
            linear_out.setdefault(_name, []).append(out)
        module = block.get_submodule(name)
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    for cname, child in block.named_children():
        if any(n.startswith(cname + ".") for n in wanted):
            def child_post(mod, args, out, _name=cname):
                child_out.setdefault(_name, []).append(out)
            handles.append(child.register_forward_hook(child_post))
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
    tails: dict[str, tuple[str, int]] = {}
    for cname, outs in child_out.items():
        inside = [n for n, _, _ in seen if n.startswith(cname + ".")]
        if len(outs) != 1 or len(inside) != len(set(inside)):
            continue  # a child or linear that runs twice per pass cannot be replayed from one recorded input
        out, arity = outs[0], 0
        if isinstance(out, (tuple, list)):
            if not out or any(o is not None for o in out[1:]):
                continue
            out, arity = out[0], len(out)
        tail = inside[-1]
        if linear_out.get(tail, [None])[-1] is out and any(g[0] == tail for g in groups):
            tails[cname] = (tail, arity)
    return _Layout(groups, tails)


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
        with _full_precision(block):
            stage.process(index, block, {n: (mod, acc) for n, mod in m.items()})


@dataclass
class _Resume:
    """The inputs of one child of a block (e.g. `mlp`) for every batch, recorded while collecting a group inside
    it: the next group inside the same child is collected by running only that child again, not the whole block.
    Valid because the earlier group's change lies inside the child, after the point where its input is computed."""

    child: str
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


class _Rows:
    """One tensor per batch ([..., features], the leading dims holding `counts[i]` rows), all in one flat allocation.
    Tens of separate tensors of a few MB each fragment the heap (a freed one rarely fits the next), and the process
    keeps the holes; one large allocation goes back to the system when freed.

    With a `limit` (bytes), the allocation stops there: a batch that would end beyond it is not stored. Without one,
    the allocation grows to hold every batch."""

    def __init__(self, counts: list[int], limit: int | None = None) -> None:
        self.counts = counts
        self.starts = [sum(counts[:i]) for i in range(len(counts))]
        self.limit = limit
        self.buffer: torch.Tensor | None = None
        self.shapes: list[torch.Size] = []

    def append(self, t: torch.Tensor) -> bool:
        """Store the next batch's tensor; False when it does not fit the layout or the limit (then nothing is
        stored)."""
        i = len(self.shapes)
        if i >= len(self.counts) or t.shape[:-1].numel() != self.counts[i]:
            return False
        width = t.shape[-1]
        end = (self.starts[i] + self.counts[i]) * width
        if self.buffer is None:
            size = sum(self.counts) * width
            if self.limit is not None:
                size = min(size, self.limit // t.element_size())
            if end > size:
                return False
            self.buffer = torch.empty(size, dtype=t.dtype, device=t.device)
        elif (t.dtype, t.device) != (self.buffer.dtype, self.buffer.device) or (i and width != self.shapes[-1][-1]):
            return False
        if end > self.buffer.numel():
            if self.limit is not None:
                return False
            grown = torch.empty(sum(self.counts) * width, dtype=self.buffer.dtype, device=self.buffer.device)
            grown[: self.starts[i] * width].copy_(self.buffer[: self.starts[i] * width])
            self.buffer = grown
        self.buffer[self.starts[i] * width : end].copy_(t.reshape(-1))
        self.shapes.append(t.shape)
        return True

    def __len__(self) -> int:
        return len(self.shapes)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> torch.Tensor:
        assert self.buffer is not None
        width = self.shapes[i][-1]
        return self.buffer[self.starts[i] * width : (self.starts[i] + self.counts[i]) * width].view(self.shapes[i])

    def map_(self, fn: Any) -> None:
        """Replace every batch's tensor by fn(i, tensor), in place when the result is not wider (batch i's result
        only overwrites rows of batches up to i, already read), else in a new allocation."""
        assert self.buffer is not None
        results = _Rows(self.counts)
        for i in range(len(self)):
            y = fn(i, self[i])
            if y.shape[-1] > self.shapes[i][-1] or y.dtype != self.buffer.dtype:
                results.append(y)
                continue
            width = y.shape[-1]
            self.buffer[self.starts[i] * width : (self.starts[i] + self.counts[i]) * width].copy_(y.reshape(-1))
            self.shapes[i] = y.shape
        if len(results):
            if len(results) != len(self):
                raise RuntimeError("a replayed child's outputs changed width between batches")
            self.buffer, self.shapes = results.buffer, results.shapes
        else:  # narrower outputs (down_proj's after its 3-4x wider inputs): the rest of the buffer is dead
            discard_from(self.buffer, sum(self.counts) * self.shapes[-1][-1] * self.buffer.element_size())


@dataclass
class _Replay:
    """A child's output for every batch, computed once its last linear was changed (see the module docstring)."""

    outputs: _Rows
    arity: int  # the length of the tuple the child returns, 0 for a bare tensor

    def result(self, i: int) -> Any:
        return _as_result(self.outputs[i], self.arity)


@dataclass
class _Zeros:
    """A folded child: its outputs were added into the block inputs, so from then on it adds zeros. Negative zeros:
    x + (-0.0) is x for every x, -0.0 included, where x + 0.0 would turn a -0.0 into +0.0."""

    like: list[tuple[torch.Size, torch.dtype, torch.device]]  # per batch: the shape, dtype and device of the output
    arity: int

    def result(self, i: int) -> Any:
        shape, dtype, device = self.like[i]
        return _as_result(torch.full(shape, -0.0, dtype=dtype, device=device), self.arity)


@dataclass
class _Fixed:
    """One given result whatever the batch (the probe that decides a fold)."""

    value: Any

    def result(self, i: int) -> Any:
        return self.value


def _as_result(y: torch.Tensor, arity: int) -> Any:
    return (y,) + (None,) * (arity - 1) if arity else y


@dataclass
class _BlockState:
    """What the sequential passes over one block keep from one group to the next."""

    layout: _Layout
    resume: _Resume | None = None
    replays: dict[str, _Replay | _Zeros] = field(default_factory=dict)
    folded: bool = False  # a child's outputs were added into the block inputs: the recorded inputs cannot be dropped

    def drop(self) -> None:
        self.resume = None
        self.replays = {}

    def reaches_cheaply(self, child: str) -> bool:
        """Whether a pass of the whole block reaches `child` at little cost: every child before it with calibrated
        linears is replayed (recording the child's inputs would then save nothing but memory)."""
        order = list(dict.fromkeys(g[0].split(".")[0] for g in self.layout.groups))
        return all(c in self.replays for c in order[: order.index(child)])


@contextmanager
def _replaying(block: nn.Module, replays: dict[str, _Replay | _Zeros | _Fixed]) -> Iterator[list[int]]:
    """Children with a replay return their output for the batch at cursor[0] instead of running."""
    cursor = [0]
    saved = {}
    for name, replay in replays.items():
        child = block.get_submodule(name)
        saved[name] = child.__dict__.get("forward")  # an instance-level wrapper (accelerate's hooks) comes back

        def forward(*args: Any, _r: Any = replay, **kwargs: Any) -> Any:
            return _r.result(cursor[0])
        child.forward = forward
    try:
        yield cursor
    finally:
        for name, old in saved.items():
            child = block.get_submodule(name)
            if old is None:
                del child.forward
            else:
                child.forward = old


def _fingerprint(block: nn.Module, skip: list[str]) -> dict[str, Any]:
    """Identity and version of every module, parameter and buffer of `block` outside the modules `skip`."""
    inside = tuple(n + "." for n in skip)
    fp: dict[str, Any] = {}
    for n, m in block.named_modules():
        if n not in skip and not n.startswith(inside):
            fp["module " + n] = id(m)
    for n, t in [*block.named_parameters(), *block.named_buffers()]:
        if not n.startswith(inside):
            fp["tensor " + n] = (id(t), t.data_ptr(), t._version, tuple(t.shape))
    return fp


def _process_group(block: nn.Module, prefix: str, names: list[str], captured: _Captured, index: int,
                   stage: LayerwiseStage, state: _BlockState) -> None:
    """Collect one group's statistic and let the stage change the group; `state` carries recorded child inputs and
    replays from one group to the next (memory holds one set of recorded child inputs)."""
    rel = [n[len(prefix) + 1 :] for n in names]
    modules = {n: block.get_submodule(r) for n, r in zip(names, rel)}
    first = modules[names[0]]
    child_name = rel[0].split(".")[0]
    child = block.get_submodule(child_name)
    spilled = isinstance(captured.hidden, SpilledBatches)  # no recorded copies either: passes re-run the block
    tail = state.layout.tails.get(child_name)
    is_tail = tail is not None and tail[0] == rel[0] and not spilled
    acc = stage.accumulator(first)
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
    tail_inputs = None
    if is_tail:  # bounded where running the child again costs only the child (the block reaches it cheaply)
        limit = int(TAIL_RECORDING_LIMIT * sum(h.numel() * h.element_size() for h in captured.hidden))
        tail_inputs = _Rows([h.shape[:-1].numel() for h in captured.hidden],
                            limit=limit if state.reaches_cheaply(child_name) else None)
    fits = [True]

    def stop(mod, args):
        acc.add(args[0])
        if tail_inputs is not None and fits[0]:
            fits[0] = tail_inputs.append(args[0])
        raise StopForward

    def record(mod, args, kwargs):
        calls[-1].append((args, kwargs))

    handles = [first.register_forward_pre_hook(stop)]
    # no group in the child is left after its tail; a whole-block pass that is cheap needs no recorded inputs
    if child is not first and not is_tail and not spilled and not state.reaches_cheaply(child_name):
        handles.append(child.register_forward_pre_hook(record, with_kwargs=True))
    resume, state.resume = state.resume, None
    try:
        with torch.no_grad():
            if resume is not None and resume.child == child_name:
                pending = resume.calls
                del resume
                while pending:
                    a, kw = pending.pop(0)  # popped: each batch's recorded input is freed once used
                    calls.append([])
                    try:
                        child(*a, **kw)
                    except StopForward:
                        pass
            else:
                del resume
                with _replaying(block, state.replays) as cursor:
                    for i, (h, kw) in enumerate(zip(captured.hidden, captured.kwargs[index])):
                        cursor[0] = i
                        calls.append([])
                        try:
                            block(h, **kw)
                        except StopForward:
                            pass
    finally:
        for h in handles:
            h.remove()
    _combine(acc)
    before = _fingerprint(block, rel)
    old = [t for m in modules.values() for t in [*m.parameters(), *m.buffers()]]
    with _full_precision(block):
        stage.process(index, block, {n: (m, acc) for n, m in modules.items()})
    kept = {id(t) for m in (block.get_submodule(r) for r in rel) for t in [*m.parameters(), *m.buffers()]}
    page_out([t for t in old if id(t) not in kept])
    del old
    if _fingerprint(block, rel) != before:  # the stage changed more than the group: recorded inputs are stale
        if state.folded:
            raise RuntimeError(f"{type(stage).__name__} says it keeps to its group, but processing {names} changed "
                               "other modules of the block: the block inputs it folded can no longer be recomputed")
        state.drop()
        return
    if tail_inputs is not None and len(calls) == len(captured.hidden):
        if _tail_outputs(block, rel[0], child_name, tail_inputs, captured, index, state.replays):
            state.replays[child_name] = _Replay(tail_inputs, tail[1])
            if getattr(stage, "keeps_to_its_group", False):
                _fold(block, child_name, captured, index, state)
    elif calls and all(len(c) == 1 for c in calls):  # recorded (once per batch): the next group in the child resumes
        state.resume = _Resume(child_name, [c[0] for c in calls])


def _tail_outputs(block: nn.Module, linear_name: str, child_name: str, rows: _Rows, captured: _Captured,
                  index: int, replays: dict[str, Any]) -> bool:
    """Turn `rows`, the inputs of the child's (changed) last linear recorded for the first batches, into the child's
    outputs for every batch: the linear applied to the recorded inputs, and the child run again on the batches whose
    inputs were beyond the recording limit. False when an output does not fit the layout (no replay then)."""
    linear = block.get_submodule(linear_name)
    child = block.get_submodule(child_name)
    recorded = len(rows)
    with torch.no_grad():
        if recorded:
            rows.map_(lambda i, x: linear(x))
        rows.limit = None  # the outputs are narrower than the inputs (or get their own allocation)
        if recorded == len(captured.hidden):
            return True
        out: list[torch.Tensor] = []

        def grab(mod, args, result):
            out.append(_output(result))
            raise StopForward

        handle = child.register_forward_hook(grab)
        try:
            with _replaying(block, replays) as cursor:
                for i in range(recorded, len(captured.hidden)):
                    cursor[0] = i
                    try:
                        block(captured.hidden[i], **captured.kwargs[index][i])
                    except StopForward:
                        pass
                    if len(out) != 1 or not rows.append(out.pop()):
                        return False
        finally:
            handle.remove()
    return True


def _fold(block: nn.Module, child: str, captured: _Captured, index: int, state: _BlockState) -> None:
    """Add the replayed outputs of `child` into the recorded block inputs, in place, and let the child return zeros
    from now on, when the block only adds the child's output to its input (a residual branch).

    The check runs the block twice on the first row of the first batch, other replayed children returning their
    recorded rows: on (x, child gives y) and on (x + y, child gives 0). A block that normalizes the child's output
    first (Gemma's post-norms) or feeds its input to another branch too (parallel attention and MLP) gives different
    outputs and is not folded. Equal outputs bit for bit make the fold exact: the block computes the same x + y."""
    replay = state.replays[child]
    hidden = captured.hidden
    # the block's x + y has x's dtype when y's is the same or narrower (bfloat16 products on a float32 stream)
    if not isinstance(replay, _Replay) or not isinstance(hidden, _Rows) or any(
            replay.outputs[i].shape != h.shape or torch.promote_types(replay.outputs[i].dtype, h.dtype) != h.dtype
            for i, h in enumerate(hidden)):
        return
    y = _first_rows(replay.outputs[0], hidden[0].shape[0])
    want = _one_row(block, captured, index, state.replays)
    got = _one_row(block, captured, index, state.replays, add=y,
                   override={child: _Fixed(_as_result(torch.full_like(y, -0.0), replay.arity))})
    if want is None or got is None or not torch.equal(want, got):  # left unfolded: only memory is at stake
        return
    for i in range(len(hidden)):
        hidden[i].add_(replay.outputs[i])  # the block's own x + y, bit for bit
    state.replays[child] = _Zeros([(h.shape, h.dtype, h.device) for h in hidden], replay.arity)  # frees the replay
    state.folded = True


def _passes_through(block: nn.Module, captured: _Captured, index: int, replays: dict[str, Any]) -> bool:
    """Whether the block, every calibrated child folded, returns its input unchanged (checked bit for bit on one
    row, like the folds): the recorded inputs are then its outputs already and the pass computing them is skipped."""
    hidden = captured.hidden
    if not replays or not all(isinstance(r, _Zeros) for r in replays.values()) or not isinstance(hidden, _Rows):
        return False
    y = _one_row(block, captured, index, replays)
    return y is not None and torch.equal(y, hidden[0][:1])


def _one_row(block: nn.Module, captured: _Captured, index: int, replays: dict[str, Any],
             add: torch.Tensor | None = None, override: dict[str, Any] | None = None) -> torch.Tensor | None:
    """The block's output on the first row of its first batch (plus `add`), replayed children returning their rows
    for that batch (or `override`'s results); None when the block cannot run on one row."""
    hidden = captured.hidden
    batch = hidden[0].shape[0]
    x = hidden[0][:1].clone()  # a copy: a block may change its input in place
    if add is not None:
        x += add
    probe = {n: _Fixed(_first_rows(r.result(0), batch)) for n, r in replays.items()} | (override or {})
    try:
        with torch.no_grad(), _replaying(block, probe):
            return _output(block(x, **_first_rows(captured.kwargs[index][0], batch)))
    except Exception as e:
        log.debug("block %d: a one-row probe failed (%s)", index, e)
        return None


def _first_rows(value: Any, batch: int) -> Any:
    """The first row of every tensor in `value` whose leading dimension is the batch (tuples and dicts walked)."""
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_first_rows(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _first_rows(v, batch) for k, v in value.items()}
    return value
