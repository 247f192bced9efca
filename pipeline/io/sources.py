"""Open any supported input as a lazy dask array with named axes and a pixel size.

Supported: TIFF (plain, multi-page, striped or tiled, generic pyramids of pages or
SubIFDs, ImageJ hyperstacks), Aperio SVS (JPEG, JPEG 2000), Hamamatsu NDPI, OME-TIFF
(pyramids in SubIFDs), QPTIFF (one page per channel), Zarr v2/v3 arrays and OME-Zarr
images (NGFF 0.4/0.5, bioformats2raw layout). Side images (label, macro, thumbnail) are
listed but never the default. Nothing decodes a whole level: reading a region decodes
only the stored tiles or chunks it touches (an uncompressed striped TIFF is memory-mapped
and reads only the rows and columns asked for).

Conventions
-----------
- ``axes`` uses the letters ``t c z y x`` in the file's own order; TIFF samples (RGB)
  are ``c``; axes of length 1 that the pipeline has no name for are dropped.
- ``pixel_size`` is in micrometres per pixel, only for spatial axes whose physical size
  the file states; levels above 0 take level 0's size times the real shape ratio.
- Every problem with an input is an :class:`~pipeline.errors.InputError` naming the
  file, the problem and a hint.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import (
    CorruptInputError,
    InputError,
    NotFoundError,
    UnsupportedFormatError,
)
from pipeline.io import fingerprint, lazy
from pipeline.io.formats import TIFF_SUFFIXES, ZARR_MARKERS, is_zarr_dir
from pipeline.io.meta import FileInfo, SeriesInfo, level_pixel_size
from pipeline.io.tiff import inspect_tiff
from pipeline.io.zarr_source import inspect_zarr

if TYPE_CHECKING:
    import dask.array

__all__ = ["ImageSource", "describe", "open_image", "open_image_cached", "series_info"]

#: A stored tile or strip must be decoded whole to read any pixel of it: one larger than
#: this (a huge compressed strip, a tile that declares a giant size) is refused, since
#: every worker reading it would need that much memory for each read.
MAX_STORED_CHUNK_BYTES = 256 * 2**20

_CONVERTIBLE = (".h5", ".hdf5", ".czi", ".nd2", ".lif", ".mrxs", ".vsi", ".png", ".jpg")


@dataclass(frozen=True, eq=False)
class ImageSource:
    """One level of one image series, opened lazily.

    Attributes
    ----------
    path
        The path as given.
    format
        ``"tiff"``, ``"svs"``, ``"ome-tiff"``, ``"ndpi"``, ``"qptiff"``, ``"zarr"`` or
        ``"ome-zarr"``.
    array
        Lazy dask array with axes ``axes``; picklable, so it can go to Dask workers,
        where each process opens the file once.
    axes
        Lower-case letters from ``"tczyx"`` in stored order, e.g. ``"yxc"``, ``"zyx"``.
    pixel_size
        Micrometres per pixel for the spatial axes the file calibrates; may be empty.
    series, level
        Which image in the file and which pyramid level (0 = full resolution).
    levels
        Shapes (in ``axes``) of all pyramid levels of this series, level 0 first.
    dtype
        Numpy dtype name, e.g. ``"uint8"``.
    info
        Cheap extras: vendor, magnification, compression, photometric, extra samples,
        series name, storage chunks, NGFF version, channel names, where the pixel size
        came from (``pixel_size_source``) and implausible ones it declared
        (``pixel_size_rejected``)...
    reader
        The array-like under ``array`` (a :class:`~pipeline.io.lazy.LazyLevel`): numpy
        out of one call, for reads that need no dask graph (a block's input).
    """

    path: str
    format: str
    array: dask.array.Array
    axes: str
    pixel_size: dict[str, float]
    series: int
    level: int
    levels: tuple[tuple[int, ...], ...]
    dtype: str
    info: dict
    reader: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``array``."""
        return tuple(int(s) for s in self.array.shape)


def open_image(
    path: str | os.PathLike, *, series: int | None = None, level: int = 0
) -> ImageSource:
    """Open one level of one series of an image lazily.

    Parameters
    ----------
    path
        A TIFF-family file, a Zarr array folder or an OME-Zarr image folder.
    series
        Image within the file; default: the main image (side images such as label,
        macro and thumbnail are skipped).
    level
        Pyramid level; 0 is full resolution.

    Returns
    -------
    ImageSource

    Raises
    ------
    InputError
        Missing, unreadable, empty, corrupt or unsupported input; a series or level
        that does not exist; a zero-size dimension.
    """
    where = os.fspath(path)
    try:
        stamp = fingerprint.stamp(where)  # before reading metadata: a later change shows
    except OSError:
        stamp = None  # _inspect says what is wrong with the path
    file = _inspect(where)
    chosen = _choose_series(file, series)
    if not 0 <= level < len(chosen.levels):
        raise InputError(
            f"series {chosen.index} has no level {level}; its levels are "
            f"{describe_levels(where, chosen)}",
            where=where,
            hint="choose one of these levels (0 is full resolution)",
        )
    stored = chosen.levels[level]
    _check_level(where, chosen, level)
    view = lazy.LazyLevel(
        file.kind,
        where,
        chosen.locators[level],
        chosen.selection,
        stored.shape,
        stored.dtype,
        stamp or fingerprint.stamp(where),
        f"series {chosen.index} level {level}",
        chosen.axes,
        stored.chunks,
    )
    info = {**file.info, **chosen.info, "storage_chunks": stored.chunks}
    return ImageSource(
        path=where,
        format=file.format,
        array=lazy.make_array(view, stored.chunks, chosen.axes),
        axes=chosen.axes,
        pixel_size=_level_pixel_size(where, chosen, level),
        series=chosen.index,
        level=level,
        levels=tuple(lv.shape for lv in chosen.levels),
        dtype=stored.dtype,
        info=info,
        reader=view,
    )


def open_image_cached(
    path: str | os.PathLike, series: int | None = None, level: int = 0
) -> ImageSource:
    """:func:`open_image`, cached per process and keyed by the file's mtime and size.

    For Dask workers: each worker opens (and parses the metadata of) a file once, and
    reopens it when it changed on disk.
    """
    where = os.fspath(path)
    try:
        stamp = fingerprint.stamp(where)
    except OSError:
        stamp = (0, 0)  # let open_image report the problem
    return _open_cached(where, series, level, stamp)


@functools.lru_cache(maxsize=16)
def _open_cached(
    path: str, series: int | None, level: int, _stamp: fingerprint.Stamp
) -> ImageSource:
    # _stamp: only part of the cache key, so that a changed file is opened again
    return open_image(path, series=series, level=level)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``pipeline inspect`` shows about an input; JSON-serialisable.

    Returns
    -------
    dict
        ``path``, ``format``, ``default_series``, ``info`` and ``series``: a list of
        ``{index, name, associated, axes, dtype, pixel_size, levels, info}`` where each
        level is ``{level, shape, dtype, chunks, axes, pixel_size}`` (pixel sizes in µm)
        and ``info`` may hold ``unreadable``: why that series cannot be opened here.
    """
    where = os.fspath(path)
    file = _inspect(where)
    series = []
    for s in file.series:
        levels = [
            {
                "level": i,
                "shape": list(lv.shape),
                "dtype": lv.dtype,
                "chunks": list(lv.chunks),
                "axes": s.axes,
                "pixel_size": _level_pixel_size(where, s, i),
                **({"problem": lv.problem} if lv.problem else {}),
            }
            for i, lv in enumerate(s.levels)
        ]
        series.append(
            {
                "index": s.index,
                "name": s.name,
                "associated": s.associated,
                "axes": s.axes,
                "dtype": s.levels[0].dtype if s.levels else None,
                "pixel_size": dict(s.pixel_size),
                "levels": levels,
                "info": s.info,
            }
        )
    return _jsonable(
        {
            "path": where,
            "format": file.format,
            "default_series": file.default_series(),
            "info": file.info,
            "series": series,
        }
    )


def series_info(path: str | os.PathLike, series: int | None = None) -> tuple[FileInfo, SeriesInfo]:
    """What the file says about one series (default: the main image), decoding nothing."""
    where = os.fspath(path)
    file = _inspect(where)
    return file, _choose_series(file, series)


def describe_levels(where: str, s: SeriesInfo) -> str:
    """``0 = 2967 x 2220 (0.499 µm/px), 1 = ...``: the levels of a series, for messages."""
    parts = []
    for i, lv in enumerate(s.levels):
        sizes = dict(zip(s.axes, lv.shape))
        text = f"{i} = {' x '.join(str(sizes[a]) for a in s.axes if a in 'zyx')}"
        pixel = _level_pixel_size(where, s, i)
        if "x" in pixel:
            text += f" ({pixel['x']:.4g} µm/px)"
        parts.append(text)
    return ", ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        # keys starting with "_" hold bulky internals (a palette's colour map)
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _level_pixel_size(where: str, s: SeriesInfo, level: int) -> dict[str, float]:
    if level == 0:
        return dict(s.pixel_size)
    return level_pixel_size(
        s.pixel_size,
        s.axes,
        s.levels[0].shape,
        s.levels[level].shape,
        s.levels[level].declared_scale,
        where=f"{where} series {s.index} level {level}",
    )


def _choose_series(file: FileInfo, series: int | None) -> SeriesInfo:
    if series is None:
        return file.series[file.default_series()]
    if not 0 <= series < len(file.series):
        names = ", ".join(f"{s.index}={s.name or '(unnamed)'}" for s in file.series)
        raise InputError(
            f"has no series {series} (it has {len(file.series)}: {names})",
            where=file.path,
            hint="choose an existing series, or leave it out for the main image",
        )
    return file.series[series]


def _check_level(where: str, s: SeriesInfo, level: int) -> None:
    stored = s.levels[level]
    if stored.problem:
        raise CorruptInputError(
            f"is damaged: series {s.index} {stored.problem}",
            where=where,
            hint="the export or copy did not finish, or the scanner skipped tiles; "
            "re-export or re-transfer it (reading on would paint the holes black)",
        )
    if s.info.get("unreadable"):
        raise UnsupportedFormatError(
            f"series {s.index} {s.info['unreadable']}",
            where=where,
            hint="install imagecodecs with that codec, or convert the file "
            "(e.g. to OME-Zarr or a JPEG/zlib-compressed TIFF)",
        )
    if 0 in stored.shape:
        raise InputError(
            f"series {s.index} level {level} has a zero-size dimension "
            f"(shape {stored.shape}, axes {s.axes!r})",
            where=where,
            hint="the image is empty; check how it was exported",
        )
    itemsize = np.dtype(stored.dtype).itemsize
    chunk_bytes = int(np.prod(stored.chunks)) * itemsize
    if chunk_bytes > MAX_STORED_CHUNK_BYTES:
        total = int(np.prod(stored.shape)) * itemsize
        raise UnsupportedFormatError(
            f"stores series {s.index} level {level} ({' x '.join(map(str, stored.shape))} "
            f"{stored.dtype}, {_size(total)} decoded) in compressed pieces of {_size(chunk_bytes)} "
            f"(chunks {stored.chunks}); reading any region would decode a whole piece, "
            f"more than the {_size(MAX_STORED_CHUNK_BYTES)} allowed",
            where=where,
            hint="re-save it tiled, e.g. as a tiled TIFF or OME-Zarr with 512-1024 px "
            "chunks (uncompressed striped TIFFs are read in place and need no conversion)",
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _inspect(where: str) -> FileInfo:
    kind = _detect(where)
    return inspect_zarr(where) if kind == "zarr" else inspect_tiff(where)


def _detect(where: str) -> str:
    """``"tiff"`` or ``"zarr"``; an InputError for anything that cannot be read."""
    if not os.path.lexists(where):
        raise NotFoundError("does not exist", where=where, hint="check the path")
    try:
        os.stat(where)
    except FileNotFoundError as exc:
        raise NotFoundError(
            "is a symbolic link to a missing file",
            where=where,
            hint="fix or remove the link",
        ) from exc
    except OSError as exc:
        raise InputError(
            f"cannot be accessed ({exc.strerror or exc})",
            where=where,
            hint="check the path for symbolic link loops and permissions",
        ) from exc
    if os.path.isdir(where):
        if is_zarr_dir(where):
            return "zarr"
        raise InputError(
            "is a folder but not a Zarr array or OME-Zarr image "
            f"(no {', '.join(ZARR_MARKERS[:-1])} or {ZARR_MARKERS[-1]})",
            where=where,
            hint="pass an image file, or the root folder of a Zarr/OME-Zarr image",
        )
    return _detect_file(where)


def _detect_file(where: str) -> str:
    base = os.path.basename(where)
    suffix = base[base.rfind(".") :].lower() if "." in base else ""  # "..tif" too
    if suffix not in TIFF_SUFFIXES:
        hint = f"supported: {', '.join(TIFF_SUFFIXES)} files and Zarr/OME-Zarr folders"
        if suffix in _CONVERTIBLE:
            hint += "; convert it, e.g. with bioformats2raw to OME-Zarr"
        raise UnsupportedFormatError(
            f"has an unsupported file type {suffix or '(no extension)'!r}",
            where=where,
            hint=hint,
        )
    if os.path.getsize(where) == 0:
        raise InputError(
            "is empty (0 bytes)", where=where, hint="the copy or export did not finish"
        )
    if not os.access(where, os.R_OK):
        raise InputError(
            "cannot be read (permission denied)",
            where=where,
            hint="check the file's permissions",
        )
    return "tiff"
