"""Nightly batches: resume after kill -9, incremental reruns, many small slides, the lock.

Every run is the real command line (``python -m pipeline.cli run``) in its own process
group, with a small real U-Net (ONNX, base 16 as in bench_throughput, depth 3) so that
computing outweighs the few seconds every run spends starting (workers importing torch
and ONNX Runtime, opening inputs, finishing images). With ``--base 8`` a 6-slide run
takes about 14 s here, and that start-up weighs more in every ratio:

kills
    An uninterrupted run of ``--slides`` slides (``--size``², blocks of ``--block``,
    ``--workers`` workers) is timed; then, on a fresh output, the same command is killed
    with ``kill -9 -PGID`` when 25 %, 50 % and 75 % of the blocks are written, and run
    once more to the end. Figures: every output bit-identical to the uninterrupted run,
    and all attempts together against the uninterrupted run (target ≤ 1.6×; without
    resume it would be 1 + 0.25 + 0.5 + 0.75 = 2.5×).
nightly
    The slides are run; two are added and the same command rerun (target ≤ 0.5× the
    first run's time, no file of the finished images rewritten: same inode and mtime,
    the two new ones written); then one slide is replaced by other pixels under the same
    name and the command rerun: only it is recomputed, and equals a fresh run of it;
    ``report.json`` names every input.
scaling
    16 slides of (``--scale-size`` / 4)² against one slide of ``--scale-size``² on a
    local cluster of 2 workers × 1 thread (target ≤ 1.15×).
lock
    While a run writes the output, a second run on it must exit non-zero within 15 s
    saying the output is locked; the first finishes with exit 0 and all its images.

Run the timed figures on an otherwise idle machine, under the shared benchmark lock::

    flock /tmp/bench.lock python benchmarks/bench_batch.py [--size 2048] [--slides 6]
        [--block 512] [--base 16] [--workers 2] [--scale-size 4096]
        [--parts kills,nightly,scaling,lock] [--workdir DIR] [--quick] [--out HISTORY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (  # noqa: E402
    ROOT,
    add_standard_options,
    append_history,
    use_source_tree,
    work_folder,
    write_tiled_tiff,
)

PARTS = ("kills", "nightly", "scaling", "lock")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="side of each slide (kills, nightly)")
    p.add_argument("--slides", type=int, default=6)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--base", type=int, default=16, help="U-Net base width")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scale-size", type=int, default=4096, help="the one big slide (scaling)")
    p.add_argument("--parts", default=",".join(PARTS))
    add_standard_options(
        p,
        workdir="keep slides and outputs here (default: a temp folder)",
        quick="tiny slides and model",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.slides, args.block, args.base, args.scale_size = 256, 2, 128, 4, 512
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    return args


# --- helpers ------------------------------------------------------------------------------


def pipeline_run(*args: object, wait: bool = True, env: dict | None = None):
    """``pipeline run ARGS`` in its own process group; (returncode, seconds, stderr) or Popen."""
    from pipeline.testing import run_cli

    if not wait:
        return run_cli("run", *args, env=env, wait=False, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    done = run_cli("run", *args, env=env)
    return done.returncode, time.perf_counter() - t0, done.stderr


def images(out: Path) -> list[Path]:
    """The published images in ``out`` (not its collection group, not hidden folders)."""
    from pipeline.io.collection import find_images, root_format

    zarr_format = root_format(out) if out.exists() else None
    return [] if zarr_format is None else [out / n for n in find_images(out, zarr_format)]


def image_files(out: Path) -> dict[str, dict[str, bytes]]:
    """Every file of every image (the run settings in the attributes left out)."""
    from pipeline import testing

    return testing.image_files(images(out))


def stamps(out: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for name in names
        for p in (out / name).rglob("*")
        if p.is_file()
    }


def report(out: Path) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads((out / "report.json").read_text())["inputs"]}


def fresh(path: Path) -> Path:
    """``path`` removed: every part starts from nothing, also in a reused --workdir (an
    output left by an earlier run would count as progress, or as images already done)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def make_slides(folder: Path, count: int, size: int, first: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    # a different texture bank per slide: the slides differ in their pixels
    return [
        write_tiled_tiff(folder / f"slide{i:02d}.tif", size, variants=11 + i, compression="jpeg")
        for i in range(first, first + count)
    ]


def make_model(path: Path, base: int) -> Path:
    from pipeline.model.export import export_model

    export_model(path, in_channels=3, classes=1, base=base, depth=3, padding="same")
    return path


# --- parts --------------------------------------------------------------------------------


def part_kills(work: Path, common: list, args) -> dict[str, Any]:
    slides = fresh(work / "kills-in")
    make_slides(slides, args.slides, args.size)
    ref = fresh(work / "kills-ref.zarr")
    rc, t0, err = pipeline_run(slides, "--out", ref, *common)
    if rc:
        raise RuntimeError(f"uninterrupted run failed: {err[-2000:]}")
    expected = image_files(ref)
    per_image = {e["name"]: e["blocks"] for e in report(ref).values()}
    total = sum(per_image.values())
    out = fresh(work / "kills.zarr")
    attempts = []
    for fraction in (0.25, 0.5, 0.75):

        def done() -> float:
            staged = len(list(out.glob(".pipeline/staging/*/blocks/*")))
            published = sum(per_image.get(p.name, 0) for p in images(out))
            return (staged + published) / total

        before = done()
        proc = pipeline_run(slides, "--out", out, *common, wait=False)
        start = time.perf_counter()
        progress = before
        while proc.poll() is None:
            progress = done()
            # killed once this attempt has written something and the share is reached
            if progress >= fraction and progress > before:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.communicate()
        attempts.append(
            {
                "kill_at": fraction,
                "progress": round(progress, 3),
                "seconds": time.perf_counter() - start,
                "returncode": proc.returncode,
            }
        )
    rc, last, err = pipeline_run(slides, "--out", out, *common)
    attempts.append({"kill_at": None, "seconds": last, "returncode": rc})
    total_s = sum(a["seconds"] for a in attempts)
    return {
        "uninterrupted_s": t0,
        "attempts": attempts,
        "total_s": total_s,
        "ratio": total_s / t0,
        "target_ratio": 1.6,
        "identical": image_files(out) == expected,
        "blocks": total,
    }


def part_nightly(work: Path, common: list, args) -> dict[str, Any]:
    slides = fresh(work / "nightly-in")
    make_slides(slides, args.slides, args.size)
    out = fresh(work / "nightly.zarr")
    rc1, t1, err = pipeline_run(slides, "--out", out, *common)
    first = [p.name for p in images(out)]
    before = stamps(out, first)
    make_slides(slides, 2, args.size, first=args.slides)
    rc2, t2, _ = pipeline_run(slides, "--out", out, *common)
    after = stamps(out, first)
    rewritten = sorted(k for k in before if after.get(k) != before[k])
    added = [p.name for p in images(out) if p.name not in first]
    # one slide replaced by other pixels under the same name
    replaced = slides / "slide00.tif"
    write_tiled_tiff(replaced, args.size, variants=7, compression="jpeg")
    rc3, t3, _ = pipeline_run(slides, "--out", out, *common)
    entries = report(out)
    recomputed = sorted(n for n, e in entries.items() if e["state"] == "done")
    alone = fresh(work / "nightly-fresh.zarr")
    pipeline_run(replaced, "--out", alone, *common)
    return {
        "first_s": t1,
        "rerun_with_2_new_s": t2,
        "ratio": t2 / t1,
        "target_ratio": 0.5,
        "rewritten_files": len(rewritten),
        "new_images": added,
        "replaced_rerun_s": t3,
        "recomputed_after_replacing": recomputed,
        "replaced_equals_fresh": image_files(out).get("slide00")
        == image_files(alone).get("slide00"),
        "report_inputs": len(entries),
        "returncodes": [rc1, rc2, rc3],
    }


def part_scaling(work: Path, model: Path, args) -> dict[str, Any]:
    small, big = fresh(work / "scaling-small"), fresh(work / "scaling-big")
    make_slides(small, 16, args.scale_size // 4)
    make_slides(big, 1, args.scale_size)
    layout = [
        "--model",
        model,
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--no-skip-background",
    ]
    rc16, t16, err16 = pipeline_run(small, "--out", fresh(work / "scaling-16.zarr"), *layout)
    rc1, t1, err1 = pipeline_run(big, "--out", fresh(work / "scaling-1.zarr"), *layout)
    if rc16 or rc1:
        raise RuntimeError(f"scaling runs failed: {err16[-1000:]} {err1[-1000:]}")
    return {"sixteen_s": t16, "one_s": t1, "ratio": t16 / t1, "target_ratio": 1.15}


def part_lock(work: Path, common: list, args) -> dict[str, Any]:
    slides = fresh(work / "lock-in")
    make_slides(slides, args.slides, args.size)
    out = fresh(work / "lock.zarr")
    first = pipeline_run(slides, "--out", out, *common, wait=False)
    lock = out / ".pipeline" / "locks" / "run.lock"
    while not lock.exists() and first.poll() is None:
        time.sleep(0.05)
    rc2, t2, err2 = pipeline_run(slides, "--out", out, *common)
    _, err1 = first.communicate()
    return {
        "second_returncode": rc2,
        "second_s": t2,
        "second_says_locked": "is being written by another run" in err2,
        "first_returncode": first.returncode,
        "first_images": len(images(out)),
        "slides": args.slides,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_source_tree()
    work, tmp = work_folder(args.workdir, "bench-batch-")
    model = make_model(work / f"unet-b{args.base}.onnx", args.base)
    common = ["--model", model, "--chunk", args.block, "--block", args.block]
    common += ["--workers", args.workers]
    common += ["--no-skip-background"]
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}
    loadavg = os.getloadavg()
    for part in args.parts:
        try:
            if part == "kills":
                figures[part] = part_kills(work, common, args)
            elif part == "nightly":
                figures[part] = part_nightly(work, common, args)
            elif part == "scaling":
                figures[part] = part_scaling(work, model, args)
            else:
                figures[part] = part_lock(work, common, args)
        except Exception as exc:  # one part failing still records the others
            errors[part] = f"{type(exc).__name__}: {exc}"
        print(part, json.dumps(figures.get(part) or errors.get(part), default=str), flush=True)
    record = append_history(
        args.out,
        {
            "benchmark": "batch",
            "params": {
                k: getattr(args, k)
                for k in ("size", "slides", "block", "base", "workers", "scale_size", "quick")
            },
            "pixels": args.slides * args.size**2,
            "figures": figures,
            "errors": errors,
            "loadavg_start": [round(v, 2) for v in loadavg],
            "source": str(ROOT),
        },
    )
    if tmp is not None:
        tmp.cleanup()
    return 1 if errors or not record else 0


if __name__ == "__main__":
    sys.exit(main())
