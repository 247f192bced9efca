"""What a reader learns about a file before decoding any pixel.

The format modules (:mod:`pipeline.io.tiff`, :mod:`pipeline.io.zarr_source`) describe a
file as a :class:`FileInfo`; :mod:`pipeline.io.sources` turns one series and level of it
into a lazy array. Also here: physical units and the pixel size of pyramid levels, which
both formats share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Series names (lower case) of the small pictures slide scanners store beside the slide.
ASSOCIATED_NAMES = frozenset(
    {"thumbnail", "label", "macro", "map", "overview", "label image", "macro image"}
)

#: Micrometres per unit, for every spelling seen in NGFF, OME and ImageJ metadata.
_MICROMETRES_PER_UNIT = {
    "angstrom": 1e-4,
    "picometer": 1e-6,
    "pm": 1e-6,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "nm": 1e-3,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "µm": 1.0,  # micro sign
    "μm": 1.0,  # greek mu
    "\\u00b5m": 1.0,  # how ImageJ escapes the micro sign
    "millimeter": 1e3,
    "millimetre": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "metre": 1e6,
    "m": 1e6,
    "inch": 25400.0,
    "in": 25400.0,
}

#: A pixel size outside this range (micrometres) is taken as a metadata error: 0, a
#: millimetre or more per pixel, or an unconverted unit (B11).
PLAUSIBLE_UM = (1e-5, 1e3)

#: Relative disagreement between a level's declared and actual scale that is reported.
SCALE_TOLERANCE = 0.05


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level as stored: shape and storage chunks in the series' axes."""

    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    declared_scale: dict[str, float] | None = None  # µm per pixel the file claims, if any
    problem: str | None = None  # why this level cannot be read (missing tiles...), if so


@dataclass(frozen=True)
class SeriesInfo:
    """One image in a file (an Aperio slide has a baseline, thumbnail, label, macro)."""

    index: int
    name: str
    axes: str  # canonical letters from "tczyx", see :func:`pipeline.io.axes.select_axes`
    selection: tuple[Any, ...]  # AxisSelection.index: the stored array down to ``axes``
    levels: tuple[LevelInfo, ...]  # shapes already in ``axes``
    pixel_size: dict[str, float]  # level 0, µm
    locators: tuple[tuple[Any, ...], ...]  # per level, how the format module reopens it
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def associated(self) -> bool:
        """True for label, macro, thumbnail and similar side images."""
        return self.name.strip().lower() in ASSOCIATED_NAMES


@dataclass(frozen=True)
class FileInfo:
    """Everything cheap to know about one input file or folder."""

    path: str
    format: str
    kind: str  # which module reopens levels: "tiff" or "zarr"
    series: tuple[SeriesInfo, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def default_series(self) -> int:
        """Index of the main image: the first series that is not a side image."""
        for s in self.series:
            if not s.associated:
                return s.index
        return 0


def to_micrometres(value: Any, unit: str | None) -> float | None:
    """Convert ``value`` in ``unit`` to micrometres; None when the unit is not physical.

    >>> to_micrometres(250, "nanometer")
    0.25
    """
    if unit is None:
        return None
    factor = _MICROMETRES_PER_UNIT.get(str(unit).strip().lower())
    try:
        size = float(value) * factor if factor is not None else None
    except (TypeError, ValueError):
        return None
    return size


def is_plausible_um(size: float | None) -> bool:
    """Whether ``size`` (µm) can be a real pixel size: finite and within :data:`PLAUSIBLE_UM`."""
    try:
        return (
            size is not None and math.isfinite(size) and PLAUSIBLE_UM[0] <= size <= PLAUSIBLE_UM[1]
        )
    except TypeError:
        return False


def clean_pixel_size(
    sizes: Mapping[str, float | None],
    where: str,
    rejected: dict[str, float] | None = None,
) -> dict[str, float]:
    """Keep the plausible, finite, positive sizes; warn about the others.

    The implausible ones are also put into ``rejected`` (when given), so that a later
    request for a physical resolution can say what the file declared.
    """
    out: dict[str, float] = {}
    for axis, size in sorted(sizes.items(), key=lambda item: "tczyx".find(item[0])):
        if size is None:
            continue
        if not is_plausible_um(size):
            log.warning("%s: ignoring implausible %s pixel size %r µm", where, axis, size)
            if rejected is not None:
                rejected[axis] = float(size)
            continue
        out[axis] = float(size)
    return out


def level_pixel_size(
    base: Mapping[str, float],
    axes: str,
    shape0: Sequence[int],
    shape: Sequence[int],
    declared: Mapping[str, float] | None = None,
    where: str = "",
) -> dict[str, float]:
    """Pixel size of a pyramid level from level 0's size and the real shape ratio.

    Files do not always downsample by the factor they declare (the OME-Zarr of the CMU
    slide claims 2x for a level that is 3.87x smaller), so the shapes decide; a declared
    scale that disagrees by more than :data:`SCALE_TOLERANCE` is logged.
    """
    out: dict[str, float] = {}
    for i, axis in enumerate(axes):
        if axis not in base or shape[i] == 0:
            continue
        size = base[axis] * shape0[i] / shape[i]
        out[axis] = size
        claimed = (declared or {}).get(axis)
        if claimed and abs(claimed - size) / size > SCALE_TOLERANCE:
            log.warning(
                "%s: level declares %s pixel size %.6g µm but its shape implies %.6g µm; "
                "using the shape",
                where,
                axis,
                claimed,
                size,
            )
    return out
