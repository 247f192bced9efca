"""Masks and labels in and out: a user's mask file in, the tissue mask out as NGFF labels.

Out: ``<image>/labels/tissue`` in OME-Zarr 0.5 on Zarr v3. The ``labels`` group lists
its label images; each label image is a multiscale image of integers with
``image-label`` metadata (colours, properties, source). It has as many levels as the
image, each halving y and x like the image's pyramid. The mask stays on its coarse
grid: the scale says how large a cell is. Cell ``i`` covers run pixels
``[i*s, (i+1)*s)``, the convention the image's own levels follow (no translation), so
the label lines up with every level of the image.

In: a mask of any size as PNG/JPEG/BMP, TIFF, Zarr or OME-Zarr; nonzero is tissue.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .sink import ngff_axes

if TYPE_CHECKING:
    import dask.array

    from ..tissue import TissueMask

__all__ = ["write_tissue_labels", "read_mask", "reduce_blocks", "TISSUE_COLORS"]

NGFF_VERSION = "0.5"

#: Background transparent, tissue translucent green.
TISSUE_COLORS = (
    {"label-value": 0, "rgba": [0, 0, 0, 0]},
    {"label-value": 1, "rgba": [0, 200, 83, 110]},
)
_PROPERTIES = ({"label-value": 0, "class": "background"}, {"label-value": 1, "class": "tissue"})
_CHUNK = 1024
_PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def write_tissue_labels(
    image_group_path: str | os.PathLike,
    mask: TissueMask,
    run_shape: Sequence[int],
    axes: str,
    pixel_size: dict[str, float],
    *,
    name: str = "tissue",
    levels: int | None = None,
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
    image = zarr.open_group(os.fspath(image_group_path), mode="r+", zarr_format=3)
    if levels is None:
        levels = _image_levels(image)
    lead = len(spatial) - mask.mask.ndim
    cells = dict(zip(spatial[lead:], mask.mask.shape))
    cell = dict(zip(spatial[lead:], mask.scale))  # run pixels per cell
    repeat = dict(zip(spatial[:lead], run_shape[:lead]))  # axes a 2D mask holds along

    labels = image.require_group("labels")
    group = labels.create_group(name, overwrite=True)
    data = mask.mask.astype(np.uint8).reshape([cells.get(a, 1) for a in axes])
    datasets = []
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
            dimension_names=list(axes),
        )
        array[...] = np.broadcast_to(data, full)
        scale = [
            1.0
            if a == "c"
            else float(pixel_size.get(a, 1.0)) * cell.get(a, 1.0) * (2**level if a in "yx" else 1)
            for a in axes
        ]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    group.attrs.update(
        {
            "ome": {
                "version": NGFF_VERSION,
                "multiscales": [
                    {
                        "name": name,
                        "axes": ngff_axes(axes, pixel_size),
                        "datasets": datasets,
                        "type": "max",
                    }
                ],
                "image-label": {
                    "colors": [dict(c) for c in TISSUE_COLORS],
                    "properties": [dict(p) for p in _PROPERTIES],
                    "source": {"image": "../../"},
                },
            },
            "pipeline": {
                "tissue": {
                    "method": mask.method,
                    "fraction": round(mask.fraction, 6),
                    "cell": [float(s) for s in mask.scale],
                }
            },
        }
    )
    listed = list(labels.attrs.get("ome", {}).get("labels", []))
    labels.attrs.update(
        {
            "ome": {
                "version": NGFF_VERSION,
                "labels": listed + [name] if name not in listed else listed,
            }
        }
    )
    return os.path.join(os.fspath(image_group_path), "labels", name)


def _image_levels(image) -> int:
    multiscales = image.attrs.get("ome", {}).get("multiscales") or [{}]
    return max(1, len(multiscales[0].get("datasets", [])))


def _halve(data: np.ndarray, yx: list[int]) -> np.ndarray:
    """2× smaller in y and x, a cell tissue if any of its four is (the image's levels
    take the floor of odd sizes; a label keeps its last half cell, it covers image)."""
    pad = [(0, data.shape[i] % 2 if i in yx else 0) for i in range(data.ndim)]
    data = np.pad(data, pad)
    for axis in sorted(yx, reverse=True):
        shape = data.shape[:axis] + (data.shape[axis] // 2, 2) + data.shape[axis + 1 :]
        data = data.reshape(shape).max(axis=axis + 1)
    return data


def read_mask(
    path: str | os.PathLike, need: int, max_side: int
) -> tuple[np.ndarray, tuple[int, int], int]:
    """Where a mask file is nonzero, no longer than ``max_side`` cells.

    Parameters
    ----------
    path
        PNG/JPEG/BMP (read whole), or a TIFF, Zarr array or OME-Zarr image (read
        lazily, from the coarsest pyramid level at least ``need`` pixels long).
        Several channels: nonzero in any; the alpha of RGBA is ignored (it says where a
        drawing is opaque, not where tissue is).
    need, max_side
        Pixels wanted on the long side; the most cells allowed (larger masks are
        reduced with "any": a cell is nonzero if any of its pixels is).

    Returns
    -------
    nonzero, shape, factor
        Boolean cells, the ``(y, x)`` shape of the pixels read, and pixels per cell.

    Raises
    ------
    InputError
        A missing or unreadable file, or one that is not 2D.
    """
    where = os.fspath(path)
    if where.lower().endswith(_PICTURES):
        nonzero = _read_picture(where)[None]
    else:
        nonzero = _open_lazy_mask(where, need)
    shape = (int(nonzero.shape[1]), int(nonzero.shape[2]))
    factor = max(1, math.ceil(max(shape) / max_side))
    return reduce_blocks(nonzero, factor, np.any)[0].astype(bool), shape, factor


def reduce_blocks(array: dask.array.Array | np.ndarray, factor: int, how: Callable) -> np.ndarray:
    """``how`` (``np.mean``, ``np.any``) over ``factor``² blocks of a ``(C, y, x)`` array.

    Edges are padded by repeating the last row and column, which only the last cells
    see. A lazy array is read chunk by chunk in this process's threads: it never sits
    whole in memory at full resolution, and no cluster is needed.
    """
    import dask.array as da

    array = da.asarray(array)
    if factor > 1:
        pad = [(0, 0)] + [(0, -n % factor) for n in array.shape[1:]]
        if any(p for _, p in pad):
            array = da.pad(array, pad, mode="edge")
        if how is np.mean:
            array = array.astype(np.float32)
        array = da.coarsen(how, array, {1: factor, 2: factor})
    return np.asarray(array.compute(scheduler="threads"))


def _read_picture(where: str) -> np.ndarray:
    import imagecodecs

    if not os.path.isfile(where):
        raise InputError(
            "does not exist", where=where, hint="check the mask path", reason="not-found"
        )
    try:
        data = np.asarray(imagecodecs.imread(where))
    except Exception as exc:  # codecs raise their own types for damaged files
        raise InputError(
            f"cannot be read as an image ({type(exc).__name__}: {exc})",
            where=where,
            hint="save the mask as PNG or TIFF",
        ) from exc
    if data.ndim == 3 and data.shape[-1] in (2, 4):
        data = data[..., :-1]  # drop alpha
    if data.ndim == 3:
        data = data.any(axis=-1)
    if data.ndim != 2:
        raise InputError(
            f"is not a 2D mask (shape {data.shape})",
            where=where,
            hint="save the mask as a single-plane image",
        )
    return data != 0


def _open_lazy_mask(where: str, need: int) -> dask.array.Array:
    """Lazy ``(1, y, x)`` nonzero of a TIFF/Zarr mask, from the coarsest level ≥ ``need``."""
    from .layout import to_model_layout
    from .sources import open_image

    source = open_image(where)
    yx = [source.axes.index("y"), source.axes.index("x")]
    longest = [max(level[i] for i in yx) for level in source.levels]
    level = max([i for i, n in enumerate(longest) if n >= need], default=0)
    if level != source.level:
        source = open_image(where, series=source.series, level=level)
    array, spatial, _ = to_model_layout(source, 2, 0)
    if spatial != "yx":
        raise InputError(
            f"is not a 2D mask (axes {spatial!r})",
            where=where,
            hint="save the mask as a single-plane image",
        )
    if array.shape[0] == 4 and str(source.info.get("photometric", "")).upper() == "RGB":
        array = array[:3]  # drop alpha
    return (array != 0).any(axis=0)[None]
