"""`compress audit`: compare finished runs. One row per (run, artifact), Pareto fronts, gates, and a report written
as audit.json, audit.md and a self-contained audit.html (plots embedded as PNG).

Layout of this module: reading and checking run folders, the table and its gates (plain data, no plotting), the
plots (matplotlib, off-screen), then the renderers. `audit()` ties them together and is what the CLI calls.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from . import __version__
from .fileio import atomic_write_text
from .report import cell

AUDIT_FILES = ("audit.json", "audit.md", "audit.html")

# gate name -> (row field, comparison, description shown in --help and in errors)
GATES: dict[str, tuple[str, str, str]] = {
    "max_perplexity_increase": ("perplexity_increase", "max", "relative perplexity increase over the run's own "
                                                              "baseline, e.g. 0.15 = +15%"),
    "max_kl": ("kl_divergence", "max", "KL divergence from the baseline, nats per token"),
    "min_speedup": ("decode_speedup", "min", "decode speedup over the baseline (baseline ms/token / artifact's)"),
    "max_size_mb": ("size_mb", "max", "artifact size on disk in MB (10^6 bytes)"),
}


class AuditError(ValueError):
    """Input that cannot be audited (a folder that is not a run, baselines that differ, an unknown gate)."""


@dataclass
class Run:
    name: str
    folder: Path
    report: dict[str, Any]
    recipe: Path | None  # the resolved recipe.yaml the run wrote, when present
    recipe_data: dict[str, Any] | None


# ------------------------------------------------------------------------------------------- reading runs
def load_run(path: str | Path) -> Run:
    """Read one run folder (or its report.json); errors name the path and what is wrong with it."""
    path = Path(path)
    if path.is_file() and path.name == "report.json":
        path = path.parent
    if not path.exists():
        raise AuditError(f"{path}: no such folder")
    if not path.is_dir():
        raise AuditError(f"{path}: not a run folder (expected a folder written by `compress run`)")
    report_file = path / "report.json"
    if not report_file.is_file():
        raise AuditError(f"{path}: not a run folder: it has no report.json (expected a folder written by "
                         "`compress run`)")
    try:
        report = json.loads(report_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AuditError(f"{report_file}: unreadable: {e}") from None
    if not isinstance(report, dict) or "artifacts" not in report:
        raise AuditError(f"{report_file}: not a compressor run report (no 'artifacts')")
    if "baseline" not in report or "evaluation" not in report:
        raise AuditError(f"{path}: the run was not evaluated (its recipe has no `evaluate` section), so there is "
                         "nothing to compare")
    recipe_file = path / "recipe.yaml"
    recipe_data = None
    if recipe_file.is_file():
        try:
            recipe_data = yaml.safe_load(recipe_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            recipe_data = None  # the report is what is audited; a damaged recipe only loses the stage summary
    return Run(path.resolve().name, path.resolve(), report, recipe_file.resolve() if recipe_file.is_file() else None,
               recipe_data if isinstance(recipe_data, dict) else None)


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    if not run_dirs:
        raise AuditError("no run folders given")
    runs: list[Run] = []
    seen: set[Path] = set()
    for d in run_dirs:
        run = load_run(d)
        if run.folder not in seen:  # a folder matched twice by shell globs is audited once
            seen.add(run.folder)
            runs.append(run)
    _unique_names(runs)
    return runs


def _unique_names(runs: list[Run]) -> None:
    """Runs are named by their folder; folders of the same name (two sweeps' `run-0`) get parent folders added
    until every name differs."""
    depth = 1
    while len({r.name for r in runs}) < len(runs) and depth < 32:
        depth += 1
        names = [r.name for r in runs]
        for r in runs:
            if names.count(r.name) > 1:
                r.name = "/".join(r.folder.parts[-depth:])


def baseline_identity(report: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for two runs' numbers to share a baseline: the model, the evaluation text and windows,
    and (as a check on both) the baseline's measured perplexity."""
    model = report.get("model") or {}
    ev = report.get("evaluation") or {}
    ident = {f"model {k}": model.get(k) for k in ("id", "model_type", "parameters")}
    ident.update({f"evaluation {k}": ev.get(k) for k in ("source", "split", "windows", "seq_len", "tokens_scored",
                                                           "description")})
    ident["baseline perplexity"] = ((report.get("baseline") or {}).get("accuracy") or {}).get("perplexity")
    return ident


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "baseline perplexity" and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        # The same model on the same windows scores the same up to float noise (another device, thread count)
        return math.isclose(a, b, rel_tol=1e-3)
    return a == b


def baseline_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    ia, ib = baseline_identity(a), baseline_identity(b)
    return [f"{k} {ia[k]!r} vs {ib[k]!r}" for k in ia if not _same(k, ia[k], ib[k])]


def check_baselines(runs: Sequence[Run], allow_mixed: bool = False) -> list[str]:
    """Raise unless every run shares the first run's baseline; with `allow_mixed`, return the differences as
    notes for the report instead."""
    notes = []
    for other in runs[1:]:
        diff = baseline_differences(runs[0].report, other.report)
        if not diff:
            continue
        msg = f"runs {runs[0].name!r} ({runs[0].folder}) and {other.name!r} ({other.folder}) were measured " \
              f"against different baselines: {'; '.join(diff)}"
        if not allow_mixed:
            raise AuditError(msg + ". Their perplexities, KL and speedups are not comparable; pass --allow-mixed "
                                   "(in Python: allow_mixed=True) to audit them together anyway")
        notes.append(msg + " (audited together because of --allow-mixed: each row's increase and speedup are "
                           "relative to its own run's baseline)")
    return notes


# ----------------------------------------------------------------------------------------- rows and gates
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mb(b: Any) -> float | None:
    v = _num(b)
    return None if v is None else v / 1e6


def stage_summary(run: Run) -> str:
    """A short description of the run's stages ("quantize gptq 4-bit g32"), to tell variants apart in a table."""
    stages = (run.recipe_data or {}).get("stages")
    if not isinstance(stages, list):
        stages = [{s.get("kind", "?"): s.get("summary", {})} for s in run.report.get("stages") or []]
    parts = []
    for stage in stages:
        if not isinstance(stage, dict) or len(stage) != 1:
            continue
        kind, cfg = next(iter(stage.items()))
        cfg = cfg if isinstance(cfg, dict) else {}
        words = [kind]
        for key in ("method", "bits", "group_size", "sparsity", "pattern", "ratio", "energy", "rank", "steps"):
            v = cfg.get(key)
            if v is None or isinstance(v, (dict, list)):
                continue
            words.append(f"{v}-bit" if key == "bits" else f"g{v}" if key == "group_size" else
                         str(v) if key in ("method", "pattern") else f"{key} {v}")
        parts.append(" ".join(words))
    return " + ".join(parts) or "none"


def _speed_row(entry: Mapping[str, Any]) -> dict[str, float | None]:
    s = entry.get("speed") or {}
    r = entry.get("resources") or {}
    flops = _num(r.get("flops_per_token"))
    return {"decode_ms_per_token": _num(s.get("decode_ms_per_token")),
            "prefill_tokens_per_second": _num(s.get("prefill_tokens_per_second")),
            "peak_rss_mb": _num(s.get("peak_rss_mb")),
            "gflops_per_token": flops / 1e9 if flops is not None else None,
            "energy_j_per_token": _num(r.get("energy_j_per_token")),
            "cost_per_million_tokens": _num(r.get("cost_per_million_tokens"))}


def run_rows(run: Run) -> list[dict[str, Any]]:
    """The audit rows of one run: one per evaluated artifact, flat and JSON-ready (None where not measured)."""
    base = run.report["baseline"]
    base_ppl = _num((base.get("accuracy") or {}).get("perplexity"))
    stages = stage_summary(run)
    rows = []
    for art in run.report["artifacts"]:
        acc = art.get("accuracy") or {}
        ppl = _num(acc.get("perplexity"))
        increase = ppl / base_ppl - 1 if ppl is not None and base_ppl else _num(acc.get("perplexity_increase"))
        size = art.get("size") or {}
        row = {
            "run": run.name, "artifact": art.get("name"), "format": art.get("format"), "runtime": art.get("runtime"),
            "stages": stages,
            "size_mb": _mb(size.get("bytes")), "bits_per_weight": _num(size.get("bits_per_weight")),
            "perplexity": ppl, "baseline_perplexity": base_ppl, "perplexity_increase": increase,
            "kl_divergence": _num(acc.get("kl_divergence")), "top1_agreement": _num(acc.get("top1_agreement")),
            **_speed_row(art),
            "decode_speedup": _num((art.get("speed") or {}).get("decode_speedup")),
            "run_dir": str(run.folder), "recipe": str(run.recipe) if run.recipe else None,
            "artifact_path": str(run.folder / art["path"]) if art.get("path") else None,
        }
        rows.append(row)
    return rows


def baseline_row(run: Run) -> dict[str, Any]:
    base = run.report["baseline"]
    size = base.get("size") or {}
    return {"run": run.name, "description": base.get("description"), "runtime": base.get("runtime"),
            "size_mb": _mb(size.get("bytes")), "bits_per_weight": _num(size.get("bits_per_weight")),
            "perplexity": _num((base.get("accuracy") or {}).get("perplexity")), **_speed_row(base)}


def parse_gates(gates: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate gates ({name: number}); unknown names and non-numbers are errors that list the valid names."""
    if not gates:
        return {}
    if not isinstance(gates, Mapping):
        raise AuditError(f"gates: expected a mapping of gate name to number, got {type(gates).__name__}")
    out = {}
    for name, value in gates.items():
        if name not in GATES:
            raise AuditError(f"unknown gate {name!r}; valid gates: {', '.join(GATES)}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise AuditError(f"gate {name}: expected a number, got {value!r}") from None
        if not math.isfinite(v) or v < 0:
            raise AuditError(f"gate {name}: expected a number >= 0, got {value!r}")
        out[name] = v
    return out


_GATE_TEXT: dict[str, Callable[[float], str]] = {
    "max_perplexity_increase": lambda v: f"{v:+.2%}", "max_kl": lambda v: f"{v:.4g}",
    "min_speedup": lambda v: f"{v:.2f}x", "max_size_mb": lambda v: f"{v:.3g} MB",
}


def gate_failures(row: Mapping[str, Any], gates: Mapping[str, float]) -> list[str]:
    """Why a row misses the gates. A gate whose number the run did not measure fails: a CI gate must not pass on a
    number nobody measured."""
    fails = []
    for name, limit in gates.items():
        field, kind, _ = GATES[name]
        value = row.get(field)
        show = _GATE_TEXT[name]
        if value is None:
            fails.append(f"{name}: not measured ({field} missing from the run's report)")
        elif (kind == "max" and value > limit) or (kind == "min" and value < limit):
            fails.append(f"{name}: {show(value)} {'>' if kind == 'max' else '<'} {show(limit)}")
    return fails


def pareto_front(points: Sequence[Sequence[float]], minimize: Sequence[bool] = (True, True)) -> list[int]:
    """Indices (ascending) of the points no other point dominates. `minimize[i]` says whether lower is better
    along dimension i (False: higher is better). A point dominates another when it is at least as good in every
    dimension and better in one, so identical points are all kept."""
    signs = [1.0 if m else -1.0 for m in minimize]
    keyed = []
    for p in points:
        if len(p) != len(signs):
            raise ValueError(f"point {tuple(p)} has {len(p)} coordinates; minimize has {len(signs)}")
        keyed.append([s * float(v) for s, v in zip(signs, p)])
    front = []
    for i, p in enumerate(keyed):
        dominated = any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                        for j, q in enumerate(keyed) if j != i)
        if not dominated:
            front.append(i)
    return front


# (name, x field, y field, title, x label, y label): trade-offs where lower is better on both axes
TRADE_OFFS = [
    ("size_perplexity", "size_mb", "perplexity", "Artifact size vs perplexity",
     "artifact size (MB on disk)", "perplexity on the evaluation windows (lower is better)"),
    ("latency_perplexity", "decode_ms_per_token", "perplexity", "Decode latency vs perplexity",
     "decode latency (ms per token, batch 1)", "perplexity on the evaluation windows (lower is better)"),
    ("kl_bits", "bits_per_weight", "kl_divergence", "KL divergence vs bits per weight",
     "bits per weight (weight files, bits / parameter)", "KL divergence from the baseline (nats per token)"),
]


def mark_pareto(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Set each row's `pareto` (the trade-offs it is optimal in); return each trade-off's front as row numbers."""
    fronts: dict[str, list[int]] = {}
    for row in rows:
        row["pareto"] = []
    for name, x, y, *_ in TRADE_OFFS:
        have = [r for r in rows if r[x] is not None and r[y] is not None]
        front = [have[i] for i in pareto_front([(r[x], r[y]) for r in have])]
        for r in front:
            r["pareto"].append(name)
        fronts[name] = sorted(r["index"] for r in front)
    return fronts


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The passing row of lowest perplexity, then smallest size (rows lacking a number sort after those with it)."""
    def key(r: Mapping[str, Any]) -> tuple:
        ppl, size = r["perplexity"], r["size_mb"]
        return (ppl is None, ppl or 0.0, size is None, size or 0.0, r["index"])

    passing = [r for r in rows if r["passes_gates"]]
    return min(passing, key=key) if passing else None


# ------------------------------------------------------------------------------------------- orchestration
def audit(run_dirs: Sequence[str | Path], out: str | Path, gates: Mapping[str, Any] | None = None, *,
          allow_mixed: bool = False) -> dict[str, Any]:
    """Audit run folders: build the table, mark the Pareto fronts, apply `gates`, draw the plots and write
    audit.json, audit.md and audit.html into `out`. Returns what audit.json holds.

    Everything is computed before the first file is written, and each file is replaced atomically, so an error
    leaves a previous audit in `out` as it was."""
    gate_values = parse_gates(gates)
    runs = load_runs(run_dirs)
    notes = check_baselines(runs, allow_mixed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AuditError(f"{out}: exists and is not a folder")

    rows = [row for run in runs for row in run_rows(run)]
    if not rows:
        raise AuditError("the runs hold no artifacts to compare: " + ", ".join(str(r.folder) for r in runs))
    for i, row in enumerate(rows, 1):
        row["index"] = i
        row["gate_failures"] = gate_failures(row, gate_values)
        row["passes_gates"] = not row["gate_failures"]
    fronts = mark_pareto(rows)
    best = best_row(rows)

    baselines: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    for run in runs:  # one baseline unless --allow-mixed let different ones in
        same = next((i for i, rep in enumerate(reports) if not baseline_differences(rep, run.report)), None)
        if same is None:
            reports.append(run.report)
            baselines.append({**baseline_row(run), "identity": baseline_identity(run.report)})
            continue
        # Runs of one baseline may measure different things (one timed speed, one not): keep every number
        for key, value in baseline_row(run).items():
            if baselines[same].get(key) is None:
                baselines[same][key] = value
    protocols = {r.report.get("speed_protocol") for r in runs
                 if r.report.get("speed_protocol") and any(a.get("speed") for a in r.report["artifacts"])}
    if len(protocols) > 1:
        notes.append("the runs measured speed with different protocols (prompt lengths, threads, device); decode "
                     "ms/token are comparable only within one protocol, speedups only against each run's baseline")

    first = runs[0].report
    result: dict[str, Any] = {
        "compressor_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": first.get("model"),
        "evaluation": (first.get("evaluation") or {}).get("description"),
        "runs": [{"name": r.name, "folder": str(r.folder), "recipe": str(r.recipe) if r.recipe else None,
                  "created": r.report.get("created"), "speed_protocol": r.report.get("speed_protocol"),
                  "artifacts": len(r.report["artifacts"])} for r in runs],
        "baselines": baselines,
        "gates": gate_values,
        "rows": rows,
        "pareto": fronts,
        "best": None if best is None else {"index": best["index"], "run": best["run"],
                                           "artifact": best["artifact"]},
        "passed": best is not None,
        "notes": notes,
        "files": {name: str((out / name).resolve()) for name in AUDIT_FILES},
    }
    plots = draw_plots(result)
    result["plots"] = [{"name": p.name, "title": p.title, "skipped": p.skipped} for p in plots]

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "audit.md", markdown(result, out))
    atomic_write_text(out / "audit.html", to_html(result, plots, out))
    return result


# ------------------------------------------------------------------------------------------------- plots
@dataclass
class Plot:
    name: str
    title: str
    png: bytes | None  # None when skipped
    skipped: str | None = None


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h", "<", ">"]
_SKIP_REASON = {
    "size_perplexity": "no row has both a size and a perplexity (evaluate.metrics needs size and perplexity)",
    "latency_perplexity": "no row has both a decode latency and a perplexity (speed is measured only when "
                          "evaluate.metrics has latency)",
    "kl_bits": "no row has both bits per weight and a KL divergence (evaluate.metrics needs size and "
               "kl_divergence)",
}


def draw_plots(result: Mapping[str, Any]) -> list[Plot]:
    """One PNG per trade-off, or a reason it was skipped."""
    plots = []
    model = (result.get("model") or {}).get("id") or "model"
    per_run: dict[str, int] = {}
    for r in result["rows"]:
        per_run[r["run"]] = per_run.get(r["run"], 0) + 1
    for name, x, y, title, xlabel, ylabel in TRADE_OFFS:
        rows = [r for r in result["rows"] if r[x] is not None and r[y] is not None]
        if not rows:
            plots.append(Plot(name, title, None, _SKIP_REASON[name]))
            continue
        bases = [b for b in result["baselines"] if b.get(x) is not None and b.get(y) is not None]
        labels = {r["index"]: _point_label(r, per_run[r["run"]]) for r in rows}
        png = _scatter(rows, bases, labels, (x, y), (f"{title}\n{_short(model, 70)}", xlabel, ylabel), name)
        plots.append(Plot(name, title, png))
    return plots


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _point_label(row: Mapping[str, Any], artifacts_in_run: int) -> str:
    # A sweep's run names already say what the variant is; the artifact is needed only when a run has several
    name = _short(row["run"], 28)
    if artifacts_in_run > 1:
        name += f" · {_short(str(row['artifact']), 16)}"
    return f"#{row['index']} {name}"


def _wide(values: Sequence[float]) -> bool:
    """Log scale when the values span more than a decade (4-bit next to a float32 baseline); never for <= 0."""
    pos = [v for v in values if v > 0]
    return len(pos) == len(values) and len(pos) > 1 and max(pos) / min(pos) > 10


def _scatter(rows: Sequence[Mapping[str, Any]], baselines: Sequence[Mapping[str, Any]], labels: Mapping[int, str],
             fields: tuple[str, str], text: tuple[str, str, str], front_name: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    x, y = fields
    fig = Figure(figsize=(10.5, 5.8), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    runtimes = list(dict.fromkeys(r["runtime"] or "unknown" for r in rows))
    handles = []
    for i, rt in enumerate(runtimes):
        pts = [r for r in rows if (r["runtime"] or "unknown") == rt]
        marker, color = _MARKERS[i % len(_MARKERS)], f"C{i % 10}"
        ax.scatter([r[x] for r in pts], [r[y] for r in pts], s=46, c=color, marker=marker, zorder=3,
                   edgecolors="white", linewidths=0.6)
        handles.append(Line2D([], [], ls="", marker=marker, color=color, markersize=7, label=rt))
    front = sorted((r for r in rows if front_name in r["pareto"]), key=lambda r: (r[x], r[y]))
    if front:
        ax.scatter([r[x] for r in front], [r[y] for r in front], s=190, facecolors="none", edgecolors="black",
                   linewidths=1.4, zorder=4)
        if len(front) > 1:  # the boundary of what the front dominates
            ax.step([r[x] for r in front], [r[y] for r in front], where="post", color="0.35", lw=1, ls="--",
                    zorder=2)
        handles.append(Line2D([], [], ls="--", color="0.35", marker="o", markersize=11, markerfacecolor="none",
                              markeredgecolor="black", label="Pareto-optimal (bold label)"))
    for b in baselines:
        ax.scatter([b[x]], [b[y]], s=170, marker="*", c="black", zorder=5)
    if baselines:
        handles.append(Line2D([], [], ls="", marker="*", color="black", markersize=12,
                              label=f"baseline: {_short(baselines[0].get('runtime') or 'uncompressed', 24)}"))
    xs = [r[x] for r in rows] + [b[x] for b in baselines]
    ys = [r[y] for r in rows] + [b[y] for b in baselines]
    for values, setter, axis in ((xs, ax.set_xscale, ax.xaxis), (ys, ax.set_yscale, ax.yaxis)):
        if _wide(values):
            setter("log")
            # Plain numbers (0.01, 250) read faster than 1e-02 or 10^2; a narrow span also labels 2x and 5x
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            few = math.log10(max(values) / min(values)) < 2
            axis.set_minor_formatter(FuncFormatter(
                lambda v, _, few=few: f"{v:g}" if few and f"{v:.0e}"[0] in "25" else ""))
    ax.margins(0.12)
    title, xlabel, ylabel = text
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    # Outside the axes, so it can never hide a point or a label
    ax.legend(handles=handles, title="runtime", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8.5,
              title_fontsize=9, framealpha=0.9)
    canvas.draw()  # fixes the layout, so label placement below works in final display coordinates

    on_front = {r["index"] for r in front}
    points = [(r[x], r[y], 10 if r["index"] in on_front else 5) for r in rows]
    points += [(b[x], b[y], 9) for b in baselines]
    # Baselines and Pareto labels are placed first, so crowding costs only the plain numbers
    todo = [(b[x], b[y], 9, "baseline" if len(baselines) == 1 else f"baseline ({_short(b['run'], 18)})",
             {"fontsize": 8.5}, True) for b in baselines]
    todo += [(r[x], r[y], 10, labels[r["index"]], {"fontsize": 8.5, "fontweight": "bold"}, True) for r in front]
    todo += [(r[x], r[y], 5, f"#{r['index']}", {"fontsize": 7.5, "color": "0.3"}, False)
             for r in rows if r["index"] not in on_front]
    _place_labels(fig, ax, canvas.get_renderer(), points, todo)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _place_labels(fig: Any, ax: Any, renderer: Any, points: Sequence[tuple[float, float, float]],
                  todo: Sequence[tuple[float, float, float, str, dict, bool]]) -> None:
    """Put each label at the first offset around its point (nearest ring first) that stays inside the axes and
    clear of every marker and earlier label; further rings get a leader line. A label that must be shown and finds
    no free place goes to its first offset anyway; a plain number is left out (the table lists every row)."""
    from matplotlib.transforms import Bbox

    px = fig.dpi / 72  # points -> pixels
    to_display = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    taken = []
    for xv, yv, radius in points:
        cx, cy = to_display((xv, yv))
        r = radius * px * 0.8  # a square around a round marker: its corners are empty
        taken.append(Bbox([[cx - r, cy - r], [cx + r, cy + r]]))
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    for xv, yv, radius, label, style, required in todo:
        chosen = None
        for ring in range(1, 7):
            step = radius * 0.8 + 3 + (ring - 1) * 12  # ring 1 just clears the marker's box
            for dx, dy in directions:
                # Measured without its leader line, whose extent reaches back to the point it labels
                ann = _annotation(ax, label, (xv, yv), (dx * step, dy * step), style, False)
                box = ann.get_window_extent(renderer).expanded(1.04, 1.1)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                ann.remove()
                if inside and not any(box.overlaps(t) for t in taken):
                    _annotation(ax, label, (xv, yv), (dx * step, dy * step), style, ring > 1)
                    chosen = box
                    break
            if chosen is not None:
                break
        if chosen is None:
            if not required:
                continue
            offset = (radius * 0.8 + 3,) * 2
            chosen = _annotation(ax, label, (xv, yv), offset, style, False).get_window_extent(renderer)
        taken.append(chosen)


def _annotation(ax: Any, label: str, xy: tuple[float, float], offset: tuple[float, float], style: dict,
                leader: bool) -> Any:
    ha = "left" if offset[0] > 0 else "right" if offset[0] < 0 else "center"
    va = "bottom" if offset[1] > 0 else "top" if offset[1] < 0 else "center"
    ann = ax.annotate(label, xy, xytext=offset, textcoords="offset points", ha=ha, va=va, zorder=6,
                      bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.7},
                      arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 4}
                      if leader else None, **style)
    ann.set_in_layout(False)  # placed after the layout was fixed; must not move the axes again
    return ann


# ---------------------------------------------------------------------------------------------- renderers
# (header, row field, format); the CLI's short table takes the columns marked short
_COLUMNS: list[tuple[str, str, str, bool]] = [
    ("#", "index", "{}", True),
    ("run", "run", "{}", True),
    ("artifact", "artifact", "{}", True),
    ("format", "format", "{}", False),
    ("runtime", "runtime", "{}", True),
    ("stages", "stages", "{}", False),
    ("size MB", "size_mb", "{:.3g}", True),
    ("bits/w", "bits_per_weight", "{:.2f}", True),
    ("ppl", "perplexity", "{:.3f}", True),
    ("Δppl", "perplexity_increase", "{:+.2%}", True),
    ("KL", "kl_divergence", "{:.4f}", True),
    ("top-1", "top1_agreement", "{:.3f}", False),
    ("decode ms/tok", "decode_ms_per_token", "{:.2f}", True),
    ("speedup", "decode_speedup", "{:.2f}x", True),
    ("prefill tok/s", "prefill_tokens_per_second", "{:.0f}", False),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}", False),
    ("GFLOPs/tok", "gflops_per_token", "{:.4g}", False),
    ("J/tok", "energy_j_per_token", "{:.4f}", False),
    ("cost/1M tok", "cost_per_million_tokens", "{:.4g}", False),
]


def _verdict(row: Mapping[str, Any], gates: Mapping[str, float]) -> str:
    if not gates:
        return ""
    return "pass" if row["passes_gates"] else "FAIL"


def _pareto_text(row: Mapping[str, Any]) -> str:
    names = {"size_perplexity": "size", "latency_perplexity": "latency", "kl_bits": "KL/bits"}
    return ", ".join(names[p] for p in row.get("pareto", []))


def text_table(result: Mapping[str, Any]) -> str:
    """The short table `compress audit` prints."""
    cols = [c for c in _COLUMNS if c[3]]
    table = [[c[0] for c in cols] + ["pareto"] + (["gates"] if result["gates"] else [])]
    for r in result["rows"]:
        table.append([cell(r[f], fmt) for _, f, fmt, _ in cols] + [_pareto_text(r) or "-"]
                     + ([_verdict(r, result["gates"])] if result["gates"] else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """Best row and gate outcome in words (shared by the CLI, audit.md and audit.html)."""
    gates = result["gates"]
    gate_text = ", ".join(f"{k} {_GATE_TEXT[k](v)}" for k, v in gates.items()) if gates else "none"
    lines = [f"Gates: {gate_text}"]
    rows = {r["index"]: r for r in result["rows"]}
    if result["best"] is None:
        lines.append(f"No row meets the gates ({len(rows)} row(s) checked).")
    else:
        b = rows[result["best"]["index"]]
        what = "Best row meeting the gates" if gates else "Lowest perplexity (no gates given)"
        lines.append(f"{what}: #{b['index']} {b['run']} / {b['artifact']} on {b['runtime']}: perplexity "
                     f"{cell(b['perplexity'], '{:.3f}')} ({cell(b['perplexity_increase'], '{:+.2%}')}), "
                     f"size {cell(b['size_mb'], '{:.3g}')} MB")
    return lines


def _rel(target: str | None, out: Path) -> str | None:
    """Links relative to the audit folder, so audit and runs can be moved or served together."""
    if not target:
        return None
    try:
        return Path(os.path.relpath(target, out.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return Path(target).as_posix()


def markdown(result: Mapping[str, Any], out: Path) -> str:
    model = result.get("model") or {}
    lines = [f"# Audit: {model.get('id', 'model')}", "",
             f"- Created: {result['created']} by compressor {result['compressor_version']}",
             f"- Runs: {len(result['runs'])}, rows (run × artifact): {len(result['rows'])}",
             f"- Evaluation: {result['evaluation']}"]
    for b in result["baselines"]:
        lines.append(f"- Baseline ({b['run']}): {b['description']}: perplexity {cell(b['perplexity'], '{:.3f}')}, "
                     f"{cell(b['size_mb'], '{:.3g}')} MB, decode {cell(b['decode_ms_per_token'], '{:.2f}')} ms/token")
    lines += [f"- {s}" for s in summary_lines(result)]
    lines += ["- Plots: audit.html (size vs perplexity, decode latency vs perplexity, KL vs bits per weight)", ""]
    head = [c[0] for c in _COLUMNS] + ["Pareto", "gate failures", "links"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [cell(r[f], fmt).replace("|", "\\|") for _, f, fmt, _ in _COLUMNS]
        fails = "; ".join(r["gate_failures"]) or ("pass" if result["gates"] else "")
        links = f"[run]({_rel(r['run_dir'], out)})" + (f" · [recipe]({_rel(r['recipe'], out)})" if r["recipe"]
                                                        else "")
        lines.append("| " + " | ".join(cells + [_pareto_text(r), fails.replace("|", "\\|"), links]) + " |")
    skipped = [p for p in result["plots"] if p["skipped"]]
    if skipped:
        lines += [""] + [f"- Plot '{p['title']}' skipped: {p['skipped']}" for p in skipped]
    for note in result["notes"]:
        lines += ["", f"> {note}"]
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1400px;color:#222;
padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2}td.t{text-align:left;white-space:nowrap}td.g{white-space:normal}
.wide{overflow-x:auto}tr.best{background:#e6f4e6}tr.fail td.g{color:#a00}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}.plots img{max-width:100%;height:auto;
border:1px solid #ddd}.skipped{color:#a60}.note{color:#555;border-left:3px solid #ccc;padding-left:.6em}
"""


def to_html(result: Mapping[str, Any], plots: Sequence[Plot], out: Path) -> str:
    """A single page with no external resources: styles inline, plots as base64 PNG data URIs."""
    e = html.escape
    model = (result.get("model") or {}).get("id", "model")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>Audit: {e(model)}</title><style>{_CSS}</style></head><body>",
             f"<h1>Audit: {e(model)}</h1><ul>",
             f"<li>Created {e(result['created'])} by compressor {e(result['compressor_version'])}; "
             f"{len(result['runs'])} run(s), {len(result['rows'])} row(s) (run × artifact)</li>",
             f"<li>Evaluation: {e(str(result['evaluation']))}</li>"]
    for b in result["baselines"]:
        parts.append(f"<li>Baseline ({e(b['run'])}): {e(str(b['description']))}: perplexity "
                     f"{cell(b['perplexity'], '{:.3f}')}, {cell(b['size_mb'], '{:.3g}')} MB</li>")
    parts += [f"<li><b>{e(s)}</b></li>" for s in summary_lines(result)] + ["</ul>", "<h2>Plots</h2>",
                                                                            '<div class="plots">']
    for p in plots:
        if p.png is None:
            parts.append(f'<p class="skipped">{e(p.title)}: skipped: {e(p.skipped or "")}</p>')
            continue
        data = base64.b64encode(p.png).decode("ascii")
        parts.append(f'<figure id="plot-{e(p.name)}"><img src="data:image/png;base64,{data}" '
                     f'alt="{e(p.title)}"></figure>')
    parts.append("</div><p>Points are numbered as the rows below. Circled points, labelled in bold, are "
                 "Pareto-optimal: no other row is as low on both axes and lower on one.</p>")
    head = [c[0] for c in _COLUMNS] + ["Pareto", "gates", "links"]
    parts.append('<h2>Rows</h2><div class="wide"><table><thead><tr>' + "".join(f"<th>{e(h)}</th>" for h in head)
                 + "</tr></thead><tbody>")
    best = (result["best"] or {}).get("index")
    text_cols = {"run", "artifact", "format", "runtime", "stages"}
    for r in result["rows"]:
        cls = "best" if r["index"] == best else "fail" if not r["passes_gates"] else ""
        cells = [f'<td class="t">{e(cell(r[f], fmt))}</td>' if f in text_cols else f"<td>{e(cell(r[f], fmt))}</td>"
                 for _, f, fmt, _ in _COLUMNS]
        gates = "<br>".join(e(f) for f in r["gate_failures"]) or ("pass" if result["gates"] else "")
        links = f'<a href="{e(_rel(r["run_dir"], out) or "")}">run</a>'
        if r["recipe"]:
            links += f' · <a href="{e(_rel(r["recipe"], out) or "")}">recipe</a>'
        parts.append(f'<tr class="{cls}">' + "".join(cells) + f'<td class="t">{e(_pareto_text(r))}</td>'
                     f'<td class="t g">{gates}</td><td class="t">{links}</td></tr>')
    parts.append("</tbody></table></div>")
    for note in result["notes"]:
        parts.append(f'<p class="note">{e(note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
