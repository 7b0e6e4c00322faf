"""A transformers tokenizer as GGUF tokenizer metadata (`tokenizer.ggml.*`).

llama.cpp re-implements tokenization, so besides tokens and merges it needs the name of the pre-tokenizer (the
regex that splits text before BPE). That name is recognised here from the tokenizer's own pre-tokenizer
definition; an unknown one falls back to llama.cpp's default with a warning, and the run's tokenizer check (HF ids
against llama.cpp ids on sample text) shows whether it matters.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Distinguishing fragments of the split regex -> llama.cpp pre-tokenizer name.
_REGEX_PRE = (
    (r"\p{N}{1,3}", "llama-bpe"),  # Llama 3 and many derived BPE vocabularies
    (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|", "qwen2"),  # Qwen2/Qwen3: single digits
)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # gguf.TokenType values


class TokenizerError(ValueError):
    """A tokenizer that cannot be written to GGUF."""


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex", "")
            for fragment, name in _REGEX_PRE:
                if fragment in regex:
                    return name
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    log.warning("GGUF export: pre-tokenizer %s is not recognised; llama.cpp will split text with its default rules "
                "(the tokenizer check in the report shows whether ids differ)", kinds)
    return "default"


def add_hf_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        path = Path(tmp)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError("GGUF export needs a fast tokenizer (tokenizer.json); this one has none")
        tj = json.loads((path / "tokenizer.json").read_text())
        model = tj["model"]
        if model.get("type") != "BPE":
            raise TokenizerError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported (BPE is)")
        if model.get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(path)
            tokens, scores, types = [], [], []
            for text, score, ttype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(int(ttype))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            _pad(tokens, types, config.vocab_size, scores)
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, load_merges=False, n_vocab=len(tokens))
        else:
            tokens, types = _byte_level_tokens(tj)
            _pad(tokens, types, config.vocab_size)
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer_name(tj))
            writer.add_token_list(tokens)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(path, load_merges=True, n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


def _byte_level_tokens(tj: dict[str, Any]) -> tuple[list[str], list[int]]:
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    kinds: dict[int, int] = {}
    for added in tj.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    size = max(vocab.values()) + 1
    tokens: list[str | None] = [None] * size
    for text, i in vocab.items():
        tokens[i] = text
    types = []
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types.append(UNUSED)
        else:
            types.append(kinds.get(i, NORMAL))
    return tokens, types  # type: ignore[return-value]


def _pad(tokens: list, types: list[int], vocab_size: int, scores: list[float] | None = None) -> None:
    """The embedding has `vocab_size` rows; llama.cpp wants one token per row."""
    if len(tokens) > vocab_size:
        raise TokenizerError(f"GGUF export: the tokenizer has {len(tokens)} tokens but the model's embedding only "
                             f"{vocab_size} rows")
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)
