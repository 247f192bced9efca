"""OME-Zarr output: one NGFF image group per input inside the output root.

An image is written under a staging name inside the root and moved to its final name
only when every level is complete, so nothing that looks complete is left by a failed
run. Level 0 is written block by block by the workers (one writer per chunk); each
further pyramid level is computed from the previous one with chunk-aligned Dask tasks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import OutputError

log = logging.getLogger(__name__)

_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", ".tiff", ".tif", ".svs", ".ndpi", ".zarr",
             ".qptiff", ".btf", ".scn")
_ARRAY_CONFIG = {"write_empty_chunks": False}
UNITS = {"micrometer"}


def sanitize_name(path: str | os.PathLike) -> str:
    """A safe group name from an input path: its file name without image suffixes.

    Keeps letters, digits, ``.``, ``_`` and ``-``; anything else (spaces, brackets,
    separators, ``..``) becomes ``_``; never starts with ``.`` or ``-``.
    """
    name = Path(os.fspath(path).rstrip("/\\")).name
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    name = re.sub(r"\.{2,}", "_", name).lstrip("._-")
    return name[:120] or "image"


def unique_names(paths: Sequence[str]) -> list[str]:
    """Distinct sanitised names for ``paths`` (``name``, ``name-2``, ...), in order."""
    taken: set[str] = set()
    names = []
    for p in paths:
        base = sanitize_name(p)
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        names.append(name)
    return names


def open_root(out: str | os.PathLike):
    """Open (or create) the output root group, refusing non-group paths."""
    import zarr

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError("output exists and is not a folder", where=out,
                          hint="choose a new path ending in .zarr")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return zarr.open_group(str(out), mode="a", zarr_format=3)
    except OSError as exc:
        raise OutputError(f"cannot write the output ({exc.strerror or exc})", where=out,
                          hint="check permissions and free space") from exc
    except Exception as exc:  # zarr raises its own types for a v2 or broken root
        raise OutputError(f"not a Zarr v3 group: {exc}", where=out,
                          hint="choose a new output path") from exc


def open_level(path: str):
    """Open one level array for writing; empty (all-zero) chunks are not stored."""
    import zarr

    return zarr.open_array(path, mode="r+", config=_ARRAY_CONFIG)


@dataclass
class ImageWriter:
    """An NGFF image being written under ``staging``, published to ``final``."""

    root: Path
    name: str
    staging: Path
    axes: str               # "cyx" or "czyx"
    chunks: tuple[int, ...]  # per axis, including c
    dtype: str

    @property
    def final(self) -> Path:
        return self.root / self.name

    def level_path(self, level: int) -> str:
        return str(self.staging / str(level))


def create_image(root: str | os.PathLike, name: str, shape: Sequence[int], axes: str,
                 chunks: Sequence[int], dtype: str) -> ImageWriter:
    """Create the staging group of one image with its level-0 array (nothing stored yet)."""
    import zarr

    root = Path(root)
    staging = root / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(str(staging), mode="w", zarr_format=3)
    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    group.create_array("0", shape=tuple(shape), chunks=chunks, dtype=dtype, fill_value=0,
                       dimension_names=list(axes), config=_ARRAY_CONFIG)
    return ImageWriter(root, name, staging, axes, chunks, dtype)


def pyramid_shapes(shape: Sequence[int], axes: str, min_size: int = 256) -> list[tuple[int, ...]]:
    """Shapes of level 0 and each 2× (y, x) downsampled level until y and x fit ``min_size``."""
    shapes = [tuple(shape)]
    yx = [axes.index("y"), axes.index("x")]
    while max(shapes[-1][i] for i in yx) > min_size and min(shapes[-1][i] for i in yx) >= 2:
        shapes.append(tuple(s // 2 if i in yx else s for i, s in enumerate(shapes[-1])))
    return shapes


def write_pyramid(writer: ImageWriter, min_size: int = 256) -> int:
    """Compute levels 1.. from level 0 (mean over 2×2 in y, x); returns the level count."""
    import dask.array as da
    import zarr

    group = zarr.open_group(str(writer.staging), mode="r+")
    shapes = pyramid_shapes(group["0"].shape, writer.axes, min_size)
    factors = {writer.axes.index("y"): 2, writer.axes.index("x"): 2}
    for level in range(1, len(shapes)):
        src = da.from_zarr(group[str(level - 1)])
        down = da.coarsen(np.mean, src.astype(np.float32), factors, trim_excess=True)
        if writer.dtype == "uint8":
            down = da.rint(down).astype(np.uint8)
        else:
            down = down.astype(writer.dtype)
        chunks = tuple(min(c, s) for c, s in zip(writer.chunks, shapes[level]))
        target = group.create_array(str(level), shape=shapes[level], chunks=chunks,
                                    dtype=writer.dtype, fill_value=0,
                                    dimension_names=list(writer.axes), config=_ARRAY_CONFIG)
        # chunk-aligned tasks: each output chunk has exactly one writer
        da.store(down.rechunk(chunks), target, lock=False)
    return len(shapes)


def write_metadata(writer: ImageWriter, levels: int, pixel_size: dict[str, float],
                   attrs: dict[str, Any]) -> None:
    """NGFF 0.5 multiscales (level 0 first) plus provenance under ``pipeline``."""
    import zarr

    group = zarr.open_group(str(writer.staging), mode="r+")
    axes_meta = []
    for a in writer.axes:
        if a == "c":
            axes_meta.append({"name": "c", "type": "channel"})
        else:
            entry = {"name": a, "type": "space"}
            if a in pixel_size:
                entry["unit"] = "micrometer"
            axes_meta.append(entry)
    datasets = []
    for level in range(levels):
        scale = []
        for a in writer.axes:
            factor = 2 ** level if a in "yx" else 1
            scale.append(1.0 if a == "c" else float(pixel_size.get(a, 1.0)) * factor)
        datasets.append({"path": str(level),
                         "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    multiscales = [{"name": writer.name, "axes": axes_meta, "datasets": datasets,
                    "type": "mean"}]
    group.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales}, "pipeline": attrs})


def publish(writer: ImageWriter) -> Path:
    """Move the finished staging group to its final name (replacing an older result)."""
    final = writer.final
    if final.exists():
        shutil.rmtree(final)
    os.replace(writer.staging, final)
    return final


def discard(writer: ImageWriter) -> None:
    """Remove a staging group after a failure: nothing that looks complete is left."""
    shutil.rmtree(writer.staging, ignore_errors=True)
