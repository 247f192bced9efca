"""Zarr v2/v3 arrays and OME-Zarr images (NGFF 0.4 and 0.5, bioformats2raw layout).

Axes and pixel sizes come from the NGFF ``multiscales`` metadata; pixel sizes of
levels above 0 are derived from the real shapes by :mod:`pipeline.io.sources`, since
real files declare scales that do not match their shapes.

Missing chunks: a chunk absent from the store reads as the array's fill value. That is
Zarr's own semantics (writers leave out chunks that are all fill value; zarr 3 does so
by default), so a deleted chunk of an input cannot be told from an empty one and is not
reported. A truncated or corrupt chunk fails to decode and is a
:class:`~pipeline.errors.CorruptInputError` naming the level and the chunk.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import zarr
import zarr.errors
from zarr.storage import LocalStore

from pipeline.errors import InputError, UnsupportedFormatError
from pipeline.io.axes import select_axes
from pipeline.io.meta import FileInfo, LevelInfo, SeriesInfo, clean_pixel_size, to_micrometres

log = logging.getLogger(__name__)

#: Dimension names seen in plain Zarr arrays (xarray, tifffile) → select_axes labels.
_NAME_LABELS = {
    "time": "t",
    "channel": "c",
    "channels": "c",
    "sample": "s",
    "samples": "s",
    "depth": "z",
    "plane": "z",
    "row": "y",
    "col": "x",
    "column": "x",
    "i": "i",
    "q": "i",
}

#: Axis order guessed for arrays without dimension names, by rank.
_GUESSED_AXES = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}


def open_zarr_level(path: str, component: str) -> zarr.Array:
    """Open the array ``component`` (``""`` for the root) read-only."""
    store = LocalStore(path, read_only=True)
    return zarr.open_array(store=store, path=component, mode="r")


def inspect_zarr(path: str) -> FileInfo:
    """Describe a Zarr array or OME-Zarr group without reading chunks."""
    try:
        node = zarr.open(store=LocalStore(path, read_only=True), mode="r")
        if isinstance(node, zarr.Array):
            return _plain_array(path, node)
        return _group(path, node)
    except InputError:
        raise
    except (
        zarr.errors.BaseZarrError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        OSError,
    ) as exc:
        raise InputError.because(
            exc,
            "is not a readable Zarr array or OME-Zarr image",
            where=path,
            hint="check the folder's zarr.json/.zarray/.zattrs, or pass the path of an array",
        ) from exc


def _stored_chunks(array: zarr.Array) -> tuple[int, ...]:
    shards = getattr(array, "shards", None)
    return tuple(int(c) for c in (shards or array.chunks))


def _plain_array(path: str, array: zarr.Array) -> FileInfo:
    selection = select_axes(_plain_labels(path, array), array.shape, path)
    axes = selection.axes
    level = LevelInfo(
        shape=selection.kept(array.shape),
        dtype=str(array.dtype),
        chunks=selection.kept(_stored_chunks(array)),
    )
    fmt_info = {"zarr_format": array.metadata.zarr_format}
    series = SeriesInfo(
        index=0,
        name="",
        axes=axes,
        selection=selection.index,
        levels=(level,),
        pixel_size={},
        locators=(("",),),
        info=dict(fmt_info),
    )
    return FileInfo(path=path, format="zarr", kind="zarr", series=(series,), info=fmt_info)


def _plain_labels(path: str, array: zarr.Array) -> list[str]:
    """Axis labels from dimension names (zarr 3, or xarray's attribute), else guessed."""
    names = getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS")
    if names and len(names) == array.ndim and all(names):
        labels = [_NAME_LABELS.get(str(n).lower(), str(n).lower()) for n in names]
        if any(label in ("t", "c", "z", "y", "x", "s", "i") for label in labels):
            return labels
    guessed = _GUESSED_AXES.get(array.ndim)
    if guessed is None:
        raise UnsupportedFormatError(
            f"is a {array.ndim}-D array without usable dimension names ({names})",
            where=path,
            hint="name its dimensions t, c, z, y, x (zarr 3 dimension_names) or write it "
            "as OME-Zarr",
        )
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        guessed = "yxc"  # interleaved RGB(A)
    log.info("%s: no usable dimension names; assuming axes %r", path, guessed)
    return list(guessed)


def _ome(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    """NGFF 0.5 nests its metadata under ``ome``; 0.4 keeps it at the top."""
    ome = attrs.get("ome")
    return ome if isinstance(ome, Mapping) else attrs


def _group(path: str, group: zarr.Group) -> FileInfo:
    attrs = group.attrs.asdict()
    ome = _ome(attrs)
    fmt_info: dict[str, Any] = {"zarr_format": group.metadata.zarr_format}
    if "multiscales" in ome:
        images = [("", group, i) for i in range(len(ome["multiscales"]))]
    elif "bioformats2raw.layout" in ome:
        fmt_info["bioformats2raw.layout"] = ome["bioformats2raw.layout"]
        images = [(name, group[name], 0) for name in _b2r_series(group)]
    else:
        what = "an HCS plate" if "plate" in ome or "well" in ome else "a Zarr group"
        arrays = sorted(name for name, _ in group.arrays())
        raise UnsupportedFormatError(
            f"is {what} without OME-Zarr multiscales image metadata",
            where=path,
            hint=f"pass the path of one image or array inside it (arrays here: {arrays or 'none'})",
        )
    series = tuple(
        _multiscale(path, prefix, node, which, index)
        for index, (prefix, node, which) in enumerate(images)
    )
    return FileInfo(path=path, format="ome-zarr", kind="zarr", series=series, info=fmt_info)


def _b2r_series(group: zarr.Group) -> list[str]:
    """Image groups of a bioformats2raw layout: listed in ``OME/``, else numbered children."""
    names: list[str] = []
    if "OME" in group:
        names = [str(n) for n in _ome(group["OME"].attrs.asdict()).get("series", [])]
    if not names:
        numbered = [name for name, _ in group.groups() if name.isdigit()]
        names = sorted(numbered, key=int)
    return [n for n in names if n in group]


def _axis_labels(axes: list[Any], ndim: int) -> tuple[list[str], list[str | None]]:
    """select_axes labels and units of NGFF axes (0.3 name strings or 0.4+ objects)."""
    if not axes:
        return list(_GUESSED_AXES.get(ndim, "?" * ndim)), [None] * ndim
    labels, units = [], []
    for axis in axes:
        axis = axis if isinstance(axis, Mapping) else {"name": str(axis)}
        name, kind = str(axis.get("name", "")).lower(), axis.get("type")
        if name not in ("t", "c", "z", "y", "x"):
            name = {"channel": "c", "time": "t"}.get(kind, "?" + name)
        labels.append(name)
        units.append(axis.get("unit"))
    return labels, units


def _scale(transforms: Any, ndim: int) -> list[float] | None:
    for transform in transforms or []:
        if isinstance(transform, Mapping) and transform.get("type") == "scale":
            values = transform.get("scale")
            if isinstance(values, list) and len(values) == ndim:
                return [float(v) for v in values]
    return None


def _multiscale(path: str, prefix: str, group: zarr.Group, which: int, index: int) -> SeriesInfo:
    meta = _ome(group.attrs.asdict())["multiscales"][which]
    arrays = [group[d["path"]] for d in meta["datasets"]]
    ndim = arrays[0].ndim
    labels, units = _axis_labels(meta.get("axes") or [], ndim)
    selection = select_axes(labels, arrays[0].shape, path)
    axes = selection.axes
    kept = [i for i, p in enumerate(selection.index) if isinstance(p, slice)]
    overall = _scale(meta.get("coordinateTransformations"), ndim) or [1.0] * ndim
    levels = []
    rejected: dict[str, float] = {}
    for dataset, array in zip(meta["datasets"], arrays):
        scale = _scale(dataset.get("coordinateTransformations"), ndim)
        declared = None
        if scale is not None:
            declared = {
                axes[k]: to_micrometres(scale[i] * overall[i], units[i])
                for k, i in enumerate(kept)
                if axes[k] in "zyx" and units[i] is not None
            }
            declared = clean_pixel_size(declared, path, rejected if not levels else None)
        levels.append(
            LevelInfo(
                shape=selection.kept(array.shape),
                dtype=str(array.dtype),
                chunks=selection.kept(_stored_chunks(array)),
                declared_scale=declared,
            )
        )
    info = {
        "series_name": meta.get("name") or "",
        "ngff_version": meta.get("version") or _ome(group.attrs.asdict()).get("version"),
        "channel_names": _channel_names(group),
    }
    if rejected:
        info["pixel_size_rejected"] = rejected
    return SeriesInfo(
        index=index,
        name=str(meta.get("name") or ""),
        axes=axes,
        selection=selection.index,
        levels=tuple(levels),
        pixel_size=dict(levels[0].declared_scale or {}),
        locators=tuple((_join(prefix, d["path"]),) for d in meta["datasets"]),
        info=info,
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else str(name)


def _channel_names(group: zarr.Group) -> list[str]:
    omero = _ome(group.attrs.asdict()).get("omero") or {}
    channels = omero.get("channels") if isinstance(omero, Mapping) else None
    return [str(c.get("label", "")) for c in channels or [] if isinstance(c, Mapping)]
