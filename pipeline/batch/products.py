"""What a run makes of each input besides its image: class labels, GeoJSON, a preview.

Where each is made
------------------
**Per block**, on the worker, inside the block task (:class:`BlockProducts`, a
:class:`~pipeline.engine.stages.BlockOutput` the block's job carries): the block's class labels
are written into ``IMAGE/labels/classes`` (exactly the chunks the block writes in the
image: one writer per chunk; background chunks not stored), and with ``--geojson`` its
objects are traced (:func:`~pipeline.outputs.polygons.trace_block`) and saved as one
small file beside the staged image (``polygons/<block id>.npz``). Both are written
before the block records that it is done, so a resumed run keeps them, and no result of
unbounded size travels through Dask.

**Per input**, at finalize, on the worker (:func:`finish_products`): the GeoJSON (the
block files merged across seams, :func:`~pipeline.outputs.polygons.merge_blocks`; a block
without a file, written by a run that did not ask for polygons, is traced again from the
label image) in level-0 pixel coordinates of the input, and the preview PNG (the input's
thumbnail with the class labels over it). Both go to the stage's ``products/`` folder.
Finalize runs on a worker because a preview reads the input and a GeoJSON merge may take
a while: the driver stays free to keep other inputs' blocks flowing.

**When the image is published**, in the driver (:func:`publish_products`): the files are
renamed into ``OUT/previews/NAME.png`` and ``OUT/geojson/NAME.geojson`` (a rename is
atomic) right after the image, before the ledger records the input; a new image without
a GeoJSON removes a GeoJSON made from older pixels.

What the ledger remembers (:func:`products_record`): the run key they were made for and
the GeoJSON settings. A GeoJSON is no part of the run key (it does not change the image):
a rerun asking for ``--geojson`` (or other ``--simplify``/``--object-type``) on an
up-to-date image makes just the GeoJSON from the published label image
(:func:`products_current` tells when).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core import atomic
from pipeline.core.classes import label_colors, label_names
from pipeline.errors import PipelineError
from pipeline.io.class_labels import ClassLabels, open_label_level, write_label_block
from pipeline.io.staging import block_id

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.engine.stages import BlockJob
    from pipeline.io.model_input import ModelInput
    from pipeline.outputs.polygons import BlockPolygons

log = logging.getLogger(__name__)

__all__ = [
    "BlockProducts",
    "Products",
    "finish_products",
    "level0_scale",
    "load_block_polygons",
    "products_current",
    "products_record",
    "publish_products",
    "save_block_polygons",
]

#: Folders of the output root that hold the per-input files, and their suffixes.
PREVIEWS, GEOJSON = ("previews", ".png"), ("geojson", ".geojson")
_POLYGONS = "polygons"  # in the stage: one file per traced block
_MADE = "products"  # in the stage: the files made at finalize, until published
_WINDOW = 2048  # label pixels per side traced at once when no block files exist


@dataclass(frozen=True)
class Products:
    """What a run asks of each input besides its image (picklable).

    Attributes
    ----------
    threshold
        Probability at which a one-class pixel is foreground (the labels).
    names
        Class names given (``--class-names`` or the model's), see
        :func:`pipeline.core.classes.label_names`.
    geojson, simplify, object_type
        Polygons: whether, their tolerance, their QuPath object type.
    """

    threshold: float
    names: tuple[str, ...] | None = None
    geojson: bool = False
    simplify: float = 0.0
    object_type: str = "annotation"

    @classmethod
    def of(cls, cfg: RunConfig, model_names: Sequence[str] | None = None) -> Products:
        names = cfg.class_names or (tuple(model_names) if model_names else None)
        return cls(cfg.threshold, names, cfg.geojson, cfg.simplify, cfg.object_type)

    def geojson_settings(self) -> dict[str, Any] | None:
        """What the GeoJSON of an image depends on besides its run key (None: not asked)."""
        if not self.geojson:
            return None
        return {"simplify": float(self.simplify), "object_type": self.object_type}


@dataclass(frozen=True)
class BlockProducts:
    """The per-block outputs of an input (see the module docstring).

    Attributes
    ----------
    labels
        The class label image being written.
    polygons
        Folder of the per-block polygon files, or None: no GeoJSON asked.
    image_shape
        Spatial shape of the run grid (block sides on its border are no seams).
    """

    labels: ClassLabels
    polygons: str | None
    image_shape: tuple[int, ...]

    def write(self, job: BlockJob, data: np.ndarray) -> None:
        """Labels of the block's pixels ``data`` ``(K, *spatial)``, then its polygons."""
        meta = self.labels
        levels = [open_label_level(meta, k) for k in range(1, meta.levels + 1)]
        array = open_label_level(meta)
        labels = write_label_block(array, job.write.offset, data, meta.threshold, levels, meta.axes)
        if self.polygons is None or len(self.image_shape) != 2:
            return
        from pipeline.outputs.polygons import trace_block

        traced = trace_block(labels[0], job.write.offset, image_shape=self.image_shape)
        save_block_polygons(Path(self.polygons) / f"{block_id(job.write)}.npz", traced)


def save_block_polygons(path: str | os.PathLike, polygons: BlockPolygons) -> None:
    """One block's polygons as a small ``.npz`` (classes and WKB; no pickle), written to a
    temporary name, flushed to disk and renamed: a reader sees the whole file or none,
    also after a power loss (the block's record comes after it)."""
    import shapely

    arrays = {}
    for part in ("interior", "edge"):
        found = getattr(polygons, part)
        wkb = shapely.to_wkb(found.geoms) if len(found) else np.array([], dtype=object)
        arrays[f"{part}_classes"] = np.asarray(found.classes, dtype=np.int32)
        arrays[f"{part}_sizes"] = np.fromiter(map(len, wkb), dtype=np.int64, count=len(wkb))
        arrays[f"{part}_wkb"] = np.frombuffer(b"".join(wkb), dtype=np.uint8)
    with atomic.replacing(path, text=False) as f:
        np.savez(f, **arrays)


def load_block_polygons(path: str | os.PathLike) -> BlockPolygons:
    """Read what :func:`save_block_polygons` wrote."""
    import shapely

    from pipeline.outputs.polygons import BlockPolygons, Polygons

    with np.load(path, allow_pickle=False) as data:
        parts = []
        for part in ("interior", "edge"):
            sizes, buffer = data[f"{part}_sizes"], data[f"{part}_wkb"].tobytes()
            ends = np.cumsum(sizes)
            wkb = [buffer[e - s : e] for s, e in zip(sizes.tolist(), ends.tolist())]
            geoms = shapely.from_wkb(np.array(wkb, dtype=object)) if wkb else ()
            parts.append(Polygons.of(data[f"{part}_classes"], geoms))
    return BlockPolygons(*parts)


def polygons_folder(stage_dir: str | os.PathLike) -> Path:
    """Where the blocks of a stage save their polygons (created)."""
    folder = Path(stage_dir) / _POLYGONS
    folder.mkdir(exist_ok=True)
    return folder


def level0_scale(inp: ModelInput, run_shape: Sequence[int]) -> tuple[float, float]:
    """``(y, x)`` level-0 pixels of the input per run-grid pixel (a run on a coarser level
    or resampled to ``--mpp`` is 2, 4, 1.5...)."""
    axes, level0 = inp.source.axes, inp.source.levels[0]
    return (
        level0[axes.index("y")] / run_shape[-2],
        level0[axes.index("x")] / run_shape[-1],
    )


def finish_products(
    image: str | os.PathLike,
    stage_dir: str | os.PathLike,
    name: str,
    products: Products,
    *,
    classes: int,
    scale: Sequence[float],
    input_path: str,
    series: int | None = None,
    blocks: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The GeoJSON (if asked) and the preview of an image whose class labels are
    finished, into ``stage_dir/products`` (see the module docstring).

    Parameters
    ----------
    image
        The image group (staged, or published for an up-to-date image).
    stage_dir
        The input's staging folder: block polygon files, and where the files go.
    name
        The output name (file names).
    classes
        Probability channels of the model.
    scale
        ``(y, x)`` level-0 pixels per run pixel (:func:`level0_scale`).
    input_path, series
        The input, for the preview's thumbnail.
    blocks
        Block ids (:func:`~pipeline.io.staging.block_id`) of the blocks that ran; their
        polygon files are used, a missing one is traced again from the labels. None: the
        whole label image is traced.

    Returns
    -------
    dict
        What was made: ``{"geojson": settings or None, "preview": bool, "volume": bool}``
        (a volume gets no GeoJSON, whatever the settings).

    Raises
    ------
    OutputError
        The GeoJSON could not be written. A preview that cannot be made is logged and
        left out (an extra); a GeoJSON asked for is not.
    """
    made = Path(stage_dir) / _MADE
    made.mkdir(exist_ok=True)
    label_image = Path(image) / "labels" / "classes"
    settings = products.geojson_settings()
    flat = _is_2d(label_image)
    if settings is not None:
        if flat:
            _write_geojson(label_image, Path(stage_dir), made / f"{name}{GEOJSON[1]}",
                           products, classes, scale, blocks)  # fmt: skip
        else:
            log.warning("%s: GeoJSON is made for 2D images only; none for this volume", name)
    preview = made / f"{name}{PREVIEWS[1]}"
    try:
        from pipeline.outputs.preview import make_preview

        make_preview(input_path, label_image, preview, series=series)
    except (PipelineError, OSError, ValueError) as exc:
        log.warning("%s: no preview: %s", name, exc)
        with contextlib.suppress(FileNotFoundError):
            preview.unlink()
    return {"geojson": settings, "preview": preview.is_file(), "volume": not flat}


def _is_2d(label_image: Path) -> bool:
    import zarr

    return zarr.open_array(str(label_image / "0"), mode="r").ndim == 3  # (c, y, x)


def _write_geojson(
    label_image: Path,
    stage_dir: Path,
    path: Path,
    products: Products,
    classes: int,
    scale: Sequence[float],
    blocks: Iterable[str] | None,
) -> None:
    import zarr

    from pipeline.outputs.geojson import feature_collection, write_geojson
    from pipeline.outputs.polygons import merge_blocks, trace_block

    level0 = zarr.open_array(str(label_image / "0"), mode="r")
    shape = tuple(int(n) for n in level0.shape[1:])
    folder = stage_dir / _POLYGONS
    regions = _windows(shape, level0.chunks[1:]) if blocks is None else map(_region, blocks)
    traced, again = [], 0
    for offset, size in regions:
        file = folder / f"{block_id(_Box(offset, size))}.npz"
        if file.is_file():
            traced.append(load_block_polygons(file))
            continue
        again += 1
        window = tuple(slice(o, o + n) for o, n in zip(offset, size))
        traced.append(trace_block(level0[(0, *window)], offset, image_shape=shape))
    if again and blocks is not None:
        log.info("%s: %d blocks traced again from the label image", path.name, again)
    count = len(label_names(classes, products.names))
    collection = feature_collection(
        merge_blocks(traced),
        scale=(float(scale[0]), float(scale[1])),
        class_names=label_names(classes, products.names)[1:],
        class_colors=[c[:3] for c in label_colors(count)[1:]],
        object_type=products.object_type,
        simplify=products.simplify,
    )
    write_geojson(collection, path)


@dataclass(frozen=True)
class _Box:
    offset: tuple[int, ...]
    shape: tuple[int, ...]


def _region(bid: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offset, shape)`` of a block id (``0_512+512_512``)."""
    offset, shape = bid.split("+")
    return tuple(map(int, offset.split("_"))), tuple(map(int, shape.split("_")))


def _windows(shape: Sequence[int], chunks: Sequence[int]):
    """Chunk-aligned windows of about :data:`_WINDOW` pixels a side covering ``shape``."""
    sides = [max(c, _WINDOW // c * c) for c in chunks]
    for y in range(0, shape[0], sides[0]):
        for x in range(0, shape[1], sides[1]):
            yield (y, x), (min(sides[0], shape[0] - y), min(sides[1], shape[1] - x))


def publish_products(
    stage_dir: str | os.PathLike, out: str | os.PathLike, name: str, *, replace: bool
) -> dict[str, str | None]:
    """Move the files :func:`finish_products` made into the output root.

    ``replace``: a new image was published, so a file of this name it did not come with
    (a GeoJSON made from the old pixels) is removed. Returns the ``preview`` and
    ``geojson`` paths relative to ``out`` (None: there is none).
    """
    made, out = Path(stage_dir) / _MADE, Path(out)
    found: dict[str, str | None] = {}
    for kind, (folder, suffix) in (("preview", PREVIEWS), ("geojson", GEOJSON)):
        src, rel = made / f"{name}{suffix}", f"{folder}/{name}{suffix}"
        if src.is_file():
            (out / folder).mkdir(exist_ok=True)
            os.replace(src, out / rel)
            atomic.fsync_dir(out / folder)  # its entry, and the folder's if it is new
            atomic.fsync_dir(out)
        elif replace:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / rel)
        found[kind] = rel if (out / rel).is_file() else None
    return found


def products_record(
    key: str, made: Mapping[str, Any], before: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What the ledger keeps of an input's products: the run key and what was made
    (``before``: the record of the same key, for what this run did not redo)."""
    same = before if before and before.get("key") == key else {}
    return {
        "key": key,
        "geojson": made.get("geojson") or same.get("geojson"),
        "preview": bool(made.get("preview") or same.get("preview")),
        "volume": bool(made.get("volume")),
    }


def products_current(
    record: Mapping[str, Any] | None, key: str, products: Products, out: Path, name: str
) -> bool:
    """True when the output of an up-to-date image also has what this run asks: a
    preview (unless none could be made) and the GeoJSON with these settings."""
    record = record or {}
    if record.get("key") != key:
        return False
    if record.get("preview") and not (out / PREVIEWS[0] / f"{name}{PREVIEWS[1]}").is_file():
        return False
    wanted = products.geojson_settings()
    if wanted is None:
        return True
    if record.get("geojson") != wanted:
        return False
    return bool(record.get("volume")) or (out / GEOJSON[0] / f"{name}{GEOJSON[1]}").is_file()
