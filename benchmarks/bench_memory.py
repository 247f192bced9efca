"""Peak memory of ``pipeline run`` on a large slide, with the identity backend.

    python benchmarks/bench_memory.py [--size 20000] [--channels 3] [--out benchmarks/results/history.jsonl]

Writes a ``size`` × ``size`` uint8 tiled TIFF (tile 512, compressed, written tile by tile
so the writer stays small), runs the CLI (``python -m pipeline.cli run IN --out OUT
--backend identity``) as a subprocess and samples the RSS of the whole process tree
(parent and every child, recursively) every 0.2 s. Reports the peak (target < 2 GB),
the wall time and Mpix/s, and appends one JSON line to the history file.

RSS of a tree counts pages shared between processes (libraries, copy-on-write) once per
process, so the sum is an upper bound on what the run really needs; the peak
proportional set size (PSS, shared pages split between their users) is sampled too,
less often, as the tighter figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ROOT,
    add_standard_options,
    append_history,
    fmt,
    use_source_tree,
    work_folder,
    write_tiled_tiff,
)

TARGET_BYTES = 2 * 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=20000, help="image side in pixels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3)
    p.add_argument("--compression", choices=("jpeg", "zlib"), default="jpeg")
    p.add_argument("--interval", type=float, default=0.2, help="RSS sampling period (s)")
    p.add_argument(
        "--pss-every",
        type=int,
        default=5,
        help="sample PSS every N RSS samples (0: never; PSS reads smaps, slower)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="kill the run after this many s")
    add_standard_options(
        p,
        workdir="keep the TIFF and output here (default: temp); an existing slide of the "
        "right size is reused",
        quick="a 1024² slide",
    )
    p.add_argument(
        "pipeline_args",
        nargs="*",
        help="extra arguments for `pipeline run` (after --), e.g. -- --workers 2",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size = min(args.size, 1024)
    return args


class TreeSampler(threading.Thread):
    """Samples the summed RSS (and sometimes PSS) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float, pss_every: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self.peak_single = 0
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []
        self.t0 = time.perf_counter()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        procs = self._tree()
        rss, pss, biggest, alive = 0, 0, 0, 0
        want_pss = self.pss_every and self.samples % self.pss_every == 0
        for proc in procs:
            try:
                if want_pss:
                    info = proc.memory_full_info()
                    pss += getattr(info, "pss", info.uss)
                else:
                    info = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += info.rss
            biggest = max(biggest, info.rss)
            alive += 1
        self.samples += 1
        if rss > self.peak_rss:
            self.peak_rss, self.peak_procs = rss, alive
        self.peak_single = max(self.peak_single, biggest)
        self.peak_pss = max(self.peak_pss, pss)
        self.timeline.append((round(time.perf_counter() - self.t0, 1), rss))

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval)


def slide(work: Path, size: int, channels: int, compression: str) -> tuple[Path, float | None]:
    path = work / f"slide_{size}_{channels}c_{compression}.tif"
    if path.exists():
        return path, None
    t0 = time.perf_counter()
    write_tiled_tiff(
        path.with_suffix(".part"), size, channels=channels, tile=512, compression=compression
    )
    path.with_suffix(".part").rename(path)
    return path, time.perf_counter() - t0


def run_cli(tiff: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        str(tiff),
        "--out",
        str(out),
        "--backend",
        "identity",
        *args.pipeline_args,
    ]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sampler = TreeSampler(proc.pid, args.interval, args.pss_every)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    report_file = out / "report.json"
    run_report = json.loads(report_file.read_text()) if report_file.exists() else None
    return {
        "cmd": cmd[1:],
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_bytes": sampler.peak_rss,
        "peak_pss_bytes": sampler.peak_pss or None,
        "peak_single_rss_bytes": sampler.peak_single,
        "procs_at_peak": sampler.peak_procs,
        "samples": sampler.samples,
        "output_tail": output[-3000:],
        "timeline": _thin(sampler.timeline, 60),
        "report": _slim(run_report),
    }


def _thin(points: list, n: int) -> list:
    step = max(1, len(points) // n)
    return points[::step]


def _slim(report: dict | None) -> dict | None:
    if not report:
        return None
    return {
        "ok": report.get("ok"),
        "seconds": report.get("seconds"),
        "mpix_per_s": report.get("mpix_per_s"),
        "inputs": [
            {
                k: r.get(k)
                for k in ("state", "reason", "message", "shape", "tiles", "blocks", "seconds")
            }
            for r in report.get("inputs", [])
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_source_tree()
    load_start = [round(v, 2) for v in os.getloadavg()]
    work, tmp = work_folder(args.workdir, "bench_memory_")
    try:
        tiff, write_s = slide(work, args.size, args.channels, args.compression)
        print(
            f"slide {tiff} ({tiff.stat().st_size / 1e6:.0f} MB)"
            + (f" written in {write_s:.1f} s" if write_s is not None else " reused"),
            flush=True,
        )
        out = work / "out.zarr"
        shutil.rmtree(out, ignore_errors=True)
        res = run_cli(tiff, out, args)
        shutil.rmtree(out, ignore_errors=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    pixels = args.size * args.size
    rss = res["peak_rss_bytes"]
    figures = {
        "peak_rss_mb": round(rss / 2**20, 1),
        "peak_pss_mb": round(res["peak_pss_bytes"] / 2**20, 1) if res["peak_pss_bytes"] else None,
        "peak_single_rss_mb": round(res["peak_single_rss_bytes"] / 2**20, 1),
        "wall_s": round(res["wall_s"], 3),
        "mpix_per_s": round(pixels / 1e6 / res["wall_s"], 4) if res["returncode"] == 0 else None,
        "within_target": rss < TARGET_BYTES,
        "slide_write_s": round(write_s, 3) if write_s is not None else None,
    }
    params = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    params.update(backend="identity", tile_tiff=512)
    record = append_history(
        args.out,
        {
            "benchmark": "memory",
            "params": params,
            "pixels": pixels,
            "loadavg_start": load_start,
            "figures": figures,
            "run": res,
        },
    )
    print(res["output_tail"][-1500:])
    print(f"\nslide {args.size}² x {args.channels} ch, identity backend, exit {res['returncode']}")
    print(
        f"  peak RSS of the process tree {fmt(figures['peak_rss_mb'], 0)} MB "
        f"({res['procs_at_peak']} processes; target < {TARGET_BYTES / 1e6:.0f} MB: "
        f"{'ok' if figures['within_target'] else 'OVER'})"
    )
    print(
        f"  peak PSS {fmt(figures['peak_pss_mb'], 0)} MB, largest single process "
        f"{fmt(figures['peak_single_rss_mb'], 0)} MB"
    )
    print(
        f"  wall {figures['wall_s']:.1f} s, {fmt(figures['mpix_per_s'])} Mpix/s "
        f"(history: {args.out}, commit {record['commit']})"
    )
    return 0 if res["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
