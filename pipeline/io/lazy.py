"""Lazy, picklable access to one stored level, the dask array on top of it, and the
view of it a model reads (:class:`ModelView`).

tifffile's Zarr store holds an open file and cannot be pickled, so a dask array made
straight from it cannot travel to distributed workers. :class:`LazyLevel` instead
carries only the path, a locator and the file's fingerprint; each process opens the
level once (:func:`_open_level`, cached) on its first read. Decode failures become
:class:`~pipeline.errors.InputError` with reason ``corrupt-input`` naming the file,
level and region, never a silent black tile.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks
from dask.base import tokenize

from pipeline.errors import InputError
from pipeline.io.tiff import open_tiff_level
from pipeline.io.zarr_source import open_zarr_level

if TYPE_CHECKING:
    from pipeline.io.sources import ImageSource

logger = logging.getLogger(__name__)

#: Target size of one dask chunk; chunks are whole multiples of the stored tiles.
DASK_CHUNK_BYTES = 16 * 2**20

#: Source pixels (as float64) one resampling step may hold; larger reads go in bands.
RESAMPLE_BAND_BYTES = 64 * 2**20

#: Metadata files whose change means a Zarr folder changed.
_ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs")

Fingerprint = tuple[int, int]

#: How each kind of file reopens a level: ``opener(path, *locator) -> zarr.Array``.
#: A plain table, not a registry filled by another module: a worker process that only
#: unpickles a LazyLevel must find it.
_OPENERS: dict[str, Callable[..., Any]] = {"tiff": open_tiff_level, "zarr": open_zarr_level}


def fingerprint(path: str | os.PathLike) -> Fingerprint:
    """(mtime in ns, size) of a file, or of a Zarr folder and its root metadata."""
    path = os.fspath(path)
    stats = [os.stat(path)]
    if os.path.isdir(path):
        for name in _ZARR_METADATA:
            try:
                stats.append(os.stat(os.path.join(path, name)))
            except FileNotFoundError:
                continue
    return max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats)


@functools.lru_cache(maxsize=32)
def _open_level(kind: str, path: str, locator: tuple, expected: Fingerprint) -> Any:
    if fingerprint(path) != expected:
        raise InputError(
            "changed on disk since it was opened",
            where=path,
            hint="rerun; do not modify inputs while a run reads them",
            reason="input-changed",
        )
    opener = _OPENERS[kind]
    try:
        return opener(path, *locator)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError(
            f"cannot be opened again for reading ({type(exc).__name__}: {exc})",
            where=path,
            hint="the file may have been damaged or replaced; check it and rerun",
        ) from exc


class LazyLevel:
    """Array-like view of one stored level; opens the file on first read per process."""

    def __init__(
        self,
        kind: str,
        path: str,
        locator: tuple,
        plan: tuple[Any, ...],
        shape: tuple[int, ...],
        dtype: str,
        stamp: Fingerprint,
        label: str = "",
        axes: str = "",
        chunks: tuple[int, ...] = (),
    ) -> None:
        self.kind, self.path, self.locator = kind, path, tuple(locator)
        self.axes, self.chunks = axes, tuple(chunks)  # stored tiles, to say which one failed
        self.plan = tuple(plan)  # stored axes: slice(None) kept, an integer dropped
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)
        self.stamp = stamp
        self.label = label or str(self.locator)  # e.g. "series 0 level 1", for messages

    def _stored_selection(self, selection: Any) -> tuple[Any, ...]:
        """Selection on the kept axes → selection on the stored array."""
        selection = list(selection if isinstance(selection, tuple) else (selection,))
        if Ellipsis in selection:
            at = selection.index(Ellipsis)
            selection[at : at + 1] = [slice(None)] * (self.ndim - len(selection) + 1)
        selection += [slice(None)] * (self.ndim - len(selection))
        given = iter(selection)
        return tuple(next(given) if isinstance(p, slice) else p for p in self.plan)

    def __getitem__(self, selection: Any) -> np.ndarray:
        stored = self._stored_selection(selection)
        array = _open_level(self.kind, self.path, self.locator, self.stamp)
        try:
            data = array[stored]
            # a memory-mapped level returns a view of the map: copy what was asked for
            return np.array(data) if isinstance(data, np.memmap) else np.asarray(data)
        except InputError:
            raise
        except (ValueError, RuntimeError) as exc:
            # Codecs raise RuntimeError subclasses, tifffile a ValueError. OSError is
            # left alone: it may be transient and worth a retry.
            tile = self._failing_tile(array, selection)
            raise InputError(
                f"cannot decode {self.label}{tile} (reading {_describe(selection)}): "
                f"{type(exc).__name__}: {exc}",
                where=self.path,
                hint="the file is damaged (truncated or corrupt tile/chunk); "
                "re-export or re-transfer it",
                reason="corrupt-input",
            ) from exc

    def _failing_tile(self, array: Any, selection: Any) -> str:
        """`` tile at y 64:128, x 0:64``: the first stored tile of ``selection`` that does
        not decode, or ``""`` when that cannot be told (only runs after a failure)."""
        if not self.chunks or len(self.axes) != self.ndim:
            return ""
        selection = selection if isinstance(selection, tuple) else (selection,)
        if len(selection) != self.ndim or not all(isinstance(s, slice) for s in selection):
            return ""
        ranges = []
        for s, n, c in zip(selection, self.shape, self.chunks):
            start, stop, _ = s.indices(n)
            ranges.append(range(start // c * c, max(start + 1, stop), c))
        for corner in itertools.product(*ranges):
            box = tuple(slice(o, min(o + c, n)) for o, c, n in zip(corner, self.chunks, self.shape))
            try:
                array[self._stored_selection(box)]
            except (ValueError, RuntimeError):
                named = [f"{a} {b.start}:{b.stop}" for a, b in zip(self.axes, box) if a in "zyx"]
                return f" tile at {', '.join(named)}"
        return ""

    def __repr__(self) -> str:
        return f"LazyLevel({self.kind!r}, {self.path!r}, {self.locator}, {self.shape})"


def _describe(selection: Any) -> str:
    if not isinstance(selection, tuple):
        selection = (selection,)
    parts = []
    for s in selection:
        if isinstance(s, slice):
            parts.append(f"{s.start or 0}:{'' if s.stop is None else s.stop}")
        else:
            parts.append(str(s))
    return "[" + ", ".join(parts) + "]"


def dask_chunks(
    shape: tuple[int, ...], dtype: str, stored: tuple[int, ...], axes: str
) -> tuple[tuple[int, ...], ...]:
    """Dask chunks of about :data:`DASK_CHUNK_BYTES`, whole multiples of ``stored``.

    Channels stay in one chunk (a model reads them together), time points are split.
    """
    wanted = tuple(-1 if a == "c" else 1 if a == "t" else "auto" for a in axes)
    stored = tuple(max(1, min(c, s)) for c, s in zip(stored, shape))
    return normalize_chunks(
        wanted, shape, dtype=np.dtype(dtype), previous_chunks=stored, limit=DASK_CHUNK_BYTES
    )


def make_array(level: LazyLevel, stored_chunks: tuple[int, ...], axes: str) -> da.Array:
    """A dask array over ``level``; reading a region decodes only the tiles it touches.

    Slices of it are fused into the read by dask's optimizer, so a 256x256 window of a
    100k x 100k slide reads a handful of tiles even though dask chunks are larger.
    """
    chunks = dask_chunks(level.shape, str(level.dtype), stored_chunks, axes)
    name = "read-" + tokenize(level.kind, level.path, level.locator, level.stamp, chunks)
    meta = np.empty((0,) * level.ndim, dtype=level.dtype)
    # fancy=True (the default) matters: with fancy=False dask stops fusing slices into
    # the read, and every read decodes its whole dask chunk.
    return da.from_array(level, chunks=chunks, name=name, meta=meta)


# --- the array a model reads ------------------------------------------------------------


class ModelView:
    """Array-like ``(C, *spatial)`` over one opened level, for ``dask.array.from_array``.

    Reading a window reads the source window under it (dask fuses the slicing into the
    read, so only the touched tiles decode), then: drops single t/z, moves axes, inverts
    MINISWHITE, maps a palette, selects channels, checks floats for NaN/Inf and
    resamples. ``resample`` maps ``y``/``x`` to a
    :class:`~pipeline.resolution.AreaAxis` (``size``, ``factor``, ``source_range``,
    ``apply``); each output pixel depends on its own footprint only, so windows agree.
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
        resample: dict[str, Any],
        check_finite: bool = True,
    ) -> None:
        self.base, self.axes, self.path = source.array, source.axes, source.path
        self.label = f"series {source.series} level {source.level}"
        self.take, self.order, self.spatial = take, order, spatial
        self.colormap, self.keep, self.invert = colormap, keep, invert
        self.resample, self.check_finite = resample, check_finite
        sizes = dict(zip(source.axes, source.shape))
        channels = 3 if colormap is not None else sizes.get("c", 1)
        self.channels = len(keep) if keep is not None else channels
        out = tuple(resample[a].size if a in resample else sizes[a] for a in spatial)
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
