"""Run by compressor.evaluate.speed in a fresh process: load one model, time prefill and decode, print JSON."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import psutil
import torch


class _Energy:
    """Energy of the timed decode loops, from a hardware counter where one is readable (else the reason)."""

    def __init__(self, device: str) -> None:
        from compressor.evaluate.resources import cpu_energy_meter, gpu_energy_meter

        self.meter = gpu_energy_meter() if device.startswith("cuda") else cpu_energy_meter()
        self.joules, self.tokens, self._start = 0.0, 0, None

    def start(self) -> None:
        self._start = None if isinstance(self.meter, str) else self.meter.read()

    def stop(self, tokens: int) -> None:
        if self._start is not None:
            self.joules += self.meter.read() - self._start
            self.tokens += tokens

    def fields(self) -> dict:
        if isinstance(self.meter, str) or not self.tokens:
            return {"energy": self.meter if isinstance(self.meter, str) else "not measured"}
        return {"energy_j_per_token": round(self.joules / self.tokens, 6), "energy_source": self.meter.source}


ENERGY: _Energy | None = None


def main() -> None:
    from compressor.recipe import ModelConfig, SpeedConfig

    global ENERGY

    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["model", "checkpoint", "gguf", "onnx"], required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    cfg = SpeedConfig.model_validate_json(args.config)
    ENERGY = _Energy("cpu" if args.kind == "gguf" else args.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if args.kind == "gguf":
        print(json.dumps(_llama_cpp(args.path, cfg)))
        return
    if args.kind == "onnx":
        print(json.dumps(_onnxruntime(args.path, cfg, args.device)))
        return

    t0 = time.perf_counter()
    if args.kind == "model":
        from compressor.models import load

        model, _, _ = load(ModelConfig.model_validate_json(args.path), device=args.device)
    else:
        from export.safetensors import load_checkpoint

        model, _ = load_checkpoint(args.path, device=args.device, materialize=args.device == "cpu")
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, vocab, (1, cfg.prefill_tokens), generator=gen).to(args.device)
    prompt_ids = prefill_ids[:, : cfg.prompt_tokens] if cfg.prompt_tokens <= cfg.prefill_tokens else \
        torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=gen).to(args.device)

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    from compressor.models import cache_argument

    cache_arg = cache_argument(model)

    def decode() -> float:
        """Greedy decode through the KV cache after the prompt, timed per token (the prompt is not timed)."""
        out = model(input_ids=prompt_ids, use_cache=True)
        cache, token = out[cache_arg], out.logits[:, -1:].argmax(-1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        ENERGY.start()
        t = time.perf_counter()
        for _ in range(cfg.decode_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
            cache, token = out[cache_arg], out.logits[:, -1:].argmax(-1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        ENERGY.stop(cfg.decode_tokens)
        return seconds / cfg.decode_tokens

    with torch.no_grad():
        model(input_ids=prefill_ids[:, :16], use_cache=False)  # warm-up
        prefill = [timed(lambda: model(input_ids=prefill_ids, use_cache=False)) for _ in range(cfg.repeats)]
        decode_s = statistics.median(decode() for _ in range(cfg.repeats))
    result = {
        "load_seconds": round(load_s, 3),
        "prefill_tokens_per_second": round(cfg.prefill_tokens / statistics.median(prefill), 2),
        "decode_ms_per_token": round(decode_s * 1000, 3),
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "prompt_tokens": cfg.prompt_tokens,
        "decode_tokens": cfg.decode_tokens,
        "prefill_tokens": cfg.prefill_tokens,
        **ENERGY.fields(),
    }
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result))


def _llama_cpp(path: str, cfg) -> dict:
    """The same protocol in llama.cpp: prefill of random ids in one batch; decode one token at a time (greedy) with
    the KV cache after a prompt."""
    import numpy as np

    from compressor.evaluate.llama_cpp_runtime import default_threads, open_model

    threads = cfg.threads or default_threads()
    t0 = time.perf_counter()
    llm = open_model(path, n_ctx=max(cfg.prefill_tokens, cfg.prompt_tokens + cfg.decode_tokens) + 8,
                     logits_all=False, threads=threads)
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    gen = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prefill_ids = gen.integers(0, vocab, cfg.prefill_tokens).tolist()
    prompt_ids = gen.integers(0, vocab, cfg.prompt_tokens).tolist()

    def prefill() -> float:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prefill_ids)
        return time.perf_counter() - t

    def decode() -> float:
        llm.reset()
        llm.eval(prompt_ids)
        ENERGY.start()
        t = time.perf_counter()
        for _ in range(cfg.decode_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        seconds = time.perf_counter() - t
        ENERGY.stop(cfg.decode_tokens)
        return seconds / cfg.decode_tokens

    llm.reset()
    llm.eval(prefill_ids[:16])  # warm-up
    return _timed_result(cfg, load_s, rss_loaded, prefill, decode, threads, "cpu (llama.cpp)")


def _onnxruntime(path: str, cfg, device: str) -> dict:
    """The same protocol in onnxruntime: prefill of random ids in one run from an empty cache; decode one token at a
    time (greedy), each step fed the previous step's `present` tensors."""
    import numpy as np

    from compressor.evaluate.llama_cpp_runtime import default_threads
    from compressor.evaluate.onnx_runtime import open_decoder

    threads = cfg.threads or default_threads()
    t0 = time.perf_counter()
    dec = open_decoder(path, threads, device)
    load_s = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss
    gen = np.random.default_rng(0)
    vocab = dec.session.get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else dec.config["vocab_size"]
    prefill_ids = gen.integers(0, vocab, (1, cfg.prefill_tokens))
    prompt_ids = gen.integers(0, vocab, (1, cfg.prompt_tokens))

    def prefill() -> float:
        t = time.perf_counter()
        dec.step(prefill_ids, dec.empty_cache(1), 0)
        return time.perf_counter() - t

    def decode() -> float:
        logits, cache = dec.step(prompt_ids, dec.empty_cache(1), 0)
        ENERGY.start()
        t = time.perf_counter()
        for i in range(cfg.decode_tokens):
            token = np.array([[int(np.argmax(logits[0, -1]))]])
            logits, cache = dec.step(token, cache, cfg.prompt_tokens + i)
        seconds = time.perf_counter() - t
        ENERGY.stop(cfg.decode_tokens)
        return seconds / cfg.decode_tokens

    dec.step(prefill_ids[:, :16], dec.empty_cache(1), 0)  # warm-up
    return _timed_result(cfg, load_s, rss_loaded, prefill, decode, threads, f"{device} (onnxruntime)")


def _timed_result(cfg, load_s: float, rss_loaded: int, prefill, decode, threads: int, device: str) -> dict:
    """Median of `cfg.repeats` runs of `prefill()` (seconds) and `decode()` (seconds per token), as JSON fields."""
    prefill_s = statistics.median(prefill() for _ in range(cfg.repeats))
    decode_s = statistics.median(decode() for _ in range(cfg.repeats))
    return {
        "load_seconds": round(load_s, 3),
        "prefill_tokens_per_second": round(cfg.prefill_tokens / prefill_s, 2),
        "decode_ms_per_token": round(decode_s * 1000, 3),
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_mb": round(_peak_rss_bytes() / 2**20, 1),
        "threads": threads,
        "device": device,
        "prompt_tokens": cfg.prompt_tokens,
        "decode_tokens": cfg.decode_tokens,
        "prefill_tokens": cfg.prefill_tokens,
        **ENERGY.fields(),
    }


def _peak_rss_bytes() -> int:
    """This process's own peak: VmHWM belongs to its address space, whereas ru_maxrss survives exec and would
    report the parent's footprint at fork time."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
