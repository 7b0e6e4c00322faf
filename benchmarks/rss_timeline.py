#!/usr/bin/env python
"""Run a Python script in this process while sampling its resident memory, labelled by the script's log lines.

    python benchmarks/rss_timeline.py [--every-ms 20] [--csv OUT.csv] SCRIPT [ARGS...]

Samples VmRSS, RssAnon and RssFile from /proc/self/status on a background thread. Each sample carries the last log
message the script emitted, so a peak can be placed (e.g. "block 17/30 done"). At the end it prints, on stderr, the
highest sample of each label in order and the overall peak; `--csv` keeps every sample. Linux only.
"""
from __future__ import annotations

import argparse
import csv
import logging
import runpy
import sys
import threading
import time
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def read_status() -> dict[str, float]:
    """The memory fields of /proc/self/status, in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[key] = int(rest.split()[0]) / 1024
    return out


class _LastMessage(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.label = "start"

    def emit(self, record: logging.LogRecord) -> None:
        self.label = record.getMessage()[:90]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every-ms", type=float, default=20.0)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("script")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()

    # the script's own basicConfig call is then a no-op; its INFO lines still reach stderr through this handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    last = _LastMessage()
    logging.getLogger().addHandler(last)
    samples: list[tuple[float, str, dict[str, float]]] = []
    done = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter() - t0, last.label, read_status()))
            done.wait(a.every_ms / 1000)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    sys.argv = [a.script, *a.args]
    try:
        runpy.run_path(a.script, run_name="__main__")
    finally:
        done.set()
        thread.join()
        report(samples, a.csv)


def report(samples: list[tuple[float, str, dict[str, float]]], path: Path | None) -> None:
    if not samples:
        return
    if path is not None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seconds", "label", *FIELDS])
            for t, label, s in samples:
                w.writerow([f"{t:.3f}", label, *(f"{s.get(k, 0):.1f}" for k in FIELDS)])
    peaks: dict[str, tuple[float, dict[str, float]]] = {}
    for t, label, s in samples:
        if label not in peaks or s["VmRSS"] > peaks[label][1]["VmRSS"]:
            peaks[label] = (t, s)
    print("\nhighest sample per log line (MB):", file=sys.stderr)
    print(f"{'s':>8} {'VmRSS':>8} {'anon':>8} {'file':>8}  after", file=sys.stderr)
    for label, (t, s) in peaks.items():
        print(f"{t:8.1f} {s['VmRSS']:8.1f} {s['RssAnon']:8.1f} {s['RssFile']:8.1f}  {label}", file=sys.stderr)
    t, label, s = max(samples, key=lambda x: x[2]["VmRSS"])
    print(f"peak VmRSS {s['VmRSS']:.1f} MB (anon {s['RssAnon']:.1f}, file {s['RssFile']:.1f}) at {t:.1f} s, "
          f"after: {label}", file=sys.stderr)


if __name__ == "__main__":
    main()
