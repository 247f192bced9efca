"""Helpers shared by the benchmark scripts: environment, synthetic slides, history.

Benchmarks are scripts, not part of the package: they import ``pipeline`` from the
source tree beside them when it is not installed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HISTORY = ROOT / "benchmarks" / "results" / "history.jsonl"


def add_standard_options(
    p: argparse.ArgumentParser, *, workdir: str, quick: str, workdir_default: str | None = None
) -> None:
    """The options every benchmark script takes: ``--out`` (the history file),
    ``--workdir`` (what is kept there, ``workdir``) and ``--quick`` (the smoke mode the
    tests run, ``quick``)."""
    p.add_argument("--out", default=str(DEFAULT_HISTORY), help="history file (JSON lines)")
    p.add_argument("--workdir", default=workdir_default, help=workdir)
    p.add_argument("--quick", action="store_true", help=f"smoke mode: {quick}")


def use_source_tree() -> None:
    """Make ``import pipeline`` work here and in every process started from here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *parts])


def run_process(
    cmd: list[str], timeout: float | None, cwd: str | os.PathLike = ROOT
) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output captured. On a timeout (``TimeoutExpired``) or any
    interruption the process and all its descendants (a Dask cluster's nannies and
    workers) are killed first, by process id, so nothing outlives the benchmark."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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


def gpu_info() -> dict[str, Any]:
    """The GPU(s), driver and the runtime versions GPU figures depend on (what is known)."""
    info: dict[str, Any] = {"cuda_available": False}
    try:
        import torch

        info.update(
            torch=torch.__version__,
            torch_cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            cuda_available=torch.cuda.is_available(),
        )
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                gpu=props.name,
                gpus=torch.cuda.device_count(),
                capability=f"{props.major}.{props.minor}",
                memory_gb=round(props.total_memory / 2**30, 1),
                multiprocessors=props.multi_processor_count,
            )
    except Exception as exc:  # a benchmark must still record what it can
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if smi.returncode == 0 and smi.stdout.strip():
            info["driver"] = smi.stdout.strip().splitlines()[0].split(",")[-1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        info["onnxruntime"] = None
    info["monai"] = _version("monai")
    return info


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU and the versions the figures depend on."""
    import psutil

    from pipeline.core.devices import usable_cores

    cores = usable_cores()
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
    size: int | tuple[int, int],
    *,
    channels: int = 3,
    tile: int = 256,
    compression: str = "jpeg",
    variants: int = 16,
) -> Path:
    """Write a ``size`` × ``size`` (or ``(height, width)``) uint8 tiled TIFF tile by tile
    (the writer stays small).

    Tiles cycle through ``variants`` precomputed textures, shifted in brightness per tile
    so neighbouring tiles differ.
    """
    bank = [_texture(tile, channels, seed) for seed in range(variants)]
    if channels == 1:
        bank = [b[..., 0] for b in bank]

    def tiles(ny: int, nx: int) -> Iterator[np.ndarray]:
        for iy in range(ny):
            for ix in range(nx):
                t = bank[(iy * 7 + ix) % variants]
                yield t if (iy + ix) % 3 else (255 - t)

    return _write_tiles(path, size, tiles, channels=channels, tile=tile, compression=compression)


def _write_tiles(
    path: str | os.PathLike,
    size: int | tuple[int, int],
    tiles: Callable[[int, int], Iterator[np.ndarray]],
    *,
    channels: int,
    tile: int,
    compression: str,
) -> Path:
    """Write the tiles ``tiles(rows, columns)`` yields (row by row) as one tiled TIFF."""
    import tifffile

    path = Path(path)
    height, width = (size, size) if isinstance(size, int) else size
    ny, nx = -(-height // tile), -(-width // tile)
    shape = (height, width, channels) if channels > 1 else (height, width)
    kwargs: dict[str, Any] = {}
    if compression == "jpeg":
        kwargs["compressionargs"] = {"level": 90}
    elif compression in ("zlib", "deflate"):
        compression, kwargs["compressionargs"] = "zlib", {"level": 1}
    tifffile.imwrite(
        path,
        tiles(ny, nx),
        shape=shape,
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb" if channels == 3 else "minisblack",
        compression=None if compression == "none" else compression,
        bigtiff=height * width * channels > 2**31,
        metadata=None,
        **kwargs,
    )
    return path


# optical density per unit stain (RGB), Ruifrok & Johnston (2001)
_STAINS = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float32)


def _smooth(shape: tuple[int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise, mean 0 and std about 1: a ``cells``-wide random grid, cubic zoom."""
    from scipy import ndimage

    grid = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    big = ndimage.zoom(grid, (shape[0] + 8) / (cells + 3), order=3)
    return big[4 : 4 + shape[0], 4 : 4 + shape[1]] / big.std()


def slide_patch(size: int = 2048, seed: int = 0) -> np.ndarray:
    """An H&E-like brightfield RGB uint8 image: glass, pink stroma, textured nuclei.

    Stain concentrations go through Beer-Lambert (``255 * exp(-optical density)``), so
    the colours, the share of near-white glass and the fine texture compress like a
    scanned slide (a flat or noise image would decode much faster or slower).
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (size, size)
    tissue = (_smooth(shape, max(2, size // 512), rng) > -0.4).astype(np.float32)
    tissue = ndimage.gaussian_filter(tissue, 3)
    # nuclei: impulses blurred into soft round blobs of three sizes, then clipped flat
    nuclei = np.zeros(shape, np.float32)
    for sigma in (2.5, 4.0, 6.0):
        spots = np.zeros(shape, np.float32)
        n = int(size * size / 6000)
        spots[rng.integers(0, size, n), rng.integers(0, size, n)] = rng.uniform(0.8, 1.6, n)
        blob = ndimage.gaussian_filter(spots, sigma) * (2 * np.pi * sigma**2)
        np.maximum(nuclei, np.clip(blob * 1.8, 0, 1.6), out=nuclei)
    grain = 0.75 + 0.25 * ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), 1.0)
    haem = 0.02 + tissue * nuclei * grain
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), (1.0, 4.0))
    eosin = 0.02 + tissue * (0.25 + 0.12 * _smooth(shape, size // 64, rng) + 0.2 * fibres)
    density = haem[..., None] * _STAINS[0] + np.clip(eosin, 0, None)[..., None] * _STAINS[1]
    rgb = 255.0 * np.exp(-density) + rng.normal(0.0, 3.0, (*shape, 3)).astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_slide_tiff(
    path: str | os.PathLike,
    size: int | tuple[int, int],
    *,
    tile: int = 256,
    compression: str = "jpeg",
    seed: int = 0,
) -> Path:
    """Write a slide-like RGB tiled TIFF: every tile a different window of one
    :func:`slide_patch`, at a random place, turned and flipped at random."""
    patch = slide_patch(min(2048, max(4 * tile, 512)), seed)
    rng = np.random.default_rng(seed + 1)
    room = patch.shape[0] - tile

    def tiles(ny: int, nx: int) -> Iterator[np.ndarray]:
        for _ in range(ny * nx):
            y, x = rng.integers(0, room + 1, 2)
            t = np.rot90(patch[y : y + tile, x : x + tile], int(rng.integers(4)))
            yield np.ascontiguousarray(t[:, ::-1] if rng.integers(2) else t)

    return _write_tiles(path, size, tiles, channels=3, tile=tile, compression=compression)


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis as the pipeline places them for a padded network:
    ``stride`` apart from 0, the last one flush with the border (one tile if ``n <= tile``).
    """
    return [0] if n <= tile else [*range(0, n - tile, stride), n - tile]


def same_stride(tile: int, overlap: int, step: int) -> int:
    """The pipeline's stride: the largest multiple of ``step`` leaving ``overlap``."""
    return (tile - overlap) // step * step


def cached(path: str | os.PathLike, make: Callable[[Path], Any]) -> tuple[Path, float | None]:
    """``path``, made by ``make(partial_path)`` unless it exists; and the seconds spent
    making it (None: reused). Written under another name and renamed, so a file that is
    there is always complete."""
    path = Path(path)
    if path.exists():
        return path, None
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + f".{os.getpid()}.part")
    t0 = time.perf_counter()
    try:
        make(part)
        part.replace(path)
    finally:
        part.unlink(missing_ok=True)
    return path, time.perf_counter() - t0


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
