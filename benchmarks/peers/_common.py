"""Helpers shared by run_gptqmodel.py and run_llmcompressor.py.

Only depends on torch + safetensors so it imports in every peer venv. The peer
runners put this folder on sys.path themselves (they are run as scripts).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager


def build_parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="plain float HF checkpoint folder")
    ap.add_argument("--calib", required=True,
                    help="safetensors file with one int64 tensor `input_ids` [n_windows, seq_len]")
    ap.add_argument("--out", required=True, help="output folder (dense.safetensors, result.json)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    ap.add_argument("--sym", dest="sym", action="store_true", default=True)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--act-order", dest="act_order", action="store_true", default=False)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of mean diag")
    ap.add_argument("--batch-size", type=int, default=1, help="calibration forward batch size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype the peer loads/runs the model in (default float32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    return ap


def prepare(args):
    """Thread count, calibration windows and model dtype, as every runner needs them first."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_calib(args.calib), getattr(torch, args.dtype)


def load_calib(path: str):
    import torch
    from safetensors.torch import load_file

    d = load_file(path)
    if "input_ids" not in d:
        raise SystemExit(f"{path}: no `input_ids` tensor (keys: {sorted(d)})")
    ids = d["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"{path}: input_ids must be 2-D [n_windows, seq_len], got {tuple(ids.shape)}")
    return ids.to(torch.int64).contiguous()


def base_result(peer: str, args, timing: dict, peak_after_quant: float, n: int, seq_len: int) -> dict:
    """The fields every peer runner reports, in the same shape."""
    import torch
    from importlib.metadata import version

    return {
        "peer": peer,
        "version": version(peer),
        "seconds": timing["seconds"],
        "cpu_seconds": timing["cpu_seconds"],
        "loadavg_1min": [timing["loadavg_1min_start"], timing["loadavg_1min_end"]],
        "peak_rss_mb": peak_after_quant,
        "peak_rss_mb_process": peak_rss_mb(),
        "settings": {
            "bits": args.bits, "group_size": args.group_size, "sym": args.sym,
            "act_order": args.act_order, "damp": args.damp, "batch_size": args.batch_size,
            "dtype": args.dtype, "n_windows": n, "seq_len": seq_len,
            "torch_threads": torch.get_num_threads(),
        },
    }


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextmanager
def timed(store: dict, key: str = "seconds"):
    """Wall seconds of the block in store[key]; also the process CPU seconds (all threads)
    and the 1-minute load average before/after, to spot runs slowed by other work on the
    machine (wall time is only comparable between runs on an otherwise idle machine)."""
    store["loadavg_1min_start"] = os.getloadavg()[0]
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = time.perf_counter() - t0
        store["cpu_seconds"] = _cpu_seconds() - c0
        store["loadavg_1min_end"] = os.getloadavg()[0]


def unpack_gptq_int32(packed, bits: int, dim: int):
    """Unpack GPTQ int32 words into `bits`-bit codes along `dim` (0: rows, as in qweight
    [in/pack, out]; 1: columns, as in qzeros [groups, out/pack]). Value j of a word sits at
    bit offset bits*j (little end first). Returns int32 codes."""
    import torch

    if bits not in (2, 4, 8):
        raise NotImplementedError(f"unpacking {bits}-bit GPTQ words is not implemented")
    pack = 32 // bits
    p = packed.to(torch.int32)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=p.device)
    mask = (1 << bits) - 1
    if dim == 0:
        codes = (p.unsqueeze(1) >> shifts.view(1, pack, 1)) & mask  # [rows, pack, cols]
        return codes.reshape(p.shape[0] * pack, p.shape[1])
    codes = (p.unsqueeze(2) >> shifts.view(1, 1, pack)) & mask      # [rows, cols, pack]
    return codes.reshape(p.shape[0], p.shape[1] * pack)


def dequant_gptq(qweight, qzeros, scales, g_idx, bits: int, in_features: int, out_features: int,
                 zero_offset: int):
    """Dense float32 weight [out, in] from GPTQ tensors.

    qweight [in*bits/32, out] int32, qzeros [n_groups, out*bits/32] int32, scales [n_groups, out],
    g_idx [in] (group of each input column, in ORIGINAL column order).
    zero_offset: 1 for the GPTQ v1 checkpoint format (qzeros hold zero-1), 0 for v2.
    W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + zero_offset)).
    """

    q = unpack_gptq_int32(qweight, bits, 0)[:in_features, :out_features].float()
    z = unpack_gptq_int32(qzeros, bits, 1)[:, :out_features].float() + zero_offset
    s = scales.float()
    g = g_idx.long()
    w = s[g] * (q - z[g])          # [in, out]
    return w.t().contiguous()


def rel_err(a, b) -> float:
    a = a.double()
    b = b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def write_outputs(out_dir: str, dense: dict, result: dict) -> None:
    import torch
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    dense = {k: v.detach().to(torch.float32).contiguous() for k, v in dense.items()}
    save_file(dense, os.path.join(out_dir, "dense.safetensors"), metadata={"format": "pt"})
    result = dict(result)
    result.setdefault("host", {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "python": platform.python_version()})
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    print(json.dumps({k: result[k] for k in ("peer", "version", "seconds", "peak_rss_mb")}))


def original_state_dict(model_dir: str) -> dict:
    """Float tensors of the source HF checkpoint (all safetensors shards)."""
    import glob

    from safetensors.torch import load_file

    sd = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        sd.update(load_file(f))
    if not sd:
        raise SystemExit(f"{model_dir}: no *.safetensors files")
    return sd
