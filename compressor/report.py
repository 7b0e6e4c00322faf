"""Run reports: budget gates, report.md and the short table the CLI prints."""
from __future__ import annotations

from typing import Any

from .recipe import BudgetConfig


def budget_failures(budget: BudgetConfig | None, baseline: dict[str, Any], artifact: dict[str, Any]) -> list[str]:
    if budget is None:
        return []
    name = artifact["name"]
    m = artifact.get("accuracy", {})
    fails = []
    if budget.max_perplexity_increase is not None and "perplexity" in m:
        increase = m["perplexity"] / baseline["accuracy"]["perplexity"] - 1
        if increase > budget.max_perplexity_increase:
            fails.append(f"{name}: perplexity {m['perplexity']:.3f} is {increase:+.1%} over the baseline "
                         f"{baseline['accuracy']['perplexity']:.3f}; budget max_perplexity_increase "
                         f"{budget.max_perplexity_increase:.1%}")
    if budget.max_kl_divergence is not None and "kl_divergence" in m and m["kl_divergence"] > budget.max_kl_divergence:
        fails.append(f"{name}: KL divergence {m['kl_divergence']:.4f} > budget {budget.max_kl_divergence}")
    if budget.min_top1_agreement is not None and "top1_agreement" in m and \
            m["top1_agreement"] < budget.min_top1_agreement:
        fails.append(f"{name}: top-1 agreement {m['top1_agreement']:.3f} < budget {budget.min_top1_agreement}")
    size = artifact.get("size", {}).get("bytes")
    if budget.max_size_mb is not None and size is not None and size / 1e6 > budget.max_size_mb:
        fails.append(f"{name}: size {size / 1e6:.1f} MB > budget {budget.max_size_mb} MB")
    return fails


_COLUMNS = [  # (header, getter, format)
    ("artifact", lambda r: r["name"], "{}"),
    ("runtime", lambda r: r.get("runtime"), "{}"),
    ("ppl", lambda r: r.get("accuracy", {}).get("perplexity"), "{:.3f}"),
    ("Δppl", lambda r: r.get("accuracy", {}).get("perplexity_increase"), "{:+.2%}"),
    ("KL", lambda r: r.get("accuracy", {}).get("kl_divergence"), "{:.4f}"),
    ("top-1", lambda r: r.get("accuracy", {}).get("top1_agreement"), "{:.3f}"),
    ("size MB", lambda r: _mb(r.get("size", {}).get("bytes")), "{:.1f}"),
    ("bits/w", lambda r: r.get("size", {}).get("bits_per_weight"), "{:.2f}"),
    ("decode ms/tok", lambda r: r.get("speed", {}).get("decode_ms_per_token"), "{:.2f}"),
    ("prefill tok/s", lambda r: r.get("speed", {}).get("prefill_tokens_per_second"), "{:.0f}"),
    ("peak RSS MB", lambda r: r.get("speed", {}).get("peak_rss_mb"), "{:.0f}"),
]


def _cell(value: Any) -> str:
    """A table cell; a mapping (e.g. predicted KL per width) as `key: value` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:.3g}" if isinstance(v, float) else f"{k}: {v}" for k, v in value.items())
    return str(value)


def _mb(b: int | None) -> float | None:
    return None if b is None else b / 1e6


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [report["baseline"], *report["artifacts"]]


def table(report: dict[str, Any]) -> list[list[str]]:
    out = [[c[0] for c in _COLUMNS]]
    for r in rows(report):
        line = []
        for _, get, fmt in _COLUMNS:
            v = get(r)
            line.append("-" if v is None else fmt.format(v))
        out.append(line)
    return out


def text_table(report: dict[str, Any]) -> str:
    t = table(report)
    widths = [max(len(row[i]) for row in t) for i in range(len(t[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in t)


def markdown(report: dict[str, Any]) -> str:
    t = table(report)
    lines = [f"# Compression report: {report['model']['id']}", ""]
    lines += [f"- Created: {report['created']} by compressor {report['compressor_version']}",
              f"- Baseline: {report['baseline']['description']}",
              f"- Evaluation: {report['evaluation']['description']}"]
    if report.get("calibration"):
        lines.append(f"- Calibration: {report['calibration']['description']}")
    lines.append(f"- Speed: {report['speed_protocol']}")
    verdict = "passed" if report["passed"] else "FAILED"
    lines += [f"- Budget: {verdict}" + ("" if report["passed"] else ": " + "; ".join(report["failures"])), ""]
    lines += ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
    lines += ["| " + " | ".join(r) + " |" for r in t[1:]]
    checks = []
    for art in report["artifacts"]:
        if "tokenizer_check" in art:
            c = art["tokenizer_check"]
            checks.append(f"- {art['name']}: llama.cpp tokenizes {c['identical']}/{c['texts']} sample texts as HF")
        if "generation_check" in art:
            c = art["generation_check"]
            checks.append(f"- {art['name']}: greedy generation in {art['runtime']} matches {c['reference']} for "
                          f"{c['identical_prefix']}/{c['new_tokens']} tokens after a {c['prompt_tokens']}-token "
                          "prompt")
        for key in ("gguf", "onnx"):
            redone = (art.get(key) or {}).get("requantized")
            if redone:
                checks.append(f"- {art['name']}: {len(redone)} calibrated layer(s) rounded again to fit the format")
            own = (art.get(key) or {}).get("layer_types") or (art.get(key) or {}).get("own_width")
            if own:
                kinds = ", ".join(f"{n} as {t if key == 'gguf' else f'{t}-bit'}" for t, n in own.items())
                checks.append(f"- {art['name']}: layers kept at their own width (mixed precision): {kinds}")
    if checks:
        lines += ["", "## Runtime checks", "", *checks]
    lines += _resources_section(report)
    lines += _cuda_section(report)
    for stage in report["stages"]:
        lines += ["", f"## Stage: {stage['kind']} ({stage['seconds']:.1f} s)", "",
                  ", ".join(f"{k}={v}" for k, v in stage["summary"].items())]
        if stage["layers"]:
            keys = list(stage["layers"][0])
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k, "")) for k in keys) + " |" for row in stage["layers"]]
    for note in report.get("notes", []):
        lines += ["", f"> {note}"]
    return "\n".join(lines) + "\n"


def _cuda_section(report: dict[str, Any]) -> list[str]:
    cuda = report.get("targets", {}).get("cuda")
    if cuda is None:
        return []
    if "skipped" in cuda:
        return ["", "## Target: cuda", "", f"Skipped: {cuda['skipped']}."]
    lines = ["", f"## Target: cuda ({cuda['device']}, {cuda['dtype']})", "",
             "| variant | decode ms/tok | speedup | prefill tok/s | peak GPU MB | ppl | KL | top-1 | decode | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    base_ppl = cuda.get("baseline_accuracy", {}).get("perplexity")
    for name, r in cuda["variants"].items():
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |||||||||")
            continue
        acc = r.get("accuracy", {"perplexity": base_ppl})
        cells = [name, f"{r['decode_ms_per_token']:.3f}", f"{r['decode_speedup']:.2f}x",
                 f"{r['prefill_tokens_per_s']:.0f}", f"{r['peak_gpu_bytes'] / 1e6:.0f}",
                 cell(acc.get("perplexity"), "{:.3f}"), cell(acc.get("kl_divergence"), "{:.4f}"),
                 cell(acc.get("top1_agreement"), "{:.3f}"), r["decode_method"], r.get("note", "")]
        lines.append("| " + " | ".join(cells) + " |")
    cpu = [f"{a['name']} {a['speed']['decode_speedup']:.2f}x" for a in report["artifacts"]
           if a.get("speed", {}).get("decode_speedup")]
    if cpu:
        lines += ["", "CPU decode speedup of the artifacts over the baseline, for comparison: " + ", ".join(cpu)]
    return lines


def cell(v: Any, fmt: str) -> str:
    """A number formatted for a table, "-" where it was not measured."""
    return "-" if v is None else fmt.format(v)


def _resources_section(report: dict[str, Any]) -> list[str]:
    entries = [e for e in rows(report) if e.get("resources")]
    if not entries:
        return []
    lines = ["", "## Resources", "",
             "| model | GFLOPs/token | nonzero GFLOPs | decode tok/s | prefill tok/s | peak MB | download MB | "
             "energy J/token | cost per 1M tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        r = e["resources"]
        energy = r.get("energy_j_per_token")
        cells = [e["name"], cell(_giga(r.get("flops_per_token")), "{:.4g}"),
                 cell(_giga(r.get("flops_per_token_nonzero")), "{:.4g}"), cell(r.get("decode_tokens_per_s"), "{:.1f}"),
                 cell(r.get("prefill_tokens_per_s"), "{:.0f}"), cell(r.get("peak_memory_mb"), "{:.0f}"),
                 cell(_mb(r.get("download_bytes")), "{:.1f}"),
                 f"{energy:.4f}" if isinstance(energy, (int, float)) else "-",
                 cell(r.get("cost_per_million_tokens"), "{:.4g}")]
        lines.append("| " + " | ".join(cells) + " |")
    first = entries[0]["resources"]
    lines.append("")
    lines.append(f"FLOPs of one token decoded at position {first.get('flops_context')} (linear layers as stored plus "
                 "attention); nonzero counts only weights that are not zero.")
    reasons = {e["resources"]["energy_j_per_token"] for e in entries
               if isinstance(e["resources"].get("energy_j_per_token"), str)}
    sources = {e["resources"].get("energy_source") for e in entries if e["resources"].get("energy_source")}
    if sources:
        lines.append(f"Energy: {', '.join(sorted(sources))}, over the timed decode (the whole package: other "
                     "processes included).")
    for reason in sorted(reasons):
        lines.append(f"Energy: {reason}.")
    if first.get("price_per_hour") is None:
        lines.append("Cost: set `evaluate.price_per_hour` to the machine's price for a cost per million tokens.")
    else:
        lines.append(f"Cost: at {first['price_per_hour']:g} per hour, decoding one token at a time.")
    return lines


def _giga(v: Any) -> float | None:
    return None if v is None else v / 1e9
