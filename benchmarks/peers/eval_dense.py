#!/usr/bin/env python
"""Sanity check for a peer's dense.safetensors: load the float HF checkpoint, overwrite
its weights with the peer's dequantized ones and compute WikiText-2 test perplexity.

Runs in the project venv (/work/venv):

    python benchmarks/peers/eval_dense.py --model /tmp/smollm2-hf \
        [--dense OUT_DIR/dense.safetensors] [--windows 16] [--seq-len 2048]

Without --dense it evaluates the float baseline. Protocol (GPTQ paper): the test
file's lines are rows (a line that is only " " is an empty row), joined with
"\\n\\n", tokenized once, cut into non-overlapping windows; ppl = exp(mean token NLL)
over the first --windows windows.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

DEFAULT_TEST = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data",
                            "wikitext-2-raw-v1", "wiki.test.raw")


def wikitext_rows(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    # HF's wikitext rows keep their trailing newline; blank rows are "".
    return ["" if ln.strip() == "" else ln + "\n" for ln in lines]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dense", default=None)
    ap.add_argument("--test", default=DEFAULT_TEST)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    info = {}
    if args.dense:
        sd = load_file(args.dense)
        ref = model.state_dict()
        changed = sum(1 for k, v in sd.items() if k in ref and not torch.equal(ref[k], v.to(ref[k].dtype)))
        res = model.load_state_dict(sd, strict=False)
        unexpected = list(res.unexpected_keys)
        missing = [k for k in res.missing_keys if k != "lm_head.weight"]
        if unexpected or missing:
            raise SystemExit(f"state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
        if model.config.tie_word_embeddings:
            model.tie_weights()
        info = {"dense": args.dense, "tensors": len(sd), "tensors_changed": changed}
        print(f"loaded {len(sd)} tensors from {args.dense} ({changed} differ from the float model)",
              file=sys.stderr)

    text = "\n\n".join(wikitext_rows(args.test))
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    n = min(args.windows, ids.shape[1] // args.seq_len)
    t0 = time.time()
    nll, count, per_window = 0.0, 0, []
    with torch.inference_mode():
        for i in range(n):
            w = ids[:, i * args.seq_len:(i + 1) * args.seq_len]
            logits = model(w).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum")
            nll += loss.item()
            count += w.shape[1] - 1
            per_window.append(math.exp(loss.item() / (w.shape[1] - 1)))
    ppl = math.exp(nll / count)
    out = {"ppl": ppl, "windows": n, "seq_len": args.seq_len, "seconds": time.time() - t0,
           "per_window_ppl": per_window, **info}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
