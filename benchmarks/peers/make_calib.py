#!/usr/bin/env python
"""Write a calibration file for the peer runners: a safetensors file holding one
int64 tensor `input_ids` of shape [n_windows, seq_len].

The text is tokenized once as a whole (no special tokens added), and window starts
are drawn with torch.randint from a torch.Generator seeded with --seed.

    python benchmarks/peers/make_calib.py --model /tmp/smollm2-hf \
        --text ../shared/data/wikitext-2-raw-v1/wiki.train.subset.raw \
        --n 128 --seq-len 512 --seed 0 --out /tmp/calib_128x512.safetensors
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF checkpoint folder (for its tokenizer)")
    ap.add_argument("--text", required=True, help="plain text file")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if ids.numel() <= args.seq_len:
        raise SystemExit(f"text has only {ids.numel()} tokens, need more than {args.seq_len}")
    g = torch.Generator().manual_seed(args.seed)
    starts = torch.randint(0, ids.numel() - args.seq_len + 1, (args.n,), generator=g)
    windows = torch.stack([ids[s:s + args.seq_len] for s in starts.tolist()]).contiguous()
    save_file({"input_ids": windows}, args.out)
    print(f"{args.out}: {tuple(windows.shape)} from {ids.numel()} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
