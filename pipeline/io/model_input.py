"""What the model reads: one level of an input, in the model's layout, at the requested
physical resolution.

:func:`open_for_model` resolves the options a user gives about an input (``--series``,
``--level``, ``--mpp``, ``--mpp-input``, ``--channels``) and what a model declares (its
training pixel size, its input channels) into a :class:`ModelInput`: a lazy
``(C, *spatial)`` dask array and a picklable :class:`InputRef` that rebuilds the same
array on a Dask worker. Tissue detection reads the same conversions at a coarser level
(:func:`open_level`), so it sees what the model sees.

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
as they are read: NaN or Inf fails the input
(:class:`~pipeline.errors.NonFiniteInputError`), naming the level and region. complex,
64-bit integer and other dtypes are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import MissingPixelSizeError, ResolutionError, UnsupportedFormatError
from pipeline.io import fingerprint
from pipeline.io.channels import choose_channels, palette_colormap
from pipeline.io.meta import PLAUSIBLE_UM, SeriesInfo, is_plausible_um
from pipeline.io.model_view import ModelView, model_axes
from pipeline.io.resample import AreaAxis
from pipeline.io.sources import ImageSource, open_image_cached, series_info

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "InputRef",
    "LEVEL_TOLERANCE",
    "ModelInput",
    "open_for_model",
    "open_level",
    "to_model_layout",
]

log = logging.getLogger(__name__)

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

    @classmethod
    def of(cls, source: ImageSource, ndim: int = 2, in_channels: int = 0) -> InputRef:
        """How an ``ndim``-D model taking ``in_channels`` (0: any) reads the level
        ``source`` as it is (every channel, not resampled)."""
        return cls(source.path, source.series, source.level, ndim, in_channels)

    def open(self) -> dask.array.Array:
        """The lazy ``(C, *spatial)`` array, built once per process and file version."""
        return self._opened().array

    def open_view(self) -> ModelView:
        """The same pixels as :meth:`open` as a plain array-like: a window comes back as
        numpy from one read of the stored tiles under it, without a dask graph (what a
        block reads)."""
        return self._opened().view

    def _opened(self) -> ModelInput:
        try:
            stamp = fingerprint.stamp(self.path)
        except OSError:
            stamp = (0, 0)  # opening reports what is wrong with the path
        return _open_cached(self, stamp)


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
    view: ModelView | None = None


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
        implausible pixel size: :class:`~pipeline.errors.MissingPixelSizeError`; finer
        than level 0: :class:`~pipeline.errors.ResolutionError`), bad channels
        (:class:`~pipeline.errors.ChannelMismatchError`), an unsupported dtype.
    """
    where = os.fspath(path)
    if mpp is not None and level is not None:
        raise ValueError("give mpp or level, not both")
    _check_positive("mpp", mpp)
    _check_positive("mpp_input", mpp_input)
    _, chosen = series_info(where, series)
    if level is not None:  # opening checks that it exists, and lists the levels if not
        if model_mpp is not None:
            log.info(
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
    inp = _build(ref)
    if not {"y", "x"} & set(inp.pixel_size):
        log.warning(
            "%s has no pixel size: it runs on its own pixels (the model's training resolution "
            "is not matched) and the output's scale is 1 per pixel, with no unit. If you know "
            "it, --mpp-input UM gives level 0's micrometres per pixel: it is written into the "
            "output, and --mpp or the model's resolution can then pick the matching level",
            where,
        )
    return inp


@functools.lru_cache(maxsize=16)
def _open_cached(ref: InputRef, _stamp: fingerprint.Stamp) -> ModelInput:
    # _stamp: only part of the cache key, so that a changed file is built again
    return _build(ref)


def _build(ref: InputRef) -> ModelInput:
    """The :class:`ModelInput` that ``ref`` describes (deterministic for a given file)."""
    source = open_image_cached(ref.path, ref.series, ref.level)
    dtype = np.dtype(source.dtype)
    if dtype.kind not in _SUPPORTED_KINDS or dtype.itemsize > 4 and dtype.kind != "f":
        raise UnsupportedFormatError(
            f"has pixels of type {dtype}, which the pipeline cannot normalise",
            where=ref.path,
            hint="convert it to uint8, uint16 or float32",
        )
    layout = model_axes(source.axes, source.shape, ref.ndim, ref.path)
    sizes = dict(zip(source.axes, source.shape))
    colormap = palette_colormap(source, sizes.get("c", 1))
    channels = 3 if colormap is not None else sizes.get("c", 1)
    keep = choose_channels(source, channels, ref.in_channels, ref.channels, spatial=layout.spatial)
    pixel = _level_pixel_size(source, ref.mpp_input)
    resample: dict[str, AreaAxis] = {}
    if ref.target_mpp is not None:
        for axis in "yx":
            resample[axis] = AreaAxis.between(sizes[axis], pixel[axis], ref.target_mpp)
    view = ModelView(
        source,
        layout,
        keep=keep,
        colormap=colormap,
        invert=str(source.info.get("photometric", "")).upper() == "MINISWHITE",
        resample=resample,
    )
    pixel_size = {a: pixel[a] for a in layout.spatial if a in pixel}
    pixel_size.update({a: float(ref.target_mpp) for a in resample})  # type: ignore[arg-type]
    factors = {a: r.factor for a, r in resample.items()}
    return ModelInput(
        ref=ref,
        array=view.to_dask(),
        spatial_axes=layout.spatial,
        pixel_size=pixel_size,
        source=source,
        level=ref.level,
        factor=max(factors.values(), default=1.0),
        factors=factors,
        view=view,
    )


def open_level(ref: InputRef, level: int) -> ModelInput:
    """The input ``ref`` describes, read at pyramid ``level`` as it is (not resampled).

    The same series, channels, palette mapping and MINISWHITE inversion as the model's
    input: what tissue detection looks at, so that it sees the model's pixels.
    """
    return _build(dataclasses.replace(ref, level=level, target_mpp=None))


def to_model_layout(
    source: ImageSource, ndim: int, in_channels: int
) -> tuple[dask.array.Array, str, dict[str, float]]:
    """The stored values of ``source`` in the axes a model takes: ``c`` then spatial.

    Only rearranges axes and drops an alpha channel: no palette mapping, inversion,
    channel selection or resampling (what the model reads is :func:`open_for_model`'s).
    For masks, where the stored value is what counts.

    Parameters
    ----------
    source
        An opened image.
    ndim
        2 for a 2D model, 3 for a 3D model. A 2D model on a volume keeps ``z`` (the
        caller runs it plane by plane).
    in_channels
        Channels the model expects; 0 means any.

    Returns
    -------
    array, spatial, pixel_size
        A lazy array with axes ``"c" + spatial``; ``spatial`` is ``"yx"`` or
        ``"zyx"``; the pixel sizes (µm) known for those axes.

    Raises
    ------
    InputError
        A time series, a 3D model on a 2D image, or a channel count the model cannot
        take (:class:`~pipeline.errors.ChannelMismatchError`).
    """
    layout = model_axes(source.axes, source.array.shape, ndim, source.path)
    channels = dict(zip(source.axes, source.array.shape)).get("c", 1)
    keep = choose_channels(source, channels, in_channels, None)
    view = ModelView(source, layout, keep=keep, check_finite=False)
    pixel_size = {a: source.pixel_size[a] for a in layout.spatial if a in source.pixel_size}
    return view.to_dask(), layout.spatial, pixel_size


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
        log.warning("ignoring the model's implausible training pixel size %r µm", value)
        return None
    return mpp


def _pick_level(
    where: str, s: SeriesInfo, wanted: float, mpp_input: float | None, *, from_model: bool
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
        raise ResolutionError(
            f"cannot be read at {asked}: its finest level has {best:.4g} µm/px, and "
            f"upsampling x{best / wanted:.2f} would invent detail",
            where=where,
            hint=f"use --mpp {best:.4g} or coarser, a model trained at about {best:.4g} "
            "µm/px, or --level 0 to run at the file's own resolution regardless",
        )
    return max(finer, key=lambda i: max(sizes[i])), wanted


def _yx(pixel: dict[str, float]) -> tuple[float, float]:
    return pixel["y"], pixel["x"]


def _pixel_sizes(
    where: str, s: SeriesInfo, mpp_input: float | None, asked: str
) -> list[dict[str, float]]:
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
        raise MissingPixelSizeError(
            f"{problem}, so it cannot be read at {asked}",
            where=where,
            hint="pass --mpp-input with the scanner's µm per pixel of level 0, or "
            "--level N to choose a pyramid level yourself",
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
