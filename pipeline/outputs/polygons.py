"""Exact pixel-edge polygons of a segmentation, traced per block and merged across seams.

How a run uses it
-----------------
1. :func:`trace_block`, on a worker, once per block: a 2D label block (class indices,
   0 = background) or a boolean mask at a known offset in the run grid becomes a
   :class:`BlockPolygons`: exact pixel-edge polygons (holes kept), split into *interior*
   pieces and *edge* pieces that touch a seam with a neighbouring block. A plain,
   picklable function of numpy arrays; no Dask inside.
2. :func:`merge_blocks`, in the driver or one task, once per image: edge pieces of one
   class that touch are unioned into one polygon; interior pieces pass through untouched,
   so the merge costs what the seams cost, not what the slide costs.

:func:`trace_image` runs both in-process. :mod:`pipeline.outputs.geojson` turns the
result into a file QuPath imports.

Connectivity
------------
An object is a **4-connected** set of pixels of one class (pixels sharing an edge), the
default of :func:`scipy.ndimage.label` and of GDAL's polygonize (``rasterio.features``),
which traces here. Two pixels touching only at a corner are two objects: their polygons
may share that vertex. Background is then 8-connected, so a hole that meets the outside
at a corner is no hole: the outline pinches at that vertex (still a valid polygon).

Coordinates
-----------
Pixel ``(row, col)`` is the unit square ``[col, col + 1] x [row, row + 1]`` of the run
grid (the pyramid level the model ran on); shapely's ``x`` is the column and ``y`` the
row. Polygons run along pixel edges, so every vertex is an integer and pieces from
neighbouring blocks meet exactly on the seam.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import numpy as np
import shapely
from rasterio import features as rio_features
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

__all__ = [
    "CONNECTIVITY",
    "BlockPolygons",
    "Polygons",
    "merge_blocks",
    "trace_block",
    "trace_image",
]

CONNECTIVITY = 4
# The block at (0, 0) has the identity transform, which rasterio takes for a missing
# georeference and warns about; pixel coordinates are what is meant here. A filter for the
# process, once (``catch_warnings`` around each call is not thread-safe: block threads).
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning, module="rasterio.features")
# dtypes GDAL's polygonize takes as they are; others are narrowed to the smallest that fits
_TRACEABLE = (np.uint8, np.int8, np.uint16, np.int16, np.int32)


@dataclass(frozen=True)
class Polygons:
    """Polygons with their class indices, in run-grid pixel coordinates.

    Attributes
    ----------
    classes
        ``(n,)`` int32 class index of each polygon (1, 2, ...).
    geoms
        ``(n,)`` object array of :class:`shapely.Polygon`.
    """

    classes: np.ndarray
    geoms: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def of(cls, classes: Iterable[int], geoms: Iterable[shapely.Polygon]) -> Polygons:
        """Build from any iterables (classes as int32, geometries as an object array)."""
        geoms = np.fromiter(geoms, dtype=object)
        return cls(np.fromiter(classes, dtype=np.int32, count=len(geoms)), geoms)

    @classmethod
    def concat(cls, parts: Iterable[Polygons]) -> Polygons:
        """All polygons of ``parts``, in order."""
        parts = list(parts)
        if not parts:
            return cls.of((), ())
        return cls(
            np.concatenate([p.classes for p in parts]).astype(np.int32, copy=False),
            np.concatenate([p.geoms for p in parts]),
        )


@dataclass(frozen=True)
class BlockPolygons:
    """What :func:`trace_block` returns for one block (compact, picklable).

    Attributes
    ----------
    interior
        Pieces that touch no seam: whole objects, final as they are.
    edge
        Pieces that touch a seam: parts of objects that may go on in a neighbouring block.
    """

    interior: Polygons
    edge: Polygons


def trace_block(
    labels: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    *,
    image_shape: tuple[int, int] | None = None,
    class_index: int = 1,
) -> BlockPolygons:
    """Trace one block's objects as exact pixel-edge polygons (holes kept).

    Parameters
    ----------
    labels
        2D block: non-negative integer class indices (0 = background), or a boolean
        mask of class ``class_index``. Blocks of one image must not overlap (write
        regions, no halo).
    offset
        ``(y, x)`` of the block's first pixel in the run grid.
    image_shape
        ``(height, width)`` of the run grid. Block sides on the image border are then
        not seams, so pieces that touch only them stay interior (a cheaper merge).
        Sides at 0 are never seams.
    class_index
        Class of a boolean mask's ``True`` pixels.

    Returns
    -------
    BlockPolygons
        Polygons in run-grid coordinates, one per 4-connected piece and class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"trace_block takes a 2D block, not shape {labels.shape}")
    if labels.dtype == bool:
        source, mask = labels.view(np.uint8), labels
    elif np.issubdtype(labels.dtype, np.integer):
        source, mask = _traceable(labels), labels != 0
    else:
        raise TypeError(f"trace_block takes integer labels or a boolean mask, not {labels.dtype}")
    empty = Polygons.of((), ())
    if not mask.any():
        return BlockPolygons(empty, empty)
    y0, x0 = (int(v) for v in offset)
    shapes = rio_features.shapes(
        source, mask=mask, connectivity=CONNECTIVITY, transform=Affine(1, 0, x0, 0, 1, y0)
    )
    classes, geoms = _to_shapely(shapes)
    if labels.dtype == bool:
        classes[:] = class_index
    touches = _touches_seam(geoms, (y0, x0), labels.shape, image_shape)
    return BlockPolygons(
        interior=Polygons(classes[~touches], geoms[~touches]),
        edge=Polygons(classes[touches], geoms[touches]),
    )


def merge_blocks(blocks: Iterable[BlockPolygons]) -> Polygons:
    """Join the blocks of one image: one polygon per object and class.

    Edge pieces of one class that touch (share an edge or a vertex) are grouped and
    unioned; a union that is only joined at vertices falls apart again into separate
    polygons, as 4-connectivity says. Holes that straddle seams come out as holes.

    Parameters
    ----------
    blocks
        Every block's :func:`trace_block` result, in any order.

    Returns
    -------
    Polygons
        Normalised polygons (no collinear vertices; fixed ring start), sorted by class,
        then top, then left (then bottom, right): the same for any block size or order.
    """
    blocks = list(blocks)
    interior = Polygons.concat(b.interior for b in blocks)
    edge = Polygons.concat(b.edge for b in blocks)
    merged = [interior]
    for cls in np.unique(edge.classes):
        pieces = edge.geoms[edge.classes == cls]
        joined = _union_touching(pieces)
        merged.append(Polygons(np.full(len(joined), cls, dtype=np.int32), joined))
        log.debug("class %d: %d seam pieces -> %d polygons", cls, len(pieces), len(joined))
    out = Polygons.concat(merged)
    geoms = shapely.normalize(out.geoms) if len(out) else out.geoms
    bounds = shapely.bounds(geoms) if len(out) else np.zeros((0, 4))
    # bounds break ties between objects with one top-left corner (one inside another's bay)
    order = np.lexsort((bounds[:, 3], bounds[:, 2], bounds[:, 0], bounds[:, 1], out.classes))
    return Polygons(out.classes[order], geoms[order])


def trace_image(
    labels: np.ndarray, block_shape: tuple[int, int] | None = None, *, class_index: int = 1
) -> Polygons:
    """Trace a whole 2D label image in-process, block by block, and merge.

    The same path a run takes on workers, for debugging and tests. ``block_shape``
    defaults to the whole image.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"trace_image takes a 2D image, not shape {labels.shape}")
    bh, bw = block_shape or labels.shape
    blocks = [
        trace_block(
            labels[y : y + bh, x : x + bw],
            (y, x),
            image_shape=labels.shape,
            class_index=class_index,
        )
        for y in range(0, labels.shape[0], bh)
        for x in range(0, labels.shape[1], bw)
    ]
    return merge_blocks(blocks)


def _traceable(labels: np.ndarray) -> np.ndarray:
    """``labels`` in a dtype GDAL polygonizes, after checking they are non-negative."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"class indices must be >= 0, found {low}")
    if labels.dtype.type in _TRACEABLE:
        return labels
    for dtype in (np.uint8, np.uint16, np.int32):
        if high <= np.iinfo(dtype).max:
            return labels.astype(dtype)
    raise ValueError(f"class index {high} does not fit in int32")


def _to_shapely(shapes: Iterable[tuple[dict, float]]) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's GeoJSON-like polygons as (int32 classes, shapely Polygons), built in bulk.

    One flat coordinate array and two index arrays instead of a shapely object per ring:
    about four times faster than :func:`shapely.geometry.shape` on busy blocks.
    """
    shapes = list(shapes)
    classes = np.fromiter((v for _, v in shapes), dtype=np.float64, count=len(shapes))
    polys = [geom["coordinates"] for geom, _ in shapes]
    rings = list(chain.from_iterable(polys))
    ring_sizes = np.fromiter(map(len, rings), dtype=np.intp, count=len(rings))
    rings_per_poly = np.fromiter(map(len, polys), dtype=np.intp, count=len(polys))
    xy = np.fromiter(
        chain.from_iterable(chain.from_iterable(rings)),
        dtype=np.float64,
        count=2 * ring_sizes.sum(),
    ).reshape(-1, 2)
    linear = shapely.linearrings(xy, indices=np.repeat(np.arange(len(rings)), ring_sizes))
    geoms = shapely.polygons(linear, indices=np.repeat(np.arange(len(polys)), rings_per_poly))
    return classes.astype(np.int32), geoms


def _touches_seam(
    geoms: np.ndarray,
    origin: tuple[int, int],
    shape: tuple[int, int],
    image_shape: tuple[int, int] | None,
) -> np.ndarray:
    """Which polygons reach a block side that a neighbouring block shares."""
    y0, x0 = origin
    y1, x1 = y0 + shape[0], x0 + shape[1]
    height, width = image_shape if image_shape is not None else (math.inf, math.inf)
    minx, miny, maxx, maxy = shapely.bounds(geoms).T
    touches = np.zeros(len(geoms), dtype=bool)
    for is_seam, side, value in (
        (x0 > 0, minx, x0),
        (y0 > 0, miny, y0),
        (x1 < width, maxx, x1),
        (y1 < height, maxy, y1),
    ):
        if is_seam:
            touches |= side == value
    return touches


def _union_touching(pieces: np.ndarray) -> np.ndarray:
    """Union each group of touching pieces; one polygon per 4-connected object."""
    tree = shapely.STRtree(pieces)
    left, right = tree.query(pieces, predicate="intersects")
    n = len(pieces)
    graph = coo_matrix((np.ones(len(left), dtype=bool), (left, right)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.diff(group[order])) + 1
    out: list[shapely.Polygon] = []
    for members in np.split(order, starts):
        if len(members) == 1:
            out.append(pieces[members[0]])
            continue
        # pieces joined only at a vertex come back as a MultiPolygon: separate objects
        out.extend(shapely.get_parts(shapely.union_all(pieces[members])))
    # a union keeps the vertices where an outline crossed a seam in a straight line
    return shapely.simplify(np.array(out, dtype=object), 0.0)
