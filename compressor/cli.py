"""`compress`: thin click commands over the library (everything here is reachable from Python)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

EXIT_BUDGET = 3  # the run finished but a budget in the recipe was exceeded
EXIT_INPUT = 2  # bad recipe, model, data or output


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="[compress %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        import os

        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization bar
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
    except ImportError:
        pass


def _terminate_as_interrupt() -> None:
    """SIGTERM (a scheduler's kill, `timeout`) cleans up like Ctrl-C: no half-written run folder stays behind."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _fail(msg: str, code: int = EXIT_INPUT) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


_common = [
    click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors on stderr."),
    click.option("--verbose", "-v", is_flag=True, help="Debug logging."),
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
]


def common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@click.group()
@click.version_option(package_name="compressor")
def main() -> None:
    """Compress LLMs, export them, and check every artifact in its own runtime."""


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", help="Run folder (overrides the recipe's output).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of this recipe from the stages and blocks "
              "it finished (kept beside the output in .NAME.resume/).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the stage cache (~/.cache/compressor/stages; "
              "see COMPRESSOR_CACHE_DIR, COMPRESSOR_CACHE_MAX_GB).")
@common
def run(recipe: Path, output: str | None, overwrite: bool, resume: bool, no_cache: bool, quiet: bool, verbose: bool,
        as_json: bool) -> None:
    """Run RECIPE: compress, export, evaluate and report."""
    from .recipe import Recipe, RecipeError

    _setup_logging(quiet, verbose)
    if no_cache:
        os.environ["COMPRESSOR_CACHE"] = "off"
    from .distributed import init_from_env

    init_from_env()  # under torchrun: data-parallel calibration, rank 0 writes the run
    try:
        r = Recipe.from_yaml(recipe)
        if output:
            r = r.model_copy(update={"output": output})
    except RecipeError as e:
        _fail(str(e))
    from .data import DataError
    from .models import ModelError
    from .run import RunError, run as run_recipe
    from .stages.quantize import ShapeError

    _terminate_as_interrupt()
    try:
        result = run_recipe(r, overwrite=overwrite, resume=resume)
    except (RunError, ModelError, DataError, ShapeError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        from .resume import folder_for

        kept = folder_for(Path(r.output)).exists()
        _fail("interrupted; no partial run folder was left behind"
              + (f"; the finished stages and blocks are kept: `compress run --resume {recipe}` continues"
                 if kept else ""), 130)
    _print_report(result.report, as_json, quiet, str(result.output))
    if not result.passed:
        _fail("budget exceeded: " + "; ".join(result.failures), EXIT_BUDGET)


@main.command()
@click.argument("sweep_file", metavar="SWEEP", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace variant folders that hold a run of another recipe (finished "
              "runs of the same recipe are always kept and not run again).")
@click.option("--dry-run", is_flag=True, help="Validate every variant and list them; run nothing.")
@click.option("--backend", type=click.Choice(["local", "process", "ray"]), default="local", show_default=True,
              help="local: one process, all shared work done once; process: groups of variants with equal stages "
                   "in a pool of processes on this machine; ray: each group a Ray task (pip install ray).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel groups for the process and ray backends (default: the CPU count).")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray instance).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the stage cache.")
@common
def sweep(sweep_file: Path, overwrite: bool, dry_run: bool, backend: str, workers: int | None, address: str | None,
          no_cache: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Run every variant of SWEEP (a base recipe plus a grid and/or list of overrides), sharing the work they have
    in common, then audit them side by side. Exits 3 when gates are set and no variant meets them."""
    from .sweep import SweepError, finished, load_sweep, run_sweep

    _setup_logging(quiet, verbose)
    if no_cache:
        os.environ["COMPRESSOR_CACHE"] = "off"  # inherited by process and local Ray workers
    try:
        s = load_sweep(sweep_file)
    except SweepError as e:
        _fail(str(e))
    if dry_run:
        listed = [{"name": v.name, "overrides": v.overrides, "output": v.recipe.output, "finished": finished(v)}
                  for v in s.variants]
        if as_json:
            click.echo(json.dumps(listed, indent=2))
        elif not quiet:
            for row in listed:
                click.echo(f"{row['name']}: {row['overrides']} -> {row['output']}"
                           + (" (finished)" if row["finished"] else ""))
        return
    from .audit import AuditError
    from .data import DataError
    from .models import ModelError
    from .run import RunError

    _terminate_as_interrupt()
    try:
        record = run_sweep(s, overwrite=overwrite, backend=backend, workers=workers, address=address)
    except (SweepError, RunError, ModelError, DataError, AuditError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; finished variants are kept and a second `compress sweep` resumes after them", 130)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
    elif not quiet:
        for row in record["variants"]:
            click.echo(f"{row['name']}: {row['status']}" + (f" ({row['seconds']} s)" if "seconds" in row else "")
                       + (f": {row['error']}" if "error" in row else ""))
        click.echo(f"\nsweep: {record['seconds']} s; shared work: {record['shared']}; folder: {record['output']} "
                   "(sweep.json, audit.md, audit.html)")
        best = (record.get("audit") or {}).get("best")
        if record["gates"]:
            click.echo(f"best variant meeting the gates: {best['run']} / {best['artifact']}" if best else
                       "no variant meets the gates")
    failed = [r["name"] for r in record["variants"] if r["status"] == "failed"]
    if failed:
        _fail(f"{len(failed)} variant(s) failed: {', '.join(failed)} (see sweep.json)", 1)
    if record["gates"] and not (record.get("audit") or {}).get("passed"):
        _fail(f"no variant meets the gates {record['gates']}", EXIT_BUDGET)


def _print_report(report: dict, as_json: bool, quiet: bool, where: str | None) -> None:
    from .report import text_table

    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    if "baseline" in report and not quiet:
        click.echo(text_table(report))
    if where and not quiet:
        click.echo(f"\nrun folder: {where} (report.md, report.json, run.json)")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check-model", is_flag=True, help="Also resolve the model and read its config (no weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the resolved recipe as JSON.")
def validate(recipe: Path, check_model: bool, as_json: bool) -> None:
    """Check RECIPE (schema and cross-field rules) without loading a model."""
    from .recipe import Recipe, RecipeError

    try:
        r = Recipe.from_yaml(recipe)
        if check_model:
            from .models import ModelError, load_config

            try:
                load_config(r.model)
            except ModelError as e:
                raise RecipeError(f"{recipe}: model: {e}") from None
    except RecipeError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        click.echo(f"{recipe}: valid ({len(r.stages)} stage(s), {len(r.export)} export target(s))")


@main.command("eval")
@click.argument("artifact", type=click.Path(exists=True, path_type=Path))
@click.option("--baseline", help="Baseline model (default: the model of the run the artifact belongs to).")
@click.option("--data", "source", help="Evaluation text: python-docs, a text file or a JSONL file.")
@click.option("--windows", type=int, help="Number of evaluation windows.")
@click.option("--seq-len", type=int, help="Tokens per window.")
@click.option("--no-speed", is_flag=True, help="Skip the latency and memory measurement.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]))
@common
def eval_cmd(artifact: Path, baseline: str | None, source: str | None, windows: int | None, seq_len: int | None,
             no_speed: bool, device: str, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Evaluate an exported ARTIFACT against its uncompressed baseline."""
    _setup_logging(quiet, verbose)
    from .data import DataError
    from .models import ModelError
    from .recipe import RecipeError
    from .run import RunError, evaluate_artifact

    overrides: dict = {}
    data_over = {k: v for k, v in (("source", source), ("windows", windows), ("seq_len", seq_len)) if v is not None}
    if data_over:
        overrides["data"] = data_over
    if no_speed:
        overrides["metrics"] = ["perplexity", "kl_divergence", "top1_agreement", "size"]
    try:
        report = evaluate_artifact(artifact, baseline, _merge_data(artifact, overrides), device)
    except (RunError, ModelError, DataError, RecipeError) as e:
        _fail(str(e))
    _print_report(report, as_json, quiet, None)
    if not report["passed"]:
        _fail("budget exceeded: " + "; ".join(report["failures"]), EXIT_BUDGET)


def _merge_data(artifact: Path, overrides: dict) -> dict:
    """Merge --data/--windows/--seq-len into the run's own evaluate.data instead of replacing it."""
    if "data" not in overrides:
        return overrides
    record = artifact.parent / "run.json"
    base = {}
    if record.is_file():
        base = (json.loads(record.read_text())["recipe"].get("evaluate") or {}).get("data") or {}
    return {**overrides, "data": {**base, **overrides["data"]}}


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Describe a checkpoint folder, a GGUF file (or its folder), an ONNX export or a run folder."""
    from .run import RunError, inspect_artifact

    try:
        info = inspect_artifact(path)
    except RunError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    if "baseline" in info:  # a run folder
        from .report import text_table

        click.echo(text_table(info))
        return
    if info["format"].startswith("onnx"):
        for key in ("path", "format", "files_bytes", "opsets"):
            click.echo(f"{key}: {info[key]}")
        click.echo("operators: " + ", ".join(f"{k} x{v}" for k, v in info["operators"].items()))
        click.echo("MatMulNBits: " + (", ".join(f"{k} x{v}" for k, v in info["matmul_nbits"].items()) or "none"))
        click.echo(f"inputs: {len(info['inputs'])} ({', '.join(info['inputs'][:4])}, ...)")
        return
    if info["format"].startswith("gguf"):
        for key in ("path", "format", "architecture", "tokenizer_model", "tensors", "tensors_bytes", "file_bytes"):
            click.echo(f"{key}: {info[key]}")
        click.echo("tensor types: " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()))
        click.echo("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in info["hyperparameters"].items()))
        return
    for key in ("path", "format", "model_type", "num_hidden_layers", "hidden_size", "quantized_layers",
                "tensors_bytes", "files_bytes"):
        click.echo(f"{key}: {info[key]}")
    if info["quantization_config"]:
        click.echo("quantization_config: " + json.dumps(info["quantization_config"]))
    for name, tensors in list(info["layers"].items())[:10]:
        click.echo(f"  {name}: " + ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in tensors.items()))
    if len(info["layers"]) > 10:
        click.echo(f"  ... {len(info['layers']) - 10} more quantized layers")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", default="audit", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for audit.json, audit.md and audit.html (created; those three files are replaced).")
@click.option("--gate", "gate_args", multiple=True, metavar="NAME=VALUE",
              help="A gate every row is checked against; repeat for several (e.g. --gate max_kl=0.2 "
                   "--gate min_speedup=1.5).")
@click.option("--gates", "gates_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A YAML or JSON file mapping gate names to values; --gate options override it.")
@click.option("--allow-mixed", is_flag=True, help="Audit runs measured against different baselines (model or "
                                                  "evaluation windows) together instead of refusing.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")
@click.option("--json", "as_json", is_flag=True, help="Print audit.json's content on stdout.")
def audit(run_dirs: tuple[Path, ...], output: Path, gate_args: tuple[str, ...], gates_file: Path | None,
          allow_mixed: bool, quiet: bool, as_json: bool) -> None:
    """Compare finished runs: one row per (run, artifact), Pareto fronts, plots and gates.

    RUN_DIRS are folders written by `compress run`. Writes audit.json, audit.md and a self-contained audit.html
    (tables and plots: size vs perplexity, decode latency vs perplexity, KL vs bits per weight) into --output.

    \b
    Gates (a row missing the number a gate needs fails it):
      max_perplexity_increase  relative to the run's own baseline, 0.15 = +15%
      max_kl                   KL divergence from the baseline, nats per token
      min_speedup              decode speedup over the baseline
      max_size_mb              artifact size on disk, MB (10^6 bytes)

    With gates, the best row meeting all of them (lowest perplexity, then smallest size) is named, and the exit
    code is 3 when no row meets them. Exit code 2: bad input (not a run folder, different baselines, unknown gate).
    """
    import yaml

    from .audit import AuditError, audit as run_audit, summary_lines, text_table

    gates: dict = {}
    if gates_file is not None:
        try:
            loaded = yaml.safe_load(gates_file.read_text())  # YAML is a superset of JSON: one reader for both
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            _fail(f"{gates_file}: unreadable gates file: {e}")
        if not isinstance(loaded, dict):
            _fail(f"{gates_file}: expected a mapping of gate names to values, e.g. 'max_kl: 0.2'")
        gates.update(loaded)
    for arg in gate_args:
        name, sep, value = arg.partition("=")
        if not sep or not name.strip() or not value.strip():
            _fail(f"--gate {arg!r}: expected NAME=VALUE, e.g. --gate max_kl=0.2")
        gates[name.strip()] = value.strip()
    try:
        result = run_audit(list(run_dirs), output, gates, allow_mixed=allow_mixed)
    except AuditError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    elif not quiet:
        click.echo(text_table(result))
        click.echo("")
        for line in summary_lines(result):
            click.echo(line)
        for plot in result["plots"]:
            if plot["skipped"]:
                click.echo(f"plot '{plot['title']}' skipped: {plot['skipped']}")
        for note in result["notes"]:
            click.echo(f"note: {note}")
        click.echo(f"\naudit written to {output}/ (audit.html, audit.md, audit.json)")
    if result["gates"] and not result["passed"]:
        _fail(f"no row meets the gates ({len(result['rows'])} row(s) checked; see each row's gate failures)",
              EXIT_BUDGET)


if __name__ == "__main__":
    main()
