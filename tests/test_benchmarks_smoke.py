"""The benchmark scripts run end to end in their quick mode and record what they promise.

Only that they work is checked here; the figures themselves are not judged in CI (shared
machines make timings meaningless there).
"""

from __future__ import annotations

import json
import os
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
    # issue 6's bare loop (decode, cut, normalise, batches) runs the same lattice tiles
    assert _positive(rates["b_full"]) and _positive(rates["ratio_a_bfull"]), rates
    assert record["figures"]["b_full"]["tiles"] == record["figures"]["b"]["tiles"]
    assert {"size", "shape", "base", "tile", "overlap", "repeat", "device"} <= record[
        "params"
    ].keys()


def test_host_quick(tmp_path):
    record = _run(
        "bench_host.py",
        tmp_path / "history.jsonl",
        "--workdir",
        str(tmp_path / "work"),
        "--cli",
        "--profile",
    )
    assert record["benchmark"] == "host"
    assert not record["errors"], record["errors"]
    rates = record["mpix_per_s"]
    for key in ("decode", "decode_threads", "decode_one_thread", "pipeline_default", "cli"):
        assert _positive(rates[key]), (key, rates)
    assert rates["ratio_pipeline_default"] == pytest.approx(
        rates["pipeline_default"] / rates["decode"], rel=0.01
    )
    figures = record["figures"]
    assert figures["decode"]["tiles"] == 16  # 1024² in 256² tiles, every one decoded
    assert figures["pipeline_default"]["pixels"] == 1024 * 1024
    # the profile names the package's own functions, by cumulative time
    assert any(r["function"].startswith("pipeline/") for r in figures["profile"]["by_cumtime"])
    assert {"size", "tile", "overlap", "layouts"} <= record["params"].keys()
    assert record["params"]["size"] == 1024


def test_memory_quick(tmp_path):
    record = _run("bench_memory.py", tmp_path / "history.jsonl")
    assert record["benchmark"] == "memory"
    figures = record["figures"]
    for key in ("peak_rss_mb", "wall_s", "mpix_per_s"):
        assert _positive(figures[key]), (key, figures)
    assert record["run"]["returncode"] == 0
    assert record["run"]["report"]["ok"]


def test_gpu_check_cpu_mode(tmp_path):
    """``gpu_check.sh`` without a GPU: the tiny CPU version of every step, results in OUT."""
    pytest.importorskip("monai")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_MODE": "cpu", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {
        "gpu_check.json",
        "gpu_check.log",
        "history.jsonl",
        "pytest_gpu.xml",
    }
    summary = json.loads((out / "gpu_check.json").read_text())
    assert {"mode", "ok", "total_s", "steps", "tests", "gpu_env", "models", "headline"} <= (
        summary.keys()
    )
    assert summary["mode"] == "cpu" and summary["ok"]
    assert set(summary["steps"]) == {"tests", "bench_b64", "bench_b32", "bench_3d32"}
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in summary["steps"].values())
    assert summary["tests"]["tests"] >= 3 and summary["tests"]["failures"] == 0
    assert {"torch", "cudnn", "onnxruntime", "cuda_available"} <= summary["gpu_env"].keys()
    assert set(summary["models"]) == {"b64", "b32", "3d32"}
    for name, model in summary["models"].items():
        rates = model["mpix_per_s"]
        for key in ("e2e", "e2e_with_startup", "network_only", "net_module", "monai"):
            assert _positive(rates[key]), (name, key, rates)
        assert _positive(rates["ratio_e2e_network"]), rates
        assert model["errors"] == {}, (name, model["errors"])
    assert summary["models"]["3d32"]["params"]["ndim"] == 3
    assert summary["headline"]["b64_e2e_mpix_s"] == summary["models"]["b64"]["mpix_per_s"]["e2e"]
    lines = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [r["model"] for r in lines] == ["b64", "b32", "3d32"]
    assert all(COMMON <= r.keys() and r["benchmark"] == "gpu" for r in lines)
    assert "bench_3d32" in (out / "gpu_check.log").read_text()
    # the tiny run leaves nothing behind in its scratch folder
    assert not list(tmp_path.glob("gpu_check.*"))
