"""An input's fingerprint: what it was when a run planned it, to tell when it changed.

A file is fingerprinted by its real path, size, mtime and a SHA-256 over its first,
middle and last :data:`SAMPLE_BYTES` (a file replaced by one of the same size and mtime
still differs in its content); a Zarr folder by its metadata files and a few of its chunk
files. Reading the samples costs a few MiB per input whatever its size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from typing import Any

#: Bytes hashed at the start, middle and end of an input file.
SAMPLE_BYTES = 1 << 20
#: Chunk files of a Zarr input whose content is sampled.
ZARR_SAMPLES = 8
#: Files of a Zarr input listed at most (a larger store is sampled among the first ones).
ZARR_WALK_LIMIT = 200_000
_ZARR_METADATA = frozenset(("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"))

#: (size, mtime in ns): see :func:`stamp`.
Stamp = tuple[int, int]


@dataclass(frozen=True)
class Fingerprint:
    """What an input was, as far as the run key is concerned."""

    path: str  # real path
    kind: str  # "file" or "zarr"
    size: int
    mtime_ns: int
    sample: str  # SHA-256 of the sampled content
    stamp: Stamp  # see :func:`stamp`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stamp(path: str | os.PathLike) -> Stamp:
    """(size, mtime in ns) of a file, or of a Zarr folder and its root metadata files:
    what a worker re-checks cheaply before each block. Raises ``OSError``."""
    path = os.fspath(path)
    stats = [os.stat(path)]
    if os.path.isdir(path):
        for name in _ZARR_METADATA:
            try:
                stats.append(os.stat(os.path.join(path, name)))
            except FileNotFoundError:
                continue
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


def fingerprint(path: str | os.PathLike) -> Fingerprint:
    """Fingerprint an input file (start, middle and end sampled) or Zarr folder (its
    metadata files and a few chunk files). Raises ``OSError`` when it cannot be read."""
    real = os.path.realpath(path)
    st = os.stat(real)
    if os.path.isdir(real):
        return _zarr_fingerprint(real, st)
    digest = hashlib.sha256()
    size = st.st_size
    with open(real, "rb") as f:
        for offset in sorted(
            {0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}
        ):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return Fingerprint(real, "file", size, st.st_mtime_ns, digest.hexdigest(), stamp(real))


def _zarr_fingerprint(real: str, st: os.stat_result) -> Fingerprint:
    meta, chunks = [], []
    for folder, dirs, files in os.walk(real):
        dirs.sort()
        for name in sorted(files):
            (meta if name in _ZARR_METADATA else chunks).append(os.path.join(folder, name))
        if len(meta) + len(chunks) > ZARR_WALK_LIMIT:
            break
    step = max(1, ZARR_SAMPLES - 1)
    picks = {chunks[i * (len(chunks) - 1) // step] for i in range(ZARR_SAMPLES)} if chunks else ()
    digest = hashlib.sha256()
    size, mtime = 0, st.st_mtime_ns
    for file in meta + sorted(picks):
        fst = os.stat(file)
        size += fst.st_size
        mtime = max(mtime, fst.st_mtime_ns)
        digest.update(os.path.relpath(file, real).encode("utf-8", "surrogateescape") + b"\0")
        with open(file, "rb") as f:
            digest.update(f.read(SAMPLE_BYTES))
    digest.update(f"{len(chunks)} chunk files".encode())
    return Fingerprint(real, "zarr", size, mtime, digest.hexdigest(), stamp(real))
