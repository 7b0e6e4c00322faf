"""Distillation: the loss, recovery after pruning, zeros kept, early stopping, recipe checks and a whole run."""
from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from conftest import tiny_model

from compressor.algorithms.distillation import hidden_mse, logit_kl, teacher_top_k, top_k_kl
from compressor.algorithms.sparsity import sparsity_of
from compressor.recipe import DistillConfig, PruneConfig, Recipe, RecipeError
from compressor.stages.base import StageContext
from compressor.stages import distill as distill_stage
from compressor.stages.distill import apply_distill, learning_rate_factor
from compressor.stages.prune import apply_prune


def _windows(seed: int, n: int, seq: int = 48) -> torch.Tensor:
    return torch.randint(0, 384, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_logit_kl_is_the_token_mean_of_kl_and_scales_with_temperature():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    assert float(logit_kl(t, t)) == pytest.approx(0, abs=1e-6)
    p, q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    manual = (p * (p.log() - q)).sum(-1).mean()
    assert float(logit_kl(s, t)) == pytest.approx(float(manual), rel=1e-5)
    soft = (torch.softmax(t / 2, -1) * (torch.log_softmax(t / 2, -1) - torch.log_softmax(s / 2, -1))).sum(-1).mean()
    assert float(logit_kl(s, t, temperature=2.0)) == pytest.approx(4 * float(soft), rel=1e-5)
    assert float(hidden_mse(2 * t, t)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_kl_gradient_is_autograds_through_log_softmax(temperature):
    """The loss has a hand-written backward (softmax(z) - p): it must match autograd through the textbook formula."""
    g = torch.Generator().manual_seed(3)
    s, t = 4 * torch.randn(3, 6, 97, generator=g), 4 * torch.randn(3, 6, 97, generator=g)
    ours, ref = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (2 * logit_kl(ours, t, temperature)).backward()
    q, p = torch.log_softmax(ref / temperature, -1), torch.log_softmax(t / temperature, -1)
    (2 * (p.exp() * (p - q)).sum(-1).mean() * temperature ** 2).backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-7, rtol=1e-4)
    assert ours.grad.abs().max() > 1e-3  # the check compares real gradients, not zeros


def test_top_k_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_below_it():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 4, 50, generator=g), 3 * torch.randn(3, 4, 50, generator=g)
    for temperature in (1.0, 2.0):
        full = logit_kl(s, t, temperature)
        assert float(top_k_kl(s, *teacher_top_k(t, 50, temperature), temperature)) == pytest.approx(float(full),
                                                                                                   rel=1e-5)
        prev = 0.0
        for k in (1, 5, 20, 49):  # merging tokens can only lose divergence; keeping more tokens loses less
            part = float(top_k_kl(s, *teacher_top_k(t, k, temperature), temperature))
            assert prev - 1e-6 <= part <= float(full) + 1e-6
            prev = part
    s.requires_grad_(True)
    top_k_kl(s, *teacher_top_k(t, 50)).backward()  # nothing outside the kept tokens: gradients stay finite
    assert torch.isfinite(s.grad).all()
    top, ids, rest = teacher_top_k(t, 5)
    assert top.shape == ids.shape == (3, 4, 5) and rest.shape == (3, 4)
    assert torch.allclose(torch.logsumexp(torch.cat([top, rest[..., None]], -1), -1), torch.zeros(3, 4), atol=1e-5)
    assert float(top_k_kl(t, top, ids, rest)) == pytest.approx(0, abs=1e-5)


def test_precomputed_teacher_trains_like_the_live_one():
    """With top_k covering the vocabulary the precomputed targets are the live teacher's distribution, so the two
    modes follow the same trajectory; with the default top_k the student still learns."""
    teacher, student = _pruned_pair()
    vocab = teacher.config.vocab_size
    reports = {}
    for name, extra in {"live": {}, "full": {"teacher": "precomputed", "top_k": vocab},
                        "top64": {"teacher": "precomputed"}}.items():
        s = copy.deepcopy(student)
        cfg = DistillConfig(steps=20, lr=2e-3, schedule="constant", batch_size=4, eval_every=10, holdout=4,
                            hidden_weight=0.5, **extra)  # constant: 20 steps of a decaying rate learn too little
        reports[name] = apply_distill(cfg, s, StageContext(calibration=_windows(1, 36), teacher=teacher)).summary
    live, full, top64 = reports["live"], reports["full"], reports["top64"]
    assert full["teacher"] == "precomputed" and live["teacher"] == "live"
    assert full["holdout_kl_before"] == pytest.approx(live["holdout_kl_before"], rel=1e-4)
    assert full["holdout_kl_after"] == pytest.approx(live["holdout_kl_after"], rel=2e-2)
    assert top64["holdout_kl_after"] < 0.9 * top64["holdout_kl_before"]


def _pruned_pair(method: str = "magnitude"):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    apply_prune(PruneConfig(method=method, sparsity=0.5), student, StageContext(calibration=_windows(0, 16)))
    return teacher, student


def test_distillation_recovers_what_pruning_lost_and_keeps_the_zeros():
    teacher, student = _pruned_pair()
    zeros = {n: m.weight == 0 for n, m in student.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    cfg = DistillConfig(steps=60, lr=2e-3, batch_size=4, eval_every=20, holdout=4, patience=3)
    report = apply_distill(cfg, student, StageContext(calibration=_windows(1, 36), teacher=teacher))
    s = report.summary
    assert s["holdout_kl_after"] < 0.9 * s["holdout_kl_before"] and s["best_step"] > 0, s
    assert s["sparse_tensors_kept"] == len(zeros)
    for name, zero in zeros.items():
        w = student.get_submodule(name).weight
        assert (w[zero] == 0).all() and sparsity_of(w) == pytest.approx(0.5, abs=0.01)
    assert [r["step"] for r in report.layers] == [0, 20, 40, 60]
    # the embedding (and tied head) stayed as they were: train: blocks
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert not any(p.requires_grad for p in student.parameters())


def test_bfloat16_training_learns_like_float32_and_keeps_float32_weights(monkeypatch):
    """Autocast runs the passes in bfloat16 (checked: the loss sees bfloat16 logits), the weights and their updates
    stay float32, and the student recovers about as much as in float32."""
    teacher, student = _pruned_pair()
    seen = []
    real = distill_stage.logit_kl

    def spy(s, t, temperature=1.0):
        seen.append((s.dtype, t.dtype))
        return real(s, t, temperature)
    monkeypatch.setattr(distill_stage, "logit_kl", spy)
    summaries = {}
    for precision in ["float32", "bfloat16"]:
        s = copy.deepcopy(student)
        seen.clear()
        cfg = DistillConfig(steps=40, lr=2e-3, schedule="constant", batch_size=4, eval_every=20, holdout=4,
                            precision=precision)
        summaries[precision] = apply_distill(cfg, s, StageContext(calibration=_windows(1, 36), teacher=teacher)).summary
        train_dtypes = {d for d in seen if d != (torch.float32, torch.float32)}  # held-out KL: float32
        assert train_dtypes == ({(torch.bfloat16, torch.bfloat16)} if precision == "bfloat16" else set())
        assert all(p.dtype == torch.float32 for p in s.parameters())
        assert sparsity_of(s.model.layers[0].mlp.down_proj.weight) == pytest.approx(0.5, abs=0.01)
    f32, bf16 = summaries["float32"], summaries["bfloat16"]
    assert bf16["precision"] == "bfloat16" and f32["precision"] == "float32"
    assert bf16["holdout_kl_before"] == f32["holdout_kl_before"]  # the held-out KL is measured in float32
    assert bf16["holdout_kl_after"] < 0.9 * bf16["holdout_kl_before"]
    assert bf16["holdout_kl_after"] == pytest.approx(f32["holdout_kl_after"], rel=0.25)


def test_learning_rate_warms_up_then_decays_to_zero_over_the_steps_or_the_time_budget(monkeypatch):
    assert [learning_rate_factor("cosine", s, 4, 0.0) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert learning_rate_factor("cosine", 5, 4, 0.5) == pytest.approx(0.5)
    assert learning_rate_factor("cosine", 5, 4, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate_factor("linear", 5, 4, 0.25) == pytest.approx(0.75)
    assert learning_rate_factor("constant", 5, 4, 0.9) == 1.0
    teacher, student = _pruned_pair()
    for schedule in ("cosine", "constant"):
        cfg = DistillConfig(steps=60, lr=1e-3, schedule=schedule, batch_size=4, eval_every=20, holdout=4, patience=9)
        report = apply_distill(cfg, copy.deepcopy(student), StageContext(calibration=_windows(1, 36),
                                                                         teacher=teacher))
        lrs = [r["lr"] for r in report.layers[1:]]  # warmup is 3 steps (5% of 60)
        if schedule == "cosine":
            assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 60)) for s in (19, 39, 59)])
        else:
            assert lrs == [1e-3] * 3
    # with a time budget the decay follows the clock: the last step runs at a small fraction of the peak. The clock
    # is simulated (50 ms per reading) so that a slow or busy machine takes the same path.
    clock = iter(range(10**6))
    monkeypatch.setattr(distill_stage.time, "perf_counter", lambda: 0.05 * next(clock))
    cfg = DistillConfig(steps=100_000, lr=1e-3, batch_size=2, eval_every=100_000, holdout=4, max_minutes=0.1)
    report = apply_distill(cfg, student, StageContext(calibration=_windows(1, 36), teacher=teacher))
    assert report.summary["steps"] > 20 and report.layers[-1]["lr"] < 0.05e-3, report.layers


def test_divergence_stops_early_and_keeps_the_best_weights():
    teacher, student = _pruned_pair()
    before = copy.deepcopy(student.state_dict())
    cfg = DistillConfig(steps=100, lr=1.0, batch_size=2, eval_every=5, holdout=4, patience=2)
    report = apply_distill(cfg, student, StageContext(calibration=_windows(1, 20), teacher=teacher))
    s = report.summary
    assert s["steps"] == 10 and s["best_step"] == 0
    assert s["holdout_kl_after"] == s["holdout_kl_before"]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


def test_time_budget_stops_training_and_long_windows_are_cut_into_pieces():
    teacher, student = _pruned_pair()
    # 10 windows of 48 tokens at seq_len 16 give 30 windows: 4 held out, 26 to train on
    cfg = DistillConfig(steps=10_000, lr=1e-3, batch_size=2, seq_len=16, eval_every=1000, holdout=4,
                        max_minutes=0.02)
    start = time.perf_counter()
    report = apply_distill(cfg, student, StageContext(calibration=_windows(1, 10), teacher=teacher))
    assert time.perf_counter() - start < 30
    s = report.summary
    assert s["train_windows"] == 26
    assert s["warmup_steps"] == 25  # not 5% of 10 000 steps: the budget ends the run long before those
    assert 0 < s["steps"] < 10_000
    assert report.layers[-1]["step"] == s["steps"]  # the step that ran out of time was evaluated


def test_bad_distill_options_are_refused_early():
    base = {"model": "x", "calibration": {}}
    cases = [
        ([{"distill": {}}], "a first stage has no earlier model"),
        ([{"prune": {"sparsity": 0.5}}, {"distill": {"teacher_stage": 1}}], "teacher_stage 1: the teacher is the "
                                                                             "model before an earlier stage, 0 to 0"),
        ([{"prune": {"sparsity": 0.5}}, {"quantize": {}}, {"distill": {}}], "distill comes after a quantize stage"),
        ([{"prune": {"sparsity": 0.5}}, {"distill": {"stepz": 3}}], "unknown key"),
        ([{"prune": {"sparsity": 0.5}}, {"distill": {"precision": "fp16"}}], "float32.*bfloat16"),
    ]
    for stages, message in cases:
        with pytest.raises(RecipeError, match=message):
            Recipe.from_dict({**base, "stages": stages})
    with pytest.raises(RecipeError, match="needs a `calibration` section or its own `data`"):
        Recipe.from_dict({"model": "x", "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                                   {"distill": {}}]})
    Recipe.from_dict({"model": "x", "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                               {"distill": {"data": {"source": "python-docs"}}}]})


def test_compress_run_prunes_then_distills(model_dir_factory, tmp_path):
    from conftest import tiny_recipe

    from compressor.run import run
    from export.safetensors import load_checkpoint

    out = tmp_path / "run"
    recipe = tiny_recipe(model_dir_factory("qwen3"), out, export=[{"safetensors": {"format": "dense",
                                                                                   "dtype": "float32"}}])
    recipe["calibration"]["samples"] = 24
    recipe["stages"] = [{"prune": {"method": "wanda", "sparsity": 0.5}},
                        {"distill": {"steps": 20, "lr": 2e-3, "eval_every": 10, "holdout": 4}}]
    assert run(Recipe.from_dict(recipe)).passed
    report = json.loads((out / "report.json").read_text())
    distill = report["stages"][1]
    assert distill["kind"] == "distill"
    assert distill["summary"]["holdout_kl_after"] < distill["summary"]["holdout_kl_before"]
    loaded, _ = load_checkpoint(out / "safetensors-dense")
    pruned = report["stages"][0]["layers"]
    assert all(sparsity_of(loaded.get_submodule(r["name"]).weight) >= r["sparsity"] - 1e-6 for r in pruned)
    from compressor.run import inspect_artifact

    shown = inspect_artifact(out / "safetensors-dense")["sparse_layers"]
    assert set(shown) == {r["name"] for r in pruned} and all(v >= 0.49 for v in shown.values())
    assert "## Stage: distill" in (out / "report.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: streaming moves blocks between devices")
def test_a_teacher_on_the_cpu_streams_its_blocks_through_the_gpu():
    from compressor.offload import streamed

    teacher = tiny_model("llama")
    ids = _windows(2, 2)
    expected = teacher(input_ids=ids).logits
    seen = []
    hook = teacher.model.layers[1].register_forward_hook(
        lambda m, a, o: seen.append({p.device.type for p in teacher.model.layers.parameters()}))
    with streamed(teacher, "cuda"):
        got = teacher(input_ids=ids.cuda()).logits
    hook.remove()
    assert seen == [{"cpu", "cuda"}]  # while block 1 runs, the other blocks stay on the CPU
    assert {p.device.type for p in teacher.parameters()} == {"cpu"}
    assert torch.allclose(got.cpu(), expected, atol=1e-4)
