"""The class label image of an output: ``IMAGE/labels/classes``, written block by block.

How a run uses it
-----------------
1. :func:`create_class_labels`, once per input, where the image's staging group is
   created: the label group and its level-0 array, with the image's chunk grid (``c`` of
   length 1), and the pyramid levels the blocks write themselves (``level_shapes``: the
   image's block levels, :func:`pipeline.core.pyramid.block_levels`). Nothing is listed yet.
2. :func:`write_label_block`, on the worker, once per block, with the block's blended
   probabilities: labels (:func:`pipeline.core.classes.class_labels`) written into exactly the
   chunks the block writes in the image, so every label chunk has one writer, like the
   image's, and its part of those pyramid levels (every ``2**k``-th label: a block starts
   on a multiple of ``2**k`` there, so it picks what the whole image would).
   Background-only chunks are not stored.
3. :func:`finish_class_labels`, once per input, after the blocks (and the image's
   pyramid): the remaining label levels by nearest-neighbour picking (a label is never
   averaged), NGFF ``image-label`` metadata (colours, class names, the source image) and
   the entry in the image's ``labels`` list. Runs where the tissue labels are written
   (one process).

The label image has the image's axes (``c`` of length 1) and the same level shapes and
scales, so it lines up with every level of the image in napari, QuPath and OMERO.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.classes import (
    DEFAULT_THRESHOLD,
    class_labels,
    label_colors,
    label_dtype,
    label_names,
)
from pipeline.core.pyramid import build_level
from pipeline.io.chunk_writer import EMPTY_CHUNKS_CONFIG, LevelWriter, level_writer
from pipeline.io.ngff import NgffFormat, get_format

__all__ = [
    "LABEL_NAME",
    "ClassLabels",
    "add_label_name",
    "create_class_labels",
    "finish_class_labels",
    "open_label_level",
    "write_label_block",
]

#: Name of the class label image inside the image's ``labels`` group.
LABEL_NAME = "classes"


@dataclass(frozen=True)
class ClassLabels:
    """A class label image being written (picklable: it travels to workers)."""

    path: str  # the label image group, IMAGE/labels/classes
    axes: str  # the image's axes, e.g. "cyx"
    classes: int  # probability channels of the model (1: threshold, >= 2: argmax)
    threshold: float
    ngff: str  # NGFF version
    levels: int = 0  # pyramid levels 1..levels the blocks write themselves

    @property
    def level0(self) -> str:
        """Path of the level-0 array (what workers open)."""
        return os.path.join(self.path, "0")


def create_class_labels(
    image_group: str | os.PathLike,
    shape: Sequence[int],
    axes: str,
    chunks: Sequence[int],
    classes: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    fmt: NgffFormat | str | None = None,
    name: str = LABEL_NAME,
    level_shapes: Sequence[Sequence[int]] = (),
) -> ClassLabels:
    """Create the label group and its empty level-0 array under ``image_group``.

    Parameters
    ----------
    image_group
        The image's (staging) group.
    shape, axes, chunks
        The image's level-0 shape, axes and chunks, ``c`` first (``c`` = probability
        channels); the labels get ``c`` of length 1 and the same spatial chunks.
    classes
        Probability channels (see :mod:`pipeline.core.classes` for how they become labels).
    threshold
        Probability at which a one-class pixel is foreground.
    fmt
        NGFF version (default: :data:`~pipeline.io.ngff.DEFAULT_VERSION`).
    level_shapes
        Shapes (``c`` first, any length) of the image's levels 1, 2... that the blocks
        write themselves; their label levels are created too.
    """
    import zarr

    fmt = get_format(fmt)
    if len(shape) != len(axes) or len(chunks) != len(axes) or axes[0] != "c":
        raise ValueError(f"shape {tuple(shape)} / chunks {tuple(chunks)} do not fit axes {axes!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    label_shape = (1, *(int(n) for n in shape[1:]))
    label_chunks = (1, *(min(int(c), n) for c, n in zip(chunks[1:], label_shape[1:])))
    image = zarr.open_group(os.fspath(image_group), mode="r+", zarr_format=fmt.zarr_format)
    labels = image.require_group("labels")
    group = labels.create_group(name, overwrite=True)
    shapes = [label_shape, *((1, *(int(n) for n in s[1:])) for s in level_shapes)]
    for level, level_shape in enumerate(shapes):
        group.create_array(
            str(level),
            shape=level_shape,
            chunks=tuple(min(c, n) for c, n in zip(label_chunks, level_shape)),
            dtype=label_dtype(classes),
            fill_value=0,
            config=EMPTY_CHUNKS_CONFIG,
            **fmt.array_options(axes),
        )
    return ClassLabels(
        str(Path(image_group) / "labels" / name),
        axes,
        classes,
        threshold,
        fmt.version,
        len(level_shapes),
    )


def open_label_level(labels: ClassLabels, level: int = 0) -> LevelWriter:
    """A level array of the labels, for block writes (the process's writer: opened once;
    all-zero chunks are not stored)."""
    return level_writer(os.path.join(labels.path, str(level)))


def write_label_block(
    array: Any,
    offset: Sequence[int],
    probabilities: np.ndarray,
    threshold: float = DEFAULT_THRESHOLD,
    levels: Sequence[Any] = (),
    axes: str = "cyx",
) -> np.ndarray:
    """Write the labels of one block's probabilities into the level-0 label array.

    Parameters
    ----------
    array
        The level-0 label array (:func:`open_label_level`), or anything indexable the same
        way (a numpy array in tests).
    offset
        Level-0 position of the block's first pixel, spatial axes only.
    probabilities
        ``(K, *spatial)`` blended probabilities of the block's write region, in the
        output dtype (uint8 ``p x 255``, float16 or float32).
    threshold
        As for :func:`pipeline.core.classes.class_labels`.
    levels, axes
        The label levels 1, 2... the blocks write (:attr:`ClassLabels.levels` of them,
        :func:`open_label_level`) and the labels' axes: the block's part of each, every
        ``2**k``-th label along y and x from the block's start (a multiple of ``2**k``).

    Returns
    -------
    numpy.ndarray
        The labels written, ``(1, *spatial)``.
    """
    spatial = axes[1:]
    if levels and any(int(o) % 2 ** len(levels) for a, o in zip(spatial, offset) if a in "yx"):
        raise ValueError(f"a block at {tuple(offset)} cannot write level {len(levels)}")
    labels = class_labels(probabilities, threshold)[None]
    index = (slice(0, 1), *(slice(int(o), int(o) + n) for o, n in zip(offset, labels.shape[1:])))
    array[index] = labels.astype(array.dtype, copy=False)
    for k, target in enumerate(levels, 1):
        # level k holds level-0 pixels j * 2**k: from a block at a multiple of 2**k, its
        # own every 2**k-th pixel, up to the (floored) level's end of the block
        pick, where = [slice(None)], [slice(0, 1)]
        for a, o, n in zip(spatial, offset, labels.shape[1:]):
            if a in "yx":
                begin, end = int(o) >> k, (int(o) + n) >> k
                pick.append(slice(0, (end - begin) << k, 2**k))
                where.append(slice(begin, end))
            else:
                pick.append(slice(None))
                where.append(slice(int(o), int(o) + n))
        target[tuple(where)] = labels[tuple(pick)].astype(target.dtype, copy=False)
    return labels


def finish_class_labels(
    labels: ClassLabels,
    level_shapes: Sequence[Sequence[int]],
    pixel_size: Mapping[str, float],
    *,
    names: Sequence[str] | None = None,
) -> str:
    """Write levels 1.., the NGFF metadata, and list the labels in the image's ``labels``.

    Parameters
    ----------
    labels
        From :func:`create_class_labels`, with level 0 written.
    level_shapes
        The image's level shapes, level 0 first (``c`` first, any length): the labels get
        the same spatial shapes.
    pixel_size
        µm per level-0 pixel of the spatial axes that have one.
    names
        Class names (see :func:`pipeline.core.classes.label_names`).

    Returns
    -------
    str
        The label image's path.
    """
    import zarr

    fmt = get_format(labels.ngff)
    group = zarr.open_group(labels.path, mode="r+", zarr_format=fmt.zarr_format)
    level0 = group["0"]
    for level in range(labels.levels + 1, len(level_shapes)):
        shape = (1, *(int(n) for n in level_shapes[level][1:]))
        target = group.create_array(
            str(level),
            shape=shape,
            chunks=tuple(min(c, n) for c, n in zip(level0.chunks, shape)),
            dtype=level0.dtype,
            fill_value=0,
            config=EMPTY_CHUNKS_CONFIG,
            **fmt.array_options(labels.axes),
            overwrite=True,  # a level left by a run killed while finishing is made again
        )
        # nearest: every second label of the level before, chunk by chunk (one writer each)
        build_level(group[str(level - 1)], target, labels.axes, "nearest")
    all_names = label_names(labels.classes, names)
    content = {
        "multiscales": [
            fmt.multiscale(LABEL_NAME, labels.axes, pixel_size, len(level_shapes), "nearest")
        ],
        "image-label": fmt.image_label(label_colors(len(all_names)), all_names),
    }
    rule = (
        {"rule": "threshold", "threshold": labels.threshold}
        if labels.classes == 1
        else {"rule": "argmax"}
    )
    group.attrs.put({**fmt.wrap(content), "pipeline": {"classes": rule}})
    add_label_name(Path(labels.path).parent, Path(labels.path).name, fmt)
    return labels.path


def add_label_name(labels_group: str | os.PathLike, name: str, fmt: NgffFormat | str) -> None:
    """Add ``name`` to the ``labels`` list of an image's ``labels`` group (kept in order)."""
    import zarr

    fmt = get_format(fmt)
    group = zarr.open_group(os.fspath(labels_group), mode="r+", zarr_format=fmt.zarr_format)
    listed = list(fmt.unwrap(group.attrs.asdict()).get("labels", []))
    if name not in listed:
        listed.append(name)
    group.attrs.put(fmt.wrap(fmt.labels(listed)))
