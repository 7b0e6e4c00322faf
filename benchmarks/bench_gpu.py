#!/usr/bin/env python
"""GPU check of the fused low-bit kernels, 2:4 sparsity and end-to-end decode, in one call of a few minutes.

1. Ceilings: device-to-device copy bandwidth (bytes read + written) on this card.
2. Kernels against cuBLAS fp16 (`F.linear`) on Llama-like shapes, K, N in {4096, 8192, 14336}, batch 1, 4, 16, 64:
   4-bit and 8-bit weights, groups of 128, float16 activations; every timing is the median of
   `triton.testing.do_bench` (L2 flushed before each run); every kernel result is checked against float32 on fresh
   random inputs first. At batch 1 the achieved bandwidth (packed weights + scales + zeros + activations + output,
   over time) is given as a fraction of the copy bandwidth.
3. 2:4 sparsity: `torch.sparse.to_sparse_semi_structured` weights against the dense fp16 matmul.
4. End-to-end batch-1 decode of a ~1.1B-parameter Llama-shaped model (random weights; hidden 2048, MLP 8192,
   16 layers, 32 heads / 8 KV heads, vocabulary 32000): fp16, 4-bit (g128, all decoder projections; embedding and
   head stay fp16) and 2:4 sparse, each as one CUDA graph per step (compressor.evaluate.static_decode), plus
   prefill tokens/s of 512 tokens through the model's forward. The decode attention kernel is checked against SDPA
   first, and the 4-bit model is timed with it and with SDPA (the same run's A/B); the fp16 and 4-bit steps are
   broken down by kernel (profiler).

    python benchmarks/bench_gpu.py [--out DIR] [--budget-s 400]
    python benchmarks/bench_gpu.py --cpu-check     # the same code paths on tiny shapes, on the CPU (Triton interpreter)

Writes DIR/gpu_results.json (all numbers, chosen kernel configurations) and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu")
    ap.add_argument("--budget-s", type=float, default=400, help="stop starting new measurements after this")
    ap.add_argument("--cpu-check", action="store_true", help="tiny shapes on the CPU through Triton's interpreter")
    ap.add_argument("--sections", default="ceilings,kernels,sparse,decode")
    ap.add_argument("--kernel-bits", default="4,8", help="weight widths of the kernel table")
    ap.add_argument("--kernel-s", type=float, default=None, help="stop starting kernel shapes after this long")
    ap.add_argument("--batches", default="1,4,16,64", help="activation rows of the kernel table")
    ap.add_argument("--untuned-prefill", action="store_true",
                    help="prefill of the quantized model with the default kernel configurations (saves tuning time)")
    args = ap.parse_args()
    if args.cpu_check:
        from compressor.kernels import interpreter

        interpreter.enable()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.cpu_check
    if not cuda and not args.cpu_check:
        print("no CUDA GPU: run with --cpu-check for the CPU dry run")
        return 2
    results: dict = {"env": env(torch, cuda), "budget_s": args.budget_s,
                     "kernel_bits": [int(b) for b in args.kernel_bits.split(",")], "kernel_s": args.kernel_s,
                     "batches": [int(b) for b in args.batches.split(",")], "sections": args.sections.split(","),
                     "prefill_tuning": not args.untuned_prefill}
    out_file = args.out / "gpu_results.json"

    def save() -> None:
        from compressor.kernels import triton_available

        if triton_available():  # every candidate's time per tuned (batch bucket, shape): why a configuration won
            from compressor.kernels.triton_qmm import TUNING_LOG

            results["tuning"] = {str(k): [(str(c), us) for c, us in v[:8]]  # and the CUDA C++ kernel's best
                                 + [(str(c), us) for c, us in v[8:] if c.mma][:1] for k, v in TUNING_LOG.items()}
        out_file.write_text(json.dumps(results, indent=2, default=str))

    sections = args.sections.split(",")
    deadline = START + args.budget_s
    if cuda:
        results["cuda_kernel_canary"] = cuda_kernel_canary()
    for name, fn in (("ceilings", ceilings), ("kernels", kernels), ("sparse", sparse), ("decode", decode)):
        if name not in sections:
            continue
        if time.perf_counter() > deadline:
            results[name] = {"skipped": "time budget spent"}
            continue
        log(f"== {name}")
        store: dict = {}  # filled as the section goes: what was measured before an error is kept
        results[name] = store
        try:
            fn(torch, cuda, results, deadline, store)
        except Exception as e:  # one broken section must not cost the others' numbers
            import traceback

            traceback.print_exc()
            store["error"] = repr(e)
        save()
    print(summary(results))
    (args.out / "gpu_summary.md").write_text(summary(results))
    log(f"wrote {out_file}")
    return 0


CANARY_IMPORTS = """
import torch
from compressor.kernels import pack_for_kernel, reference, triton_qmm
from compressor.quant.tensor import quantize_rtn
"""
CANARY = CANARY_IMPORTS + """
import os
os.environ["COMPRESSOR_CUDA_PDL"] = "0"  # plain launches only: programmatic dependent launches are CANARY_PDL's
worst = 0.0
for dtype in (torch.float16, torch.bfloat16):
    for m, gs, split in ((1, 128, 1), (1, 128, 4), (13, 32, 3), (40, -1, 2)):
        qt = quantize_rtn(torch.randn(1024, 2048), 4, gs, symmetric=False)
        kw = pack_for_kernel(qt, dtype).to("cuda")
        x = torch.randn(m, 2048, device="cuda", dtype=dtype)
        cfg = triton_qmm.Config(8 if m <= 8 else 16, 32, split, 4, 2, mma=True)
        y = triton_qmm.quant_matmul(x, kw, config=cfg)
        exact = x.double() @ reference.dequantize(kw).double()
        worst = max(worst, float((y.double() - exact).norm() / exact.norm()))
from compressor.kernels import fused_ops  # the SwiGLU prologue of a down projection
gate_up = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
qt = quantize_rtn(torch.randn(1024, 2048), 4, 128, symmetric=False)
kw = pack_for_kernel(qt, torch.float16).to("cuda")
y = triton_qmm.quant_matmul(gate_up, kw, config=triton_qmm.Config(8, 32, 2, 4, 2, mma=True), swiglu=True)
exact = fused_ops.silu_mul(gate_up, True).double() @ reference.dequantize(kw).double()
worst = max(worst, float((y.double() - exact).norm() / exact.norm()))
torch.cuda.synchronize()
print("worst relative error", worst)
assert worst < 1.5e-2, worst
"""
# Programmatic dependent launches, eagerly and captured in a CUDA graph, after the plain launches passed: the CUDA
# C++ kernel, then the Triton kernels of a decode step chained (RMSNorm, GEMV, SwiGLU, attention).
CANARY_PDL = CANARY_IMPORTS + """
import os
qt = quantize_rtn(torch.randn(1024, 2048), 4, 128, symmetric=False)
kw = pack_for_kernel(qt, torch.float16).to("cuda")
err = 0.0
if os.environ.get("COMPRESSOR_CUDA_KERNELS", "1") != "0":  # the CUDA C++ kernel passed its plain canary
    x = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
    cfg = triton_qmm.Config(8, 32, 4, 4, 2, mma=True, pdl=True)
    want = reference.quant_matmul(x, kw).float()
    y = triton_qmm.quant_matmul(x, kw, config=cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = triton_qmm.quant_matmul(x, kw, config=cfg)
    graph.replay()
    torch.cuda.synchronize()
    err = max(float((v.float() - want).norm() / want.norm()) for v in (y, z))
    assert err < 2e-3, err
from compressor.kernels import fused_ops
h = torch.randn(1, 2048, device="cuda", dtype=torch.float16)
delta, w = torch.randn_like(h), torch.rand(2048, device="cuda", dtype=torch.float16) + 0.5
kv = [torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.float16) for _ in range(2)]
cos, sin = torch.rand(256, 64, device="cuda", dtype=torch.float16), torch.rand(256, 64, device="cuda",
                                                                                dtype=torch.float16)
pos = torch.tensor([100], device="cuda")
gemv = triton_qmm.Config(1, 32, 4, 2, 1, gemv=True)


def chain(fused):
    hh, cache = h.clone(), [c.clone() for c in kv]
    r = fused_ops.add_rmsnorm(hh, delta, w, 1e-5, fused)
    y = triton_qmm.quant_matmul(r, kw, config=gemv) if fused else reference.quant_matmul(r, kw)
    qkv = fused_ops.silu_mul(y, fused)  # [1, 512]: 4 query heads of 64, 2 key and 2 value heads
    return hh, fused_ops.decode_attention(qkv, cos, sin, pos, *cache, 4, 2, fused, chunk=64)


want = chain(False)
got = chain(True)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = chain(True)
graph.replay()
torch.cuda.synchronize()
errs = [err] + [float((a.float() - b.float()).norm() / b.float().norm()) for v in (got, captured)
                for a, b in zip(v, want)]
print("programmatic dependent launch: relative errors", errs)
assert all(e < 1e-2 for e in errs), errs  # (a NaN fails too)
"""


def cuda_kernel_canary() -> dict:
    """Run the CUDA C++ kernel once in a child process: a fault there (a sticky CUDA error would end this process's
    use of the GPU) or a wrong result turns its candidates off here (COMPRESSOR_CUDA_KERNELS=0) instead of costing
    the run."""
    import shutil
    import subprocess

    def child(code: str, wrapper: list[str] = (), timeout: int = 120) -> tuple[bool, str]:
        try:
            p = subprocess.run([*wrapper, sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=timeout, cwd=ROOT)
            return p.returncode == 0, (p.stdout + p.stderr)[-3000:]
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout} s"

    t = time.perf_counter()
    ok, tail = child(CANARY)
    if not ok:
        os.environ["COMPRESSOR_CUDA_KERNELS"] = "0"
    log(f"CUDA C++ kernel canary: {'passed' if ok else 'FAILED, its candidates are off'} "
        f"({time.perf_counter() - t:.1f} s): {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    out = {"passed": ok, "output": tail, "seconds": round(time.perf_counter() - t, 1)}
    sanitizer = shutil.which("compute-sanitizer") or next(
        (p for p in ("/usr/local/cuda/bin/compute-sanitizer",) if os.path.exists(p)), None)
    if not ok and sanitizer:  # where it went wrong, for the next session: bad accesses, with the kernel's line
        _, report = child(CANARY, [sanitizer, "--tool", "memcheck", "--print-limit", "10"], timeout=180)
        out["sanitizer"] = report
        print(report[-2000:], flush=True)
    import torch

    if torch.cuda.get_device_capability() >= (9, 0):
        pdl_ok, pdl_tail = child(CANARY_PDL)
        if not pdl_ok:
            os.environ["COMPRESSOR_CUDA_PDL"] = "0"
        log(f"programmatic dependent launch: {'passed' if pdl_ok else 'FAILED, off for this run'}: "
            f"{pdl_tail.strip().splitlines()[-1] if pdl_tail.strip() else ''}")
        out.update(pdl_passed=pdl_ok, pdl_output=pdl_tail)
    return out


def env(torch, cuda: bool) -> dict:
    import platform

    import triton

    e = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        e.update(gpu=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1),
                 capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    log(str(e))
    return e


def timer(torch, cuda: bool):
    """Median microseconds of fn(): do_bench (L2 flushed before each run) on CUDA, wall clock on the CPU."""
    if cuda:
        from triton.testing import do_bench

        return lambda fn, rep=40: do_bench(fn, warmup=10, rep=rep, return_mode="median") * 1000

    def cpu(fn, rep=0):
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e6
    return cpu


# ----------------------------------------------------------------------------------------------- 1. ceilings
def ceilings(torch, cuda, results, deadline, store) -> None:
    n = (1 << 30) if cuda else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device="cuda" if cuda else "cpu").random_()
    dst = torch.empty_like(src)
    us = timer(torch, cuda)(lambda: dst.copy_(src), rep=100)
    bw = 2 * n / (us * 1e-6) / 1e9
    log(f"copy {n / 2**30:.2f} GiB: {us:.0f} us -> {bw:.0f} GB/s (read + written)")
    store.update(copy_bytes=n, copy_us=us, copy_gbps=bw)


# ----------------------------------------------------------------------------------------------- 2. kernels
def random_kernel_weight(torch, n: int, k: int, bits: int, group: int, device: str, dtype):
    """Random codes, zeros and positive scales: timing does not depend on values, and correctness is checked against
    the same codes dequantized."""
    from compressor.kernels import pack_for_kernel
    from compressor.quant.tensor import QuantizedTensor

    groups = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, device=device)
    scales = (torch.rand(n, groups, device=device) * 0.02 + 0.005).half()
    zeros = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, device=device)
    return pack_for_kernel(QuantizedTensor(codes, scales, zeros, bits, group, False), dtype)


def kernels(torch, cuda, results, deadline, store) -> None:
    import torch.nn.functional as F

    from compressor.kernels import reference, triton_qmm
    from compressor.kernels.layout import KernelWeight
    from compressor.kernels.timing import copies_for, graph_time_us

    dev = "cuda" if cuda else "cpu"
    dims = (4096, 8192, 14336) if cuda else (256, 448)
    batches = results["batches"] if cuda else (1, 16)
    rows = store.setdefault("rows", [])
    store["timing"] = ("GPU time per call inside a CUDA graph, each call reading its own copy of the weights "
                       "(copies together >= 256 MB, so cold in L2); median of 5 replays" if cuda else "CPU wall clock")
    copy_gbps = results.get("ceilings", {}).get("copy_gbps")

    def timed(calls):
        if cuda:
            return graph_time_us(calls)
        return timer(torch, cuda)(calls[0])

    section_end = time.perf_counter() + results["kernel_s"] if results.get("kernel_s") else deadline
    for bits in results.get("kernel_bits", (4, 8)):
        for k in dims:
            for n in dims:
                # Time is kept for the sections after this one (decode's tuning and timing take ~2 minutes, its
                # A/Bs of the attention kernel and of PDL half a minute more).
                reserve = (150 if bits == 4 else 170) if {"sparse", "decode"} & set(results["sections"]) else 0
                if time.perf_counter() > min(section_end, deadline - reserve):
                    log(f"kernels: budget reached before {bits}-bit {k}x{n}")
                    break
                if bits == 8 and not (k == n or (k, n) == (4096, 14336)):
                    continue  # 8-bit on a subset: the acceptance is on 4-bit
                w16s = [torch.randn(n, k, device=dev).half() * 0.02 for _ in range(copies_for(n * k * 2, 16))]
                kw = random_kernel_weight(torch, n, k, bits, 128, dev, torch.float16)
                kws = [kw] + [KernelWeight(kw.qweight.clone(), kw.scales.clone(), kw.zeros.clone(), None, bits,
                                           kw.group_size, k, n) for _ in range(copies_for(kw.nbytes()) - 1)]
                wq = reference.dequantize(kw).float()  # [k, n]
                for m in batches:
                    if bits == 8 and m not in (1, 16):
                        continue
                    x = torch.randn(m, k, device=dev).half()
                    y = triton_qmm.quant_matmul(x, kw)  # tunes this (batch bucket, shape) on the device
                    exact = x.float() @ wq
                    err = float((y.float() - exact).norm() / exact.norm())
                    cfg = triton_qmm.tuned_config(m, kw, torch.float16)
                    t_ours = timed([lambda x=x, w=w, cfg=cfg: triton_qmm.quant_matmul(x, w, config=cfg) for w in kws])
                    t_fp16 = timed([lambda x=x, w=w: F.linear(x, w) for w in w16s])
                    nbytes = kw.nbytes() + x.numel() * 2 + m * n * 2
                    gbps = nbytes / (t_ours * 1e-6) / 1e9
                    row = {"bits": bits, "k": k, "n": n, "m": m, "fp16_us": t_fp16, "ours_us": t_ours,
                           "speedup": t_fp16 / t_ours, "rel_err": err, "config": str(cfg), "gbps": gbps,
                           "fp16_gbps": n * k * 2 / (t_fp16 * 1e-6) / 1e9,
                           "of_copy_bw": gbps / copy_gbps if copy_gbps else None}
                    # The fastest of each kernel, with two codes per instruction and with one, in this shape's
                    # tuning: what the two-codes path gave.
                    tried = triton_qmm.TUNING_LOG.get((triton_qmm.bucket(m), k, n, bits, kw.group_size, False,
                                                       torch.float16), [])
                    for variant, gemv, two in (("gemv_half2_us", True, True), ("gemv_fp32_us", True, False),
                                               ("mma_half2_us", False, True), ("mma_fp16_us", False, False)):
                        row[variant] = min((us for c, us in tried if c.gemv == gemv and c.one_dot and not c.mma
                                            and triton_qmm.half2_applies(c, bits, torch.float16) == two),
                                           default=None)
                    # The CUDA C++ kernel (cuda_qmm.py) against the best Triton kernel, in the same tuning.
                    row["cuda_us"] = min((us for c, us in tried if c.mma), default=None)
                    row["triton_us"] = min((us for c, us in tried if not c.mma), default=None)
                    rows.append(row)
                    log(f"W{bits} k{k} n{n} m{m}: fp16 {t_fp16:.1f} us, ours {t_ours:.1f} us "
                        f"({row['speedup']:.2f}x, {gbps:.0f} GB/s), err {err:.1e}, {cfg}; best in tuning: CUDA C++ "
                        f"{row['cuda_us']} us, Triton {row['triton_us']} us; GEMV "
                        f"two codes per instruction {row['gemv_half2_us']} us, one {row['gemv_fp32_us']} us; "
                        f"tensor cores two {row['mma_half2_us']} us, one {row['mma_fp16_us']} us")
                del w16s, kw, kws, wq


# ----------------------------------------------------------------------------------------------- 3. 2:4 sparse
def two_four(torch, w):
    """Keep the 2 largest of every 4 consecutive weights along the input dimension (the project's 2:4 selection)."""
    from compressor.algorithms.sparsity import n_m_mask

    return w.masked_fill(n_m_mask(w.abs(), 2, 4), 0)


def sparse(torch, cuda, results, deadline, store) -> None:
    import torch.nn.functional as F

    if not cuda:
        store["skipped"] = "semi-structured sparsity needs a CUDA GPU (compute capability 8.0+)"
        return
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from compressor.kernels.timing import copies_for, graph_time_us

    def graph_or_eager(calls):
        try:
            return graph_time_us(calls), "graph"
        except Exception:  # a sparse backend that cannot be captured: timed eagerly, launch overhead included
            torch.cuda.synchronize()
            return timer(torch, cuda)(calls[0]), "eager"

    store["backend"] = "CUTLASS" if SparseSemiStructuredTensor._FORCE_CUTLASS else "cuSPARSELt"
    rows = store.setdefault("rows", [])
    shapes = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
    for k, n in shapes:
        ws_dense = [two_four(torch, torch.randn(n, k, device="cuda").half() * 0.02)
                    for _ in range(copies_for(n * k * 2, 16))]
        wss = [to_sparse_semi_structured(w) for w in ws_dense]
        w, ws = ws_dense[0], wss[0]
        for m in (1, 16, 64, 512):
            if time.perf_counter() > deadline - 80:
                break
            x = torch.randn(m, k, device="cuda").half()
            try:
                err = float((F.linear(x, ws).float() - F.linear(x, w).float()).norm()
                            / F.linear(x, w).float().norm())
                t_sparse, how = graph_or_eager([lambda x=x, w=w: F.linear(x, w) for w in wss])
            except Exception as e:  # e.g. a batch the sparse kernels reject
                rows.append({"k": k, "n": n, "m": m, "error": repr(e)[:200]})
                log(f"2:4 k{k} n{n} m{m}: {e!r}"[:300])
                continue
            t_dense, _ = graph_or_eager([lambda x=x, w=w: F.linear(x, w) for w in ws_dense])
            rows.append({"k": k, "n": n, "m": m, "dense_us": t_dense, "sparse_us": t_sparse,
                         "speedup": t_dense / t_sparse, "rel_err": err, "sparse_timing": how})
            log(f"2:4 k{k} n{n} m{m}: dense {t_dense:.1f} us, sparse {t_sparse:.1f} us "
                f"({t_dense / t_sparse:.2f}x, {how}), err {err:.1e}")


# ----------------------------------------------------------------------------------------------- 4. decode
def llama_1b(torch, cuda: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cuda:
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                          tie_word_embeddings=False)
    else:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                          tie_word_embeddings=False)
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model


def quantize_decoder_layers(torch, model, bits: int, group: int, dtype) -> None:
    """Every projection of the decoder blocks as random 4-bit codes in a FusedQuantLinear (speed only)."""
    from compressor.kernels.module import FusedQuantLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            kw = random_kernel_weight(torch, m.out_features, m.in_features, bits, group, m.weight.device, dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FusedQuantLinear(kw))


def dequantized_copy(torch, model):
    """The same model with each FusedQuantLinear replaced by an nn.Linear holding its dequantized weight."""
    import copy

    from compressor.kernels import reference
    from compressor.kernels.module import FusedQuantLinear

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, FusedQuantLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False, device=m.qweight.device,
                                  dtype=m.scales.dtype)
            lin.weight.data = reference.dequantize(m.kernel_weight()).t().contiguous()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


def sparsify(torch, module):
    from torch.sparse import to_sparse_semi_structured

    if type(module) is not torch.nn.Linear:
        return module
    module.weight = torch.nn.Parameter(to_sparse_semi_structured(two_four(torch, module.weight.detach())),
                                       requires_grad=False)
    return module


def weight_bytes(mod) -> int:
    return sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers()))


def step_breakdown(torch, dec, steps: int = 8, top: int = 14) -> list[dict]:
    """GPU time per decode step by kernel name (graph replays under the profiler): where a step's time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.run(steps)
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        us = e.time_range.elapsed_us()  # a kernel event: its own duration on the device
        t = totals.setdefault(e.name, [0.0, 0])
        t[0] += us
        t[1] += 1
    rows = [{"kernel": name[:90], "us_per_step": round(us / steps, 2), "launches_per_step": n / steps}
            for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    total = sum(r["us_per_step"] for r in rows)
    launches = sum(r["launches_per_step"] for r in rows)
    return [{"kernel": "all kernels", "us_per_step": round(total, 1), "launches_per_step": launches}] + rows[:top]


def attention_check(torch, dev: str, dtype, max_len: int) -> bool | str:
    """The decode attention kernel against PyTorch's rotation and SDPA on the 1B model's shapes (one program per
    head and split over the cache): True, or why not."""
    from compressor.kernels import fused_ops

    heads, kv_heads, d = 32, 8, 64
    try:
        cos, sin = (torch.randn(max_len, d, device=dev).to(dtype) for _ in range(2))
        cache = [torch.randn(1, kv_heads, max_len, d, device=dev).to(dtype) for _ in range(2)]
        for p in (0, max_len * 2 // 5, max_len - 1):
            for chunk in (fused_ops.ATTENTION_CHUNK, max_len // 4):  # one program per head; four splits
                qkv = torch.randn(1, (heads + 2 * kv_heads) * d, device=dev).to(dtype)
                pos = torch.tensor([p], device=dev)
                want_c, got_c = [c.clone() for c in cache], [c.clone() for c in cache]
                want = fused_ops.decode_attention(qkv, cos, sin, pos, *want_c, heads, kv_heads, False).float()
                got = fused_ops.decode_attention(qkv, cos, sin, pos, *got_c, heads, kv_heads, True, chunk).float()
                err = float((got - want).abs().max() / want.abs().max())
                cerr = max(float((g - w).abs().max()) for g, w in zip(got_c, want_c))
                if not err < 1e-2 or not cerr < 1e-2:
                    return f"wrong at position {p}, chunk {chunk}: rel err {err:.2e}, cache err {cerr:.2e}"
        if dev == "cuda":
            torch.cuda.synchronize()
        log("decode attention kernel: matches SDPA")
        return True
    except Exception as e:  # a kernel that does not compile or faults: measured without it instead
        log(f"decode attention kernel failed: {e!r}"[:300])
        return repr(e)[:300]


def decode(torch, cuda, results, deadline, store) -> None:
    from compressor.evaluate.static_decode import StaticDecoder

    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    prompt, steps, max_len = (128, 128, 512) if cuda else (8, 4, 32)
    out = store
    out.update(prompt=prompt, steps=steps, variants={})

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # The decode attention kernel (RoPE, cache write and attention in one launch) checked on this GPU first: if it
    # fails, the fused variants fall back to PyTorch's rotation and SDPA, and the row says so.
    attention_ok = attention_check(torch, dev, dtype, max_len)
    out["attention_kernel"] = attention_ok

    def measure(name: str, model, graph: bool, fused: bool, transform=None, profile: bool = False,
                fused_attention: bool | None = None) -> StaticDecoder:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        attn = fused and attention_ok is True if fused_attention is None else fused_attention
        dec = StaticDecoder(model, max_len=max_len, fused=fused, fused_attention=attn)
        if transform is not None:
            dec.map_linears(transform)
        dec.reset(1, prompt)
        note = ""
        if graph and cuda:
            try:
                dec.capture()
            except Exception as e:  # some sparse backends cannot be captured: time the eager loop instead
                note = f"eager (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
                dec.graph = None
        ms = []
        for _ in range(3):
            dec.reset(1, prompt)
            sync()
            t = time.perf_counter()
            dec.run(steps)
            sync()
            ms.append((time.perf_counter() - t) * 1000 / steps)
        breakdown = None
        if profile and cuda and dec.graph is not None:
            dec.reset(1, prompt)
            try:
                breakdown = step_breakdown(torch, dec)
            except Exception as e:  # the profiler is a diagnostic: its failure costs no measurement
                breakdown = [{"error": repr(e)[:200]}]
        ids = torch.randint(0, model.config.vocab_size, (1, 512 if cuda else 16), device=dev)
        untuned = (not results["prefill_tuning"] and os.environ.get("COMPRESSOR_KERNEL_TUNING") != "0"
                   and any(type(m).__name__ == "FusedQuantLinear" for m in model.modules()))
        if untuned:
            os.environ["COMPRESSOR_KERNEL_TUNING"] = "0"
        pre = []
        try:  # a prefill that fails (a kernel new to this card) costs its column, not the decode row
            with torch.no_grad():
                model(ids)
                for _ in range(3):
                    sync()
                    t = time.perf_counter()
                    model(ids)
                    sync()
                    pre.append(time.perf_counter() - t)
        except Exception as e:
            note = (note + " " if note else "") + f"prefill failed: {type(e).__name__}: {str(e)[:160]}"
            log(f"prefill of {name} failed: {e!r}"[:300])
            pre = [float("nan")]
        finally:
            if untuned:
                del os.environ["COMPRESSOR_KERNEL_TUNING"]
        if untuned:
            note = (note + " " if note else "") + "prefill: default kernel configurations"
        row = {"ms_per_token": statistics.median(ms), "graph": dec.graph is not None,
               "fused_elementwise": dec.fused, "attention": "kernel" if dec.fused_attention else "sdpa",
               "prefill_tokens_per_s": ids.shape[1] / statistics.median(pre),
               "weights_mb": weight_bytes(model) / 1e6,
               "peak_gpu_mb": torch.cuda.max_memory_allocated() / 1e6 if cuda else None}
        if note:
            row["note"] = note
        if breakdown is not None:
            row["step_breakdown"] = breakdown
        out["variants"][name] = row
        log(f"decode {name}: {row['ms_per_token']:.3f} ms/token, prefill {row['prefill_tokens_per_s']:.0f} tok/s, "
            f"weights {row['weights_mb']:.0f} MB {note}")
        return dec

    model = llama_1b(torch, cuda)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    log(f"model: {out['parameters'] / 1e9:.2f}B parameters")
    measure("fp16 (torch elementwise)", model, graph=True, fused=False, profile=True)
    fp16 = measure("fp16", model, graph=True, fused=cuda, profile=True)
    del fp16
    qmodel = model
    del model
    quantize_decoder_layers(torch, qmodel, 4, 128, dtype)
    twin = dequantized_copy(torch, qmodel)
    q = measure("int4 g128 (ours)", qmodel, graph=True, fused=cuda, profile=True)
    # Correctness end to end: the fused 4-bit decoder against the same weights dequantized into nn.Linear.
    ref = StaticDecoder(twin, max_len=max_len, fused=cuda, fused_attention=q.fused_attention)
    errs = []
    for dec in (q, ref):
        dec.graph = None
        dec.reset(1, 0)
    for _ in range(4):
        a, b = q.step().float(), ref.step().float()
        errs.append(float((a - b).norm() / b.norm()))
        ref.tokens.copy_(q.tokens)
    out["int4_vs_dequantized_rel_err"] = max(errs)
    log(f"int4 decode vs dequantized fp16 twin: max rel err {max(errs):.2e}")
    del q, ref
    # The same run's A/Bs, while the budget lasts: the attention kernel against PyTorch's rotation and SDPA, and
    # programmatic dependent launches against plain ones.
    if attention_ok is True and time.perf_counter() < deadline:
        measure("int4 g128 (ours), SDPA attention", qmodel, graph=True, fused=cuda, fused_attention=False)
    if (cuda and time.perf_counter() < deadline and os.environ.get("COMPRESSOR_CUDA_PDL", "1") != "0"
            and torch.cuda.get_device_capability() >= (9, 0)):
        os.environ["COMPRESSOR_CUDA_PDL"] = "0"
        try:
            measure("int4 g128 (ours), no PDL", qmodel, graph=True, fused=cuda)
        finally:
            del os.environ["COMPRESSOR_CUDA_PDL"]
    v = out["variants"]
    base = v.get("fp16", {}).get("ms_per_token")
    for row in v.values():
        row["decode_speedup"] = base / row["ms_per_token"] if base else None
    if cuda and time.perf_counter() < deadline and "sparse" in results["sections"]:
        try:
            measure("fp16 2:4 sparse", twin, graph=True, fused=True, transform=lambda m: sparsify(torch, m))
            row = v["fp16 2:4 sparse"]
            row["decode_speedup"] = base / row["ms_per_token"] if base else None
        except Exception as e:
            out["sparse_error"] = repr(e)[:300]
            log(f"decode 2:4 sparse failed: {e!r}"[:300])


# ----------------------------------------------------------------------------------------------- summary
def summary(results: dict) -> str:
    lines = [f"# GPU benchmark — {results['env'].get('gpu', 'CPU check')} — {results['env']['date']}", ""]
    c = results.get("ceilings", {})
    if "copy_gbps" in c:
        lines += [f"Copy bandwidth (read + written): {c['copy_gbps']:.0f} GB/s", ""]
    k = results.get("kernels", {})
    if k.get("rows"):
        lines += [f"Timing: {k.get('timing')}", "",
                  "| bits | K | N | batch | cuBLAS fp16 µs | cuBLAS GB/s | ours µs | speedup | GB/s | of copy BW "
                  "| rel err | config |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in k["rows"]:
            frac = f"{r['of_copy_bw']:.0%}" if r.get("of_copy_bw") else "-"
            lines.append(f"| {r['bits']} | {r['k']} | {r['n']} | {r['m']} | {r['fp16_us']:.1f} | "
                         f"{r.get('fp16_gbps', 0):.0f} | {r['ours_us']:.1f} "
                         f"| {r['speedup']:.2f}x | {r['gbps']:.0f} | {frac} | {r['rel_err']:.1e} | {r['config']} |")
        lines.append("")
        for bits in (4, 8):
            for m in (1, 4, 16, 64):
                sp = [r["speedup"] for r in k["rows"] if r["bits"] == bits and r["m"] == m]
                if sp:
                    geo = math.exp(sum(math.log(s) for s in sp) / len(sp))
                    lines.append(f"- W{bits} batch {m}: speedup geomean {geo:.2f}x, min {min(sp):.2f}x, "
                                 f"max {max(sp):.2f}x over {len(sp)} shapes")
                pairs = [(r["triton_us"], r["cuda_us"]) for r in k["rows"] if r["bits"] == bits and r["m"] == m
                         and r.get("cuda_us") and r.get("triton_us")]
                if pairs:
                    geo = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
                    lines.append(f"  - CUDA C++ kernel against the best Triton kernel (best of each in tuning): "
                                 f"{geo:.2f}x geomean over {len(pairs)} shapes")
                for kind, one, two in (("GEMV", "gemv_fp32_us", "gemv_half2_us"),
                                       ("tensor-core kernel", "mma_fp16_us", "mma_half2_us")):
                    pairs = [(r[one], r[two]) for r in k["rows"] if r["bits"] == bits and r["m"] == m
                             and r.get(one) and r.get(two)]
                    if pairs:
                        geo = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
                        lines.append(f"  - {kind}, two codes per instruction against one (best of each in tuning): "
                                     f"{geo:.2f}x geomean over {len(pairs)} shapes")
        lines.append("")
    elif k:
        lines += [f"kernels: {k}", ""]
    s = results.get("sparse", {})
    if s.get("rows"):
        lines += [f"2:4 sparse ({s.get('backend')}):", "| K | N | batch | dense µs | sparse µs | speedup |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['k']} | {r['n']} | {r['m']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                  f"{r['speedup']:.2f}x |" if "error" not in r else f"| {r['k']} | {r['n']} | {r['m']} | "
                  f"{r['error']} |||" for r in s["rows"]]
        lines.append("")
    elif s:
        lines += [f"sparse: {s}", ""]
    d = results.get("decode", {})
    if d.get("variants"):
        lines += [f"Decode, {d.get('parameters', 0) / 1e9:.2f}B Llama-shaped, batch 1, prompt {d['prompt']}, "
                  f"{d['steps']} steps:",
                  "| variant | ms/token | speedup | attention | prefill tok/s | weights MB | peak MB | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in d["variants"].items():
            sp = f"{r['decode_speedup']:.2f}x" if r.get("decode_speedup") else "-"
            peak = f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") else "-"
            lines.append(f"| {name} | {r['ms_per_token']:.3f} | {sp} | {r.get('attention', '-')} | "
                         f"{r['prefill_tokens_per_s']:.0f} | "
                         f"{r['weights_mb']:.0f} | {peak} | {r.get('note', '')} |")
        for name, r in d["variants"].items():
            if r.get("step_breakdown"):
                lines += ["", f"Where a decode step's GPU time goes, {name} (profiler, 8 graph replays; 'all kernels' "
                          "is their busy time: below ms/token by the gaps between kernels):",
                          "| kernel | µs per step | launches per step |", "| --- | --- | --- |"]
                lines += [f"| {b.get('kernel', b.get('error'))} | {b.get('us_per_step', '')} | "
                          f"{b.get('launches_per_step', '')} |" for b in r["step_breakdown"]]
        if d.get("attention_kernel") is not True:
            lines.append(f"\ndecode attention kernel not used: {d.get('attention_kernel')}")
        if "int4_vs_dequantized_rel_err" in d:
            lines.append(f"\nint4 decoder vs its dequantized fp16 twin: max rel err of logits "
                         f"{d['int4_vs_dequantized_rel_err']:.1e}")
    elif d:
        lines += [f"decode: {d}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
