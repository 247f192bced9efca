"""The benchmark scripts run end to end in their quick mode and record what they promise.

Only that they work is checked here; the figures themselves are not judged in CI (shared
machines make timings meaningless there).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
COMMON = {"timestamp", "commit", "machine", "benchmark", "params", "pixels", "figures"}
MACHINE = {"cpu", "cores", "ram_gb", "gpu", "versions"}


def _run(script: str, history: Path, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(history), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = history.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert COMMON <= record.keys()
    assert MACHINE <= record["machine"].keys()
    assert record["machine"]["versions"]["torch"]
    return record


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def test_throughput_quick(tmp_path):
    pytest.importorskip("monai")
    pytest.importorskip("onnxruntime")
    record = _run("bench_throughput.py", tmp_path / "history.jsonl", "--skip", "warm,sync")
    assert record["benchmark"] == "throughput"
    assert not record["errors"]
    rates = record["mpix_per_s"]
    for key in ("a_total", "a_blocks", "b_bare", "c_monai", "ratio_a_b", "ratio_a_c"):
        assert _positive(rates[key]), (key, rates)
    assert record["figures"]["a"]["tiles"] == record["figures"]["b"]["tiles_in_blocks"]
    assert {"size", "base", "tile", "overlap", "repeat", "device"} <= record["params"].keys()


def test_memory_quick(tmp_path):
    record = _run("bench_memory.py", tmp_path / "history.jsonl")
    assert record["benchmark"] == "memory"
    figures = record["figures"]
    for key in ("peak_rss_mb", "wall_s", "mpix_per_s"):
        assert _positive(figures[key]), (key, figures)
    assert record["run"]["returncode"] == 0
    assert record["run"]["report"]["ok"]
