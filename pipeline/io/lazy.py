"""Lazy, picklable access to one stored level, and the dask array on top of it.

tifffile's Zarr store holds an open file and cannot be pickled, so a dask array made
straight from it cannot travel to distributed workers. :class:`LazyLevel` instead
carries only the path, a locator and the file's stamp (size and mtime:
:func:`~pipeline.io.fingerprint.stamp`); each process opens the level once
(:func:`_open_level`, cached) on its first read. Decode failures become
:class:`~pipeline.errors.CorruptInputError` naming the file, level and region, never a
silent black tile.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks
from dask.base import tokenize

from pipeline.errors import CorruptInputError, InputChangedError, InputError
from pipeline.io.fingerprint import Stamp, stamp
from pipeline.io.tiff import open_tiff_level
from pipeline.io.zarr_source import open_zarr_level

#: Target size of one dask chunk; chunks are whole multiples of the stored tiles.
DASK_CHUNK_BYTES = 16 * 2**20

#: How each kind of file reopens a level: ``opener(path, *locator) -> zarr.Array``.
#: A plain table, not a registry filled by another module: a worker process that only
#: unpickles a LazyLevel must find it.
_OPENERS: dict[str, Callable[..., Any]] = {"tiff": open_tiff_level, "zarr": open_zarr_level}


@functools.lru_cache(maxsize=32)
def _open_level(kind: str, path: str, locator: tuple, expected: Stamp) -> Any:
    if stamp(path) != expected:
        raise InputChangedError(
            "changed on disk since it was opened",
            where=path,
            hint="rerun; do not modify inputs while a run reads them",
        )
    opener = _OPENERS[kind]
    try:
        return opener(path, *locator)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError.because(
            exc,
            "cannot be opened again for reading",
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
        selection: tuple[Any, ...],
        shape: tuple[int, ...],
        dtype: str,
        stamp: Stamp,
        label: str = "",
        axes: str = "",
        chunks: tuple[int, ...] = (),
    ) -> None:
        self.kind, self.path, self.locator = kind, path, tuple(locator)
        self.axes, self.chunks = axes, tuple(chunks)  # stored tiles, to say which one failed
        self.selection = tuple(selection)  # per stored axis: slice(None) kept, 0 dropped
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
        return tuple(next(given) if isinstance(p, slice) else p for p in self.selection)

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
            raise CorruptInputError(
                f"cannot decode {self.label}{tile} (reading {_describe(selection)}): "
                f"{type(exc).__name__}: {exc}",
                where=self.path,
                hint="the file is damaged (truncated or corrupt tile/chunk); "
                "re-export or re-transfer it",
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
