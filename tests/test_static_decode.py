"""The static-cache decoder (the GPU decode benchmark's loop) computes what the Hugging Face model computes."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from compressor.evaluate.static_decode import StaticDecoder, UnsupportedModel
from compressor.kernels import use_fused_kernels
from compressor.quant.tensor import QuantLinear, quantize_rtn

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
FUSED = [False, True] if HAS_TRITON else [False]  # True: the Triton kernels (on the GPU, or interpreted on the CPU)


def _greedy_reference(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    ids = prompt.clone()
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids[None]).logits[0, -1]
            logits.append(out)
            ids = torch.cat([ids, out.argmax()[None]])
    return ids[len(prompt):].tolist(), torch.stack(logits)


@pytest.mark.parametrize("fused", FUSED, ids=["torch", "triton"][:len(FUSED)])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_static_decoder_follows_the_model(family, fused):
    from conftest import tiny_model

    over = {"attention_bias": True} if family == "llama" else {}
    device = "cuda" if fused and CUDA else "cpu"
    model = tiny_model(family, **over).to(device)
    prompt = torch.randint(0, 384, (5,), generator=torch.Generator().manual_seed(1)).to(device)
    want_ids, want_logits = _greedy_reference(model, prompt, 6)
    dec = StaticDecoder(model, max_len=32, fused=fused)
    # Feed the prompt one token at a time, then decode greedily.
    for t in prompt[:-1].tolist():
        dec.reset(t, int(dec.pos))
        dec.step()
    dec.reset(int(prompt[-1]), len(prompt) - 1)
    got = []
    for i in range(6):
        logits = dec.step()[0]
        assert torch.allclose(logits, want_logits[i], atol=2e-4, rtol=1e-4), f"step {i}"
        got.append(int(dec.tokens))
    assert got == want_ids


def test_quantized_projections_are_merged_and_decode_the_same():
    from conftest import tiny_model

    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear(quantize_rtn(m.weight.detach(), 4, 32, False)))
    prompt = torch.tensor([3, 17, 99])
    want_ids, _ = _greedy_reference(model, prompt, 4)
    assert not use_fused_kernels(model, torch.float32)
    dec = StaticDecoder(model, max_len=16, fused=False)
    assert type(dec.blocks[0]["qkv"]).__name__ == "FusedQuantLinear"  # one kernel for q, k and v
    assert dec.blocks[0]["qkv"].out_features == 64 + 2 * 32
    for i, t in enumerate(prompt.tolist()):
        dec.reset(t, i)
        dec.step()
    got = [int(dec.tokens)]
    for _ in range(3):
        dec.step()
        got.append(int(dec.tokens))
    assert got == want_ids


def test_other_architectures_are_refused():
    from conftest import tiny_model

    with pytest.raises(UnsupportedModel, match="gemma"):
        StaticDecoder(tiny_model("gemma"), max_len=16)
