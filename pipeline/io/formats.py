"""Which files are images: the suffixes the readers take, the ones a folder search picks up,
the ones an output name drops, and how a Zarr folder is recognised.

Facts only (no reading); every other module takes them from here.
"""

from __future__ import annotations

import os

#: Suffixes of the TIFF family the TIFF reader opens (a file named on the command line is
#: tried whatever its suffix; one not listed here is refused as unsupported).
TIFF_SUFFIXES = (
    ".tif",
    ".tiff",
    ".svs",
    ".ndpi",
    ".qptiff",
    ".btf",
    ".tf8",
    ".tf2",
    ".scn",
    ".bif",
)

#: Suffix of Zarr and OME-Zarr folders.
ZARR_SUFFIX = ".zarr"

#: What a folder search picks up by default (``RunConfig.extensions``).
SEARCHED_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".btf", ".qptiff", ".scn", ZARR_SUFFIX)

#: Suffixes an output name drops (``slide.ome.tif`` → ``slide``), longest first.
NAME_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr", *SEARCHED_SUFFIXES)

#: Files at the root of a Zarr v3 (``zarr.json``) or v2 (``.zarray``, ``.zgroup``) node.
ZARR_MARKERS = ("zarr.json", ".zarray", ".zgroup")


def is_zarr_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder holding Zarr v2 or v3 metadata at its root."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ZARR_MARKERS
    )
