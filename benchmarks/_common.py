"""Helpers shared by the benchmark scripts: environment, synthetic slides, history.

Benchmarks are scripts, not part of the package: they import ``pipeline`` from the
source tree beside them when it is not installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HISTORY = ROOT / "benchmarks" / "results" / "history.jsonl"


def use_source_tree() -> None:
    """Make ``import pipeline`` work here and in every process started from here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *parts])


def git_commit() -> str | None:
    """``HEAD`` of the source tree, with ``-dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # a benchmark must still record what it can
        return None
    return getattr(mod, "__version__", None)


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU and the versions the figures depend on."""
    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": cores,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        # other work on the machine skews every figure: record how busy it was
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": {
            m: _version(m)
            for m in (
                "numpy",
                "torch",
                "onnxruntime",
                "monai",
                "zarr",
                "dask",
                "distributed",
                "tifffile",
                "imagecodecs",
            )
        },
    }


def append_history(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Add timestamp, commit and machine to ``record`` and append it as one JSON line."""
    full = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_info(),
        **record,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(full, default=str) + "\n")
    return full


def _texture(tile: int, channels: int, seed: int) -> np.ndarray:
    """A smooth, tissue-like uint8 tile (compresses like a real slide, unlike noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(tile // 32 + 2, tile // 32 + 2, channels)).astype(
        np.float32
    )
    up = np.kron(coarse, np.ones((32, 32, 1), np.float32))[:tile, :tile]
    # a 1-2-1 blur twice per axis softens the blocks; noise adds fine structure
    for _ in range(2):
        up = (np.roll(up, 1, 0) + 2 * up + np.roll(up, -1, 0)) / 4
        up = (np.roll(up, 1, 1) + 2 * up + np.roll(up, -1, 1)) / 4
    up += rng.normal(0, 12, size=up.shape)
    return np.clip(up, 0, 255).astype(np.uint8)


def write_tiled_tiff(
    path: str | os.PathLike,
    size: int,
    *,
    channels: int = 3,
    tile: int = 256,
    compression: str = "jpeg",
    variants: int = 16,
) -> Path:
    """Write a ``size`` × ``size`` uint8 tiled TIFF tile by tile (the writer stays small).

    Tiles cycle through ``variants`` precomputed textures, shifted in brightness per tile
    so neighbouring tiles differ.
    """
    import tifffile

    path = Path(path)
    bank = [_texture(tile, channels, seed) for seed in range(variants)]
    if channels == 1:
        bank = [b[..., 0] for b in bank]
    ny, nx = -(-size // tile), -(-size // tile)

    def tiles() -> Iterator[np.ndarray]:
        for iy in range(ny):
            for ix in range(nx):
                t = bank[(iy * 7 + ix) % variants]
                yield t if (iy + ix) % 3 else (255 - t)

    shape = (size, size, channels) if channels > 1 else (size, size)
    kwargs: dict[str, Any] = {}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    elif compression in ("zlib", "deflate"):
        compression, kwargs["compressionargs"] = "zlib", {"level": 1}
    tifffile.imwrite(
        path,
        tiles(),
        shape=shape,
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb" if channels == 3 else "minisblack",
        compression=None if compression == "none" else compression,
        bigtiff=size * size * channels > 2**31,
        metadata=None,
        **kwargs,
    )
    return path


def work_folder(workdir: str | None, prefix: str):
    """``(folder, tmp)``: ``workdir`` (kept), else a temporary folder (``tmp`` cleans it up)."""
    if workdir:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        return work, None
    tmp = tempfile.TemporaryDirectory(prefix=prefix)
    return Path(tmp.name), tmp


def fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
