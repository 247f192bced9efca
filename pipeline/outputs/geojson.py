"""GeoJSON polygons of a segmentation that QuPath imports, in level-0 pixel coordinates.

How a run uses it
-----------------
1. :func:`trace_block` on each block (on workers), then :func:`merge_blocks` over one
   image's blocks (in the driver or one task): see :mod:`pipeline.outputs.polygons`,
   re-exported here, for tracing, connectivity (4) and seams.
2. :func:`feature_collection`: a GeoJSON ``FeatureCollection`` with QuPath's properties,
   optionally simplified.
3. :func:`write_geojson`: the file, written atomically.

:func:`read_geojson` and :func:`rasterize` read a file back and burn it into a label
image (tests, checks).

Coordinates
-----------
GeoJSON positions are ``[x, y]`` = ``[column, row]`` of the input's level 0, pixel
``(row, col)`` being the unit square ``[col, col + 1] x [row, row + 1]``. The run may be
on a coarser level: ``level0 = run * scale + offset`` per axis, with ``scale`` and
``offset`` given as ``(y, x)``. Coordinates are written as integers where they are
integral. Exterior rings are counter-clockwise and holes clockwise in ``[x, y]``
(RFC 7946; with y pointing down they look the other way round on screen); QuPath reads
either.

QuPath
------
Each feature carries ``properties.objectType`` (``"annotation"`` or ``"detection"``),
``classification`` ``{"name", "color": [r, g, b]}``, ``measurements`` ``{"Area px^2"}``
(level-0 pixels) and, if asked, ``isLocked``: the names QuPath's GeoJSON reader
(``PathObjectTypeAdapters``) takes when a file is dropped on an image.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from rasterio import features as rio_features

from pipeline.config import OBJECT_TYPES
from pipeline.core import atomic
from pipeline.core.classes import PALETTE as CLASS_PALETTE
from pipeline.core.classes import default_colour, default_name
from pipeline.errors import ConfigError, InputError, OutputError
from pipeline.outputs.polygons import (
    CONNECTIVITY,
    BlockPolygons,
    Polygons,
    merge_blocks,
    trace_block,
    trace_image,
)

log = logging.getLogger(__name__)

__all__ = [
    "AREA_MEASUREMENT",
    "CONNECTIVITY",
    "OBJECT_TYPES",
    "PALETTE",
    "BlockPolygons",
    "Polygons",
    "feature_collection",
    "merge_blocks",
    "rasterize",
    "read_geojson",
    "trace_block",
    "trace_image",
    "write_geojson",
]

AREA_MEASUREMENT = "Area px^2"
# default class colours (pipeline.core.classes.default_colour): the classes' colours
# everywhere (the label image, previews)
PALETTE = CLASS_PALETTE


def feature_collection(
    polygons: Polygons,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    offset: tuple[float, float] = (0.0, 0.0),
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    class_colors: Sequence[Sequence[int]] | Mapping[int, Sequence[int]] | None = None,
    object_type: str = "annotation",
    simplify: float = 0.0,
    locked: bool = False,
) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of ``polygons`` in level-0 pixel coordinates, for QuPath.

    Parameters
    ----------
    polygons
        Merged polygons in run-grid coordinates (:func:`merge_blocks`).
    scale, offset
        ``(y, x)``: ``level0 = run * scale + offset`` (a run on a 2x coarser level has
        ``scale=(2, 2)``).
    class_names
        Names of classes 1, 2, ... (a sequence) or by class index (a mapping); default
        ``"class k"``. A class present without a name is an error.
    class_colors
        ``[r, g, b]`` (0-255) of classes 1, 2, ... or by class index; default
        :data:`PALETTE`.
    object_type
        ``"annotation"`` (editable regions) or ``"detection"`` (many small objects,
        drawn faster and counted by QuPath).
    simplify
        Douglas-Peucker tolerance in run-grid pixels, 0 = exact outlines. Topology is
        kept within each polygon (no self-intersections, holes stay inside); a polygon
        that would collapse keeps its exact outline.
    locked
        Mark every object locked in QuPath (``isLocked``).

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}``, one Polygon feature per
        object, in the order of ``polygons``.
    """
    sy, sx = _positive_pair(scale, "scale")
    oy, ox = _finite_pair(offset, "offset")
    if object_type not in OBJECT_TYPES:
        raise ConfigError(
            f"object type {object_type!r} is not one QuPath imports here",
            where="geojson",
            hint=f"use one of {', '.join(OBJECT_TYPES)}",
        )
    if not (math.isfinite(simplify) and simplify >= 0):
        raise ConfigError(
            f"simplify tolerance {simplify!r} is not a number >= 0",
            where="geojson",
            hint="give a tolerance in pixels, e.g. 1.0, or 0 for exact outlines",
        )
    if not len(polygons):
        return {"type": "FeatureCollection", "features": []}
    styles = _class_styles(np.unique(polygons.classes), class_names, class_colors)
    geoms = _simplify(polygons.geoms, simplify) if simplify > 0 else polygons.geoms
    # scaling by positive factors keeps validity and orientation; orient last for RFC 7946
    geoms = shapely.transform(geoms, lambda xy: xy * (sx, sy) + (ox, oy))
    geoms = shapely.orient_polygons(geoms, exterior_cw=False)
    areas = shapely.area(geoms)
    out = []
    for cls, geom, area in zip(polygons.classes.tolist(), geoms, areas.tolist()):
        name, color = styles[cls]
        properties: dict[str, Any] = {
            "objectType": object_type,
            "classification": {"name": name, "color": list(color)},
            "measurements": {AREA_MEASUREMENT: _plain_number(area)},
        }
        if locked:
            properties["isLocked"] = True
        out.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": _rings(geom)},
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", "features": out}


def write_geojson(collection: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``collection`` as compact JSON, atomically: readers see no file or a whole one.

    The text goes to a temporary file beside ``path``, is flushed to disk, then renamed
    over ``path``; on any error the temporary file is removed and ``path`` is unchanged.

    Raises
    ------
    OutputError
        The file cannot be written (missing folder, full disk, a folder in the way...).
    """
    path = Path(path)
    try:
        with atomic.replacing(path) as f:
            json.dump(collection, f, separators=(",", ":"), allow_nan=False)
            f.write("\n")
    except OSError as exc:
        raise OutputError(
            f"cannot write GeoJSON ({exc.strerror or exc})",
            where=path,
            hint="check that the folder exists, is writable and has space",
        ) from exc
    return path


def read_geojson(path: str | os.PathLike) -> dict[str, Any]:
    """Read a GeoJSON FeatureCollection written by :func:`write_geojson` (or QuPath).

    Raises
    ------
    InputError
        The file cannot be read, is not JSON, or is not a FeatureCollection.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise InputError(f"cannot read GeoJSON ({exc.strerror or exc})", where=path) from exc
    except ValueError as exc:
        raise InputError(
            f"not valid JSON ({exc})", where=path, hint="the file may be cut short"
        ) from exc
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        raise InputError(
            "not a GeoJSON FeatureCollection",
            where=path,
            hint='expected {"type": "FeatureCollection", "features": [...]}',
        )
    return data


def rasterize(
    collection: Mapping[str, Any],
    shape: tuple[int, int],
    *,
    values: Sequence[int] | None = None,
) -> np.ndarray:
    """Burn a FeatureCollection's polygons into an int32 image of ``shape`` (0 elsewhere).

    A pixel takes a feature's value when its centre lies inside the polygon, so exact
    pixel-edge polygons give back exactly the pixels they were traced from.

    Parameters
    ----------
    collection
        A FeatureCollection in the image's pixel coordinates.
    shape
        ``(height, width)`` of the image.
    values
        One value per feature (e.g. class or feature number); default 1 for all.
    """
    feats = collection["features"]
    if values is None:
        values = [1] * len(feats)
    if len(values) != len(feats):
        raise ValueError(f"{len(values)} values for {len(feats)} features")
    if not feats:
        return np.zeros(shape, dtype=np.int32)
    return rio_features.rasterize(
        ((f["geometry"], int(v)) for f, v in zip(feats, values)),
        out_shape=shape,
        fill=0,
        dtype="int32",
    )


def _simplify(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """Topology-preserving simplification; polygons that would break keep their outline."""
    simple = shapely.simplify(geoms, tolerance, preserve_topology=True)
    bad = shapely.is_empty(simple) | ~shapely.is_valid(simple)
    bad |= shapely.get_type_id(simple) != shapely.GeometryType.POLYGON
    if bad.any():
        log.debug("simplify: %d of %d polygons kept exact", int(bad.sum()), len(geoms))
        simple = np.where(bad, geoms, simple)
    return simple


def _class_styles(
    classes: np.ndarray,
    names: Sequence[str] | Mapping[int, str] | None,
    colors: Sequence[Sequence[int]] | Mapping[int, Sequence[int]] | None,
) -> dict[int, tuple[str, tuple[int, int, int]]]:
    """Name and colour of each class present, from the caller's or the defaults."""
    styles = {}
    for cls in classes.tolist():
        name = _lookup(names, cls)
        if names is not None and name is None:
            raise ConfigError(
                f"class {cls} occurs in the segmentation but has no name",
                where="geojson",
                hint=f"give a name for every class 1..{int(classes.max())}",
            )
        color = _lookup(colors, cls)
        styles[cls] = (
            str(name) if name is not None else default_name(cls),
            _rgb(color, cls) if color is not None else default_colour(cls),
        )
    return styles


def _lookup(table: Sequence | Mapping | None, cls: int) -> Any:
    """Entry of class ``cls``: a mapping by index, a sequence from class 1."""
    if table is None:
        return None
    if isinstance(table, Mapping):
        return table.get(cls)
    return table[cls - 1] if 1 <= cls <= len(table) else None


def _rgb(color: Sequence[int], cls: int) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in color)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise ConfigError(
            f"colour {color!r} of class {cls} is not [r, g, b] with values 0-255",
            where="geojson",
        )
    return rgb  # type: ignore[return-value]


def _positive_pair(pair: Sequence[float], what: str) -> tuple[float, float]:
    values = _finite_pair(pair, what)
    if min(values) <= 0:
        raise ConfigError(f"{what} {tuple(pair)} must be > 0 along both axes", where="geojson")
    return values


def _finite_pair(pair: Sequence[float], what: str) -> tuple[float, float]:
    values = tuple(float(v) for v in pair)
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} {tuple(pair)} is not two finite numbers (y, x)", where="geojson")
    return values  # type: ignore[return-value]


def _rings(polygon: shapely.Polygon) -> list[list[list[float]]]:
    """GeoJSON rings (closed) of a polygon: exterior first, then holes."""
    return [_plain(shapely.get_coordinates(r)) for r in (polygon.exterior, *polygon.interiors)]


def _plain(xy: np.ndarray) -> list:
    """Coordinates as JSON numbers: integers where integral, else floats to 1e-6."""
    whole = np.rint(xy)
    if np.array_equal(whole, xy):
        return whole.astype(np.int64).tolist()
    return np.round(xy, 6).tolist()


def _plain_number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(value, 6)
