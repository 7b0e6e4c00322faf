"""A GGUF file evaluated in llama.cpp itself (through llama-cpp-python), fed the same token ids as torch."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def default_threads() -> int:
    return torch.get_num_threads() or os.cpu_count() or 1


def open_model(path: Path, n_ctx: int, logits_all: bool, threads: int | None = None) -> Any:
    from export.gguf import llama_cpp_module

    llama_cpp = llama_cpp_module()
    threads = threads or default_threads()
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_ubatch=min(n_ctx, 512),
                           n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False)


class LlamaCppRuntime:
    """Next-token logits of every position of a window, computed by llama.cpp from token ids (no BOS added)."""

    def __init__(self, name: str, path: Path, n_ctx: int, threads: int | None = None) -> None:
        self.name = name
        self.llm = open_model(path, n_ctx, logits_all=True, threads=threads)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in ids.tolist():
            self.llm.reset()  # the next eval starts at position 0 and clears the KV cache
            self.llm.eval(row)
            rows.append(torch.from_numpy(np.array(self.llm.scores[: len(row)], dtype=np.float32)))
        return torch.stack(rows)

    def close(self) -> None:
        self.llm.close()


def tokenizer_agreement(path: Path, hf_tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """Does llama.cpp's tokenizer (from the GGUF metadata) turn text into the ids the HF tokenizer gives?"""
    llm = open_model(path, n_ctx=64, logits_all=False, threads=1)
    try:
        same = 0
        first_difference = None
        total_hf = total_llama = 0
        for text in texts:
            hf = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
            lc = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            total_hf += len(hf)
            total_llama += len(lc)
            if hf == lc:
                same += 1
            elif first_difference is None:
                at = next((i for i, (a, b) in enumerate(zip(hf, lc)) if a != b), min(len(hf), len(lc)))
                first_difference = {"text": text[:80], "token_index": at, "hf": hf[at:at + 5],
                                    "llama_cpp": lc[at:at + 5]}
        return {"texts": len(texts), "identical": same, "hf_tokens": total_hf, "llama_cpp_tokens": total_llama,
                "first_difference": first_difference}
    finally:
        llm.close()
