"""NGFF versions and the class label image: blocks of probabilities -> label chunks -> a
label image that ome-zarr-models validates and ome-zarr-py reads, in NGFF 0.4 and 0.5."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from ngff_helpers import CHUNK, blobs, write_image

from pipeline.core.classes import class_labels
from pipeline.io.class_labels import (
    create_class_labels,
    finish_class_labels,
    open_label_level,
    write_label_block,
)
from pipeline.io.ngff import (
    DEFAULT_VERSION,
    FORMATS,
    detect_format,
    get_format,
)


def write_by_blocks(labels, probs: np.ndarray, block: int) -> None:
    """What the block stage does: each block's probabilities -> its label chunks."""
    array = open_label_level(labels)
    h, w = probs.shape[1:]
    for y, x in itertools.product(range(0, h, block), range(0, w, block)):
        write_label_block(array, (y, x), probs[:, y : y + block, x : x + block], labels.threshold)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
@pytest.mark.parametrize("classes", [1, 3])
def test_label_image_from_blocks_validates_and_matches_the_whole(tmp_path, version, classes):
    from ome_zarr_models.v04.image_label import ImageLabel as ImageLabelV04
    from ome_zarr_models.v05.image_label import ImageLabel as ImageLabelV05

    probs = blobs(classes)
    image = tmp_path / "img"
    shapes = write_image(image, probs, version)
    labels = create_class_labels(
        image, probs.shape, "cyx", (classes, CHUNK, CHUNK), classes, threshold=0.5, fmt=version
    )
    write_by_blocks(labels, probs, 2 * CHUNK)
    finish_class_labels(labels, shapes, {"y": 0.5, "x": 0.5}, names=None)

    group = zarr.open_group(str(image / "labels" / "classes"), mode="r")
    model = ImageLabelV04 if version == "0.4" else ImageLabelV05
    model.from_zarr(group)  # raises on invalid NGFF
    expected = class_labels(probs)
    np.testing.assert_array_equal(group["0"][0], expected)
    assert expected.any() and (expected == 0).any()
    for level, shape in enumerate(shapes):
        assert group[str(level)].shape == (1, *shape[1:])
        step = 2**level
        np.testing.assert_array_equal(
            group[str(level)][0], expected[::step, ::step][: shape[1], : shape[2]]
        )
    attrs = get_format(version).unwrap(group.attrs.asdict())
    scales = [
        d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]
    ]
    assert scales[1] == [1.0, 1.0, 1.0]  # the image's level-1 scale: they line up
    listed = get_format(version).unwrap(
        zarr.open_group(str(image / "labels"), mode="r").attrs.asdict()
    )
    assert listed["labels"] == ["classes"]


@pytest.mark.parametrize("block", [2 * CHUNK, 4 * CHUNK])
def test_blocks_write_their_part_of_the_first_levels_as_the_whole_image_would(tmp_path, block):
    """Label levels 1..k written by the blocks (from their own labels, every 2**k-th) equal
    the levels picked from the whole label image; the rest are made when finishing."""
    from pipeline.core.pyramid import block_levels

    probs = blobs(2, shape=(300, 230), seed=7)  # odd level sizes: floored like the image's
    image = tmp_path / "img"
    shapes = write_image(image, probs, "0.4")
    chunks = (2, CHUNK, CHUNK)
    k = block_levels(probs.shape, "cyx", chunks, (2, block, block), min_size=CHUNK)
    assert k >= 1
    labels = create_class_labels(
        image, probs.shape, "cyx", chunks, 2, fmt="0.4", level_shapes=shapes[1 : k + 1]
    )
    assert labels.levels == k
    levels = [open_label_level(labels, level) for level in range(1, k + 1)]
    h, w = probs.shape[1:]
    for y, x in itertools.product(range(0, h, block), range(0, w, block)):
        part = probs[:, y : y + block, x : x + block]
        write_label_block(open_label_level(labels), (y, x), part, 0.5, levels, "cyx")
    written = [zarr.open_array(str(image / f"labels/classes/{n}"))[:] for n in range(k + 1)]
    finish_class_labels(labels, shapes, {})
    expected = class_labels(probs)
    group = zarr.open_group(str(image / "labels" / "classes"), mode="r")
    for level, shape in enumerate(shapes):
        step = 2**level
        want = expected[::step, ::step][: shape[1], : shape[2]]
        np.testing.assert_array_equal(group[str(level)][0], want)
        if level <= k:  # finishing left the blocks' levels as they were
            np.testing.assert_array_equal(written[level][0], want)
    with pytest.raises(ValueError, match="cannot write level"):
        write_label_block(open_label_level(labels), (CHUNK + 2**k // 2, 0), probs, 0.5, levels)


def test_zarr_v2_for_04_and_v3_for_05(tmp_path):
    probs = blobs(2, shape=(100, 100))
    for version in ("0.4", "0.5"):
        image = tmp_path / version
        shapes = write_image(image, probs, version)
        labels = create_class_labels(image, probs.shape, "cyx", (2, CHUNK, CHUNK), 2, fmt=version)
        write_by_blocks(labels, probs, CHUNK)
        finish_class_labels(labels, shapes, {})
    v4, v5 = tmp_path / "0.4", tmp_path / "0.5"
    assert (v4 / ".zgroup").is_file() and not (v4 / "zarr.json").exists()
    assert (v4 / "labels" / "classes" / "0" / ".zarray").is_file()
    zarray = json.loads((v4 / "labels" / "classes" / "0" / ".zarray").read_text())
    assert zarray["dimension_separator"] == "/" and zarray["compressor"]["id"] == "blosc"
    assert (v4 / "labels" / "classes" / "0" / "0" / "0" / "0").is_file()  # nested chunk keys
    v4_attrs = json.loads((v4 / "labels" / "classes" / ".zattrs").read_text())
    assert v4_attrs["multiscales"][0]["version"] == "0.4"
    assert v4_attrs["image-label"]["version"] == "0.4"
    meta = json.loads((v5 / "labels" / "classes" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
    assert "version" not in meta["attributes"]["ome"]["multiscales"][0]
    array = json.loads((v5 / "labels" / "classes" / "0" / "zarr.json").read_text())
    assert array["dimension_names"] == ["c", "y", "x"]
    np.testing.assert_array_equal(
        zarr.open_array(str(v4 / "labels/classes/0"))[:],
        zarr.open_array(str(v5 / "labels/classes/0"))[:],
    )


def test_each_block_writes_only_its_own_chunks(tmp_path):
    """One writer per chunk: a block's label write touches exactly the chunks it owns."""
    probs = blobs(1, shape=(256, 192), seed=3)
    probs[:] = 255  # every chunk has foreground, so every written chunk is stored
    image = tmp_path / "img"
    write_image(image, probs, "0.5")
    labels = create_class_labels(image, probs.shape, "cyx", (1, CHUNK, CHUNK), 1, fmt="0.5")
    array = open_label_level(labels)
    chunk_dir = Path(labels.level0) / "c" / "0"
    seen: set[str] = set()
    for y, x in itertools.product(range(0, 256, 128), range(0, 192, 128)):
        write_label_block(array, (y, x), probs[:, y : y + 128, x : x + 128])
        files = {str(p.relative_to(chunk_dir)) for p in chunk_dir.rglob("*") if p.is_file()}
        new = files - seen
        owned = {
            os.path.join(str(cy), str(cx))
            for cy in range(y // CHUNK, min(y + 128, 256) // CHUNK)
            for cx in range(x // CHUNK, min(x + 128, 192) // CHUNK)
        }
        assert new == owned
        seen = files


def test_background_chunks_are_not_stored(tmp_path):
    probs = np.zeros((1, 128, 128), dtype=np.uint8)
    probs[:, :10, :10] = 255
    image = tmp_path / "img"
    write_image(image, probs, "0.4")
    labels = create_class_labels(image, probs.shape, "cyx", (1, CHUNK, CHUNK), 1, fmt="0.4")
    write_by_blocks(labels, probs, 128)
    stored = [
        p for p in Path(labels.level0).rglob("*") if p.is_file() and not p.name.startswith(".")
    ]
    assert len(stored) == 1


def test_class_names_reach_the_label_properties_and_ome_zarr_py_reads_them(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    probs = blobs(3, shape=(96, 96))
    image = tmp_path / "img"
    shapes = write_image(image, probs, "0.5")
    labels = create_class_labels(image, probs.shape, "cyx", (3, CHUNK, CHUNK), 3, fmt="0.5")
    write_by_blocks(labels, probs, CHUNK)
    finish_class_labels(labels, shapes, {"y": 0.5, "x": 0.5}, names=["tumor", "stroma"])
    nodes = list(Reader(parse_url(str(image)))())
    label = next(n for n in nodes if n.load(Label))
    props = label.metadata["properties"]
    assert {v: p["class"] for v, p in props.items()} == {0: "background", 1: "tumor", 2: "stroma"}
    assert label.metadata["color"][0] == [0, 0, 0, 0]
    image_node = nodes[0]
    assert image_node.metadata["channel_names"] == ["class 0", "class 1", "class 2"]


def test_formats_own_their_versions():
    assert DEFAULT_VERSION == "0.4" and set(FORMATS) == {"0.4", "0.5"}
    v4, v5 = FORMATS["0.4"], FORMATS["0.5"]
    assert (v4.zarr_format, v5.zarr_format) == (2, 3)
    content = {"multiscales": [v4.multiscale("a", "cyx", {}, 1, "mean")]}
    assert detect_format(v4.wrap(content)) is v4
    assert detect_format(v5.wrap({"labels": ["x"]})) is v5
    assert detect_format({"something": 1}) is None
    assert v5.unwrap(v5.wrap({"labels": ["x"]})) == {"labels": ["x"]}
    root, group = v5.collection(["a", "b"])
    assert root == {"ome": {"version": "0.5", "bioformats2raw.layout": 3, "labels": ["a", "b"]}}
    assert group == {"ome": {"version": "0.5", "series": ["a", "b"]}}
    assert v4.collection(["a"]) == (
        {"bioformats2raw.layout": 3, "labels": ["a"]},
        {"series": ["a"]},
    )


def test_unknown_version_is_a_config_error():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--ngff"):
        get_format("0.6")
