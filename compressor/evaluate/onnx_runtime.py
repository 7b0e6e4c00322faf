"""An exported ONNX decoder run in onnxruntime: logits for accuracy, a KV-cache loop for generation and timing.

Works with any decoder graph that uses the optimum / onnxruntime-genai names (ours, or a peer builder's): inputs
`input_ids`, `attention_mask`, optional `position_ids`, `past_key_values.N.key/value`; outputs `logits`,
`present.N.key/value`. Inputs the graph does not declare are not fed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32}


def model_file(path: Path) -> Path:
    """The .onnx file of an export folder (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.glob("*.onnx"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected one .onnx file, found {len(files)}")
    return files[0]


def providers(device: str = "cpu") -> list[str]:
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("onnxruntime has no CUDA execution provider here (pip install onnxruntime-gpu); running the "
                    "ONNX model on the CPU")
    return ["CPUExecutionProvider"]


def open_decoder(path: Path, threads: int | None = None, device: str = "cpu") -> "OnnxDecoder":
    """A decoder for an export folder (or .onnx file); its config.json fills in symbolic cache dimensions."""
    import json

    file = model_file(path)
    config = None
    if (file.parent / "config.json").is_file():
        config = json.loads((file.parent / "config.json").read_text())
    elif (file.parent / "genai_config.json").is_file():  # onnxruntime-genai's builder writes only this
        model = json.loads((file.parent / "genai_config.json").read_text()).get("model", {})
        decoder = model.get("decoder", {})
        config = {"num_key_value_heads": decoder.get("num_key_value_heads"), "head_dim": decoder.get("head_size"),
                  "vocab_size": model.get("vocab_size")}
    return OnnxDecoder(open_session(file, threads, device), config)


def open_session(path: Path, threads: int | None = None, device: str = "cpu") -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model_file(path)), sess_options=opts, providers=providers(device))


class OnnxDecoder:
    """Feeds a decoder graph: an empty cache for a prompt, then its own `present` outputs for each next step."""

    def __init__(self, session: Any, config: dict[str, Any] | None = None) -> None:
        self.session = session
        self.config = config or {}
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.past = sorted(n for n in self.inputs if n.startswith("past_key_values."))
        missing = {"input_ids", "attention_mask"} - set(self.inputs)
        if missing or "logits" not in self.output_names:
            raise ValueError(f"not a decoder graph with KV cache: inputs {sorted(self.inputs)}, outputs "
                             f"{self.output_names}")

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        cache = {}
        for name in self.past:
            shape = self.inputs[name].shape  # [batch, kv_heads, past, head_dim]; symbolic in some builders' graphs
            c = self.config
            kv_heads = shape[1] if isinstance(shape[1], int) else c.get("num_key_value_heads")
            head_dim = shape[3] if isinstance(shape[3], int) else (
                c.get("head_dim") or c.get("hidden_size", 0) // max(c.get("num_attention_heads", 1), 1) or None)
            dims = [batch, kv_heads, 0, head_dim]
            if not all(isinstance(d, int) for d in dims):
                raise ValueError(f"{name}: cannot tell the cache shape from {shape} (no config.json beside the "
                                 "model to read num_key_value_heads / head_dim from)")
            cache[name] = np.zeros(dims, _NUMPY[self.inputs[name].type])
        return cache

    def step(self, ids: np.ndarray, cache: dict[str, np.ndarray], past_len: int) -> tuple[np.ndarray, dict]:
        """Run `ids` [batch, new] after `past_len` cached positions; returns logits and the new cache."""
        batch, new = ids.shape
        feed = {"input_ids": ids.astype(_NUMPY[self.inputs["input_ids"].type]),
                "attention_mask": np.ones((batch, past_len + new),
                                          _NUMPY[self.inputs["attention_mask"].type])}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + new),
                                                   (batch, new)).astype(_NUMPY[self.inputs["position_ids"].type])
        feed.update(cache)
        out = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        new_cache = {p: out[p.replace("past_key_values.", "present.")] for p in self.past}
        return out["logits"], new_cache

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt`, one token per step through the KV cache."""
        logits, cache = self.step(np.array([prompt]), self.empty_cache(1), 0)
        out: list[int] = []
        for _ in range(new_tokens):
            out.append(int(np.argmax(logits[0, -1])))
            logits, cache = self.step(np.array([[out[-1]]]), cache, len(prompt) + len(out) - 1)
        return out


class OnnxRuntimeModel:
    """Next-token logits of every position of each window (LogitsRuntime), computed by onnxruntime."""

    def __init__(self, name: str, path: Path, threads: int | None = None, device: str = "cpu") -> None:
        self.name = name
        self.decoder = open_decoder(path, threads, device)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.decoder.step(ids.numpy(), self.decoder.empty_cache(ids.shape[0]), 0)
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def close(self) -> None:
        self.decoder = None  # type: ignore[assignment]
