"""`compress audit` on tiny runs: rows, Pareto fronts, gates, bad input, atomic writes, CLI, and the HTML report in a
real browser (headless Chromium, skipped when none is installed)."""
import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from compressor.audit import AuditError, GATES, audit, gate_failures, pareto_front, parse_gates
from compressor.cli import EXIT_BUDGET, EXIT_INPUT, main
from compressor.recipe import Recipe
from compressor.run import run
from conftest import tiny_recipe

PNG_DATA = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def runs(model_dir_factory, tmp_path_factory) -> dict[str, Path]:
    """Three real runs of one tiny model on the same windows: GPTQ 4-bit (two exports), RTN 8-bit, RTN 3-bit."""
    root = tmp_path_factory.mktemp("runs")
    model = model_dir_factory("llama")
    variants = {
        "gptq4": dict(export=[{"safetensors": {"format": "gptq"}},
                              {"safetensors": {"format": "dense", "name": "dense"}}]),
        "rtn8": dict(stages=[{"quantize": {"method": "rtn", "bits": 8, "group_size": 32}}]),
        "rtn3": dict(stages=[{"quantize": {"method": "rtn", "bits": 3, "group_size": 32}}]),
    }
    out = {}
    for name, over in variants.items():
        out[name] = run(Recipe.from_dict(tiny_recipe(model, root / name, **over))).output
    return out


def _with_speed(src: Path, dst: Path, ms: float, base_ms: float = 20.0) -> Path:
    """A copy of a real run with decode/prefill/RSS numbers written in: measuring speed starts a fresh process per
    model (~20 s here), which the slow test below does for real."""
    shutil.copytree(src, dst)
    report = json.loads((dst / "report.json").read_text())
    report["baseline"]["speed"] = {"decode_ms_per_token": base_ms, "prefill_tokens_per_second": 300.0,
                                   "peak_rss_mb": 400.0}
    for i, art in enumerate(report["artifacts"]):
        art["speed"] = {"decode_ms_per_token": ms + i, "prefill_tokens_per_second": 500.0, "peak_rss_mb": 300.0,
                        "decode_speedup": base_ms / (ms + i)}
    (dst / "report.json").write_text(json.dumps(report))
    return dst


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    report = json.loads((dst / "report.json").read_text())
    edit(report)
    (dst / "report.json").write_text(json.dumps(report))
    return dst


# ------------------------------------------------------------------------------------------ Pareto front
def test_pareto_front_minimizes_both():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (2, 6), (5, 1)]
    # (3,4) is beaten by (2,3); (2,6) by (1,5); (5,1) by (4,1)
    assert pareto_front(pts) == [0, 1, 3]


def test_pareto_front_edge_cases():
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 3.0)]) == [0]
    assert pareto_front([(1, 1), (1, 1), (2, 2)]) == [0, 1]  # identical points do not dominate each other
    assert pareto_front([(1, 2), (1, 3)]) == [0]  # equal in one, better in the other: dominated
    # maximize the second coordinate (e.g. top-1 agreement): higher is better
    assert pareto_front([(1, 0.9), (2, 0.95), (3, 0.9)], minimize=(True, False)) == [0, 1]
    assert pareto_front([(1, 1, 1), (0, 2, 2), (2, 2, 0), (2, 2, 2)], minimize=(True, True, True)) == [0, 1, 2]
    with pytest.raises(ValueError, match="coordinates"):
        pareto_front([(1, 2, 3)])


# ------------------------------------------------------------------------------------------------ gates
def test_gates_are_validated():
    assert parse_gates({"max_kl": "0.2", "min_speedup": 1}) == {"max_kl": 0.2, "min_speedup": 1.0}
    assert parse_gates(None) == {}
    with pytest.raises(AuditError, match="unknown gate 'max_klx'; valid gates: max_perplexity_increase, max_kl, "
                                         "min_speedup, max_size_mb"):
        parse_gates({"max_klx": 0.1})
    with pytest.raises(AuditError, match="gate max_kl: expected a number, got 'low'"):
        parse_gates({"max_kl": "low"})
    with pytest.raises(AuditError, match="max_size_mb: expected a number >= 0"):
        parse_gates({"max_size_mb": -1})


def test_gate_failures_name_the_number_and_fail_unmeasured():
    row = {"perplexity_increase": 0.2, "kl_divergence": 0.01, "decode_speedup": None, "size_mb": 90.0}
    fails = gate_failures(row, {"max_perplexity_increase": 0.15, "max_kl": 0.05, "min_speedup": 1.2,
                                "max_size_mb": 100})
    assert fails == ["max_perplexity_increase: +20.00% > +15.00%",
                     "min_speedup: not measured (decode_speedup missing from the run's report)"]
    assert set(GATES) == {"max_perplexity_increase", "max_kl", "min_speedup", "max_size_mb"}


# ------------------------------------------------------------------------------------ audit of real runs
def test_audit_rows_files_and_plots(runs, tmp_path):
    out = tmp_path / "audit"
    result = audit([runs["gptq4"], runs["rtn8"], runs["rtn3"]], out)
    assert sorted(p.name for p in out.iterdir()) == ["audit.html", "audit.json", "audit.md"]
    assert json.loads((out / "audit.json").read_text()) == json.loads(json.dumps(result))

    rows = result["rows"]
    assert [(r["run"], r["artifact"]) for r in rows] == [("gptq4", "safetensors"), ("gptq4", "dense"),
                                                         ("rtn8", "safetensors"), ("rtn3", "safetensors")]
    report = json.loads((runs["gptq4"] / "report.json").read_text())
    art, base = report["artifacts"][0], report["baseline"]
    r = rows[0]
    assert r["index"] == 1 and r["format"] == "safetensors-gptq" and r["runtime"] == "torch (transformers)"
    assert r["size_mb"] == pytest.approx(art["size"]["bytes"] / 1e6)
    assert r["bits_per_weight"] == pytest.approx(art["size"]["bits_per_weight"])
    assert r["perplexity"] == pytest.approx(art["accuracy"]["perplexity"])
    assert r["perplexity_increase"] == pytest.approx(art["accuracy"]["perplexity"]
                                                     / base["accuracy"]["perplexity"] - 1)
    assert r["kl_divergence"] == pytest.approx(art["accuracy"]["kl_divergence"])
    assert r["top1_agreement"] == pytest.approx(art["accuracy"]["top1_agreement"])
    assert r["decode_ms_per_token"] is None and r["decode_speedup"] is None  # these runs did not time speed
    assert r["run_dir"] == str(runs["gptq4"].resolve()) and Path(r["recipe"]).name == "recipe.yaml"
    assert r["stages"] == "quantize gptq 4-bit g32" and rows[2]["stages"] == "quantize rtn 8-bit g32"
    assert len(result["baselines"]) == 1 and result["baselines"][0]["size_mb"] > rows[0]["size_mb"]

    front = [rows[i]["index"] for i in pareto_front([(r["size_mb"], r["perplexity"]) for r in rows])]
    assert result["pareto"]["size_perplexity"] == front
    assert [r["index"] for r in rows if "size_perplexity" in r["pareto"]] == front
    smallest = min(rows, key=lambda r: r["size_mb"])
    assert smallest["index"] in front  # nothing is smaller, so nothing can dominate it
    # no gates: every row passes and the best is the lowest perplexity
    assert result["passed"] and result["gates"] == {}
    assert result["best"]["index"] == min(rows, key=lambda r: r["perplexity"])["index"]

    plots = {p["name"]: p for p in result["plots"]}
    assert plots["size_perplexity"]["skipped"] is None and plots["kl_bits"]["skipped"] is None
    assert "no row has both a decode latency" in plots["latency_perplexity"]["skipped"]
    page = (out / "audit.html").read_text()
    images = PNG_DATA.findall(page)
    assert len(images) == 2 and all(base64.b64decode(b).startswith(b"\x89PNG\r\n\x1a\n") for b in images)
    assert "Decode latency vs perplexity: skipped: no row has both a decode latency" in page
    # self-contained: no scripts, stylesheets, images or fonts fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page
    for href in re.findall(r'<a href="([^"]+)"', page):  # links relative to the audit folder reach the runs
        assert (out / href).exists()
    md = (out / "audit.md").read_text()
    assert "| # | run | artifact |" in md and "[run](../" in md and "[recipe](../" in md
    assert "Plot 'Decode latency vs perplexity' skipped" in md


def test_speed_rows_plot_latency_and_gate(runs, tmp_path):
    def ppl(run_dir):
        return json.loads((run_dir / "report.json").read_text())["artifacts"][0]["accuracy"]["perplexity"]

    # Random tiny models do not order perplexity by bits, so the more accurate run is made the slow one: a real
    # trade-off, both ends of it optimal
    accurate, other = sorted([runs["rtn3"], runs["rtn8"]], key=ppl)
    fast = _with_speed(other, tmp_path / "fast", ms=5.0)
    slow = _with_speed(accurate, tmp_path / "slow", ms=15.0)
    result = audit([fast, slow, runs["gptq4"]], tmp_path / "audit", {"min_speedup": 2.0})
    rows = {r["run"]: r for r in result["rows"]}
    assert rows["fast"]["decode_speedup"] == pytest.approx(4.0) and rows["fast"]["peak_rss_mb"] == 300.0
    assert rows["fast"]["prefill_tokens_per_second"] == 500.0
    # lower latency and lower perplexity: the fast 3-bit and the slow but accurate 8-bit are both optimal
    assert set(result["pareto"]["latency_perplexity"]) == {rows["fast"]["index"], rows["slow"]["index"]}
    assert all(p["skipped"] is None for p in result["plots"])
    assert len(PNG_DATA.findall((tmp_path / "audit" / "audit.html").read_text())) == 3
    # the gate: only 'fast' is 2x faster; rows without speed fail it instead of passing unmeasured
    assert [r["run"] for r in result["rows"] if r["passes_gates"]] == ["fast"]
    assert result["best"]["run"] == "fast" and result["passed"]
    assert rows["gptq4"]["gate_failures"] == ["min_speedup: not measured (decode_speedup missing from the run's "
                                              "report)"]
    assert result["baselines"][0]["decode_ms_per_token"] == 20.0  # taken from the runs that timed it


def test_best_row_and_no_row_passing(runs, tmp_path):
    rows = audit([runs["gptq4"], runs["rtn8"], runs["rtn3"]], tmp_path / "a")["rows"]
    kls = sorted(r["kl_divergence"] for r in rows)
    result = audit([runs["gptq4"], runs["rtn8"], runs["rtn3"]], tmp_path / "a", {"max_kl": kls[-1] * 0.999})
    passing = [r for r in result["rows"] if r["passes_gates"]]
    assert len(passing) == len(rows) - 1
    best = min(passing, key=lambda r: (r["perplexity"], r["size_mb"]))
    assert result["best"]["index"] == best["index"] and result["passed"]
    result = audit([runs["gptq4"], runs["rtn8"]], tmp_path / "a", {"max_kl": kls[0] / 10})
    assert not result["passed"] and result["best"] is None
    assert all(r["gate_failures"][0].startswith("max_kl: ") for r in result["rows"])
    assert "No row meets the gates" in (tmp_path / "a" / "audit.md").read_text()


# ------------------------------------------------------------------------------------------- bad input
def test_folder_without_report_is_named(runs, tmp_path):
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(AuditError, match=r"not-a-run: not a run folder: it has no report\.json"):
        audit([runs["gptq4"], empty], tmp_path / "audit")
    with pytest.raises(AuditError, match="missing: no such folder"):
        audit([tmp_path / "missing"], tmp_path / "audit")
    with pytest.raises(AuditError, match="no run folders given"):
        audit([], tmp_path / "audit")
    assert not (tmp_path / "audit").exists()


def test_mixed_baselines_refused_unless_allowed(runs, model_dir_factory, tmp_path):
    # a real run of the same model on different evaluation windows
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "two-windows")
    recipe["evaluate"]["data"]["windows"] = 2
    other = run(Recipe.from_dict(recipe)).output
    with pytest.raises(AuditError) as err:
        audit([runs["gptq4"], other], tmp_path / "audit")
    msg = str(err.value)
    assert "'gptq4'" in msg and "'two-windows'" in msg and "different baselines" in msg
    assert "evaluation windows 3 vs 2" in msg and "--allow-mixed" in msg
    assert not (tmp_path / "audit").exists()

    bigger = _edited(runs["rtn8"], tmp_path / "other-model",
                     lambda r: r["model"].update(id="other/model", parameters=r["model"]["parameters"] * 2))
    with pytest.raises(AuditError, match=r"model id .* vs 'other/model'; model parameters \d+ vs \d+"):
        audit([runs["gptq4"], bigger], tmp_path / "audit")

    result = audit([runs["gptq4"], other], tmp_path / "audit", allow_mixed=True)
    assert len(result["baselines"]) == 2 and "different baselines" in result["notes"][0]
    assert "different baselines" in (tmp_path / "audit" / "audit.html").read_text()


def test_same_folder_names_are_told_apart(runs, tmp_path):
    a = shutil.copytree(runs["rtn8"], tmp_path / "sweep-a" / "run-0")
    b = shutil.copytree(runs["rtn3"], tmp_path / "sweep-b" / "run-0")
    result = audit([a, b, a], tmp_path / "audit")  # the repeated folder is audited once
    assert [r["run"] for r in result["rows"]] == ["sweep-a/run-0", "sweep-b/run-0"]


def test_failed_audit_leaves_previous_files(runs, tmp_path, monkeypatch):
    import compressor.audit as audit_module

    out = tmp_path / "audit"
    audit([runs["rtn8"]], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(result):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(audit_module, "draw_plots", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        audit([runs["rtn8"], runs["rtn3"]], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, no temporaries


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_prints_table_json_and_quiet(runs, tmp_path):
    args = ["audit", str(runs["gptq4"]), str(runs["rtn8"]), "-o", str(tmp_path / "audit")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "gptq4" in res.stdout and "ppl" in res.stdout and "Lowest perplexity (no gates given)" in res.stdout
    assert "plot 'Decode latency vs perplexity' skipped" in res.stdout
    assert f"audit written to {tmp_path / 'audit'}" in res.stdout

    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0
    printed = json.loads(res.stdout)
    assert printed == json.loads((tmp_path / "audit" / "audit.json").read_text())

    res = CliRunner().invoke(main, args + ["--quiet"])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr == ""


def test_cli_gates_exit_codes(runs, tmp_path):
    base = ["audit", str(runs["gptq4"]), str(runs["rtn8"]), "-o", str(tmp_path / "audit")]
    res = CliRunner().invoke(main, base + ["--gate", "max_kl=0.000000001", "--quiet"])
    assert res.exit_code == EXIT_BUDGET and res.stdout == ""
    assert "error: no row meets the gates" in res.stderr

    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"max_kl": 10, "max_perplexity_increase": 5.0}))
    res = CliRunner().invoke(main, base + ["--gates", str(gates)])
    assert res.exit_code == 0, res.output
    assert "Best row meeting the gates: #" in res.stdout
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["gates"] == {
        "max_kl": 10.0, "max_perplexity_increase": 5.0}
    # --gate overrides the file
    res = CliRunner().invoke(main, base + ["--gates", str(gates), "--gate", "max_kl=1e-9", "-q"])
    assert res.exit_code == EXIT_BUDGET

    res = CliRunner().invoke(main, base + ["--gate", "max_speedup=2"])
    assert res.exit_code == EXIT_INPUT
    assert "unknown gate 'max_speedup'; valid gates: max_perplexity_increase, max_kl, min_speedup" in res.stderr
    res = CliRunner().invoke(main, base + ["--gate", "max_kl"])
    assert res.exit_code == EXIT_INPUT and "expected NAME=VALUE" in res.stderr
    res = CliRunner().invoke(main, ["audit", str(tmp_path), "-o", str(tmp_path / "x")])
    assert res.exit_code == EXIT_INPUT and "has no report.json" in res.stderr

    res = CliRunner().invoke(main, ["audit", "--help"])
    assert all(name in res.stdout for name in GATES) and "--allow-mixed" in res.stdout


# ------------------------------------------------------------------------------------------ in a browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


# Synchronous on purpose: chromium's --dump-dom does not wait for promises (img.decode()) after the load event.
# Drawing each image on a canvas and reading its pixels back decodes it and shows what it holds.
_DECODE_PROBE = """<script>
window.addEventListener("load", () => {
  const r = [...document.images].map(i => {
    const c = document.createElement("canvas"); c.width = i.naturalWidth; c.height = i.naturalHeight;
    if (!i.complete || !c.width) return {ok: false};
    const ctx = c.getContext("2d"); ctx.drawImage(i, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    let inked = 0;
    for (let k = 0; k < px.length; k += 4) if (px[k] + px[k + 1] + px[k + 2] < 600) inked++;
    return {ok: true, w: c.width, h: c.height, inked: inked / (c.width * c.height), src: i.src.slice(0, 21)};
  });
  const pre = document.createElement("pre"); pre.id = "decoded"; pre.textContent = JSON.stringify(r);
  document.body.appendChild(pre);
});
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install -y "
                                                "--no-install-recommends chromium)")
def test_html_renders_in_headless_chromium(runs, tmp_path):
    out = tmp_path / "audit"
    audit([_with_speed(runs["rtn3"], tmp_path / "fast", 5.0), runs["rtn8"]], out)
    page = (out / "audit.html").read_text()
    # A copy of the page with a probe that writes each image's decode result into the DOM after load
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", _DECODE_PROBE))
    flags = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", "--virtual-time-budget=10000", probe.as_uri()],
                         capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="decoded">(.*?)</pre>', dom)
    assert found, f"the page did not finish loading in chromium: {dom[-500:]!r}"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(images) == 3
    for img in images:
        assert img["ok"] and img["src"] == "data:image/png;base64" and img["w"] > 500 and img["h"] > 300
        assert 0.01 < img["inked"] < 0.5  # axes, text and points on a white figure: neither blank nor garbage

    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1300,1400", "--hide-scrollbars",
                            (out / "audit.html").as_uri()], capture_output=True, timeout=180)
    from PIL import Image

    pixels = Image.open(shot).convert("RGB")
    colors = pixels.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # not blank: text, plots, anti-aliasing
    # matplotlib's first colour (the one runtime here) appears only inside the plots
    assert any(abs(r - 31) + abs(g - 119) + abs(b - 180) < 30 for _, (r, g, b) in colors)


# ------------------------------------------------------------------------------------------------ slow
@pytest.mark.slow
def test_audit_of_runs_that_timed_speed(model_dir_factory, tmp_path):
    """Real decode/prefill measurements (fresh processes per model) reach the latency plot and the speedup gate."""
    recipe = tiny_recipe(model_dir_factory("llama"), tmp_path / "timed")
    recipe["evaluate"]["metrics"] += ["latency", "memory"]
    recipe["evaluate"]["speed"] = {"prompt_tokens": 8, "decode_tokens": 4, "prefill_tokens": 16, "repeats": 1}
    timed = run(Recipe.from_dict(recipe)).output
    result = audit([timed], tmp_path / "audit", {"min_speedup": 0.01})
    row = result["rows"][0]
    assert row["decode_ms_per_token"] > 0 and row["decode_speedup"] > 0 and row["peak_rss_mb"] > 0
    assert result["pareto"]["latency_perplexity"] == [1] and result["passed"]
    assert all(p["skipped"] is None for p in result["plots"])
