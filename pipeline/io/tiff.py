"""TIFF family: plain and multi-page TIFF, ImageJ hyperstacks, Aperio SVS, NDPI, OME-TIFF.

Pixels are read through tifffile's Zarr 3 store (``series.aszarr(level=...)``), one
stored tile or strip at a time; this module only reads metadata and opens levels.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import xml.etree.ElementTree as ET
from typing import Any, Iterator

import tifffile
import zarr

from pipeline.errors import InputError
from pipeline.io.layout import apply_plan, plan_axes
from pipeline.io.meta import (
    FileInfo,
    LevelInfo,
    SeriesInfo,
    clean_pixel_size,
    to_micrometres,
)

logger = logging.getLogger(__name__)

#: tifffile axis letters → labels :func:`plan_axes` understands.
_AXIS_LABELS = {"T": "t", "C": "c", "Z": "z", "Y": "y", "X": "x", "S": "s", "I": "i", "Q": "i"}

#: Screen and print resolutions: a TIFF in inches with at most this many pixels per inch
#: carries a default DPI (72, 300...), not a microscope calibration.
_MAX_PRINT_DPI = 1200.0

_RESUNIT_UM = {2: 25400.0, 3: 10000.0}  # INCH, CENTIMETER


def open_tiff_level(path: str, series: int, level: int) -> zarr.Array:
    """Open one level of one series as a read-only Zarr array (no pixels decoded).

    The TiffFile stays open for as long as the array is referenced.
    """
    tif = tifffile.TiffFile(path)
    return zarr.open_array(tif.series[series].aszarr(level=level), mode="r")


_DAMAGED_HINT = "the file is damaged or truncated (an interrupted copy?); copy or export it again"


class _ProblemLog(logging.Handler):
    """Collects what tifffile logs (in this thread) about a broken file while parsing.

    tifffile does not raise for a broken IFD chain: it logs and drops the pages, so a
    truncated 30-page stack silently opens as a single image.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and (
            record.levelno >= logging.ERROR or _DAMAGE_WORDS.search(message)
        ):
            self.problems.append(message)


_DAMAGE_WORDS = re.compile(r"invalid (page )?offset|corrupt|truncat", re.IGNORECASE)


@contextlib.contextmanager
def _watch_tifffile(path: str) -> Iterator[None]:
    handler = _ProblemLog()
    tifflog = logging.getLogger("tifffile")
    tifflog.addHandler(handler)
    try:
        yield
    finally:
        tifflog.removeHandler(handler)
    if handler.problems:
        raise InputError(
            f"is damaged: {handler.problems[0]}", where=path, hint=_DAMAGED_HINT
        )


def inspect_tiff(path: str) -> FileInfo:
    """Describe every series and level of a TIFF file without decoding pixels."""
    try:
        with _watch_tifffile(path), tifffile.TiffFile(path) as tif:
            fmt = _format(tif)
            series = tuple(_series_info(tif, i, path) for i in range(len(tif.series)))
            info = _file_info(tif)
            _check_extent(tif, path)
    except InputError:
        raise
    except (tifffile.TiffFileError, ValueError, IndexError, KeyError, EOFError) as exc:
        raise InputError(
            f"is not a readable TIFF file ({exc})",
            where=path,
            hint="check that the file is complete and really a TIFF/SVS/OME-TIFF "
            "(empty, truncated, or another format with a .tif name)",
        ) from exc
    if not series:
        raise InputError("contains no images", where=path, hint=_DAMAGED_HINT)
    return FileInfo(path=path, format=fmt, kind="tiff", series=series, info=info)


def _check_extent(tif: tifffile.TiffFile, path: str) -> None:
    """Refuse a file whose tiles or strips point past its end (cut short)."""
    size = tif.filehandle.size
    for index, series in enumerate(tif.series):
        for level in series.levels:
            for page in (level.keyframe, level[len(level) - 1]):
                if page is None:
                    continue
                ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
                if ends and max(ends) > size:
                    raise InputError(
                        f"is truncated: image data of series {index} runs to byte "
                        f"{max(ends)} but the file has {size} bytes",
                        where=path,
                        hint=_DAMAGED_HINT,
                    )


def _format(tif: tifffile.TiffFile) -> str:
    if tif.is_svs:
        return "svs"
    if tif.is_ndpi:
        return "ndpi"
    if tif.is_ome:
        return "ome-tiff"
    return "tiff"


def _file_info(tif: tifffile.TiffFile) -> dict[str, Any]:
    info: dict[str, Any] = {"vendor": _format(tif), "bigtiff": bool(tif.is_bigtiff)}
    if tif.is_svs:
        meta = aperio_metadata(tif.pages.first.description)
        info["vendor"] = "aperio"
        if "AppMag" in meta:
            info["magnification"] = meta["AppMag"]
    elif tif.is_ndpi:
        info["vendor"] = "hamamatsu"
        magnification = (tif.pages.first.ndpi_tags or {}).get("Magnification")
        if magnification:
            info["magnification"] = float(magnification)
    elif tif.is_imagej:
        info["vendor"] = "imagej"
    return info


def _series_info(tif: tifffile.TiffFile, index: int, where: str) -> SeriesInfo:
    series = tif.series[index]
    plan, axes = plan_axes([_AXIS_LABELS.get(a, a) for a in series.axes], series.shape, where)
    levels, numbers = [], []
    for number in range(len(series.levels)):
        stored = zarr.open_array(series.aszarr(level=number), mode="r")
        if stored.ndim != len(plan):
            logger.warning("%s: series %d level %d has other axes; ignored", where, index, number)
            continue
        shape, chunks = apply_plan(stored.shape, plan), apply_plan(stored.chunks, plan)
        levels.append(LevelInfo(shape=shape, dtype=str(stored.dtype), chunks=chunks))
        numbers.append(number)
    keyframe = series.keyframe
    info = {
        "series_name": series.name,
        "tiff_series_kind": series.kind,
        "compression": _name(keyframe.compression),
        "photometric": _photometric(keyframe),
    }
    undecodable = sorted(
        {_name(lv.keyframe.compression) for lv in series.levels}
        - {_name(c) for c in _decodable(series)}
    )
    if undecodable:
        info["unreadable"] = (
            f"uses compression {', '.join(undecodable)}, which this installation cannot decode"
        )
    return SeriesInfo(
        index=index,
        name=series.name or "",
        axes=axes,
        index_plan=plan,
        levels=tuple(levels),
        pixel_size=clean_pixel_size(_pixel_size(tif, index, axes), where),
        locators=tuple((index, number) for number in numbers),
        info=info,
    )


def _name(code: Any) -> str:
    return getattr(code, "name", None) or f"code {int(code)}"


def _decodable(series: Any) -> list[Any]:
    """Compressions of the series that tifffile (with imagecodecs) can decode here."""
    out = []
    for level in series.levels:
        code = level.keyframe.compression
        if code == 1 or code in tifffile.TIFF.DECOMPRESSORS:
            out.append(code)
    return out


def _photometric(keyframe: Any) -> str:
    name = keyframe.photometric.name
    # JPEG-compressed YCbCr is decoded to RGB by tifffile.
    return "RGB" if name == "YCBCR" else name


def aperio_metadata(description: str) -> dict[str, Any]:
    """Key = value pairs of an Aperio ImageDescription (``...|AppMag = 20|MPP = 0.499``)."""
    meta: dict[str, Any] = {}
    for item in description.split("|")[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            continue
        value = value.strip()
        try:
            meta[key.strip()] = float(value)
        except ValueError:
            meta[key.strip()] = value
    return meta


def _pixel_size(tif: tifffile.TiffFile, index: int, axes: str) -> dict[str, float | None]:
    """Level-0 pixel size in µm from the most specific metadata the file has."""
    series = tif.series[index]
    if tif.is_svs:
        mpp = aperio_metadata(series.keyframe.description).get("MPP")
        if index == 0 and isinstance(mpp, float):
            return {"y": mpp, "x": mpp}
        return {}
    if tif.is_ome and tif.ome_metadata:
        return _ome_pixel_size(tif.ome_metadata, index, series.name)
    if tif.is_imagej:
        return _imagej_pixel_size(tif, axes)
    return _resolution_pixel_size(series.keyframe)


def _ome_pixel_size(xml: str, index: int, name: str) -> dict[str, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        logger.warning("unparsable OME-XML; no pixel size")
        return {}
    images = [e for e in root if e.tag.endswith("}Image") or e.tag == "Image"]
    named = [e for e in images if e.get("Name") == name]
    image = named[0] if len(named) == 1 else images[index] if index < len(images) else None
    pixels = None if image is None else next(
        (e for e in image if e.tag.endswith("Pixels")), None
    )
    if pixels is None:
        return {}
    return {
        axis: to_micrometres(pixels.get(key), pixels.get(key + "Unit", "µm"))
        for axis, key in (("z", "PhysicalSizeZ"), ("y", "PhysicalSizeY"), ("x", "PhysicalSizeX"))
        if pixels.get(key) is not None
    }


def _imagej_pixel_size(tif: tifffile.TiffFile, axes: str) -> dict[str, float | None]:
    meta = tif.imagej_metadata or {}
    unit = meta.get("unit")
    keyframe = tif.series[0].keyframe
    out: dict[str, float | None] = {}
    for axis, tag in (("y", "YResolution"), ("x", "XResolution")):
        per_unit = _rational(keyframe.tags.valueof(tag))
        if per_unit:
            out[axis] = to_micrometres(1.0 / per_unit, unit)
    if "z" in axes and meta.get("spacing") is not None:
        out["z"] = to_micrometres(meta["spacing"], unit)
    return out


def _resolution_pixel_size(keyframe: Any) -> dict[str, float | None]:
    """Baseline TIFF resolution tags, only when their unit is a length."""
    unit = keyframe.tags.valueof("ResolutionUnit", 2)  # the TIFF default is inch
    um_per_unit = _RESUNIT_UM.get(int(unit))
    out: dict[str, float | None] = {}
    if um_per_unit is None:
        return out
    for axis, tag in (("y", "YResolution"), ("x", "XResolution")):
        per_unit = _rational(keyframe.tags.valueof(tag))
        if not per_unit or (int(unit) == 2 and per_unit <= _MAX_PRINT_DPI):
            continue
        out[axis] = um_per_unit / per_unit
    return out


def _rational(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    return number if number > 0 else None
