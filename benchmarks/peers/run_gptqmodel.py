#!/usr/bin/env python
"""Quantize a float HF checkpoint with GPTQModel's GPTQ on CPU and export the dense
(dequantized) weights for the benchmark.

Run INSIDE benchmarks/.venvs/gptqmodel (see setup_venvs.sh):

    benchmarks/.venvs/gptqmodel/bin/python benchmarks/peers/run_gptqmodel.py \
        --model /tmp/smollm2-hf --calib /tmp/calib.safetensors --out /tmp/peer-gptqmodel \
        --bits 4 --group-size 32 --sym --act-order --damp 0.01

Mapping of the common CLI onto GPTQModel's QuantizeConfig:
  --bits/--group-size/--sym|--asym  -> bits, group_size (-1 = per channel), sym
  --act-order                       -> desc_act=True, static_groups=False (or --static-groups),
                                       act_group_aware=False
  --no-act-order                    -> desc_act=False, act_group_aware=False (plain GPTQ; pass
                                       --act-group-aware to use GPTQModel's default "GAR" ordering)
  --damp                            -> damp_percent (GPTQModel may raise it by damp_auto_increment
                                       if the Hessian is not positive definite; logged)
Calibration: the exact token windows of --calib, one example per window, no re-tokenizing.
Timing covers model.quantize() only (not loading, not the export below).

Outputs in --out: dense.safetensors (float32, HF names, quantized linears replaced by
scale*(q - zero) unpacked from GPTQModel's packed qweight/qzeros/scales/g_idx) and
result.json.
"""
from __future__ import annotations

import os
import sys

# Must be set before gptqmodel is imported: GPTQModel sizes its CPU worker pool from it;
# with the default on a 2-core machine the quantization threads oversubscribe the cores.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _find_quant_modules(root):
    """name -> module for every GPTQ-packed linear (has qweight/qzeros/scales/g_idx)."""
    out = {}
    for name, m in root.named_modules():
        if all(hasattr(m, a) for a in ("qweight", "qzeros", "scales", "g_idx")) and \
                getattr(m, "qweight", None) is not None:
            out[name] = m
    return out


def main(argv=None) -> int:
    ap = _common.build_parser(__doc__)
    ap.add_argument("--static-groups", action="store_true",
                    help="with --act-order: GPTQModel static_groups=True (group params fixed in "
                         "original column order, like llm-compressor's actorder='weight')")
    ap.add_argument("--act-group-aware", action="store_true",
                    help="keep GPTQModel's GAR (act_group_aware) reordering with --no-act-order")
    ap.add_argument("--no-true-sequential", action="store_true",
                    help="GPTQModel default true_sequential=True re-runs the layer forward after each "
                         "sub-group (qkv, o, up/gate, down); this collects all of a layer's Hessians "
                         "from one forward instead (like llm-compressor)")
    ap.add_argument("--no-offload-to-disk", action="store_true",
                    help="GPTQModel offloads finished layers to disk by default; disable it")
    ap.add_argument("--keep-peer-checkpoint", action="store_true",
                    help="keep GPTQModel's own quantized checkpoint (OUT/gptqmodel_checkpoint, "
                         "written for verification) instead of deleting it")
    args = ap.parse_args(argv)

    import torch

    from importlib.metadata import version

    from gptqmodel import GPTQModel, QuantizeConfig

    calib, dtype = _common.prepare(args)
    n, seq_len = calib.shape

    qkw = dict(bits=args.bits, group_size=args.group_size, sym=args.sym,
               desc_act=bool(args.act_order), damp_percent=args.damp)
    if args.act_order:
        qkw["act_group_aware"] = False
        qkw["static_groups"] = bool(args.static_groups)
    else:
        qkw["act_group_aware"] = bool(args.act_group_aware)
    if args.no_offload_to_disk:
        qkw["offload_to_disk"] = False
    if args.no_true_sequential:
        qkw["true_sequential"] = False
    qcfg = QuantizeConfig(**qkw)

    model = GPTQModel.load(args.model, qcfg, dtype=dtype, device="cpu")

    calibration = [{"input_ids": row.clone(), "attention_mask": torch.ones_like(row)} for row in calib]

    timing = {}
    with _common.timed(timing):
        model.quantize(calibration, batch_size=args.batch_size)
    peak_after_quant = _common.peak_rss_mb()
    print(f"quantize(): {timing['seconds']:.1f}s, peak RSS {peak_after_quant:.0f} MB", file=sys.stderr)

    # ---- export: bring offloaded layers back into memory, then unpack ourselves ----
    orig = _common.original_state_dict(args.model)
    hf = model.model
    try:
        from gptqmodel.utils.offload import undo_offload_to_disk
        undo_offload_to_disk(hf, device=torch.device("cpu"))
    except Exception as e:  # pragma: no cover - depends on the gptqmodel version
        print(f"warning: undo_offload_to_disk failed/unavailable: {e!r}", file=sys.stderr)

    qmods = _find_quant_modules(hf)
    if not qmods:
        raise SystemExit("no packed GPTQ modules found in the quantized model")
    dense = {}
    fmt_seen = set()
    for name, m in qmods.items():
        # GPTQ v1 layout stores zero-1 in qzeros, v2 the true zero point. Right after
        # quantize() GPTQModel 7.6 holds v1 (qzero_format() == 1; checked below against the
        # saved checkpoint and the reloaded model, which GPTQModel converts to v2 on load).
        fmt = m.qzero_format() if hasattr(m, "qzero_format") else 1
        fmt_seen.add(fmt)
        w = _common.dequant_gptq(m.qweight, m.qzeros, m.scales, m.g_idx, m.bits,
                                 m.in_features, m.out_features, zero_offset=1 if fmt == 1 else 0)
        dense[name + ".weight"] = w
        if getattr(m, "bias", None) is not None:
            dense[name + ".bias"] = m.bias.detach().float()

    # Everything GPTQ did not quantize (embeddings, norms): from the in-memory model when
    # materialized, else from the source checkpoint (GPTQ does not change them).
    live = {k: v for k, v in hf.state_dict().items()}
    for k, v in orig.items():
        if k in dense:
            continue
        mod_prefix = k.rsplit(".", 1)[0]
        if mod_prefix in qmods:
            continue
        lv = live.get(k)
        dense[k] = (lv if lv is not None and not lv.is_meta else v).detach().float()
    if getattr(hf.config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    expected_quant = [k for k in orig if k.endswith(".weight") and k.rsplit(".", 1)[0] in qmods]
    assert len(expected_quant) == len(qmods), (len(expected_quant), len(qmods))

    # ---- verification against the peer's own quantized model ----
    # Right after quantize() GPTQModel keeps the packed tensors in the GPTQ v1 layout
    # (qzeros = zero - 1, qzero_format() == 1) and its TorchLinear kernels are NOT converted
    # for inference (their forward/dequantize_weight assume v2 and are off by one zero step).
    # The peer's real quantized model is what GPTQModel.load() gives for the saved checkpoint
    # (it converts v1 -> v2 on load), so: save, decode the saved tensors ourselves (must equal
    # the in-memory decode), reload with GPTQModel and compare its layers and logits.
    import glob
    import json

    from safetensors.torch import load_file

    checks = []
    ck = os.path.join(args.out, "gptqmodel_checkpoint")
    model.save(ck)
    saved = {}
    for f in sorted(glob.glob(os.path.join(ck, "*.safetensors"))):
        saved.update(load_file(f))
    with open(os.path.join(ck, "quantize_config.json")) as f:
        qc = json.load(f)
    ck_fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq")))
    zoff = 0 if ck_fmt.endswith("v2") else 1
    worst = 0.0
    for name, m in qmods.items():
        w2 = _common.dequant_gptq(saved[name + ".qweight"], saved[name + ".qzeros"],
                                  saved[name + ".scales"], saved[name + ".g_idx"], m.bits,
                                  m.in_features, m.out_features, zero_offset=zoff)
        worst = max(worst, (w2 - dense[name + ".weight"]).abs().max().item())
    checks.append({"check": "saved_checkpoint_decodes_equal", "checkpoint_format": ck_fmt,
                   "max_abs_diff": worst})
    if worst > 0:
        raise SystemExit(f"saved GPTQModel checkpoint decodes differently from memory ({worst})")
    del model, hf, qmods
    import gc
    gc.collect()

    # GPTQModel's CPU inference kernel (TorchLinear) only runs in float16/bfloat16; float16
    # matches the float16 scales it stores, so the reference side is computed in float32.
    check_dtype = torch.float16
    peer = GPTQModel.load(ck, device="cpu", backend="torch", dtype=check_dtype)
    pq = _find_quant_modules(peer.model)
    torch.manual_seed(0)
    names = list(pq)
    for name in [names[0], names[len(names) // 2], names[-1]]:
        m = pq[name]
        w = dense[name + ".weight"]
        x = torch.randn(8, m.in_features, dtype=check_dtype)
        with torch.inference_mode():
            y = m(x).float()
        y_ref = x.float() @ w.t()
        if getattr(m, "bias", None) is not None:
            y_ref = y_ref + m.bias.float()
        checks.append({"layer": name, "check": "peer_layer_forward_vs_x@Wdense^T",
                       "kernel": type(m).__name__, "dtype": str(check_dtype),
                       "rel_err": _common.rel_err(y, y_ref), "tol": 5e-3})
    # whole model: the peer's reloaded quantized model vs the float model carrying our dense
    # weights; for scale, also vs the unquantized float model (must be much further away).
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = calib[:1, :128]
    with torch.inference_mode():
        lp = peer.model(input_ids=ids).logits.float()
        lf = ref(input_ids=ids).logits.float()
        res = ref.load_state_dict(dense, strict=False)
        if res.unexpected_keys or [k for k in res.missing_keys if k != "lm_head.weight"]:
            raise SystemExit(f"dense/state-dict mismatch: {res}")
        if ref.config.tie_word_embeddings:
            ref.tie_weights()
        ld = ref(input_ids=ids).logits.float()
    e_d, e_f = _common.rel_err(lp, ld), _common.rel_err(lp, lf)
    checks.append({"check": "peer_model_logits_vs_dense_model", "rel_err": e_d, "tol": 2e-2,
                   "rel_err_vs_unquantized_model": e_f})
    del ref, peer
    for c in checks:
        print(f"check {c}", file=sys.stderr)
        if "tol" in c and not c["rel_err"] < c["tol"]:
            raise SystemExit(f"dense weights do not reproduce the peer's model: {c}")
    if not e_d < 0.25 * e_f:
        raise SystemExit(f"peer logits are not clearly closer to the dense model ({e_d}) than to "
                         f"the unquantized one ({e_f})")
    if not args.keep_peer_checkpoint:
        import shutil
        shutil.rmtree(ck, ignore_errors=True)

    g_idx_identity = None
    m0 = pq[names[0]]
    if args.group_size > 0:
        ident = torch.arange(m0.in_features) // args.group_size
        g_idx_identity = bool(torch.equal(m0.g_idx.long().cpu(), ident))
    result = _common.base_result("gptqmodel", args, timing, peak_after_quant, n, seq_len)
    result["settings"].update({
        "quantize_config": {k: getattr(qcfg, k, None) for k in (
            "bits", "group_size", "sym", "desc_act", "static_groups", "act_group_aware",
            "damp_percent", "damp_auto_increment", "mse", "true_sequential", "offload_to_disk",
            "format")},
        "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS"),
    })
    result.update({
        "versions": {p: version(p) for p in ("torch", "transformers", "gptqmodel")},
        "quantized_modules": len(pq),
        "in_memory_qzero_format": sorted(fmt_seen),
        "first_layer_g_idx_is_identity": g_idx_identity,
        "checks": checks,
        "notes": ("GPTQModel GPTQ on CPU. seconds = wall time of model.quantize() only. "
                  "Scales are stored in float16 by GPTQModel's packer, so dense weights are "
                  "fp16(scale) * (q - zero). act-order = desc_act (groups follow the permuted "
                  "order and are recorded in g_idx) unless --static-groups. peak_rss_mb is the "
                  "process peak up to the end of quantize() (model load included); peak_rss_mb_process "
                  "also covers the export/verification."),
    })
    _common.write_outputs(args.out, dense, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
