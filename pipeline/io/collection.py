"""The output root as a whole: the images it lists, and listing it without Zarr warnings.

An output root holds one NGFF image per input, and files that are not Zarr: the run
report (``report.json``), the run page (``index.html``), previews and GeoJSON files, and
hidden internal folders (staging images, the run's ledger and lock).

What the root says about its images
-----------------------------------
NGFF 0.4 and 0.5 describe several images in one hierarchy with the transitional
``bioformats2raw.layout`` metadata: the root carries ``"bioformats2raw.layout": 3`` and
its ``OME`` group a ``series`` list of the image groups' paths. Bio-Formats (QuPath,
OMERO, Fiji), ngff-zarr and ome-zarr-models read it; readers "MAY ignore other groups or
arrays under the root" (NGFF 0.4, "bf2raw"). No ``OME/METADATA.ome.xml`` is written: it
is optional ("SHOULD"), and a partial OME-XML that disagrees with the arrays would
mislead Bio-Formats more than none.

The root's attributes also list the images under ``labels``
(:meth:`~pipeline.io.ngff.NgffFormat.collection`): ome-zarr-py (``ome_zarr info OUT``,
napari-ome-zarr) follows no ``bioformats2raw.layout`` and descends from a group only into
what its ``labels``, plate, well or ``multiscales`` metadata name; with the images under
``labels`` it reads each of them as an image (a multiscales node), while
ome-zarr-models still validates the root as a ``BioFormats2Raw`` collection.

Listing without warnings
------------------------
zarr-python warns "Object at X is not recognized as a component of a Zarr hierarchy" for
every entry of a group's folder that is not a Zarr node (``report.json`` and
``index.html`` included) whenever a group's members are listed, unless the group has
*consolidated metadata*: then members come from it and the folder is not listed. So the
root gets consolidated metadata covering exactly the listed images and the ``OME`` group
(:func:`write_collection`), which also hides half-written (hidden) images from readers.
Consolidated metadata must never be stale: a run drops it before it changes the root
(:func:`drop_consolidated`) and writes it again when its images are in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.io.ngff import (
    COLLECTION_GROUP,
    COLLECTION_KEY,
    NgffFormat,
    detect_format,
    format_for_zarr,
)

log = logging.getLogger(__name__)

__all__ = [
    "RESERVED_NAMES",
    "damaged",
    "drop_consolidated",
    "find_images",
    "group_content",
    "image_summary",
    "read_collection",
    "root_format",
    "sync_root_metadata",
    "write_collection",
]

#: Names in the output root that are not input images (image names must avoid them).
RESERVED_NAMES = frozenset({COLLECTION_GROUP.lower(), "previews", "geojson", "labels"})


def root_format(out: str | os.PathLike) -> int | None:
    """The Zarr format of an existing output root folder (2 or 3), None if it is no group."""
    out = Path(out)
    if (out / "zarr.json").is_file():
        return 3
    if (out / ".zgroup").is_file():
        return 2
    return None


def find_images(out: str | os.PathLike, zarr_format: int) -> list[str]:
    """Names of the NGFF images directly in ``out`` (not hidden), sorted.

    A child is an image when its folder holds group metadata of ``zarr_format`` with
    ``multiscales``; hidden folders (staging images, internal state) never are.
    """
    out = Path(out)
    names = []
    with os.scandir(out) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            content = group_content(Path(entry.path), zarr_format)
            if content is not None and content.get("multiscales"):
                names.append(entry.name)
    return sorted(names)


def group_content(folder: Path, zarr_format: int) -> dict[str, Any] | None:
    """The NGFF content of a group folder's attributes, or None if it is not a group."""
    try:
        if zarr_format == 3:
            meta = json.loads((folder / "zarr.json").read_text(encoding="utf-8"))
            if meta.get("node_type") != "group":
                return None
            attrs = meta.get("attributes") or {}
        else:
            if not (folder / ".zgroup").is_file():
                return None
            path = folder / ".zattrs"
            attrs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return None
    return format_for_zarr(zarr_format).unwrap(attrs)


#: The metadata files of a node, by Zarr format: (group, array, attributes).
_NODE_FILES = {2: (".zgroup", ".zarray", ".zattrs"), 3: ("zarr.json", "zarr.json", "zarr.json")}


def damaged(image: str | os.PathLike) -> str | None:
    """What makes an image's metadata unreadable, e.g. ``"0/.zarray: empty"``; None when
    the metadata of every group and array in it reads (and every level its multiscales
    names is an array).

    Only metadata is read, never a chunk: a few small files per image, cheap enough for
    every up-to-date image of a nightly run. A power loss before the pipeline flushed its
    outputs left such images (files the kernel had not written back come back empty).
    """
    image = Path(image)
    zarr_format = root_format(image) or 2  # neither file: ".zgroup" is what is missing
    group_file, array_file, attrs_file = _NODE_FILES[zarr_format]
    todo, levels = [image], None
    while todo:
        node = todo.pop()
        metas = {}
        for name in dict.fromkeys((group_file, array_file, attrs_file)):
            path = node / name
            try:
                metas[name] = json.loads(path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                problem = "empty" if path.is_file() and path.stat().st_size == 0 else str(exc)
                return f"{path.relative_to(image)}: {problem}"
        kind = _node_kind(metas, zarr_format)
        if node == image:
            if kind != "group":
                return f"{group_file}: missing, or not a group"
            attrs = metas.get(attrs_file) or {}
            content = format_for_zarr(zarr_format).unwrap(
                attrs.get("attributes", {}) if zarr_format == 3 else attrs
            )
            datasets = ((content.get("multiscales") or [{}])[0]).get("datasets") or []
            levels = {str(d.get("path")) for d in datasets if isinstance(d, dict)}
        elif kind == "array" and node.parent == image:
            levels.discard(node.name)
        if kind == "group":
            todo.extend(p for p in sorted(node.iterdir(), reverse=True) if p.is_dir())
    if levels:
        return f"level {sorted(levels)[0]}: no array metadata"
    return None


def _node_kind(metas: dict[str, Any], zarr_format: int) -> str | None:
    """``"group"``, ``"array"`` or None (not a node) from a folder's metadata files."""
    if zarr_format == 3:
        meta = metas.get("zarr.json")
        return meta.get("node_type") if isinstance(meta, dict) else None
    if ".zarray" in metas:
        return "array"
    return "group" if ".zgroup" in metas else None


def read_collection(out: str | os.PathLike) -> list[str] | None:
    """The image paths the root's collection metadata lists, or None if it has none."""
    out = Path(out)
    zarr_format = root_format(out)
    if zarr_format is None:
        return None
    root = group_content(out, zarr_format) or {}
    if root.get(COLLECTION_KEY) is None:
        return None
    group = group_content(out / COLLECTION_GROUP, zarr_format) or {}
    series = group.get("series")
    return [str(s) for s in series] if isinstance(series, list) else None


def write_collection(
    out: str | os.PathLike, fmt: NgffFormat, images: Sequence[str] | None = None
) -> list[str]:
    """List the root's images in its metadata and consolidate it (see the module docstring).

    Parameters
    ----------
    out
        The output root, a Zarr group of ``fmt``'s Zarr format.
    fmt
        The NGFF version of the root and its images.
    images
        Image names to list, in order; default: every image found (:func:`find_images`).

    Returns
    -------
    list of str
        The names listed. An image whose metadata cannot be read (:func:`damaged`) is
        left out, with a warning naming it.

    Notes
    -----
    Call it in one process at a time (the driver), after images are published: it
    rewrites the root's and the ``OME`` group's metadata.
    """
    import zarr

    out = Path(out)
    found = list(images) if images is not None else find_images(out, fmt.zarr_format)
    root = zarr.open_group(str(out), mode="r+", zarr_format=fmt.zarr_format, use_consolidated=False)
    trees = {}
    for name in found:
        problem = damaged(out / name)
        if problem is None:
            try:
                trees[name] = _subtree(root, name)
                continue
            except Exception as exc:  # zarr raises its own types for a damaged node
                problem = str(exc)
        log.warning(
            "%s: left out of the output's image list: its metadata cannot be read (%s). "
            "Hint: run its input again (a damaged image is computed again), or remove the "
            "folder",
            out / name,
            problem,
        )
    names = list(trees)
    root_attrs, group_attrs = fmt.collection(names)
    kept = {k: v for k, v in root.attrs.asdict().items() if k not in (COLLECTION_KEY, "ome")}
    root.attrs.put({**kept, **root_attrs})
    group = root.require_group(COLLECTION_GROUP)
    group.attrs.put(group_attrs)
    trees[COLLECTION_GROUP] = _subtree(root, COLLECTION_GROUP)
    _consolidate(root, trees)
    sync_root_metadata(out, fmt.zarr_format)
    return names


#: The metadata files of a group, by Zarr format.
_GROUP_FILES = {2: (".zgroup", ".zattrs", ".zmetadata"), 3: ("zarr.json",)}


def sync_root_metadata(out: str | os.PathLike, zarr_format: int) -> None:
    """Put the root's and the collection group's metadata on disk (Zarr writes them in
    place: after a power loss an unflushed one reads as empty, and the root no longer
    opens)."""
    out = Path(out)
    for folder in (out / COLLECTION_GROUP, out):
        for name in _GROUP_FILES[zarr_format]:
            atomic.sync_path(folder / name)
        atomic.sync_path(folder)


def drop_consolidated(out: str | os.PathLike) -> None:
    """Remove the root's consolidated metadata (before anything in the root changes)."""
    zarr_format = root_format(out)
    if zarr_format == 2:
        with contextlib.suppress(FileNotFoundError):  # never consolidated
            os.remove(Path(out) / ".zmetadata")
    elif zarr_format == 3:
        path = Path(out) / "zarr.json"
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.pop("consolidated_metadata", None) is not None:
            atomic.write_text(path, json.dumps(meta, indent=2), durable=False)


def _subtree(root: Any, name: str) -> dict[str, Any]:
    """The metadata of the child ``name`` of ``root`` and of all its members, by path."""
    child = root[name]
    flat = {name: child.metadata}
    for path, node in child.members(max_depth=None):
        flat[f"{name}/{path}"] = node.metadata
    return flat


def _consolidate(root: Any, trees: Mapping[str, Mapping[str, Any]]) -> None:
    """Consolidated metadata of ``root`` made of the chosen children's subtrees only
    (``trees``: :func:`_subtree` of each).

    zarr's own ``consolidate_metadata`` walks every member, which would take in hidden
    half-written images and warn about the report files; this is its recipe on a chosen
    set of children (zarr-python 3 API: ``ConsolidatedMetadata`` and the group's
    ``_save_metadata``).
    """
    from zarr.core.group import ConsolidatedMetadata, GroupMetadata
    from zarr.core.sync import sync

    flat: dict[str, Any] = {}
    for tree in trees.values():
        flat.update(tree)
    for key, meta in flat.items():
        if isinstance(meta, GroupMetadata) and meta.consolidated_metadata is None:
            flat[key] = dataclasses.replace(
                meta, consolidated_metadata=ConsolidatedMetadata(metadata={})
            )
    ConsolidatedMetadata._flat_to_nested(flat)
    group = root._async_group
    metadata = dataclasses.replace(
        group.metadata, consolidated_metadata=ConsolidatedMetadata(metadata=flat)
    )
    with warnings.catch_warnings():
        # consolidated metadata is a zarr-python convention in Zarr v3 (an extension field
        # with must_understand = false): other readers ignore it, which is what we want
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        sync(dataclasses.replace(group, metadata=metadata)._save_metadata())


def image_summary(out: str | os.PathLike, name: str, zarr_format: int) -> dict[str, Any]:
    """Shape, axes, levels, dtype, pixel size and label images of one image of the root."""
    import zarr

    path = Path(out) / name
    group = zarr.open_group(str(path), mode="r", zarr_format=zarr_format)
    attrs = group.attrs.asdict()
    fmt = detect_format(attrs)
    content = format_for_zarr(zarr_format).unwrap(attrs)
    multiscale = (content.get("multiscales") or [{}])[0]
    datasets = multiscale.get("datasets") or []
    axes = "".join(
        a.get("name", "?") if isinstance(a, Mapping) else str(a) for a in multiscale.get("axes", [])
    )
    first = group[datasets[0]["path"]] if datasets else None
    scale = _scale(datasets[0]) if datasets else []
    labels = []
    if "labels" in group:
        labels_attrs = group["labels"].attrs.asdict()
        labels = list(format_for_zarr(zarr_format).unwrap(labels_attrs).get("labels", []))
    return {
        "name": name,
        "ngff": fmt.version if fmt is not None else None,
        "axes": axes,
        "shape": list(first.shape) if first is not None else None,
        "dtype": str(first.dtype) if first is not None else None,
        "levels": len(datasets),
        "pixel_size": {a: s for a, s in zip(axes, scale) if a in "zyx"},
        "labels": labels,
    }


def _scale(dataset: Mapping[str, Any]) -> list[float]:
    for transform in dataset.get("coordinateTransformations") or []:
        if transform.get("type") == "scale":
            return [float(s) for s in transform.get("scale", [])]
    return []
