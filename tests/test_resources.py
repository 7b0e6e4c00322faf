"""Resource profiles: FLOPs per token, energy from hardware counters only, cost per million tokens."""
from __future__ import annotations

import pytest
import torch

from compressor.evaluate import resources
from compressor.quant.tensor import QuantLinear, quantize_rtn


def test_flops_per_token_counts_linears_as_stored_and_attention():
    from conftest import tiny_model

    model = tiny_model("llama")  # hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 KV heads, vocabulary 384, tied
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k+v, o, gate/up/down
    f = resources.flops_per_token(model, context=100)
    assert f["linear"] == 2 * (2 * per_layer + 64 * 384)  # the tied head is a matmul; the embedding lookup is not
    assert f["attention"] == 4 * 100 * 4 * 16 * 2
    assert f["total"] == f["linear"] + f["attention"] and f["linear_nonzero"] <= f["linear"]
    # Pruning to 2:4 halves the nonzero FLOPs of a layer, not its dense FLOPs; quantized layers count the same.
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight.view(-1, 2)[:, 0] = 0
    mlp.gate_proj = QuantLinear(quantize_rtn(mlp.gate_proj.weight.detach(), 4, 32, True))
    g = resources.flops_per_token(model, context=100)
    assert g["linear"] == f["linear"]
    assert g["linear_nonzero"] == pytest.approx(f["linear"] - 64 * 128, rel=0.02)


def test_rapl_energy_is_read_with_wraparound(tmp_path):
    d = tmp_path / "intel-rapl:0"
    d.mkdir()
    (d / "energy_uj").write_text("999000000")
    (d / "max_energy_range_uj").write_text("1000000000")
    (tmp_path / "intel-rapl:0:0").mkdir()  # a subdomain (cores): part of the package, never added twice
    (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("5")
    meter = resources.cpu_energy_meter(tmp_path)
    assert isinstance(meter, resources.EnergyMeter) and "intel-rapl:0" in meter.source
    start = meter.read()
    (d / "energy_uj").write_text("1500000")  # wrapped: 1 J to the top, then 1.5 J
    assert meter.read() - start == pytest.approx(2.5)


def test_missing_energy_counters_say_why_instead_of_a_number(tmp_path):
    assert resources.cpu_energy_meter(tmp_path / "none").startswith("not measurable here: no RAPL counter")
    if not torch.cuda.is_available():
        assert resources.gpu_energy_meter().startswith("not measurable here")


def test_cost_per_million_tokens():
    assert resources.cost_per_million_tokens(10.0, 3.6) == pytest.approx(10.0)  # 1e6 tokens x 10 ms = 10000 s
    assert resources.cost_per_million_tokens(10.0, None) is None
    assert resources.cost_per_million_tokens(None, 2.0) is None
