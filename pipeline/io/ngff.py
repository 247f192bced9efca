"""The NGFF (OME-Zarr) metadata the pipeline writes, in one place.

The images (:mod:`pipeline.io.sink`) and the tissue labels (:mod:`pipeline.io.labels`)
are NGFF :data:`VERSION` multiscale images on Zarr v3: attributes under ``ome`` with the
version, ``axes`` (``c`` a channel axis, the others space in micrometres when the pixel
size is known) and one ``datasets`` entry per level, level ``i`` halving ``y`` and ``x``
``i`` times. Reading NGFF (0.4 and 0.5) is :mod:`pipeline.io.zarr_source`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The NGFF version written.
VERSION = "0.5"

#: The unit of a calibrated spatial axis.
UNIT = "micrometer"


def ome(content: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ome`` attribute holding ``content`` and the version: ``{"ome": {...}}``."""
    return {"ome": {"version": VERSION, **content}}


def axes_metadata(axes: str, pixel_size: Mapping[str, float]) -> list[dict[str, str]]:
    """NGFF axes: ``c`` a channel axis, the others space in micrometres when known."""
    out = []
    for a in axes:
        entry = {"name": a, "type": "channel" if a == "c" else "space"}
        if a != "c" and a in pixel_size:
            entry["unit"] = UNIT
        out.append(entry)
    return out


def datasets(
    axes: str,
    pixel_size: Mapping[str, float],
    levels: int,
    cell: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One entry per level (path ``"0"``, ``"1"``...) with its scale transformation.

    Level ``i`` has ``2**i`` times level 0's pixel size on ``y`` and ``x``; ``cell``
    multiplies the scale of an axis whose level-0 pixel covers several run pixels (a
    coarse mask). Axes without a pixel size get 1 (pixels).
    """
    cell = cell or {}
    out = []
    for level in range(levels):
        scale = [
            1.0
            if a == "c"
            else float(pixel_size.get(a, 1.0)) * cell.get(a, 1.0) * (2**level if a in "yx" else 1)
            for a in axes
        ]
        out.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    return out


def multiscale(
    name: str,
    axes: str,
    pixel_size: Mapping[str, float],
    levels: int,
    kind: str,
    cell: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """One ``multiscales`` entry; ``kind`` says how levels were made (``mean``, ``max``)."""
    return {
        "name": name,
        "axes": axes_metadata(axes, pixel_size),
        "datasets": datasets(axes, pixel_size, levels, cell),
        "type": kind,
    }


def level_count(attrs: Mapping[str, Any]) -> int:
    """Levels an NGFF image's attributes list (1 when it lists none yet)."""
    multiscales = attrs.get("ome", {}).get("multiscales") or [{}]
    return max(1, len(multiscales[0].get("datasets", [])))
