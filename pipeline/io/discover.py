"""Turn the command line's INPUT arguments into a list of image paths."""

from __future__ import annotations

import os
from pathlib import Path

IMAGE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".btf", ".qptiff", ".scn", ".zarr")


def is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any(
        (path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    )


def discover_inputs(args: list[str]) -> list[str]:
    """Files are taken as given; a Zarr folder is one input; any other folder is searched
    recursively (sorted, symlinked folders not followed) for image files."""
    found: list[str] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir() and not is_zarr_dir(path):
            found.extend(_walk(path))
        else:
            found.append(str(arg))
    return found


def _walk(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if is_zarr_dir(here / d):
                out.append(str(here / d))
            elif not d.startswith("."):
                keep.append(d)
        dirnames[:] = keep
        out.extend(str(here / f) for f in sorted(filenames)
                   if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
    return sorted(out)
