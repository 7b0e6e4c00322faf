"""The layer-by-layer runner: inputs captured and propagated exactly, statistics shared by input groups."""
import copy

import pytest
import torch
from torch import nn

from compressor.models import decoder_layers
from compressor.sequential import HessianAccumulator, run_layerwise
from conftest import FAMILIES, tiny_model


class Recorder:
    """A stage that changes nothing and records what the runner gives it."""

    def __init__(self):
        self.groups = []
        self.inputs = {}
        self.keep = []  # keeps accumulators alive so their ids stay unique

    def wants(self, name, module):
        return True

    def accumulator(self, module):
        rec = self

        class Acc(HessianAccumulator):
            def add(self, x):
                super().add(x)
                rec.inputs.setdefault(id(self), []).append(x.clone())

        acc = Acc(module.in_features)
        self.keep.append(acc)
        return acc

    def process(self, block_index, block, group):
        self.groups.append((block_index, sorted(group)))
        accs = {id(acc) for _, acc in group.values()}
        assert len(accs) == 1  # one statistic per input group
        self.last = group


@pytest.mark.parametrize("family", FAMILIES)
def test_runner_sees_the_true_inputs_of_every_block(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (6, 40))
    # reference: inputs of the last block's down projection in a normal forward
    seen = []
    last = decoder_layers(model)[-1]
    down = [m for n, m in last.named_modules() if n.endswith("down_proj")][0]
    h = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        ref_logits = model(ids).logits
    h.remove()
    before = copy.deepcopy(model.state_dict())

    rec = Recorder()
    run_layerwise(model, ids, rec, batch_size=4)

    # groups: q/k/v share one input, o alone, gate/up share one, down alone; per block, in execution order
    names = [g for b, g in rec.groups if b == 1]
    assert len(names) == 4
    assert [len(g) for g in names] == [3, 1, 2, 1]
    assert names[0][0].endswith("k_proj") and names[3][0].endswith("down_proj")
    # the statistic of the last group of the last block was fed exactly the real inputs (two batches: 4 + 2)
    (_, acc), = rec.last.values()
    got = torch.cat([x.reshape(-1, x.shape[-1]) for x in rec.inputs[id(acc)]])
    want = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    assert torch.allclose(got, want, atol=1e-5)
    # nothing changed
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref_logits)


def test_hessian_accumulator_matches_formula():
    acc = HessianAccumulator(8)
    xs = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    assert torch.allclose(acc.hessian, 2 * flat.T @ flat / 13, atol=1e-5)
    with pytest.raises(ValueError, match="no calibration tokens"):
        HessianAccumulator(4).hessian


def test_changes_made_by_a_stage_reach_the_next_block():
    """True sequential: block 1 is calibrated on the outputs of the already changed block 0."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 32))

    class ZeroFirstBlock(Recorder):
        def process(self, block_index, block, group):
            super().process(block_index, block, group)
            if block_index == 1 and not hasattr(self, "block1_qkv"):
                (_, acc), *_ = group.values()
                self.block1_qkv = torch.cat(self.inputs[id(acc)])
            if block_index == 0:
                for module, _ in group.values():
                    module.weight.data.zero_()

    rec = ZeroFirstBlock()
    run_layerwise(model, ids, rec, batch_size=4)
    # block 0 now adds nothing to the residual stream, so block 1's q/k/v read the normalized embeddings
    layer1 = decoder_layers(model)[1]
    with torch.no_grad():
        expect = layer1.input_layernorm(model.get_input_embeddings()(ids))
    assert torch.allclose(rec.block1_qkv, expect, atol=1e-5)


def test_unsupported_structure_is_refused():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no decoder blocks"):
        run_layerwise(NotADecoder(), torch.zeros(1, 4, dtype=torch.long), Recorder())


class ScaleEachGroup(Recorder):
    """Keeps each group's inputs as the runner gave them (`seen`), then scales the group's weights by 1.5."""

    def process(self, block_index, block, group):
        super().process(block_index, block, group)
        (_, acc), *_ = group.values()
        self.seen = getattr(self, "seen", {})
        for name, (module, _) in group.items():
            self.seen[name] = torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs[id(acc)]])
            module.weight.data.mul_(1.5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_each_group_is_calibrated_on_the_inputs_left_by_earlier_changes(family):
    """True sequential inside a block: after every group is changed, the next group's statistic must equal its real
    input in the changed model (also when the runner re-runs only the `mlp`/`self_attn` child)."""
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (5, 24))
    rec = ScaleEachGroup()
    run_layerwise(model, ids, rec, batch_size=2)
    real = _real_linear_inputs(model, ids, set(rec.seen), 2)
    assert len(real) == len(rec.seen) == 7 * model.config.num_hidden_layers
    for name, got in rec.seen.items():
        assert torch.allclose(got, real[name], atol=1e-4), name


def _real_linear_inputs(model, ids, names, batch_size):
    real = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, a, n=n: real.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in model.named_modules() if isinstance(m, nn.Linear) and n in names]
    with torch.no_grad():
        for batch in ids.split(batch_size):
            model(batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in real.items()}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_stage_that_changes_more_than_its_group_still_gets_true_inputs(family):
    """A stage may change modules outside the group it is given (AWQ folds scales into the norm in front of q/k/v or
    gate/up, or into up_proj in front of down_proj). Inputs the runner recorded before such a change are stale: each
    group must still get its real input in the model as it stands when the group's turn comes."""
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (5, 24))
    checked = []

    class FoldIntoNorms(Recorder):
        def process(self, block_index, block, group):
            super().process(block_index, block, group)
            (name, (module, acc)), *_ = group.items()
            got = torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs[id(acc)]])
            real = _real_linear_inputs(model, ids, {name}, 2)[name]
            assert torch.allclose(got, real, atol=1e-4), name
            checked.append(name)
            with torch.no_grad():
                for norm in (m for n, m in block.named_modules() if n.endswith("norm") and hasattr(m, "weight")):
                    norm.weight.mul_(1.25)  # every norm of the block, the ones in front of the next groups too
                next(m for n, m in block.named_modules() if n.endswith("up_proj")).weight.mul_(0.5)

    run_layerwise(model, ids, FoldIntoNorms(), batch_size=2)
    assert len(checked) == 4 * model.config.num_hidden_layers


@pytest.mark.parametrize("limit,again", [(100.0, 0), (1.0, 2)])
def test_each_operation_of_a_block_runs_once_per_batch(limit, again, monkeypatch):
    """The cost of true-sequential calibration: replaying `self_attn` and `mlp` from their changed last linear, every
    linear layer (and so the attention between q/k/v and o) runs once per batch per block, plus one probe batch per
    block layout, not once per group as plain re-runs of the block would. The exception is bounded memory: down_proj's
    inputs (here twice as wide as the block inputs) are recorded only while they fit in the block inputs' size, one
    batch of three here; gate/up run again on the `again` others to give the mlp's outputs."""
    import compressor.sequential as seq

    monkeypatch.setattr(seq, "TAIL_RECORDING_LIMIT", limit)
    model = tiny_model("llama")
    assert model.config.intermediate_size == 2 * model.config.hidden_size
    ids = torch.randint(0, model.config.vocab_size, (6, 24))
    calls = {}
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):  # a forward hook: counts only the calls that computed something
            m.register_forward_hook(lambda m, a, out, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))

    class Halve(Recorder):
        def process(self, block_index, block, group):
            super().process(block_index, block, group)
            for module, _ in group.values():
                module.weight.data.mul_(0.5)

    run_layerwise(model, ids, Halve(), batch_size=2)  # 3 batches
    probe = {n: 1 if ".layers.0." in n else 0 for n in calls}  # all blocks share block 0's layout
    for name, count in calls.items():
        assert count - probe[name] == 3 + (again if name.endswith(("gate_proj", "up_proj")) else 0), (name, count)
    assert len(calls) == 7 * model.config.num_hidden_layers  # lm_head: never run while calibrating


def test_one_pass_mode_collects_every_group_on_the_unchanged_block():
    """sequential=False: each group's statistic comes from the block as it was, even after earlier groups changed;
    the next block still receives the changed block's output."""
    ids = torch.randint(0, 384, (4, 24), generator=torch.Generator().manual_seed(0))

    class Zeroing:
        """Zeroes each group after recording its Hessian."""

        def __init__(self):
            self.hessians = {}

        def wants(self, name, module):
            return True

        def accumulator(self, module):
            return HessianAccumulator(module.in_features)

        def process(self, block_index, block, group):
            for name, (module, acc) in group.items():
                self.hessians[name] = acc.hessian
                with torch.no_grad():
                    module.weight.zero_()

    seen = {}
    for sequential in (True, False):
        model = tiny_model("llama")
        stage = Zeroing()
        run_layerwise(model, ids, stage, batch_size=2, sequential=sequential)
        seen[sequential] = stage.hessians
    down = "model.layers.0.mlp.down_proj"
    # sequential: gate/up were zeroed before down's inputs were collected, so down saw only zeros
    assert torch.count_nonzero(seen[True][down]) == 0
    assert torch.count_nonzero(seen[False][down]) > 0
    # block 1 follows block 0's changed output in both modes: its q/k/v input is the same
    q1 = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(seen[True][q1], seen[False][q1])


def test_one_pass_mode_is_refused_for_awq():
    from compressor.recipe import QuantizeConfig

    with pytest.raises(ValueError, match="sequential: false does not apply to AWQ"):
        QuantizeConfig(method="awq", sequential=False)
    assert not QuantizeConfig(method="gptq", sequential=False).sequential


@pytest.mark.parametrize("family,folds", [("llama", True), ("qwen3", True), ("gemma", True), ("gemma2", False)])
def test_folding_replayed_branches_into_the_block_inputs_is_exact(family, folds, monkeypatch):
    """A stage that keeps to its group lets the runner add a replayed child's outputs into the recorded block inputs
    (one buffer instead of two). It must do so only where the block really adds the child's output to its input
    (not through Gemma 2's post-norms), and every group must still be calibrated on its real inputs."""
    import compressor.sequential as seq

    folded = []
    fold = seq._fold

    def spy(block, child, captured, index, state):
        fold(block, child, captured, index, state)
        folded.append((index, child, isinstance(state.replays[child], seq._Zeros)))

    monkeypatch.setattr(seq, "_fold", spy)
    through = []
    passes = seq._passes_through
    monkeypatch.setattr(seq, "_passes_through", lambda *a: through.append(passes(*a)) or through[-1])
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (5, 24))

    class LocalScale(ScaleEachGroup):
        keeps_to_its_group = True

    rec = LocalScale()
    run_layerwise(model, ids, rec, batch_size=2)
    layers = model.config.num_hidden_layers
    assert folded and all(f == folds for _, _, f in folded)  # (Gemma 2's attention is not even replayed)
    if folds:
        assert [c for _, c, _ in folded] == ["self_attn", "mlp"] * layers
    # both branches folded: the block returns its input, so no pass computes the next block's inputs (and the real
    # inputs below show that block i + 1 still saw block i's outputs)
    assert through == [folds] * layers
    real = _real_linear_inputs(model, ids, set(rec.seen), 2)
    assert len(real) == 7 * layers
    for name, got in rec.seen.items():
        assert torch.allclose(got, real[name], atol=1e-4), name


@pytest.mark.parametrize("family,bounded", [("llama", True), ("gemma2", False)])
def test_bounded_recording_of_down_proj_inputs_gives_the_same_model_within_the_bound(family, bounded, monkeypatch):
    """Recording down_proj's inputs for only the batches that fit in the block inputs' size, and running the mlp again
    for the others, must change nothing but memory: every group sees the same inputs and the model ends bit for bit
    the same as with everything recorded; the recorded inputs never take more bytes than the block inputs. Gemma 2's
    attention is not replayed (post-norms), so running the mlp again would mean running the attention too: there
    everything is recorded, as before."""
    import compressor.sequential as seq

    limits, sizes = [], []

    class Rows(seq._Rows):
        def append(self, t):
            stored = super().append(t)
            if self.limit is not None and self.buffer is not None:
                sizes.append((self.buffer.numel() * self.buffer.element_size(), self.limit))
            return stored

    def tail_outputs(block, linear_name, child_name, rows, *args):
        limits.append(rows.limit)
        return outputs(block, linear_name, child_name, rows, *args)

    outputs = seq._tail_outputs
    monkeypatch.setattr(seq, "_tail_outputs", tail_outputs)
    monkeypatch.setattr(seq, "_Rows", Rows)
    ids = torch.randint(0, 384, (5, 24), generator=torch.Generator().manual_seed(0))

    class LocalScale(ScaleEachGroup):
        keeps_to_its_group = True

    results = {}
    for limit in (100.0, 1.0):
        monkeypatch.setattr(seq, "TAIL_RECORDING_LIMIT", limit)
        limits.clear()
        sizes.clear()
        model = tiny_model(family)
        rec = LocalScale()
        run_layerwise(model, ids, rec, batch_size=2)
        results[limit] = (rec.seen, model.state_dict())
    (seen_all, state_all), (seen, state) = results[100.0], results[1.0]
    assert seen.keys() == seen_all.keys()
    for name in seen:
        assert torch.equal(seen[name], seen_all[name]), name
    for k in state:
        assert torch.equal(state[k], state_all[k]), k
    # the last run (limit 1.0): one bounded tail per block (mlp; self_attn's o_proj inputs are as wide as the block's)
    block_inputs = 5 * 24 * model.config.hidden_size * 4
    layers = model.config.num_hidden_layers
    if bounded:
        assert len([x for x in limits if x is not None]) == 2 * layers and set(limits) == {block_inputs}
        assert sizes and all(size <= block_inputs for size, _ in sizes)
    else:
        assert limits == [None] * layers and not sizes


def test_a_block_that_does_more_than_add_its_folded_branches_is_still_run(monkeypatch):
    """Folding both branches makes a Llama block return its input; a block that also changes the sum afterwards
    (here a forward hook adds 1) must not be skipped: the next block's inputs come from running it."""
    import compressor.sequential as seq

    through = []
    passes = seq._passes_through
    monkeypatch.setattr(seq, "_passes_through", lambda *a: through.append(passes(*a)) or through[-1])
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.register_forward_hook(lambda m, a, out: (out[0] + 1,) + tuple(out[1:]) if isinstance(out, tuple)
                                    else out + 1)
    ids = torch.randint(0, model.config.vocab_size, (5, 24))

    class LocalScale(ScaleEachGroup):
        keeps_to_its_group = True

    rec = LocalScale()
    run_layerwise(model, ids, rec, batch_size=2)
    assert through == [False] * model.config.num_hidden_layers
    real = _real_linear_inputs(model, ids, set(rec.seen), 2)
    for name, got in rec.seen.items():
        assert torch.allclose(got, real[name], atol=1e-4), name


def test_a_stage_that_breaks_its_promise_to_keep_to_its_group_is_stopped():
    """Folded block inputs cannot be unfolded: a stage that says it keeps to its group and then changes a norm after
    a fold would silently calibrate later groups on wrong inputs; the runner refuses instead."""
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (4, 16))

    class Liar(Recorder):
        keeps_to_its_group = True

        def process(self, block_index, block, group):
            super().process(block_index, block, group)
            if any(n.endswith("gate_proj") for n in group):
                with torch.no_grad():
                    block.post_attention_layernorm.weight.mul_(2.0)

    with pytest.raises(RuntimeError, match="keeps to its group"):
        run_layerwise(model, ids, Liar(), batch_size=2)


@pytest.mark.parametrize("family,folds", [("llama", True), ("gemma2", False)])
def test_bfloat16_passes_give_each_group_its_real_inputs_and_still_fold(family, folds, monkeypatch):
    """With compute_dtype bfloat16 the block's products run under autocast: a float32 residual stream gets bfloat16
    branch outputs, which must still fold into it (a Llama block) and leave every group the inputs the autocast
    model really gives it; the stage's own work runs with autocast off."""
    import compressor.sequential as seq

    folded = []
    fold = seq._fold

    def spy(block, child, captured, index, state):
        fold(block, child, captured, index, state)
        folded.append(isinstance(state.replays[child], seq._Zeros))

    monkeypatch.setattr(seq, "_fold", spy)
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (5, 24))
    autocast_in = {"add": set(), "process": set()}

    class LocalScale(ScaleEachGroup):
        keeps_to_its_group = True

        def accumulator(self, module):
            acc = super().accumulator(module)
            add = acc.add
            acc.add = lambda x: autocast_in["add"].add(torch.is_autocast_enabled("cpu")) or add(x)
            return acc

        def process(self, block_index, block, group):
            autocast_in["process"].add(torch.is_autocast_enabled("cpu"))
            super().process(block_index, block, group)

    rec = LocalScale()
    run_layerwise(model, ids, rec, batch_size=2, compute_dtype=torch.bfloat16)
    assert autocast_in == {"add": {True}, "process": {False}}
    assert folded and all(f == folds for f in folded)
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = _real_linear_inputs(model, ids, set(rec.seen), 2)
    assert {x.dtype for x in rec.seen.values()} == {torch.float32, torch.bfloat16}  # down_proj's input: bfloat16
    for name, got in rec.seen.items():
        assert got.dtype == real[name].dtype, name
        assert torch.allclose(got.float(), real[name].float(), rtol=1e-2, atol=1e-3), name


def test_hessian_under_bfloat16_autocast_is_a_float32_sum_of_rounded_inputs():
    """Under bfloat16 autocast the Hessian multiplies the bfloat16-rounded inputs but sums in float32: for inputs of
    low rank (as attention outputs can be) it must stay positive semi-definite, which products returned in bfloat16
    do not (their rounding errors reach 2^-9 of the largest entries)."""
    torch.manual_seed(0)
    x = torch.randn(4096, 3) @ torch.randn(3, 96) + 10  # rank 4 with the offset: a singular 96x96 Hessian
    acc = HessianAccumulator(96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for part in x.split(1024):
            acc.add(part)
    rounded = x.bfloat16().double()
    want = 2 * rounded.T @ rounded / x.shape[0]
    h = acc.hessian.double()
    assert torch.allclose(h, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.linalg.eigvalsh(h).min() > -1e-6 * want.abs().max()
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # the setting is put back


def test_calibration_dtype_resolution(monkeypatch):
    from compressor.sequential import calibration_dtype

    model = tiny_model("llama")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert calibration_dtype("auto", model, "cpu") is torch.bfloat16
    assert calibration_dtype("float32", model, "cpu") is None
    assert calibration_dtype("float16", model, "cpu") is torch.float16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # bfloat16 would be slower here
    assert calibration_dtype("auto", model, "cpu") is None
    assert calibration_dtype("bfloat16", model, "cpu") is torch.bfloat16
    half = tiny_model("llama").to(torch.bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert calibration_dtype("auto", half, "cpu") is None  # already bfloat16: no autocast
    with pytest.raises(ValueError, match="calibration.precision"):
        calibration_dtype("bfloat16", model, "meta")
