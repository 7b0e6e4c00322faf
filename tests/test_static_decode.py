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
    # A position past the cache (the caller's error) writes nothing outside it.
    big = torch.full((2, kv_heads, t + 8, d), 7.0, dtype=dtype, device=device)
    big_k, big_v = big[:, :, :t].contiguous(), big[:, :, :t].contiguous()
    fused_ops.decode_attention(qkv, cos, sin, torch.tensor([t + 3], device=device), big_k, big_v, heads, kv_heads,
                               True, chunk)
    assert (big_k == 7).all() and (big_v == 7).all()


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability() < (9, 0),
                    reason="programmatic dependent launch needs a GPU of compute capability 9.0+")
def test_a_captured_decode_gives_the_same_logits_with_programmatic_dependent_launches(monkeypatch):
    """GPU only. A 4-bit decoder's steps as CUDA graphs, its kernels launched as programmatic dependent launches or
    plainly (COMPRESSOR_CUDA_PDL=0). A read before the previous kernel's write (a missing wait) would read another
    step's or layer's values; split-K's atomic sums differ only in their last bits."""
    from conftest import tiny_model

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=32)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "layers" in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear(quantize_rtn(m.weight.detach(), 4, 64, False)))
    model = model.half().cuda()
    assert not use_fused_kernels(model, torch.float16)
    # Default configurations, no tuning (minutes of compiles in a test): at batch 1 the Triton GEMV with split-K,
    # whose workspace every launch of a shape shares. The CUDA C++ kernel's PDL is bench_gpu.py's canary's.
    monkeypatch.setenv("COMPRESSOR_KERNEL_TUNING", "0")
    runs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("COMPRESSOR_CUDA_PDL", flag)
        dec = StaticDecoder(model, max_len=600, fused=True)  # 600 positions: the attention splits over the cache
        dec.reset(7, 0)
        dec.capture()
        dec.reset(7, 0)
        runs.append(torch.stack([dec.run(1).clone() for _ in range(16)]))
    assert runs[0].isfinite().all()
    err = (runs[0].float() - runs[1].float()).norm(dim=-1) / runs[1].float().norm(dim=-1)
    assert err.max() < 1e-2, err


COMPILE = """
import json, re, subprocess, sys, tempfile
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile
from compressor.kernels import fused_ops, triton_qmm
from compressor.kernels.layout import SUB

tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def build(name, fn, sig, consts, arch, warps=4, stages=3):  # as launched: Triton's default stages, or the GEMV's
    sig = dict(sig, **{k: "constexpr" for k in consts})
    pdl = bool(consts.get("PDL"))
    kernel = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": stages, "launch_pdl": pdl})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    print(json.dumps({"name": name, "arch": arch, "pdl": pdl, "spills": re.findall(r"(?:STACK|LOCAL):(\\d+)", usage),
                      "wait": wait >= 0, "release": "griddepcontrol.launch_dependents" in ptx,
                      "loads_before_wait": ptx[:wait].count("ld.global") if wait >= 0 else None,
                      "loads": ptx.count("ld.global")}))


for arch in (80, 90):
    pdl = arch >= 90
    for dtype, ty in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        p = "*" + ty
        for heads, kv_heads, d, t in ((32, 8, 64, 512), (32, 8, 128, 4096), (14, 2, 64, 32768)):
            splits, chunk, consts = fused_ops.attention_constants(heads, kv_heads, d, t, dtype)
            build(f"attention {ty} {heads}/{kv_heads}x{d} T{t}", fused_ops._decode_attention_kernel,
                  dict(qkv_ptr=p, cos_ptr=p, sin_ptr=p, pos_ptr="*i64", kc_ptr=p, vc_ptr=p, out_ptr=p,
                       part_ptr="*fp32", stat_ptr="*fp32", stride_row="i32", T="i32", chunk="i32", scale="fp32"),
                  dict(consts, PDL=pdl), arch)
        build(f"combine {ty}", fused_ops._attention_combine_kernel, dict(part_ptr="*fp32", stat_ptr="*fp32", out_ptr=p),
              dict(D=128, DP=128, SPLITS=8, SP=8, PDL=pdl), arch)
        build(f"add_rmsnorm {ty}", fused_ops._add_rmsnorm_kernel,
              dict(h_ptr=p, d_ptr=p, w_ptr=p, out_ptr=p, H="i32", eps="fp32"),
              dict(HAS_DELTA=True, BLOCK=4096, PDL=pdl), arch)
        build(f"silu_mul {ty}", fused_ops._silu_mul_kernel, dict(gu_ptr=p, out_ptr=p, inter="i32"),
              dict(BLOCK=1024, PDL=pdl), arch)
        if dtype != torch.float32:
            for split in (1, 4):
                build(f"gemv {ty} split {split}", triton_qmm._gemv_kernel,
                      dict(x_ptr=p, w_ptr="*i32", s_ptr=p, z_ptr=p, perm_ptr="*i32", bias_ptr=p, out_ptr=p,
                           ws_ptr="*fp32", count_ptr="*i32", M="i32", N="i32", K="i32", tiles_per_split="i32",
                           stride_xm="i32", stride_om="i32"),
                      dict(group_size=128, BITS=4, SUBR=SUB, BLOCK_N=32, GROUP_SLABS=triton_qmm.slabs_per_group(4, 128),
                           EVEN_K=True, HAS_PERM=False, HAS_BIAS=False, SPLIT=split,
                           HALF2=triton_qmm.two_codes_possible(4, dtype), ASM=True, PDL=pdl,
                           AHEAD=triton_qmm.two_codes_possible(4, dtype), SWIGLU=split == 4), arch, warps=2,
                      stages=1)
            build(f"dequant {ty}", triton_qmm._dequant_kernel,
                  dict(w_ptr="*i32", s_ptr=p, z_ptr=p, out_ptr=p, N="i32", K="i32", group_size="i32"),
                  dict(BITS=4, SUBR=SUB, BLOCK_N=128), arch)
"""


@pytest.mark.skipif(not HAS_TRITON or CUDA, reason="needs triton; on a GPU the kernels run for real instead")
def test_decode_kernels_compile_for_ampere_and_hopper_without_spilling_and_wait_before_reading():
    """The Triton kernels of a decode step compiled for sm_80 and sm_90 with Triton's bundled ptxas (no GPU needed):
    the attention as the decoder would launch it for 1B, 8B and long-context shapes, the norms, the SwiGLU, the
    4-bit GEMV and the dequantization of the dense (prefill) path. No register spills (a stack frame or local
    memory). On sm_90 they are programmatic dependent launches: each waits for the previous kernel
    (griddepcontrol.wait), then lets the next one launch; only the GEMV (its first weights) and the RMSNorm (its
    norm weights) load anything before the wait."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    done = subprocess.run([sys.executable, "-c", COMPILE], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(rows) == 2 * (3 * 6 + 2 * 3), done.stdout
    for r in rows:
        assert r["spills"] and set(r["spills"]) == {"0"}, r
        assert r["wait"] == r["release"] == r["pdl"], r
        if r["pdl"]:
            kind, before = r["name"].split()[0], r["loads_before_wait"]
            if kind == "add_rmsnorm":  # of its three equal loads (norm weight, residual, delta) only the weight
                assert 3 * before == r["loads"], r
            elif kind == "gemv":  # the first tile's words (32 x 32 over 64 threads: 16 each), in float16 its group
                # pair's scales and zeros (4), nothing else
                assert 16 <= before <= (20 if "fp16" in r["name"] else 16) < r["loads"], r
            else:
                assert before == 0, r
