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


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter on the CPU)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,d,chunk", [(4, 2, 16, 512), (6, 2, 48, 16), (5, 5, 32, 32), (8, 1, 64, 48)])
def test_decode_attention_kernel_matches_the_reference(heads, kv_heads, d, chunk, dtype):
    """RoPE, the cache writes and attention in one kernel (split over the cache and merged when it is longer than
    `chunk`) against the same step through PyTorch's ops and SDPA: at the first position, one inside a split, the
    first of a split and the last of the cache; G = 3, 5 and 8 query heads per key/value head; head sizes that are
    not powers of two; two rows."""
    from compressor.kernels import fused_ops

    device = "cuda" if CUDA else "cpu"
    gen = torch.Generator().manual_seed(heads * 100 + d)
    b, t = 2, 64
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype).to(device) for f in (torch.cos, torch.sin))
    caches = [torch.randn(b, kv_heads, t, d, generator=gen).to(dtype).to(device) for _ in range(2)]
    for p in (0, 21, 32, t - 1):
        qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen).to(dtype).to(device)
        pos = torch.tensor([p], device=device)
        want_k, want_v = (c.clone() for c in caches)
        want = fused_ops.decode_attention(qkv, cos, sin, pos, want_k, want_v, heads, kv_heads, False)
        got_k, got_v = (c.clone() for c in caches)
        got = fused_ops.decode_attention(qkv.clone(), cos, sin, pos, got_k, got_v, heads, kv_heads, True, chunk)
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        assert torch.allclose(got_k, want_k, atol=tol, rtol=tol) and torch.equal(got_v, want_v), p
        assert not torch.equal(want_k[:, :, p], caches[0][:, :, p])  # the step's key did reach the cache
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        assert err < tol, (p, err)


COMPILE_ATTENTION = """
import re, subprocess, sys, tempfile
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from compressor.kernels import fused_ops

tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for arch in (80, 90):
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for heads, kv_heads, d, t in ((32, 8, 64, 512), (32, 8, 128, 4096), (14, 2, 64, 32768)):
            splits, chunk, consts = fused_ops.attention_constants(heads, kv_heads, d, t, dtype)
            p = "*" + name
            sig = dict(qkv_ptr=p, cos_ptr=p, sin_ptr=p, pos_ptr="*i64", kc_ptr=p, vc_ptr=p, out_ptr=p,
                       part_ptr="*fp32", stat_ptr="*fp32", stride_row="i32", T="i32", chunk="i32", scale="fp32")
            sig.update({k: "constexpr" for k in consts})
            kernel = triton_compile(ASTSource(fn=fused_ops._decode_attention_kernel, signature=sig, constexprs=consts),
                                    target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
            print(arch, name, heads, kv_heads, d, splits, " ".join(re.findall(r"(?:REG|STACK|LOCAL):\\d+", usage)))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_decode_attention_compiles_for_ampere_and_hopper_without_spilling():
    """Compiled for sm_80 and sm_90 with Triton's bundled ptxas (no GPU needed), as the decoder would launch it for
    1B, 8B and long-context shapes: no register spills (a stack frame or local memory would mean spills)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    done = subprocess.run([sys.executable, "-c", COMPILE_ATTENTION], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 18, done.stdout
    for line in lines:
        assert "REG:" in line and "STACK:0" in line and "LOCAL:0" in line, line
