"""Level arrays as blocks write them: opened once per process, written chunk by chunk.

A block writes whole chunks of a level (one writer per chunk). Zarr's own way of not
storing an all-zero chunk (``write_empty_chunks=False``) compares every value of every
chunk with the fill value, and for integers that comparison goes through NaN checks and
boolean indexing: it costs more than compressing the chunk. A :class:`LevelWriter` asks
once per chunk whether it holds a nonzero value (one vectorised reduction); those chunks
are written without Zarr's check, the others through it, so an all-zero chunk is still
not stored (and one stored before is removed). A write returns once its chunk files are
on disk (fsync): a block records that it is written only after its writes returned, so
a record never outlives its chunks in a power loss.

:func:`level_writer` keeps one writer per level path in the process (a worker opens a
level's metadata once, not once per block); :func:`forget_writers` drops an image's when
it is finished or discarded.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from pipeline.core.atomic import sync_path

__all__ = ["EMPTY_CHUNKS_CONFIG", "LevelWriter", "forget_writers", "level_writer"]

#: The Zarr array configuration of every level: all-zero chunks are not stored.
EMPTY_CHUNKS_CONFIG = {"write_empty_chunks": False}

_WRITERS: dict[str, LevelWriter] = {}


def _open(path: str, write_empty: bool):
    """One level array opened for writing; ``write_empty``: without Zarr's emptiness check
    (for chunks known to hold a value)."""
    import zarr

    # open_array ignores ``config`` for an existing array: set it on the opened one
    return zarr.open_array(path, mode="r+").with_config({"write_empty_chunks": write_empty})


def _holds_nonzero(piece: np.ndarray) -> bool:
    """Whether ``piece`` has a value other than zero. Unsigned integers and booleans
    take a maximum (no conversion to bool); others ``any`` (a ``-0.0`` counts as zero
    here: Zarr's check then decides)."""
    if piece.size == 0:
        return False
    if piece.dtype.kind in "ub":
        return bool(piece.max())
    return bool(piece.any())


class LevelWriter:
    """One level array opened for block writes (see the module docstring).

    ``writer[index] = data`` writes ``data`` at ``index`` (a tuple of slices with
    ``start``/``stop``, one per axis); the region may start and end anywhere, its chunks
    are split on the level's chunk grid.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.array = _open(path, write_empty=True)
        self._checked: Any = None

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def __setitem__(self, index: tuple[slice, ...], data: np.ndarray) -> None:
        data = np.asarray(data)
        origin = [0 if s.start is None else int(s.start) for s in index]
        cuts = []
        for o, n, c in zip(origin, data.shape, self.chunks):
            inner = range((o // c + 1) * c, o + n, c)  # chunk boundaries inside the region
            edges = [o, *inner, o + n]
            cuts.append([slice(a - o, b - o) for a, b in zip(edges, edges[1:])])
        pieces = list(itertools.product(*cuts))
        empty = [p for p in pieces if not _holds_nonzero(data[p])]
        at = tuple(slice(o, o + n) for o, n in zip(origin, data.shape))
        if not empty:
            self.array[at] = data
        else:
            if self._checked is None:
                self._checked = _open(self.path, write_empty=False)
            for p in pieces:
                where = tuple(slice(o + s.start, o + s.stop) for o, s in zip(origin, p))
                (self._checked if p in empty else self.array)[where] = data[p]
        self._sync(
            tuple((o + s.start) // c for o, s, c in zip(origin, p, self.chunks)) for p in pieces
        )

    def _sync(self, chunks: Iterable[tuple[int, ...]]) -> None:
        """Flush the files of the chunks at grid positions ``chunks`` to disk, with the
        folders that name them up to the level's own: once a write returns, a power loss
        cannot empty its chunks. A chunk not stored (all zero) has no file to flush."""
        level = os.path.normpath(self.path)
        folders: set[str] = set()
        for coords in chunks:
            path = os.path.join(level, self.array.metadata.encode_chunk_key(coords))
            sync_path(path)
            folder = os.path.dirname(path)
            while len(folder) >= len(level) and folder not in folders:
                folders.add(folder)
                folder = os.path.dirname(folder)
        for folder in sorted(folders, key=len, reverse=True):
            sync_path(folder)


def level_writer(path: str) -> LevelWriter:
    """The process's writer of the level at ``path`` (opened on first use)."""
    writer = _WRITERS.get(path)
    if writer is None:  # two threads opening it at once keep the same one
        writer = _WRITERS.setdefault(path, LevelWriter(path))
    return writer


def forget_writers(folder: str | os.PathLike) -> None:
    """Drop the writers of every level under ``folder`` (an image, with its labels),
    after the image is finished or discarded."""
    prefix = os.path.join(os.fspath(folder), "")
    for path in [p for p in list(_WRITERS) if p.startswith(prefix)]:
        _WRITERS.pop(path, None)
