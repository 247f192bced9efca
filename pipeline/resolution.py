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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.io import lazy
from pipeline.io.layout import choose_channels, model_axes
from pipeline.io.meta import PLAUSIBLE_UM, is_plausible_um
from pipeline.io.sources import (
    ImageSource,
    describe_levels,
    open_image_cached,
    series_info,
)

if TYPE_CHECKING:
    import dask.array

__all__ = ["InputRef", "ModelInput", "open_for_model", "AreaAxis", "LEVEL_TOLERANCE"]

logger = logging.getLogger(__name__)

#: A pyramid level whose pixel size is within this fraction of the requested one is
#: used as it is, without resampling.
LEVEL_TOLERANCE = 0.02

#: Source pixels (as float64) one resampling step may hold; larger reads go in bands.
RESAMPLE_BAND_BYTES = 64 * 2**20

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

    def open(self) -> "dask.array.Array":
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
    """

    ref: InputRef
    array: "dask.array.Array"
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
    file, chosen = series_info(where, series)
    if level is not None:
        if not 0 <= level < len(chosen.levels):
            raise InputError(
                f"has no level {level} in series {chosen.index}; its levels are "
                f"{describe_levels(where, chosen)}",
                where=where,
                hint="choose one of these levels with --level (0 is full resolution)",
            )
        if model_mpp is not None:
            logger.info("%s: --level %d given; the model's %s µm/px is not applied",
                        where, level, model_mpp)  # fmt: skip
        use, target = level, None
    else:
        wanted = mpp if mpp is not None else _model_mpp(model_mpp)
        use, target = (0, None) if wanted is None else _pick_level(
            where, chosen, wanted, mpp_input, from_model=mpp is None
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
    del file
    return build(ref)


@functools.lru_cache(maxsize=16)
def _open_cached(ref: InputRef, stamp: lazy.Fingerprint) -> ModelInput:
    return build(ref)


def build(ref: InputRef) -> ModelInput:
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
    keep = choose_channels(
        source, channels, ref.in_channels, ref.channels, spatial=plan.spatial
    )
    pixel = _level_pixel_size(source, ref.mpp_input)
    resample: dict[str, AreaAxis] = {}
    if ref.target_mpp is not None:
        for axis in "yx":
            resample[axis] = AreaAxis.between(sizes[axis], pixel[axis], ref.target_mpp)
    view = ModelView(
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
        i for i, yx in enumerate(sizes)
        if all(abs(p - wanted) / wanted <= LEVEL_TOLERANCE for p in yx)
    ]  # fmt: skip
    if matching:
        return min(matching, key=lambda i: max(abs(p - wanted) for p in sizes[i])), None
    finer = [i for i, yx in enumerate(sizes) if all(p <= wanted * (1 + LEVEL_TOLERANCE) for p in yx)]
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


def _pixel_sizes(
    where: str, s: Any, mpp_input: float | None, asked: str
) -> list[dict[str, float]]:
    """y/x µm per pixel of every level; an InputError when the file does not say."""
    base = dict(s.pixel_size)
    if mpp_input is not None:
        base.update(y=float(mpp_input), x=float(mpp_input))
    if "y" not in base or "x" not in base:
        rejected = s.info.get("pixel_size_rejected") or {}
        if rejected:
            declared = ", ".join(f"{a} = {v:g} µm" for a, v in rejected.items())
            problem = (f"declares an implausible pixel size ({declared}; plausible is "
                       f"{PLAUSIBLE_UM[0]:g}..{PLAUSIBLE_UM[1]:g} µm)")  # fmt: skip
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
        {a: base[a] * shape0[a] / dict(zip(s.axes, lv.shape))[a] for a in "yx"}
        for lv in s.levels
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
    def between(cls, n: int, pixel: float, target: float) -> "AreaAxis":
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


# --- the array the model reads ---------------------------------------------------------


class ModelView:
    """Array-like ``(C, *spatial)`` over one opened level, for ``dask.array.from_array``.

    Reading a window reads the source window under it (dask fuses the slicing into the
    read, so only the touched tiles decode), then: drops single t/z, moves axes, inverts
    MINISWHITE, maps a palette, selects channels, checks floats for NaN/Inf and
    resamples.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        take: dict[str, int],
        order: str,
        spatial: str,
        colormap: np.ndarray | None,
        keep: tuple[int, ...] | None,
        invert: bool,
        resample: dict[str, AreaAxis],
    ) -> None:
        self.base, self.axes, self.path = source.array, source.axes, source.path
        self.label = f"series {source.series} level {source.level}"
        self.take, self.order, self.spatial = take, order, spatial
        self.colormap, self.keep, self.invert = colormap, keep, invert
        self.resample = resample
        sizes = dict(zip(source.axes, source.shape))
        channels = 3 if colormap is not None else sizes.get("c", 1)
        self.channels = len(keep) if keep is not None else channels
        self.source_shape = tuple(sizes[a] for a in spatial)
        out = tuple(resample[a].size if a in resample else sizes[a] for a in spatial)
        self.shape = (self.channels, *out)
        self.ndim = len(self.shape)
        stored = np.dtype(source.dtype)
        if colormap is not None:
            stored = np.dtype(np.uint8)
        self.dtype = np.dtype(np.float32) if resample and stored == np.bool_ else stored
        self._stored_chunks = dict(zip(source.axes, source.info.get("storage_chunks") or ()))

    def to_dask(self) -> "dask.array.Array":
        import dask.array as da
        from dask.base import tokenize

        previous = [self.channels]
        for a, n in zip(self.spatial, self.shape[1:]):
            c = self._stored_chunks.get(a, 256)
            previous.append(max(1, min(n, round(c / self.resample[a].factor)))
                            if a in self.resample else min(n, c))  # fmt: skip
        chunks = lazy.dask_chunks(self.shape, str(self.dtype), tuple(previous), "c" + self.spatial)
        name = "model-" + tokenize(self.base.name, self.take, self.order, self.keep,
                                   self.invert, self.resample, self.colormap)  # fmt: skip
        meta = np.empty((0,) * self.ndim, dtype=self.dtype)
        return da.from_array(self, chunks=chunks, name=name, meta=meta)

    def __getitem__(self, key: Any) -> np.ndarray:
        index = _expand(key, self.shape)
        if any(len(i) == 0 for i, _ in index):
            return np.empty(tuple(len(i) for i, drop in index if not drop), dtype=self.dtype)
        boxes = [(int(i.min()), int(i.max()) + 1) for i, _ in index]
        data = self._box(boxes)
        for axis in reversed(range(len(index))):  # last first: axis numbers stay valid
            (i, drop), (lo, hi) = index[axis], boxes[axis]
            if drop:
                data = np.take(data, i[0] - lo, axis=axis)
            elif len(i) != hi - lo:  # not the whole box: a step or a list
                data = np.take(data, i - lo, axis=axis)
        return data

    def _box(self, boxes: list[tuple[int, int]]) -> np.ndarray:
        """Output pixels in the box ``boxes`` (one (lo, hi) per axis, channels first)."""
        (c_lo, c_hi), spatial = boxes[0], boxes[1:]
        wanted = list(range(c_lo, c_hi)) if self.keep is None else list(self.keep[c_lo:c_hi])
        y = self.spatial.find("y")
        if "y" in self.resample and len(spatial) > y:
            band = self._band_rows(spatial)
            lo, hi = spatial[y]
            if hi - lo > band:
                parts = []
                for start in range(lo, hi, band):
                    sub = list(spatial)
                    sub[y] = (start, min(hi, start + band))
                    parts.append(self._read(wanted, sub))
                return np.concatenate(parts, axis=1 + y)
        return self._read(wanted, spatial)

    def _band_rows(self, spatial: list[tuple[int, int]]) -> int:
        """Output rows per step, so that one step holds at most RESAMPLE_BAND_BYTES."""
        row = 8.0 * self.channels
        for a, (lo, hi) in zip(self.spatial, spatial):
            factor = self.resample[a].factor if a in self.resample else 1.0
            row *= factor if a == "y" else (hi - lo) * factor
        return max(1, int(RESAMPLE_BAND_BYTES // row))

    def _read(self, wanted: list[int], spatial: list[tuple[int, int]]) -> np.ndarray:
        raw = [0] if self.colormap is not None else wanted
        r_lo, r_hi = min(raw), max(raw) + 1
        src = {a: self.resample[a].source_range(lo, hi) if a in self.resample else (lo, hi)
               for a, (lo, hi) in zip(self.spatial, spatial)}  # fmt: skip
        selection = []
        for a in self.axes:
            if a in self.take:
                selection.append(self.take[a])
            elif a == "c":
                selection.append(slice(r_lo, r_hi))
            else:
                selection.append(slice(*src[a]))
        data = self.base[tuple(selection)]
        data = np.asarray(data.compute(scheduler="synchronous") if hasattr(data, "compute") else data)
        kept = [a for a in self.axes if a not in self.take]
        data = data.transpose([kept.index(a) for a in self.order])
        if "c" not in self.order:
            data = data[None]
        if self.invert and data.dtype.kind in "bu":
            data = ~data if data.dtype == np.bool_ else np.iinfo(data.dtype).max - data
        if self.colormap is not None:
            data = self.colormap[:, data[0]]
            data = data[wanted]
        elif wanted != list(range(r_lo, r_hi)):
            data = data[[w - r_lo for w in wanted]]
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            self._nonfinite(data, src)
        for k, a in enumerate(self.spatial):
            if a in self.resample:
                lo, hi = spatial[k]
                data = self.resample[a].apply(data, 1 + k, lo, hi, src[a][0])
        return self._cast(data)

    def _cast(self, data: np.ndarray) -> np.ndarray:
        if data.dtype == self.dtype:
            return data
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(data), info.min, info.max).astype(self.dtype)
        return data.astype(self.dtype)

    def _nonfinite(self, data: np.ndarray, src: dict[str, tuple[int, int]]) -> None:
        bad = np.argwhere(~np.isfinite(data))[0]
        at = {a: src[a][0] + int(i) for a, i in zip(self.spatial, bad[1:])}
        region = ", ".join(f"{a} {lo}:{hi}" for a, (lo, hi) in src.items())
        raise InputError(
            f"has NaN or Inf pixel values in {self.label} (region {region}; the first at "
            f"{', '.join(f'{a}={v}' for a, v in at.items())})",
            where=self.path,
            hint="replace the non-finite values (e.g. with 0 or the background level) "
            "and rerun; the model's output there would be meaningless",
            reason="nonfinite-input",
        )

    def __repr__(self) -> str:
        return f"ModelView({self.path!r}, {self.label}, shape={self.shape})"


def _expand(key: Any, shape: tuple[int, ...]) -> list[tuple[np.ndarray, bool]]:
    """Each axis's selected indices and whether the axis is dropped (integer index)."""
    key = list(key if isinstance(key, tuple) else (key,))
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key[at : at + 1] = [slice(None)] * (len(shape) - len(key) + 1)
    key += [slice(None)] * (len(shape) - len(key))
    out = []
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            out.append((np.arange(*k.indices(n)), False))
        elif np.ndim(k) == 0:
            i = int(k)
            out.append((np.array([i + n if i < 0 else i]), True))
        else:
            i = np.asarray(k, dtype=np.int64)
            out.append((np.where(i < 0, i + n, i), False))
    return out
