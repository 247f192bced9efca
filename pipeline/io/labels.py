"""The tissue mask written beside the prediction as NGFF labels: ``<image>/labels/tissue``.

OME-Zarr in the image's NGFF version (:mod:`pipeline.io.ngff`). The ``labels`` group lists
its label images; each label image is a multiscale image of integers with
``image-label`` metadata (colours, properties, source). It has as many levels as the
image, each halving y and x like the image's pyramid. The mask stays on its coarse
grid: the scale says how large a cell is. Cell ``i`` covers run pixels
``[i*s, (i+1)*s)``, the convention the image's own levels follow (no translation), so
the label lines up with every level of the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.io import ngff
from pipeline.io.class_labels import add_label_name

if TYPE_CHECKING:
    from pipeline.core.tissue_mask import TissueMask

__all__ = ["TISSUE_COLORS", "write_tissue_labels"]

#: RGBA of labels 0 and 1: background transparent, tissue translucent green.
TISSUE_COLORS = ((0, 0, 0, 0), (0, 200, 83, 110))
#: Names of labels 0 and 1.
TISSUE_NAMES = ("background", "tissue")
_CHUNK = 1024


def write_tissue_labels(
    image_group_path: str | os.PathLike,
    mask: TissueMask,
    run_shape: Sequence[int],
    axes: str,
    pixel_size: dict[str, float],
    *,
    name: str = "tissue",
    levels: int | None = None,
    fmt: ngff.NgffFormat | str | None = None,
) -> str:
    """Write ``mask`` as the label image ``name`` of an NGFF image group.

    Parameters
    ----------
    image_group_path
        The image group (e.g. the writer's staging folder, after its metadata is
        written and before it is published, so the labels appear atomically with it).
    mask
        A whole mask (not a crop) over ``run_shape``.
    run_shape
        Spatial shape of the image's level 0 (``(y, x)`` or ``(z, y, x)``).
    axes
        The image's axes, e.g. ``"cyx"``; the label has the same axes, with ``c`` of
        length 1 and the mask's cells on ``y`` and ``x`` (a 2D mask repeats over ``z``).
    pixel_size
        µm per run pixel for the spatial axes that have one.
    name
        Label image name, added to the ``labels`` list (other labels are kept).
    levels
        Number of levels; default: as many as the image's multiscales lists (1 if it
        has none yet).
    fmt
        The image's NGFF version (default: :data:`pipeline.io.ngff.DEFAULT_VERSION`).

    Returns
    -------
    str
        Path of the label image group.
    """
    import zarr

    run_shape = tuple(int(n) for n in run_shape)
    spatial = [a for a in axes if a in "zyx"]
    if len(spatial) != len(run_shape):
        raise ValueError(f"axes {axes!r} do not match run shape {run_shape}")
    if any(mask.offset):
        raise ValueError("write the whole mask, not a crop")
    if mask.mask.ndim > len(spatial):
        raise ValueError(f"a {mask.mask.ndim}-D mask cannot label a {len(spatial)}-D image")
    fmt = ngff.get_format(fmt)
    image = zarr.open_group(os.fspath(image_group_path), mode="r+", zarr_format=fmt.zarr_format)
    if levels is None:
        levels = ngff.level_count(image.attrs)
    lead = len(spatial) - mask.mask.ndim
    cells = dict(zip(spatial[lead:], mask.mask.shape))
    cell = dict(zip(spatial[lead:], mask.scale))  # run pixels per cell
    repeat = dict(zip(spatial[:lead], run_shape[:lead]))  # axes a 2D mask holds along

    labels = image.require_group("labels")
    group = labels.create_group(name, overwrite=True)
    data = mask.mask.astype(np.uint8).reshape([cells.get(a, 1) for a in axes])
    for level in range(levels):
        if level:
            data = _halve(data, [axes.index("y"), axes.index("x")])
        full = tuple(repeat.get(a, n) for a, n in zip(axes, data.shape))
        array = group.create_array(
            str(level),
            shape=full,
            dtype="uint8",
            fill_value=0,
            chunks=tuple(1 if a in "cz" else min(_CHUNK, n) for a, n in zip(axes, full)),
            **fmt.array_options(axes),
        )
        array[...] = np.broadcast_to(data, full)
    group.attrs.update(
        {
            **fmt.wrap(
                {
                    "multiscales": [fmt.multiscale(name, axes, pixel_size, levels, "max", cell)],
                    "image-label": fmt.image_label(TISSUE_COLORS, TISSUE_NAMES),
                }
            ),
            "pipeline": {
                "tissue": {
                    "method": mask.method,
                    "fraction": round(mask.fraction, 6),
                    "cell": [float(s) for s in mask.scale],
                }
            },
        }
    )
    add_label_name(os.path.join(os.fspath(image_group_path), "labels"), name, fmt)
    return os.path.join(os.fspath(image_group_path), "labels", name)


def _halve(data: np.ndarray, yx: list[int]) -> np.ndarray:
    """2× smaller in y and x, a cell tissue if any of its four is (the image's levels
    take the floor of odd sizes; a label keeps its last half cell, it covers image)."""
    pad = [(0, data.shape[i] % 2 if i in yx else 0) for i in range(data.ndim)]
    data = np.pad(data, pad)
    for axis in sorted(yx, reverse=True):
        shape = data.shape[:axis] + (data.shape[axis] // 2, 2) + data.shape[axis + 1 :]
        data = data.reshape(shape).max(axis=axis + 1)
    return data
