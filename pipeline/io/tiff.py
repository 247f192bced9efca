"""TIFF family: plain and multi-page TIFF, ImageJ hyperstacks, Aperio SVS, Hamamatsu NDPI,
OME-TIFF (pyramids in SubIFDs), PerkinElmer/Akoya QPTIFF, generic pyramidal TIFF.

Pixels of a one-page level are read tile by tile straight from the file
(:mod:`pipeline.io.tiff_tiles`), of other levels through tifffile's Zarr 3 store, and of
uncompressed contiguous data (a large striped TIFF) through a read-only memory map that
reads only the rows and columns asked for. This module only reads metadata and opens levels.

Guards against damaged files: a file cut short or whose tiles point past its end, a
level with tiles that were never written (offset or byte count 0: tifffile would return
zeros), and JPEG / JPEG 2000 tiles whose own header declares more pixels than the tile
holds (a decompression bomb: the decoder would allocate the declared size).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import numpy as np
import tifffile
import zarr

from pipeline.errors import InputError
from pipeline.io.axes import select_axes
from pipeline.io.meta import (
    FileInfo,
    LevelInfo,
    SeriesInfo,
    clean_pixel_size,
    is_plausible_um,
    to_micrometres,
)
from pipeline.io.tiff_guard import guard_decoders
from pipeline.io.tiff_tiles import TiffTiles, supports

log = logging.getLogger(__name__)

#: tifffile axis letters → labels :func:`~pipeline.io.axes.select_axes` understands.
_AXIS_LABELS = {"T": "t", "C": "c", "Z": "z", "Y": "y", "X": "x", "S": "s", "I": "i", "Q": "i"}

#: Screen and print resolutions: a TIFF in inches with at most this many pixels per inch
#: carries a default DPI (72, 300...), not a microscope calibration.
_MAX_PRINT_DPI = 1200.0

_RESUNIT_UM = {2: 25400.0, 3: 10000.0}  # INCH, CENTIMETER


#: Locator tag of levels read through a memory map instead of tifffile's Zarr store.
MEMMAP = "memmap"

#: Side of the pieces a memory-mapped (untiled, uncompressed) level is read in (its
#: storage chunks as far as dask chunking and error messages are concerned).
MEMMAP_PIECE = 512

#: Levels with more pages than this have only their first and last page checked for
#: missing or out-of-file data (a 10,000-page stack would take long to scan).
MAX_PAGES_CHECKED = 256


def open_tiff_level(path: str, series: int, level: int, mode: str = "zarr") -> Any:
    """Open one level of one series read-only, without decoding pixels: ``mode`` is
    ``"zarr"`` (:class:`~pipeline.io.tiff_tiles.TiffTiles` or else tifffile's Zarr store,
    holding the TiffFile open) or :data:`MEMMAP` (contiguous uncompressed data)."""
    if mode == MEMMAP:
        return tifffile.memmap(path, series=series, level=level, mode="r")
    tif = tifffile.TiffFile(path)
    guard_decoders(tif.series[series].levels[level])
    if supports(tif.series[series].levels[level]):
        return TiffTiles(tif, path, series, level)
    return zarr.open_array(tif.series[series].aszarr(level=level, maxworkers=4), mode="r")


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
        raise InputError(f"is damaged: {handler.problems[0]}", where=path, hint=_DAMAGED_HINT)


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
            for page in _pages_to_check(level):
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


#: tifffile flag → (format, vendor), most specific first.
_FLAVOURS = {
    "svs": ("svs", "aperio"),
    "ndpi": ("ndpi", "hamamatsu"),
    "qpi": ("qptiff", "akoya"),
    "scn": ("tiff", "leica"),
    "bif": ("tiff", "ventana"),
    "philips": ("tiff", "philips"),
    "ome": ("ome-tiff", "ome"),
    "imagej": ("tiff", "imagej"),
}


def _flavour(tif: tifffile.TiffFile) -> tuple[str, str]:
    for flag, flavour in _FLAVOURS.items():
        if getattr(tif, "is_" + flag, False):
            return flavour
    return "tiff", "tiff"


def _format(tif: tifffile.TiffFile) -> str:
    return _flavour(tif)[0]


def _file_info(tif: tifffile.TiffFile) -> dict[str, Any]:
    info: dict[str, Any] = {"vendor": _flavour(tif)[1], "bigtiff": bool(tif.is_bigtiff)}
    magnification = None
    if tif.is_svs:
        magnification = aperio_metadata(tif.pages.first.description).get("AppMag")
    elif tif.is_ndpi:
        magnification = (tif.pages.first.ndpi_tags or {}).get("Magnification")
    elif tif.is_ome and tif.ome_metadata:
        magnification = _ome_magnification(tif.ome_metadata)
    if isinstance(magnification, (int, float)) and magnification > 0:
        info["magnification"] = float(magnification)
    return info


def _series_info(tif: tifffile.TiffFile, index: int, where: str) -> SeriesInfo:
    series = tif.series[index]
    selection = select_axes([_AXIS_LABELS.get(a, a) for a in series.axes], series.shape, where)
    axes = selection.axes
    levels, locators = [], []
    for number, stored_level in enumerate(series.levels):
        stored = zarr.open_array(series.aszarr(level=number), mode="r")
        if stored.ndim != len(selection.index):
            log.warning("%s: series %d level %d has other axes; ignored", where, index, number)
            continue
        locator: tuple[Any, ...] = (index, number)
        chunks = stored.chunks
        if stored_level.dataoffset is not None and stored_level.keyframe.compression == 1:
            # uncompressed and contiguous: a memory map reads just the rows asked for,
            # where the Zarr store would decode a whole (possibly huge) strip
            locator = (index, number, MEMMAP)
            chunks = _memmap_pieces(series.axes, stored.shape)
        levels.append(
            LevelInfo(
                shape=selection.kept(stored.shape),
                dtype=str(stored.dtype),
                chunks=selection.kept(chunks),
                problem=_missing_data(stored_level, number, lenient=tif.is_philips),
            )
        )
        locators.append(locator)
    keyframe = series.keyframe
    info: dict[str, Any] = {
        "series_name": series.name,
        "tiff_series_kind": series.kind,
        "compression": _name(keyframe.compression),
        "photometric": _photometric(keyframe),
    }
    if keyframe.extrasamples:
        info["extrasamples"] = [_extrasample(e) for e in keyframe.extrasamples]
    if keyframe.photometric == tifffile.PHOTOMETRIC.PALETTE and keyframe.colormap is not None:
        info["_colormap"] = np.asarray(keyframe.colormap)  # "_": not shown by describe
    names = _channel_names(tif, series)
    if names:
        info["channel_names"] = names
    undecodable = sorted(
        {_name(lv.keyframe.compression) for lv in series.levels}
        - {_name(c) for c in _decodable(series)}
    )
    if undecodable:
        info["unreadable"] = (
            f"uses compression {', '.join(undecodable)}, which this installation cannot decode"
        )
    rejected: dict[str, float] = {}
    sizes, source = _pixel_size(tif, index, axes, where)
    pixel_size = clean_pixel_size(sizes, where, rejected)
    if pixel_size:
        info["pixel_size_source"] = source
    if rejected:
        info["pixel_size_rejected"] = rejected
    return SeriesInfo(
        index=index,
        name=series.name or "",
        axes=axes,
        selection=selection.index,
        levels=tuple(levels),
        pixel_size=pixel_size,
        locators=tuple(locators),
        info=info,
    )


def _memmap_pieces(axes: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Storage chunks of a memory-mapped level: 512 x 512 planes, samples together."""
    return tuple(
        min(MEMMAP_PIECE, n) if a in "YX" else n if a == "S" else 1 for a, n in zip(axes, shape)
    )


def _missing_data(level: Any, number: int, lenient: bool = False) -> str | None:
    """Why a level cannot be read faithfully: tiles or strips with no data in the file.

    tifffile returns zeros for a tile whose offset or byte count is 0, or that is not
    listed at all, which would paint a hole in the slide black; such a level is refused
    instead. ``lenient``: Philips TIFFs legitimately omit the last row of tiles.
    """
    for page_number, page in enumerate(_pages_to_check(level)):
        if page is None:
            return f"level {number} lacks page {page_number}"
        expected = int(np.prod(page.chunked))
        if len(page.dataoffsets) < expected and not lenient:
            kind = "tiles" if page.is_tiled else "strips"
            return (
                f"level {number} declares {page.imagelength} x {page.imagewidth} pixels in "
                f"{expected} {kind} but the file lists {len(page.dataoffsets)}"
            )
        pairs = zip(page.dataoffsets, page.databytecounts)
        missing = [i for i, (offset, count) in enumerate(pairs) if not (offset and count)]
        if missing:
            kind = "tiles" if page.is_tiled else "strips"
            return (
                f"{len(missing)} of {len(page.dataoffsets)} {kind} of level {number} "
                f"have no data in the file (the first at y, x = "
                f"{_segment_origin(page, missing[0])})"
            )
    return None


def _pages_to_check(level: Any) -> list[Any]:
    """Every page of a level, or its first and last when it has very many."""
    count = len(level)
    if count > MAX_PAGES_CHECKED:
        return [level.keyframe, level[count - 1]]
    return [level[i] for i in range(count)]


def _segment_origin(page: Any, segment: int) -> str:
    """Pixel position (y, x) of a tile or strip of a page, for messages."""
    if page.is_tiled:
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        row, col = divmod(segment % (across * down), across)
        return f"{row * page.tilelength}, {col * page.tilewidth}"
    strips = max(1, -(-page.imagelength // max(1, page.rowsperstrip)))
    return f"{(segment % strips) * page.rowsperstrip}, 0"


def _extrasample(value: Any) -> str:
    try:
        return tifffile.EXTRASAMPLE(int(value)).name
    except ValueError:
        return f"code {int(value)}"


def _channel_names(tif: tifffile.TiffFile, series: Any) -> list[str]:
    """Marker names of a QPTIFF's channel pages, from each page's description XML."""
    if not tif.is_qpi:
        return []
    names = []
    for page in series.pages:
        try:
            root = ET.fromstring(page.description)
        except (ET.ParseError, AttributeError):
            return []
        name = root.findtext("Biomarker") or root.findtext("Name")
        names.append((name or "").strip())
    return names if any(names) else []


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


#: Two sources of a pixel size that differ by more than this are reported.
_PIXEL_SIZE_AGREEMENT = 0.05


def _pixel_size(
    tif: tifffile.TiffFile, index: int, axes: str, where: str
) -> tuple[dict[str, float | None], str]:
    """Level-0 pixel size in µm and where it came from.

    Every place the file may state it is read, most specific first (the vendor's
    metadata, then OME-XML, then ImageJ's, then the baseline resolution tags); the first
    that gives a plausible size wins, and another that disagrees is logged, so neither
    is trusted blindly.
    """
    series = tif.series[index]
    candidates: list[tuple[str, dict[str, float | None]]] = []
    if tif.is_svs:
        mpp = aperio_metadata(series.keyframe.description).get("MPP")
        if index != 0:  # the MPP belongs to the baseline, not the label or macro
            return {}, ""
        if isinstance(mpp, (int, float)):
            candidates.append(("aperio MPP", {"y": mpp, "x": mpp}))
    if tif.is_ome and tif.ome_metadata:
        ome = _ome_pixel_size(tif.ome_metadata, index, series.name)
        candidates.append(("OME PhysicalSize", ome))
    if tif.is_imagej:
        candidates.append(("ImageJ", _imagej_pixel_size(tif, axes)))
    candidates.append(("TIFF resolution tags", _resolution_pixel_size(series.keyframe)))
    plausible = [
        (name, {a: v for a, v in sizes.items() if is_plausible_um(v)}) for name, sizes in candidates
    ]
    plausible = [(name, sizes) for name, sizes in plausible if sizes]
    if not plausible:
        # nothing usable: pass on the first declared value, so the caller can say what it was
        return next((sizes for _, sizes in candidates if sizes), {}), ""
    name, chosen = plausible[0]
    for other_name, other in plausible[1:]:
        for axis, size in other.items():
            mine = chosen.get(axis)
            if mine and abs(size - mine) / mine > _PIXEL_SIZE_AGREEMENT:
                log.warning(
                    "%s: %s says %s pixel size %.6g µm but %s says %.6g µm; using %s",
                    where,
                    name,
                    axis,
                    mine,
                    other_name,
                    size,
                    name,
                )
    return chosen, name


def _ome_magnification(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag.endswith("Objective") and element.get("NominalMagnification"):
            try:
                return float(element.get("NominalMagnification", ""))
            except ValueError:
                return None
    return None


def _ome_pixel_size(xml: str, index: int, name: str) -> dict[str, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("unparsable OME-XML; no pixel size")
        return {}
    images = [e for e in root if e.tag.endswith("}Image") or e.tag == "Image"]
    named = [e for e in images if e.get("Name") == name]
    image = named[0] if len(named) == 1 else images[index] if index < len(images) else None
    pixels = None if image is None else next((e for e in image if e.tag.endswith("Pixels")), None)
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
        if per_unit is not None:
            out[axis] = to_micrometres(1.0 / per_unit if per_unit else math.inf, unit)
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
        if per_unit is None or (int(unit) == 2 and 0 < per_unit <= _MAX_PRINT_DPI):
            continue
        out[axis] = um_per_unit / per_unit if per_unit else math.inf
    return out


def _rational(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (TypeError, IndexError):
        return None
    except ZeroDivisionError:
        return 0.0
    return number if number >= 0 and math.isfinite(number) else None
