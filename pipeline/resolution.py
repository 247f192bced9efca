"""What the model reads: one level of an input, in the model's layout, at the requested
physical resolution.

:func:`open_for_model` resolves the options a user gives about an input (``--series``,
``--level``, ``--mpp``, ``--mpp-input``, ``--channels``) and what a model declares (its
training pixel size, its input channels) into a :class:`ModelInput`: a lazy
``(C, *spatial)`` dask array and a picklable :class:`InputRef` that rebuilds the same
array on a Dask worker.

Resolution
----------
``mpp`` (µm per pixel; ``model_mpp`` is its default) selects the pyramid level whose
pixel size matches within :data:`LEVEL_TOLERANCE`, else the nearest *finer* level,
which is then reduced with an area (box) filter over each output pixel's exact
footprint: output pixel ``i`` averages source ``[i f, (i + 1) f)`` with ``f = mpp /
level pixel size``, weighting partly covered pixels by their overlap. Each output pixel
depends only on its own footprint, so any window reads the same values (no seams
between chunks), and a read decodes only the source tiles under it. Upsampling (an
``mpp`` finer than level 0) is refused: it would invent detail the model never saw.
Only ``y`` and ``x`` are resampled; ``z`` keeps its spacing.

Pixel values
------------
The array keeps the stored dtype (resampled integers are rounded; 1-bit becomes
float32 in [0, 1]); the pipeline's ``normalize="dtype"`` then divides integers by their
dtype's maximum: uint8 by 255, uint16 by 65535 (so 12-bit data stored in 16 bits spans
0..0.0625: the model must have been trained the same way), int8 by 127 (giving -1.01..1),
and leaves floats as they are. Palette images become RGB through their colour map;
``MINISWHITE`` images are inverted so that larger is brighter. Float images are checked
as they are read: NaN or Inf fails the input (reason ``nonfinite-input``), naming the
level and region. complex, 64-bit integer and other dtypes are refused.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError
from pipeline.io import lazy
from pipeline.io.layout import choose_channels, model_axes
from pipeline.io.meta import PLAUSIBLE_UM, is_plausible_um
from pipeline.io.sources import ImageSource, open_image_cached, series_info

if TYPE_CHECKING:
    import dask.array

__all__ = ["InputRef", "ModelInput", "open_for_model", "AreaAxis", "LEVEL_TOLERANCE"]

logger = logging.getLogger(__name__)

#: A pyramid level whose pixel size is within this fraction of the requested one is
#: used as it is, without resampling.
LEVEL_TOLERANCE = 0.02

#: Dtypes the pipeline can normalise (see the module docstring).
_SUPPORTED_KINDS = {"b", "u", "i", "f"}


@dataclass(frozen=True)
class InputRef:
    """How to rebuild a :class:`ModelInput`'s array, on any process (picklable, hashable).

    Every field is already resolved: ``series`` and ``level`` are the ones chosen, and
    ``target_mpp`` is None unless that level is resampled.
    """

    path: str
    series: int | None
    level: int
    ndim: int
    in_channels: int
    channels: tuple[int, ...] | None = None
    target_mpp: float | None = None
    mpp_input: float | None = None

    def open(self) -> dask.array.Array:
        """The lazy ``(C, *spatial)`` array, built once per process and file version."""
        try:
            stamp = lazy.fingerprint(self.path)
        except OSError:
            stamp = (0, 0)  # opening reports what is wrong with the path
        return _open_cached(self, stamp).array


@dataclass(frozen=True)
class ModelInput:
    """An input as the model reads it.

    Attributes
    ----------
    ref
        Rebuilds ``array`` on a worker.
    array
        Lazy ``(C, *spatial)`` array in the stored dtype (see the module docstring for
        how values are normalised).
    spatial_axes
        ``"yx"`` or ``"zyx"``.
    pixel_size
        µm per pixel of the run grid for the spatial axes known: the requested ``mpp``
        on resampled axes, the level's own size otherwise. May be empty.
    source
        The level read (before channel selection and resampling).
    level
        Its pyramid level.
    factor
        Source pixels per output pixel of the resampling (the larger of y and x); 1.0
        when the level is used as it is.
    factors
        The same per resampled axis (``{"y": ..., "x": ...}``; empty when none).
    """

    ref: InputRef
    array: dask.array.Array
    spatial_axes: str
    pixel_size: dict[str, float]
    source: ImageSource
    level: int
    factor: float = 1.0
    factors: dict[str, float] = field(default_factory=dict)


def open_for_model(
    path: str | os.PathLike,
    *,
    ndim: int,
    in_channels: int,
    series: int | None = None,
    level: int | None = None,
    mpp: float | None = None,
    mpp_input: float | None = None,
    channels: Sequence[int] | None = None,
    model_mpp: float | None = None,
) -> ModelInput:
    """Open an input for a model: level, resolution, layout and channels resolved.

    Parameters
    ----------
    path
        A TIFF-family file or a Zarr / OME-Zarr folder.
    ndim
        The model's spatial dimensions (2 or 3).
    in_channels
        Channels the model takes; 0 means any.
    series
        Image within the file; default: the main image.
    level
        A pyramid level to read as it is (``--level``); excludes ``mpp``.
    mpp
        Run at this many µm per pixel (``--mpp``); see the module docstring.
    mpp_input
        µm per pixel of level 0, overriding the file (``--mpp-input``); other levels
        scale by their shape.
    channels
        Channel indices to feed the model, in order (``--channels``).
    model_mpp
        The model's training pixel size (its metadata): the default for ``mpp`` when
        neither ``mpp`` nor ``level`` is given.

    Raises
    ------
    InputError
        Unreadable input, a level that does not exist (the message lists the levels),
        a requested resolution that the file's pixel size cannot give (missing or
        implausible pixel size: reason ``missing-pixel-size``; finer than level 0:
        ``resolution-unavailable``), bad channels (``channel-mismatch``), an
        unsupported dtype.
    """
    where = os.fspath(path)
    if mpp is not None and level is not None:
        raise ValueError("give mpp or level, not both")
    _check_positive("mpp", mpp)
    _check_positive("mpp_input", mpp_input)
    _, chosen = series_info(where, series)
    if level is not None:  # opening checks that it exists, and lists the levels if not
        if model_mpp is not None:
            logger.info(
                "%s: --level %d given; the model's %s µm/px is not applied", where, level, model_mpp
            )
        use, target = level, None
    else:
        wanted = mpp if mpp is not None else _model_mpp(model_mpp)
        use, target = (
            (0, None)
            if wanted is None
            else _pick_level(where, chosen, wanted, mpp_input, from_model=mpp is None)
        )
    ref = InputRef(
        path=where,
        series=chosen.index,
        level=use,
        ndim=ndim,
        in_channels=in_channels,
        channels=None if channels is None else tuple(int(c) for c in channels),
        target_mpp=target,
        mpp_input=None if mpp_input is None else float(mpp_input),
    )
    return _build(ref)


@functools.lru_cache(maxsize=16)
def _open_cached(ref: InputRef, stamp: lazy.Fingerprint) -> ModelInput:
    return _build(ref)


def _build(ref: InputRef) -> ModelInput:
    """The :class:`ModelInput` that ``ref`` describes (deterministic for a given file)."""
    source = open_image_cached(ref.path, ref.series, ref.level)
    dtype = np.dtype(source.dtype)
    if dtype.kind not in _SUPPORTED_KINDS or dtype.itemsize > 4 and dtype.kind != "f":
        raise InputError(
            f"has pixels of type {dtype}, which the pipeline cannot normalise",
            where=ref.path,
            hint="convert it to uint8, uint16 or float32",
            reason="unsupported-format",
        )
    plan = model_axes(source.axes, source.shape, ref.ndim, ref.path)
    sizes = dict(zip(source.axes, source.shape))
    colormap = _colormap(source, sizes.get("c", 1))
    channels = 3 if colormap is not None else sizes.get("c", 1)
    keep = choose_channels(source, channels, ref.in_channels, ref.channels, spatial=plan.spatial)
    pixel = _level_pixel_size(source, ref.mpp_input)
    resample: dict[str, AreaAxis] = {}
    if ref.target_mpp is not None:
        for axis in "yx":
            resample[axis] = AreaAxis.between(sizes[axis], pixel[axis], ref.target_mpp)
    view = lazy.ModelView(
        source,
        take=plan.take,
        order=plan.order,
        spatial=plan.spatial,
        colormap=colormap,
        keep=keep,
        invert=str(source.info.get("photometric", "")).upper() == "MINISWHITE",
        resample=resample,
    )
    pixel_size = {a: pixel[a] for a in plan.spatial if a in pixel}
    pixel_size.update({a: float(ref.target_mpp) for a in resample})  # type: ignore[arg-type]
    factors = {a: r.factor for a, r in resample.items()}
    return ModelInput(
        ref=ref,
        array=view.to_dask(),
        spatial_axes=plan.spatial,
        pixel_size=pixel_size,
        source=source,
        level=ref.level,
        factor=max(factors.values(), default=1.0),
        factors=factors,
    )


# --- choosing the level ---------------------------------------------------------------


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of µm per pixel, got {value!r}")


def _model_mpp(value: Any) -> float | None:
    """The model's declared training pixel size, if it is a usable number."""
    if value is None:
        return None
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        mpp = math.nan
    if not is_plausible_um(mpp):
        logger.warning("ignoring the model's implausible training pixel size %r µm", value)
        return None
    return mpp


def _pick_level(
    where: str, s: Any, wanted: float, mpp_input: float | None, *, from_model: bool
) -> tuple[int, float | None]:
    """(level, target µm/px or None) for a requested pixel size."""
    asked = (
        f"the model's training resolution {wanted:g} µm/px (its metadata)"
        if from_model
        else f"--mpp {wanted:g}"
    )
    sizes = [_yx(lv) for lv in _pixel_sizes(where, s, mpp_input, asked)]
    matching = [
        i
        for i, yx in enumerate(sizes)
        if all(abs(p - wanted) / wanted <= LEVEL_TOLERANCE for p in yx)
    ]
    if matching:
        return min(matching, key=lambda i: max(abs(p - wanted) for p in sizes[i])), None
    limit = wanted * (1 + LEVEL_TOLERANCE)
    finer = [i for i, yx in enumerate(sizes) if all(p <= limit for p in yx)]
    if not finer:
        best = min(max(yx) for yx in sizes)
        raise InputError(
            f"cannot be read at {asked}: its finest level has {best:.4g} µm/px, and "
            f"upsampling x{best / wanted:.2f} would invent detail",
            where=where,
            hint=f"use --mpp {best:.4g} or coarser, a model trained at about {best:.4g} "
            "µm/px, or --level 0 to run at the file's own resolution regardless",
            reason="resolution-unavailable",
        )
    return max(finer, key=lambda i: max(sizes[i])), wanted


def _yx(pixel: dict[str, float]) -> tuple[float, float]:
    return pixel["y"], pixel["x"]


def _pixel_sizes(where: str, s: Any, mpp_input: float | None, asked: str) -> list[dict[str, float]]:
    """y/x µm per pixel of every level; an InputError when the file does not say."""
    base = dict(s.pixel_size)
    if mpp_input is not None:
        base.update(y=float(mpp_input), x=float(mpp_input))
    if "y" not in base or "x" not in base:
        rejected = s.info.get("pixel_size_rejected") or {}
        if rejected:
            declared = ", ".join(f"{a} = {v:g} µm" for a, v in rejected.items())
            problem = (
                f"declares an implausible pixel size ({declared}; plausible is "
                f"{PLAUSIBLE_UM[0]:g}..{PLAUSIBLE_UM[1]:g} µm)"
            )
        else:
            problem = "does not state its pixel size"
        raise InputError(
            f"{problem}, so it cannot be read at {asked}",
            where=where,
            hint="pass --mpp-input with the scanner's µm per pixel of level 0, or "
            "--level N to choose a pyramid level yourself",
            reason="missing-pixel-size",
        )
    shape0 = dict(zip(s.axes, s.levels[0].shape))
    return [
        {a: base[a] * shape0[a] / dict(zip(s.axes, lv.shape))[a] for a in "yx"} for lv in s.levels
    ]


def _level_pixel_size(source: ImageSource, mpp_input: float | None) -> dict[str, float]:
    """The level's pixel sizes, with ``mpp_input`` replacing level 0's y and x."""
    pixel = dict(source.pixel_size)
    if mpp_input is not None:
        shape0 = dict(zip(source.axes, source.levels[0]))
        here = dict(zip(source.axes, source.shape))
        for a in "yx":
            pixel[a] = float(mpp_input) * shape0[a] / here[a]
    return pixel


def _colormap(source: ImageSource, channels: int) -> np.ndarray | None:
    """A palette image's colour map as (3, entries) uint8, or None."""
    cmap = source.info.get("_colormap")
    if cmap is None or channels != 1 or str(source.info.get("photometric")).upper() != "PALETTE":
        return None
    cmap = np.asarray(cmap, dtype=np.float64)[:3]
    if cmap.max() > 255:  # TIFF colour maps are 16-bit
        cmap = cmap / 257.0
    return np.clip(np.rint(cmap), 0, 255).astype(np.uint8)


# --- area resampling -----------------------------------------------------------------


@dataclass(frozen=True)
class AreaAxis:
    """Area (box) downsampling of one axis by a real factor.

    Output pixel ``i`` covers source ``[i * factor, (i + 1) * factor)`` clipped to the
    source; each source pixel is weighted by how much of it lies inside. The weights of
    an output pixel depend on ``i`` alone, so any window computes the same values.
    """

    n: int
    factor: float
    size: int

    @classmethod
    def between(cls, n: int, pixel: float, target: float) -> AreaAxis:
        factor = target / pixel
        return cls(n, factor, max(1, round(n / factor)))

    @property
    def taps(self) -> int:
        return math.ceil(self.factor) + 1

    def source_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Source pixels that output ``[lo, hi)`` reads."""
        return math.floor(lo * self.factor), min(self.n, math.ceil(hi * self.factor))

    def weights(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """First source pixel and ``taps`` weights of each output pixel in ``[lo, hi)``."""
        i = np.arange(lo, hi, dtype=np.float64)
        start = i * self.factor
        end = np.minimum((i + 1) * self.factor, self.n)
        first = np.floor(start)
        j = first[:, None] + np.arange(self.taps)[None, :]
        overlap = np.clip(np.minimum(end[:, None], j + 1) - np.maximum(start[:, None], j), 0, None)
        return first.astype(np.int64), overlap / (end - start)[:, None]

    def apply(self, data: np.ndarray, axis: int, lo: int, hi: int, src_lo: int) -> np.ndarray:
        """Reduce ``data`` (source pixels from ``src_lo`` on ``axis``) to output ``[lo, hi)``."""
        first, w = self.weights(lo, hi)
        last = src_lo + data.shape[axis] - 1
        shape = [1] * data.ndim
        shape[axis] = hi - lo
        out = np.zeros(data.shape[:axis] + (hi - lo,) + data.shape[axis + 1 :], np.float64)
        for k in range(self.taps):  # a fixed order: the same sums whatever the window
            index = np.minimum(first + k, last) - src_lo
            out += np.take(data, index, axis=axis) * w[:, k].reshape(shape)
        return out
