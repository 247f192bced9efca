"""Reading a mask the user drew: any size, any of the usual formats; nonzero is tissue.

PNG/JPEG/BMP are read whole (they are small); a TIFF, Zarr array or OME-Zarr image is
read lazily from the coarsest pyramid level that is still long enough. The stored
values count, not colours: a mask is not converted as the model's input is.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import InputError, NotFoundError
from pipeline.io.model_input import to_model_layout
from pipeline.io.resample import reduce_blocks
from pipeline.io.sources import open_image

if TYPE_CHECKING:
    import dask.array

__all__ = ["read_mask"]

#: Picture formats read whole with imagecodecs.
PICTURES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


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
    if where.lower().endswith(PICTURES):
        nonzero = _read_picture(where)[None]
    else:
        nonzero = _open_lazy_mask(where, need)
    shape = (int(nonzero.shape[1]), int(nonzero.shape[2]))
    factor = max(1, math.ceil(max(shape) / max_side))
    return reduce_blocks(nonzero, factor, np.any)[0].astype(bool), shape, factor


def _read_picture(where: str) -> np.ndarray:
    import imagecodecs

    if not os.path.isfile(where):
        raise NotFoundError("does not exist", where=where, hint="check the mask path")
    try:
        data = np.asarray(imagecodecs.imread(where))
    except Exception as exc:  # codecs raise their own types for damaged files
        raise InputError.because(
            exc, "cannot be read as an image", where=where, hint="save the mask as PNG or TIFF"
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
