"""OME-Zarr output: one NGFF image group per input inside the output root.

An image is written under a staging folder (:mod:`pipeline.io.staging`) and moved to its final name
only when every level is complete, so nothing that looks complete is left by a failed
run. Level 0 is written block by block by the workers (one writer per chunk), and so are
the pyramid levels whose chunks lie inside one block, from the block's own pixels; the
remaining (small) levels are computed from the previous one with chunk-aligned Dask
tasks.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import output_error
from pipeline.core.classes import channel_names, label_colors
from pipeline.core.pyramid import block_levels, build_level, level_chunks, pyramid_shapes
from pipeline.errors import OutputError
from pipeline.io import ngff
from pipeline.io.chunk_writer import EMPTY_CHUNKS_CONFIG
from pipeline.io.collection import (
    RESERVED_NAMES,
    drop_consolidated,
    root_format,
    sync_root_metadata,
)
from pipeline.io.formats import NAME_SUFFIXES

_WINDOWS_DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"{d}{i}" for d in ("COM", "LPT") for i in range(10)),
}
#: Suffixes of files the output root holds itself (Zarr metadata, the run report and page,
#: previews, polygons, locks).
_ROOT_SUFFIXES = {"json", "jsonl", "lock", "tmp", "log", "html", "png", "geojson"}


def sanitize_name(path: str | os.PathLike) -> str:
    """A safe group name from an input path: its file name without image suffixes.

    The name is portable (a Zarr v3 node name, a file name on Linux, macOS and Windows)
    and stays one entry inside the output root: letters become ASCII (``ü`` → ``u``);
    anything but letters, digits, ``.``, ``_`` and ``-`` (spaces, brackets, separators,
    ``..``) becomes ``_``; it never starts with ``.``, ``_`` or ``-`` nor ends with ``.``
    or ``_``; Windows device names (``CON``, ``LPT1``...) and names the output root uses
    itself (``zarr.json``, ``report.json``, ``index.html``, the ``OME`` group) get a ``_``. A name with no ASCII left becomes
    ``image-<hash>`` (the hash of the original name, so different names stay apart).
    """
    name = Path(os.fspath(path).rstrip("/\\")).name
    lower = name.lower()
    for suffix in NAME_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    clean = _clean(name)[:120].rstrip("._")
    if not clean:
        digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        return f"image-{digest}" if name.strip("._- ") else "image"
    stem, dot, rest = clean.partition(".")
    if stem.upper() in _WINDOWS_DEVICES or (not dot and stem.lower() in RESERVED_NAMES):
        clean = f"{stem}_{dot}{rest}"
    head, dot, suffix = clean.rpartition(".")
    if dot and suffix.lower() in _ROOT_SUFFIXES:
        clean = f"{head}_{suffix}"
    return clean


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text)
    return re.sub(r"\.{2,}", "_", text).lstrip("._-")


def unique_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Distinct sanitised names for ``paths``, in order; distinct ignoring case.

    Inputs whose names clash are told apart by their folders (``case1/HE.svs`` and
    ``case2/HE.svs`` → ``case1_HE``, ``case2_HE``); what still clashes gets ``-2``,
    ``-3``... in input order.
    """
    names = [sanitize_name(p) for p in paths]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.lower(), []).append(i)
    for members in groups.values():
        if len(members) > 1:
            renamed = _with_folders([paths[i] for i in members], [names[i] for i in members])
            for i, name in zip(members, renamed):
                names[i] = name
    taken: set[str] = set()
    out = []
    for base in names:
        name, n = base, 1
        while name.lower() in taken:
            n += 1
            name = f"{base}-{n}"
        taken.add(name.lower())
        out.append(name)
    return out


def _with_folders(paths: Sequence[str | os.PathLike], bases: list[str]) -> list[str]:
    """``bases`` prefixed with the fewest parent folder names that tell ``paths`` apart."""
    parents = [
        [_clean(p) for p in reversed(Path(os.path.abspath(path)).parent.parts)] for path in paths
    ]
    for depth in range(1, max(len(p) for p in parents) + 1):
        prefixes = [
            "_".join(reversed([p for p in parts[:depth] if p]))[-60:].lstrip("._-")
            for parts in parents
        ]
        names = [f"{prefix}_{base}" if prefix else base for prefix, base in zip(prefixes, bases)]
        if len({n.lower() for n in names}) == len(names):
            return names
    return bases


def check_root(out: str | os.PathLike, fmt: ngff.NgffFormat | str | None = None) -> None:
    """Refuse an output that cannot take ``fmt``'s images, without creating anything.

    Raises
    ------
    OutputError
        ``out`` is a file, or a Zarr group of the other Zarr format (an output holds one
        NGFF version).
    """
    fmt = ngff.get_format(fmt)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(
            "output exists and is not a folder", where=out, hint="choose a new path ending in .zarr"
        )
    found = root_format(out) if out.is_dir() else None
    if found is not None and found != fmt.zarr_format:
        other = ngff.format_for_zarr(found)
        raise OutputError(
            f"holds NGFF {other.version} (Zarr v{found}) images; --ngff {fmt.version} cannot "
            "be added to it",
            where=out,
            hint=f"run with --ngff {other.version}, or choose a new output path",
        )


def open_root(out: str | os.PathLike, fmt: ngff.NgffFormat | str | None = None):
    """Open (or create) the output root group for writing ``fmt``'s images.

    Its consolidated metadata is dropped: the run is about to change the root, and
    :func:`pipeline.io.collection.write_collection` writes it again at the end.
    """
    import zarr

    fmt = ngff.get_format(fmt)
    check_root(out, fmt)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        drop_consolidated(out)
        try:
            root = zarr.open_group(
                str(out), mode="a", zarr_format=fmt.zarr_format, use_consolidated=False
            )
        except zarr.errors.ContainsGroupError:
            # another run (a shard of the same array) created it between zarr's check and
            # its write: it is there now, so open it
            root = zarr.open_group(
                str(out), mode="r+", zarr_format=fmt.zarr_format, use_consolidated=False
            )
        sync_root_metadata(out, fmt.zarr_format)
        return root
    except OSError as exc:
        raise output_error(exc, out) from exc
    except Exception as exc:  # zarr raises its own types for a broken root
        raise OutputError(
            f"not a Zarr v{fmt.zarr_format} group: {exc}",
            where=out,
            hint="choose a new output path",
        ) from exc


@dataclass
class ImageWriter:
    """An NGFF image being written under ``staging``, published to ``final``."""

    root: Path
    name: str
    staging: Path
    axes: str  # "cyx" or "czyx"
    chunks: tuple[int, ...]  # per axis, including c
    dtype: str
    ngff: str = ngff.DEFAULT_VERSION
    block_levels: int = 0  # levels 1..block_levels are written by the blocks themselves

    @property
    def format(self) -> ngff.NgffFormat:
        return ngff.get_format(self.ngff)

    def level_path(self, level: int) -> str:
        return str(self.staging / str(level))

    def block_paths(self) -> tuple[str, ...]:
        """Paths of the pyramid levels (1, 2...) the blocks write from memory."""
        return tuple(self.level_path(k) for k in range(1, self.block_levels + 1))


def create_image(
    root: str | os.PathLike,
    name: str,
    shape: Sequence[int],
    axes: str,
    chunks: Sequence[int],
    dtype: str,
    fmt: ngff.NgffFormat | str | None = None,
    block: Sequence[int] | None = None,
    min_size: int = 256,
    *,
    staging: str | os.PathLike | None = None,
) -> ImageWriter:
    """Create the staging group of one image with its level-0 array (nothing stored yet),
    at ``staging`` (default: a new hidden folder in ``root``).

    With ``block`` (the block shape, every axis), the pyramid levels whose chunks each lie
    inside one block (:func:`pipeline.core.pyramid.block_levels`) are created too: the blocks
    write them from their own pixels, and :func:`write_pyramid` builds only the rest.
    """
    import zarr

    staging = staging or Path(root) / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    writer, shapes = _layout(
        root, name, shape, axes, chunks, dtype, fmt, block, min_size, staging=staging
    )
    group = zarr.open_group(str(staging), mode="w", zarr_format=writer.format.zarr_format)
    for level in range(writer.block_levels + 1):
        _create_level(group, writer, level, shapes[level])
    return writer


def reopen_image(*args: Any, staging: str | os.PathLike, **kwargs: Any) -> ImageWriter | None:
    """The writer of an image that :func:`create_image` made at ``staging``, given the
    same arguments, to continue writing it; None unless every level it created is there
    and matches (shape, chunks, dtype)."""
    writer, shapes = _layout(*args, staging=staging, **kwargs)
    for level in range(writer.block_levels + 1):
        if not level_matches(writer.level_path(level), shapes[level], writer.chunks, writer.dtype):
            return None
    return writer


def _layout(
    root, name, shape, axes, chunks, dtype, fmt=None, block=None, min_size=256, *, staging
) -> tuple[ImageWriter, list[tuple[int, ...]]]:
    """The writer of :func:`create_image`'s arguments and the shapes of its levels."""
    fmt = ngff.get_format(fmt)
    chunks = level_chunks(chunks, shape)
    written = 0 if block is None else block_levels(shape, axes, chunks, block, min_size)
    writer = ImageWriter(Path(root), name, Path(staging), axes, chunks, dtype, fmt.version, written)
    return writer, pyramid_shapes(shape, axes, min_size)


def _create_level(
    group, writer: ImageWriter, level: int, shape: Sequence[int], overwrite: bool = False
):
    return group.create_array(
        str(level),
        shape=tuple(shape),
        chunks=level_chunks(writer.chunks, shape),
        dtype=writer.dtype,
        fill_value=0,
        config=EMPTY_CHUNKS_CONFIG,
        **writer.format.array_options(writer.axes),
        overwrite=overwrite,
    )


def level_matches(
    path: str | os.PathLike, shape: Sequence[int], chunks: Sequence[int], dtype: str
) -> bool:
    """True if ``path`` is a level array of this shape, chunking and dtype (a staged
    level that may be continued)."""
    import zarr

    try:
        arr = zarr.open_array(str(path), mode="r")
    except Exception:  # missing or damaged: not continued
        return False
    chunks = level_chunks(chunks, shape)
    return arr.shape == tuple(shape) and arr.chunks == chunks and arr.dtype == np.dtype(dtype)


def write_pyramid(writer: ImageWriter, min_size: int = 256) -> int:
    """Build the levels the blocks did not write, each from the previous one (mean over
    2×2 in y, x, as :func:`pipeline.core.pyramid.downsample`), one output chunk at a time
    (each has exactly one writer); level 0 is read back only when no block wrote
    level 1. Returns the level count."""
    import zarr

    group = zarr.open_group(str(writer.staging), mode="r+")
    shapes = pyramid_shapes(group["0"].shape, writer.axes, min_size)
    for level in range(writer.block_levels + 1, len(shapes)):
        # a level left by a run killed while finishing is made again
        target = _create_level(group, writer, level, shapes[level], overwrite=True)
        build_level(group[str(level - 1)], target, writer.axes)
    return len(shapes)


def write_metadata(
    writer: ImageWriter,
    levels: int,
    pixel_size: dict[str, float],
    attrs: dict[str, Any],
    class_names: Sequence[str] | None = None,
) -> None:
    """NGFF multiscales (level 0 first, see :mod:`pipeline.io.ngff`), the channels named
    after the classes (``omero.channels[].label``, see :func:`pipeline.core.classes.channel_names`)
    in their label colours, and provenance under ``pipeline``."""
    import zarr

    fmt = writer.format
    group = zarr.open_group(str(writer.staging), mode="r+", zarr_format=fmt.zarr_format)
    multiscale = fmt.multiscale(writer.name, writer.axes, pixel_size, levels, "mean")
    classes = int(group["0"].shape[0])
    names = channel_names(classes, class_names)
    colors = label_colors(len(names) + 1)[1:] if classes == 1 else label_colors(classes)
    # background (label 0) is transparent as a label but shown grey as a channel
    colors = [(128, 128, 128) if c[3] == 0 else c[:3] for c in colors]
    window = (0.0, 255.0) if writer.dtype == "uint8" else (0.0, 1.0)
    content = {"multiscales": [multiscale], "omero": ngff.omero_channels(names, colors, window)}
    group.attrs.update({**fmt.wrap(content), "pipeline": attrs})
