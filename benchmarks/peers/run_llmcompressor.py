#!/usr/bin/env python
"""Quantize a float HF checkpoint with llm-compressor's GPTQModifier on CPU and export the
dense (dequantized) weights for the benchmark.

Run INSIDE benchmarks/.venvs/llmcompressor (see setup_venvs.sh):

    benchmarks/.venvs/llmcompressor/bin/python benchmarks/peers/run_llmcompressor.py \
        --model /tmp/smollm2-hf --calib /tmp/calib.safetensors --out /tmp/peer-llmcompressor \
        --bits 4 --group-size 32 --sym --act-order --damp 0.01

Mapping of the common CLI onto llm-compressor (compressed-tensors QuantizationArgs):
  --bits/--sym|--asym      -> num_bits, type=int, symmetric
  --group-size G           -> strategy="group", group_size=G;  -1 -> strategy="channel"
  --act-order              -> GPTQModifier(actorder="weight")  (the only act-order llm-compressor
                              >= 0.10 still supports: columns are processed in activation order
                              but groups stay in the original column order, i.e. "static groups";
                              no g_idx)
  --no-act-order           -> GPTQModifier(actorder=None)  (its default would be "static")
  --damp                   -> dampening_frac
Targets: every nn.Linear except lm_head. Calibration: exactly the token windows in --calib
(a datasets.Dataset of input_ids/attention_mask rows, no shuffling, no truncation).
Timing covers the oneshot() call only (not loading, not the export below).

Note: llm-compressor computes each group's scale/zero-point ONCE from the original weights
(min-max observer) before running GPTQ, instead of re-deriving them from the error-updated
weights when GPTQ reaches a group as the reference GPTQ implementation does.

Outputs in --out: dense.safetensors (float32, HF names; quantized linears replaced by
weight_scale*(q - weight_zero_point)) and result.json.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _dequant_ct(module, qargs):
    """Dense float32 weight [out, in] from a compressed-tensors quantized Linear: recompute the
    integer codes from the stored (already fake-quantized) weight and the module's
    weight_scale / weight_zero_point (/ weight_g_idx), then scale*(q - zp)."""
    import torch

    w = module.weight.detach().float()
    out_f, in_f = w.shape
    scale = module.weight_scale.detach().float()
    zp = getattr(module, "weight_zero_point", None)
    zp = torch.zeros_like(scale) if zp is None else zp.detach().float()
    bits = qargs.num_bits
    # compressed-tensors uses the signed range for int weights, symmetric or not
    # (compressed_tensors.quantization.utils.helpers._calculate_range).
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    strategy = str(getattr(qargs.strategy, "value", qargs.strategy))
    if strategy == "group":
        g_idx = getattr(module, "weight_g_idx", None)
        if g_idx is not None and (g_idx >= 0).all():
            cols = g_idx.long()
        else:
            cols = torch.arange(in_f) // qargs.group_size
        s = scale[:, cols]
        z = zp[:, cols]
    elif strategy == "channel":
        s = scale.reshape(out_f, 1)
        z = zp.reshape(out_f, 1)
    elif strategy == "tensor":
        s = scale.reshape(1, 1)
        z = zp.reshape(1, 1)
    else:
        raise NotImplementedError(f"strategy {strategy}")
    q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    deq = s * (q - z)
    return deq, q, (qmin, qmax)


def main(argv=None) -> int:
    ap = _common.build_parser(__doc__)
    ap.add_argument("--block-size", type=int, default=128, help="GPTQ block size (lazy batch)")
    args = ap.parse_args(argv)

    import torch

    from importlib.metadata import version

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calib, dtype = _common.prepare(args)
    n, seq_len = calib.shape

    wargs = dict(num_bits=args.bits, type="int", symmetric=args.sym)
    if args.group_size == -1:
        wargs["strategy"] = "channel"
    elif args.group_size > 0:
        wargs.update(strategy="group", group_size=args.group_size)
    else:
        raise SystemExit(f"bad --group-size {args.group_size}")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          dampening_frac=args.damp, block_size=args.block_size,
                          actorder="weight" if args.act_order else None)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": torch.ones_like(calib).tolist()})

    timing = {}
    with _common.timed(timing):
        model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe,
                        num_calibration_samples=n, max_seq_length=seq_len,
                        shuffle_calibration_samples=False, batch_size=args.batch_size)
    peak_after_quant = _common.peak_rss_mb()
    print(f"oneshot(): {timing['seconds']:.1f}s, peak RSS {peak_after_quant:.0f} MB", file=sys.stderr)

    # ---- export ----
    qmods = {name: m for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")
             and getattr(getattr(m, "quantization_scheme", None), "weights", None) is not None}
    if not qmods:
        raise SystemExit("no quantized Linear modules (weight_scale) found after oneshot")
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    dense, checks = {}, []
    worst_grid = worst_ct = 0.0
    code_range = None
    for name, m in qmods.items():
        qargs = m.quantization_scheme.weights
        deq, q, code_range = _dequant_ct(m, qargs)
        # the stored weight must already lie on the grid (GPTQ wrote the fake-quantized values)
        worst_grid = max(worst_grid, (deq - m.weight.detach().float()).abs().max().item())
        # and compressed-tensors' own quantize-dequantize must give the same tensor
        with torch.no_grad():
            ct = fake_quantize(m.weight.detach(), m.weight_scale.detach(),
                               getattr(m, "weight_zero_point", None), qargs).float()
        worst_ct = max(worst_ct, (deq - ct).abs().max().item())
        dense[name + ".weight"] = deq
        if m.bias is not None:
            dense[name + ".bias"] = m.bias.detach().float()
    checks.append({"check": "stored_weight_on_grid_max_abs_diff", "value": worst_grid})
    checks.append({"check": "ct_fake_quantize_vs_dense_max_abs_diff", "value": worst_ct})
    if dtype == torch.float32 and max(worst_grid, worst_ct) > 1e-5:
        raise SystemExit(f"dequantized weights disagree with the peer's: {checks[-2:]}")
    sd = model.state_dict()
    for k, v in sd.items():
        mod = k.rpartition(".")[0]
        if mod in qmods or k in dense:
            continue          # quantized layers: weight/bias done; weight_scale, zero_point... dropped
        dense[k] = v.detach().float()
    if getattr(model.config, "tie_word_embeddings", False):
        dense.pop("lm_head.weight", None)
    orig_keys = set(_common.original_state_dict(args.model))
    extra = sorted(set(dense) - orig_keys)
    if extra:
        raise SystemExit(f"unexpected tensors in export: {extra[:8]}")

    # ---- verification: the peer's own quantized layer forward (compressed-tensors applies
    # fake quantization of the weight on the fly while quantization is enabled) ----
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.manual_seed(0)
    names = list(qmods)
    for name in [names[0], names[len(names) // 2], names[-1]]:
        m = qmods[name]
        x = torch.randn(8, m.in_features, dtype=dtype)
        with torch.inference_mode():
            y = m(x).float()
        y_ref = x.float() @ dense[name + ".weight"].t()
        if m.bias is not None:
            y_ref = y_ref + m.bias.float()
        checks.append({"layer": name, "check": "peer_layer_forward_vs_x@Wdense^T",
                       "rel_err": _common.rel_err(y, y_ref), "tol": tol,
                       "status": str(getattr(m, "quantization_status", None))})
    # whole model: peer's in-memory quantized model vs a fresh float model with dense weights
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = calib[:1, :128]
    with torch.inference_mode():
        lp = model(input_ids=ids).logits.float()
        lf = ref(input_ids=ids).logits.float()
        res = ref.load_state_dict(dense, strict=False)
        if res.unexpected_keys or [k for k in res.missing_keys if k != "lm_head.weight"]:
            raise SystemExit(f"dense/state-dict mismatch: {res}")
        if ref.config.tie_word_embeddings:
            ref.tie_weights()
        ld = ref(input_ids=ids).logits.float()
    e_d, e_f = _common.rel_err(lp, ld), _common.rel_err(lp, lf)
    checks.append({"check": "peer_model_logits_vs_dense_model", "rel_err": e_d, "tol": 10 * tol,
                   "rel_err_vs_unquantized_model": e_f})
    for c in checks:
        print(f"check {c}", file=sys.stderr)
        if "tol" in c and not c["rel_err"] < c["tol"]:
            raise SystemExit(f"dense weights do not reproduce the peer's model: {c}")
    if not e_d < 0.25 * e_f:
        raise SystemExit(f"peer logits are not clearly closer to the dense model ({e_d}) than to "
                         f"the unquantized one ({e_f})")

    q0 = qmods[names[0]].quantization_scheme.weights
    result = _common.base_result("llmcompressor", args, timing, peak_after_quant, n, seq_len)
    result["settings"].update({"block_size": args.block_size,
                               "resolved_weight_args": q0.model_dump(mode="json")})
    result.update({
        "versions": {p: version(p) for p in ("torch", "transformers", "llmcompressor",
                                             "compressed-tensors")},
        "quantized_modules": len(qmods),
        "code_range": code_range,
        "checks": checks,
        "notes": ("llm-compressor GPTQModifier via oneshot() on CPU; seconds = wall time of "
                  "oneshot() (calibration forward passes + GPTQ). Group scales/zero-points come "
                  "from a min-max observer on the ORIGINAL weights, fixed before GPTQ runs. "
                  "act-order = actorder='weight' (static groups, no g_idx). Integer codes use "
                  "the signed range [-2^(b-1), 2^(b-1)-1]; dense = scale*(q - zero_point). "
                  "peak_rss_mb = process peak at the end of oneshot() (model load included)."),
    })
    _common.write_outputs(args.out, dense, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
