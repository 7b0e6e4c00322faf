"""`compress`: thin click commands over the library (everything here is reachable from Python)."""
from __future__ import annotations

import json
import logging
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
@common
def run(recipe: Path, output: str | None, overwrite: bool, quiet: bool, verbose: bool, as_json: bool) -> None:
    """Run RECIPE: compress, export, evaluate and report."""
    from .recipe import Recipe, RecipeError

    _setup_logging(quiet, verbose)
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
        result = run_recipe(r, overwrite=overwrite)
    except (RunError, ModelError, DataError, ShapeError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; no partial run folder was left behind", 130)
    _print_report(result.report, as_json, quiet, str(result.output))
    if not result.passed:
        _fail("budget exceeded: " + "; ".join(result.failures), EXIT_BUDGET)


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


if __name__ == "__main__":
    main()
