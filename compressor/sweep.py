"""`compress sweep`: one base recipe, many variants (a grid and/or a list of overrides), run with the work they share
done once, then audited side by side.

A sweep file:

    base: quickstart.yaml              # a recipe file (relative to the sweep file) or an inline recipe mapping
    grid:                              # every combination of these values (dotted paths into the recipe)
      stages.0.quantize.method: [rtn, gptq]
      stages.0.quantize.bits: [4, 8]
      export: {gguf: [{gguf: {type: q4_0}}], onnx: [{onnx: {weights: int4}}]}   # {label: value}: labels name
    variants:                          # and/or explicit variants
      - {name: awq-w4, set: {stages.0.quantize.method: awq}}
    output: sweeps/quant               # variants land in OUTPUT/variants/NAME, the audit in OUTPUT
    gates: {max_perplexity_increase: 0.15, max_kl: 0.2}   # as `compress audit --gate`: the best variant that meets
                                                           # them is named; none: `compress sweep` exits 3

Every variant is validated as a full recipe before anything runs. A variant whose folder already holds a finished run
of the same recipe is not run again, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .recipe import Recipe, RecipeError

log = logging.getLogger("compressor")

SWEEP_KEYS = ("base", "grid", "variants", "output", "gates")


class SweepError(ValueError):
    """A sweep file that cannot be run, with the key at fault."""


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    recipe: Recipe


@dataclass
class Sweep:
    variants: list[Variant]
    output: Path
    gates: dict[str, float] = field(default_factory=dict)
    source: str = "sweep"


def load_sweep(path: str | Path) -> Sweep:
    from .fileio import read_yaml

    path = Path(path)
    return sweep_from_dict(read_yaml(path, "sweep", SweepError), base_dir=path.parent, source=str(path))


def sweep_from_dict(spec: Any, base_dir: Path = Path("."), source: str = "sweep") -> Sweep:
    if not isinstance(spec, dict):
        raise SweepError(f"{source}: a sweep is a mapping with keys {list(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    if "base" not in spec:
        raise SweepError(f"{source}: base: missing; give a recipe file or an inline recipe mapping")
    base = _base(spec["base"], base_dir, source)
    output = Path(spec.get("output") or base.get("output") or "sweeps/sweep")
    points = _grid(spec.get("grid"), source) + _listed(spec.get("variants"), source)
    if not points:
        raise SweepError(f"{source}: no variants: give a non-empty grid (path: [values]) and/or a variants list")
    names = [n for n, _ in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{source}: variant names repeat: {dupes}; name the explicit variants (name: ...)")
    variants = []
    for name, overrides in points:
        data = copy.deepcopy(base)
        for dotted, value in overrides.items():
            if dotted.split(".")[0] == "output":
                raise SweepError(f"{source}: variant {name}: output is set by the sweep (OUTPUT/variants/NAME)")
            _set(data, dotted, value, f"{source}: variant {name}: {dotted}")
        data["output"] = str(output / "variants" / name)
        try:
            recipe = Recipe.from_dict(data, source=f"{source}: variant {name} (set {overrides})")
        except RecipeError as e:
            raise SweepError(str(e)) from None
        variants.append(Variant(name, overrides, recipe))
    return Sweep(variants, output, _gates(spec.get("gates"), source), source)


def _base(base: Any, base_dir: Path, source: str) -> dict[str, Any]:
    if isinstance(base, str):
        from .fileio import read_yaml

        base = read_yaml(Path(base) if Path(base).is_absolute() else base_dir / base, f"{source}: base: recipe",
                         SweepError)
    if not isinstance(base, dict):
        raise SweepError(f"{source}: base: a recipe file path or a recipe mapping; got {type(base).__name__}")
    try:
        Recipe.from_dict(base, source=f"{source}: base")  # a broken base is one error, not one per variant
    except RecipeError as e:
        raise SweepError(str(e)) from None
    return base


def _grid(grid: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{source}: grid: a mapping of dotted recipe paths to lists of values, e.g. "
                         "{stages.0.quantize.bits: [4, 8]}")
    labelled: dict[str, list[tuple[str, Any]]] = {}
    for path, values in grid.items():
        if isinstance(values, dict) and values:  # {label: value}: the labels name the variants
            labelled[path] = [(str(k), v) for k, v in values.items()]
        elif isinstance(values, list) and values:
            labelled[path] = [(_name({path: v}), v) for v in values]
        else:
            raise SweepError(f"{source}: grid.{path}: a non-empty list of values (or a mapping {{label: value}}); "
                             f"got {values!r}")
    keys = list(labelled)
    points = []
    for combo in itertools.product(*(labelled[k] for k in keys)):
        points.append(("-".join(label for label, _ in combo), {k: v for k, (_, v) in zip(keys, combo)}))
    return points


def _listed(variants: Any, source: str) -> list[tuple[str, dict[str, Any]]]:
    if variants is None:
        return []
    if not isinstance(variants, list) or not variants:
        raise SweepError(f"{source}: variants: a non-empty list of {{name: ..., set: {{path: value}}}}")
    points = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or set(v) - {"name", "set"} or not isinstance(v.get("set"), dict):
            raise SweepError(f"{source}: variants[{i}]: a mapping {{name: ..., set: {{dotted.path: value}}}}; "
                             f"got {v!r}")
        name = str(v.get("name") or _name(v["set"]))
        if not re.fullmatch(r"[A-Za-z0-9._=+-]+", name):
            raise SweepError(f"{source}: variants[{i}].name {name!r}: use letters, digits and . _ = + - (it names "
                             "a folder)")
        points.append((name, dict(v["set"])))
    return points


def _name(overrides: dict[str, Any]) -> str:
    """A folder-safe name from the override values, e.g. {..method: gptq, ..bits: 4} -> gptq-4."""
    parts = []
    for value in overrides.values():
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9.=+]+", "_", text).strip("_") or "x")
    return "-".join(parts) or "base"


def _set(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set a dotted path (`stages.0.quantize.bits`); list items must exist, mapping keys may be new (the recipe
    schema then says whether they are valid)."""
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SweepError(f"{where}: {here}: the list has {len(node)} item(s); use an index below "
                                 f"{len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise SweepError(f"{where}: {'.'.join(parts[:i])} is {node!r}, not a mapping or list")


def _gates(gates: Any, source: str) -> dict[str, float]:
    from .audit import AuditError, parse_gates

    try:
        return parse_gates(gates)
    except AuditError as e:
        raise SweepError(f"{source}: gates: {e}") from None


def finished(variant: Variant) -> bool:
    """The variant's folder holds a complete run of exactly this recipe (run folders appear only when complete)."""
    out = Path(variant.recipe.output)
    try:
        done = yaml.safe_load((out / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return (out / "report.json").is_file() and done == variant.recipe.to_dict()


BACKENDS = ("local", "process", "ray")


def run_sweep(sweep: Sweep, overwrite: bool = False, backend: str = "local", workers: int | None = None,
              address: str | None = None) -> dict[str, Any]:
    """Run every variant not already finished, then audit them all; returns the sweep record (also written to
    OUTPUT/sweep.json).

    Variants with identical stages form a group that one worker runs back to back, sharing the loaded model, the
    data, the baseline measurements and the compressed model. Backends: ``local`` runs all groups in this process
    (everything shared); ``process`` runs groups in a pool of `workers` processes on this machine; ``ray`` runs each
    group as a Ray task (`address`: an existing cluster; none: a local Ray instance). In the parallel backends, speed
    measurements of concurrent groups share the machine: compare latencies from the local backend."""
    from .fileio import atomic_write_text
    from .run import preflight

    if backend not in BACKENDS:
        raise SweepError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if not overwrite:
        clash = [v.recipe.output for v in sweep.variants
                 if Path(v.recipe.output).is_dir() and any(Path(v.recipe.output).iterdir()) and not finished(v)]
        if clash:
            raise SweepError(f"{sweep.source}: {len(clash)} variant folder(s) hold a run of another recipe (e.g. "
                             f"{clash[0]}); pass --overwrite to replace them, or set another output")
    for v in sweep.variants:  # data, model, exporters: every variant's early errors before hours of work
        if not finished(v):
            preflight(v.recipe, overwrite=True)
    sweep.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    order = sorted(range(len(sweep.variants)), key=lambda i: _stage_key(sweep.variants[i]))  # shared work adjacent
    rows: dict[str, dict[str, Any]] = {}
    groups: list[list[dict[str, Any]]] = []
    for n, i in enumerate(order, 1):
        v = sweep.variants[i]
        if finished(v):
            log.info("sweep: variant %d/%d %s: already finished in %s, not run again", n, len(order), v.name,
                     v.recipe.output)
            rows[v.name] = {"name": v.name, "status": "resumed", "output": v.recipe.output, "overrides": v.overrides}
            continue
        spec = {"name": v.name, "overrides": v.overrides, "recipe": v.recipe.to_dict(), "position": n,
                "count": len(order), "stage_key": _stage_key(v)}
        if groups and groups[-1][-1]["stage_key"] == spec["stage_key"]:
            groups[-1].append(spec)
        else:
            groups.append([spec])
    results = _dispatch(groups, backend, workers, address)
    summary: dict[str, dict[str, float]] = {}
    saved = 0.0
    for res in results:
        for row in res["rows"]:
            rows[row["name"]] = row
        saved += res["seconds_saved"]
        for kind, counts in res["shared"].items():
            into = summary.setdefault(kind, {})
            for key, value in counts.items():
                into[key] = round(into.get(key, 0) + value, 1)
    ordered = [rows[sweep.variants[i].name] for i in order]
    seconds = time.perf_counter() - start
    record = {"source": sweep.source, "output": str(sweep.output), "variants": ordered, "gates": sweep.gates,
              "backend": backend, "groups": len(groups), "seconds": round(seconds, 1), "shared": summary,
              # Each reuse skipped a computation whose cost was measured when it was made: run alone, the variants
              # would have paid it again.
              "seconds_if_run_alone_estimate": round(seconds + saved, 1)}
    if backend != "local":
        record["workers"] = results[0].get("workers") if results else 0
    ran = [r["output"] for r in ordered if r["status"] != "failed"]
    if ran:
        from .audit import audit

        result = audit(ran, sweep.output, sweep.gates)
        record["audit"] = {"passed": result["passed"], "best": result["best"], "files": result["files"]}
    atomic_write_text(sweep.output / "sweep.json", json.dumps(record, indent=2) + "\n")
    return record


def _dispatch(groups: list[list[dict[str, Any]]], backend: str, workers: int | None,
              address: str | None) -> list[dict[str, Any]]:
    if not groups:
        return []
    cwd = str(Path.cwd())  # recipes may name files relative to where `compress` runs
    if backend == "local":
        return [run_group([spec for g in groups for spec in g], cwd, None)]  # one process: everything shared
    import os

    cpus = os.cpu_count() or 1
    n = max(1, min(workers or cpus, len(groups)))
    threads = max(1, cpus // n)
    log.info("sweep: %d group(s) of variants on %d %s worker(s), %d thread(s) each", len(groups), n, backend, threads)
    if backend == "process":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: torch's thread pools and a forked parent do not mix
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(run_group, groups, [cwd] * len(groups), [threads] * len(groups)))
    else:
        try:
            import ray
        except ImportError:
            raise SweepError("backend ray: Ray is not installed; pip install 'compressor[ray]' (or ray)") from None
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=None if address else cpus, include_dashboard=False,
                     log_to_driver=True, ignore_reinit_error=True)
        task = ray.remote(num_cpus=threads)(run_group)
        results = ray.get([task.remote(g, cwd, threads) for g in groups])
    for r in results:
        r["workers"] = n
    return results


def run_group(specs: list[dict[str, Any]], cwd: str, threads: int | None) -> dict[str, Any]:
    """Run variants (recipes as dicts) one after the other with shared work; picklable for process and Ray
    workers. Returns their sweep rows and what was shared."""
    import os

    from .run import SharedWork, run

    if threads is not None:  # a worker process: its own logging, working directory and share of the cores
        import torch

        os.chdir(cwd)
        torch.set_num_threads(threads)
        if not logging.getLogger().handlers and not log.handlers:
            logging.basicConfig(level=logging.INFO, format="[compress worker %(process)d] %(message)s")
    shared = SharedWork()
    rows = []
    for spec in specs:
        recipe = Recipe.from_dict(spec["recipe"])
        log.info("sweep: variant %d/%d %s (%s)", spec["position"], spec["count"], spec["name"], spec["overrides"])
        t = time.perf_counter()
        try:
            result = run(recipe, overwrite=True, shared=shared, resume=True)  # an interrupted variant continues
        except Exception as e:  # one broken variant must not lose the others' results
            log.error("sweep: variant %s failed: %s", spec["name"], e)
            rows.append({"name": spec["name"], "status": "failed", "error": f"{type(e).__name__}: {e}",
                         "overrides": spec["overrides"], "output": recipe.output})
            continue
        rows.append({"name": spec["name"], "status": "done", "seconds": round(time.perf_counter() - t, 1),
                     "passed_budget": result.passed, "output": recipe.output, "overrides": spec["overrides"]})
    return {"rows": rows, "shared": shared.summary(), "seconds_saved": shared.total_saved()}


def _stage_key(v: Variant) -> str:
    from .run import stages_inputs

    return json.dumps(stages_inputs(v.recipe), sort_keys=True)
