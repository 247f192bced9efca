"""The array a model reads: one opened level as ``(C, *spatial)``, converted on read.

:func:`model_axes` decides how a source's axes become the model's ``c`` + spatial order;
:class:`ModelView` is the array-like that applies it (with the channel choice, palette
mapping, MINISWHITE inversion and resampling that :mod:`pipeline.io.model_input`
resolves) under ``dask.array.from_array``, so that reading a window decodes only the
stored tiles under it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from pipeline.errors import InputError, NonFiniteInputError
from pipeline.io.lazy import dask_chunks

if TYPE_CHECKING:
    from pipeline.io.resample import AreaAxis
    from pipeline.io.sources import ImageSource

#: Source pixels (as float64) one resampling step may hold; larger reads go in bands.
RESAMPLE_BAND_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ModelAxes:
    """How a source's axes become the model's ``c`` + spatial order.

    ``take`` maps the axes that are dropped (a single time point, a single z plane for
    a 2D model) to the index kept; ``order`` lists the remaining source axes in model
    order (``c`` first when the source has one; otherwise the caller adds it).
    """

    take: dict[str, int]
    order: str
    spatial: str


def model_axes(axes: str, shape: Sequence[int], ndim: int, where: str) -> ModelAxes:
    """The model layout of a source with ``axes`` and ``shape`` for an ``ndim``-D model.

    Raises
    ------
    InputError
        A time series, or a 3D model on a 2D image.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    sizes = dict(zip(axes, shape))
    take: dict[str, int] = {}
    if "t" in axes:
        if sizes["t"] != 1:
            raise InputError(
                f"is a time series of {sizes['t']} time points",
                where=where,
                hint="export the time points as separate images",
            )
        take["t"] = 0
    if "z" in axes and sizes["z"] == 1 and ndim == 2:
        take["z"] = 0
    if ndim == 3 and sizes.get("z", 1) == 1:
        raise InputError(
            "is a 2D image but the model is 3D",
            where=where,
            hint="use a 2D model, or pass a volume (a z stack)",
        )
    spatial = "zyx" if "z" in axes and "z" not in take else "yx"
    order = ("c" if "c" in axes else "") + spatial
    return ModelAxes(take, order, spatial)


class ModelView:
    """Array-like ``(C, *spatial)`` over one opened level, for ``dask.array.from_array``.

    Reading a window reads the source window under it (dask fuses the slicing into the
    read, so only the touched tiles decode), then: drops single t/z, moves axes, inverts
    MINISWHITE, maps a palette, selects channels, checks floats for NaN/Inf and
    resamples. ``resample`` maps ``y``/``x`` to a
    :class:`~pipeline.io.resample.AreaAxis` (``size``, ``factor``, ``source_range``,
    ``apply``); each output pixel depends on its own footprint only, so windows agree.
    """

    def __init__(
        self,
        source: ImageSource,
        layout: ModelAxes,
        *,
        keep: tuple[int, ...] | None = None,
        colormap: np.ndarray | None = None,
        invert: bool = False,
        resample: dict[str, AreaAxis] | None = None,
        check_finite: bool = True,
    ) -> None:
        self.base, self.axes, self.path = source.array, source.axes, source.path
        self.reader = source.reader  # read directly when there is one: no dask graph
        self.label = f"series {source.series} level {source.level}"
        self.take, self.order, self.spatial = layout.take, layout.order, layout.spatial
        resample = resample or {}
        self.colormap, self.keep, self.invert = colormap, keep, invert
        self.resample, self.check_finite = resample, check_finite
        sizes = dict(zip(source.axes, source.shape))
        channels = 3 if colormap is not None else sizes.get("c", 1)
        self.channels = len(keep) if keep is not None else channels
        out = tuple(resample[a].size if a in resample else sizes[a] for a in self.spatial)
        self.shape = (self.channels, *out)
        self.ndim = len(self.shape)
        stored = np.dtype(source.dtype)
        if colormap is not None:
            stored = np.dtype(np.uint8)
        self.dtype = np.dtype(np.float32) if resample and stored == np.bool_ else stored
        self._stored_chunks = dict(zip(source.axes, source.info.get("storage_chunks") or ()))

    def to_dask(self) -> da.Array:
        previous = [self.channels]
        for a, n in zip(self.spatial, self.shape[1:]):
            c = self._stored_chunks.get(a, 256)
            previous.append(
                max(1, min(n, round(c / self.resample[a].factor)))
                if a in self.resample
                else min(n, c)
            )
        chunks = dask_chunks(self.shape, str(self.dtype), tuple(previous), "c" + self.spatial)
        name = "model-" + tokenize(
            self.base.name,
            self.take,
            self.order,
            self.keep,
            self.invert,
            self.resample,
            self.colormap,
            self.check_finite,
        )
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
        if "y" in self.resample:
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
        src = {
            a: self.resample[a].source_range(lo, hi) if a in self.resample else (lo, hi)
            for a, (lo, hi) in zip(self.spatial, spatial)
        }
        selection = []
        for a in self.axes:
            if a in self.take:
                selection.append(self.take[a])
            elif a == "c":
                selection.append(slice(r_lo, r_hi))
            else:
                selection.append(slice(*src[a]))
        if self.reader is not None:
            data = self.reader[tuple(selection)]
        else:
            data = self.base[tuple(selection)]
            if hasattr(data, "compute"):  # the level's dask array: fused into one read
                data = data.compute(scheduler="synchronous")
        data = np.asarray(data)
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
        if self.check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
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
        raise NonFiniteInputError(
            f"has NaN or Inf pixel values in {self.label} (region {region}; the first at "
            f"{', '.join(f'{a}={v}' for a, v in at.items())})",
            where=self.path,
            hint="replace the non-finite values (e.g. with 0 or the background level) "
            "and rerun; the model's output there would be meaningless",
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
