"""What a run makes of each input besides its image, through ``pipeline run``: the class
label image, GeoJSON polygons for QuPath, in level-0 pixel coordinates, made per block and
merged across seams, kept across a resume, and added alone to an up-to-date output."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cli, image_files, run_process, write_tiff
from scipy import ndimage

from pipeline.outputs.geojson import rasterize, read_geojson

SIDE, BLOCK = 2048, 512
# a one-class threshold model: the identity backend on a one-channel image whose blobs are
# bright (200 -> p = 0.78) on a dark ground (30 -> p = 0.12), labels at --threshold 0.5
ARGS = ("--backend", "identity", "--threshold", "0.5", "--no-skip-background")
BLOCKS = ("--block", str(BLOCK), "--chunk", str(BLOCK))


def blobs(side: int = SIDE, seed: int = 3) -> np.ndarray:
    """Discs and rings (holes) of several sizes, some across the seams of 512-pixel blocks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    scale = side / SIDE
    mask = np.zeros((side, side), bool)

    def disc(cy, cx, r):
        return (yy - cy * scale) ** 2 + (xx - cx * scale) ** 2 < (r * scale) ** 2

    # rings centred on block corners and seams: one object over 2 or 4 blocks, hole included
    for cy, cx, r, hole in ((512, 512, 150, 60), (1024, 1536, 170, 70), (1536, 700, 90, 30)):
        mask |= disc(cy, cx, r) & ~disc(cy, cx, hole)
    mask |= disc(1000, 300, 80) | disc(300, 1024, 120)  # discs across a seam
    for _ in range(60):  # small blobs anywhere, some touching each other
        mask |= disc(rng.integers(30, SIDE - 30), rng.integers(30, SIDE - 30), rng.integers(6, 30))
    return np.where(mask, 200, 30).astype(np.uint8)


@pytest.fixture(scope="module")
def blob_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blobs")
    return write_tiff(folder / "blobs.tif", blobs(), tile=(256, 256), compression="zlib")


@pytest.fixture(scope="module")
def blob_run(blob_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out.zarr"
    extra = ("--geojson", "--class-names", "blob")
    result = cli("run", blob_file, "--out", out, *ARGS, *BLOCKS, *extra)
    assert result.exit_code == 0, result.output
    (out / "cli.txt").write_text(result.output)
    return out


def labels_of(out: Path, name: str = "blobs") -> np.ndarray:
    return zarr.open_array(str(out / name / "labels/classes/0"), mode="r")[0]


def test_geojson_polygons_match_the_class_labels_one_feature_per_object(blob_run, blob_file):
    out = blob_run
    labels = labels_of(out)
    mask = blobs() / 255 >= 0.5  # the model's mask
    np.testing.assert_array_equal(labels, mask.astype(np.uint8))
    report = json.loads((out / "report.json").read_text())["inputs"][0]
    assert report["geojson"] == "geojson/blobs.geojson"
    collection = read_geojson(out / report["geojson"])
    features = collection["features"]
    objects, count = ndimage.label(mask)  # 4-connected, as the polygons
    assert len(features) == count
    # rasterised back: each feature burns its own number, so two features on one object
    # or one feature over two objects would show
    burnt = rasterize(collection, mask.shape, values=range(1, len(features) + 1))
    assert ((burnt > 0) & mask).sum() / ((burnt > 0) | mask).sum() >= 0.97
    np.testing.assert_array_equal(burnt > 0, mask)  # exact outlines: exactly the mask
    pairs = {(int(o), int(b)) for o, b in zip(objects[mask], burnt[mask])}
    assert len(pairs) == count  # one feature per object, one object per feature
    for feature in features:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "blob", "color": [0, 230, 90]}
    # the test has what it claims: holes, and objects over the seams of the blocks
    assert sum(len(f["geometry"]["coordinates"]) > 1 for f in features) >= 3
    spans = [np.array(f["geometry"]["coordinates"][0]) for f in features]
    across = [s for s in spans if any(s[:, a].min() // BLOCK != (s[:, a].max() - 1) // BLOCK for a in (0, 1))]  # fmt: skip
    assert len(across) >= 5


def test_class_label_image_has_its_metadata_and_the_image_levels(blob_run):
    from ome_zarr_models.v04.image_label import ImageLabel

    image = zarr.open_group(str(blob_run / "blobs"), mode="r")
    group = zarr.open_group(str(blob_run / "blobs/labels/classes"), mode="r")
    ImageLabel.from_zarr(group)
    attrs = group.attrs.asdict()
    assert attrs["image-label"]["properties"] == [
        {"label-value": 0, "class": "background"},
        {"label-value": 1, "class": "blob"},
    ]
    assert attrs["image-label"]["colors"][1]["rgba"] == [0, 230, 90, 255]
    assert attrs["image-label"]["source"] == {"image": "../../"}
    assert attrs["pipeline"]["classes"] == {"rule": "threshold", "threshold": 0.5}
    levels = sorted(image.array_keys())
    assert sorted(group.array_keys()) == levels
    level0 = group["0"][0]
    for level in levels:
        assert group[level].shape[1:] == image[level].shape[1:]
        step, (h, w) = 2 ** int(level), group[level].shape[1:]
        np.testing.assert_array_equal(group[level][0], level0[::step, ::step][:h, :w])
    # one chunk per 512 block, background chunks not stored: far fewer than 16 per level 0
    stored = [p for p in (blob_run / "blobs/labels/classes/0/0").rglob("*") if p.is_file()]
    assert 0 < len(stored) <= 16
    assert image["labels"].attrs["labels"] == ["classes"]


def test_the_terminal_says_what_runs_and_counts_tiles(blob_run):
    text = (blob_run / "cli.txt").read_text()
    line = next(x for x in text.splitlines() if x.startswith("blobs: 2048x2048 px"))
    assert "identity on identity/cpu" in line and "tile 256" in line and "gaussian" in line
    assert "16 blocks" in line
    tiles = int(line.split(" tiles")[0].rsplit(", ", 1)[1].replace(",", ""))
    assert f"blobs: done, {tiles:,}/{tiles:,} tiles" in text


def test_geojson_is_in_level0_pixels_when_the_run_is_on_a_coarser_level(tmp_path):
    import tifffile

    image = blobs(512, seed=5)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, tile=(128, 128), subifds=1, resolution=(1e4 / 0.5, 1e4 / 0.5),
                  resolutionunit="CENTIMETER")  # fmt: skip
        tif.write(image[::2, ::2], tile=(128, 128), subfiletype=1)
    out = tmp_path / "out.zarr"
    result = cli("run", path, "--out", out, *ARGS, "--level", "1", "--geojson")
    assert result.exit_code == 0, result.output
    labels = labels_of(out, "pyramid")
    assert labels.shape == (256, 256)
    collection = read_geojson(out / "geojson/pyramid.geojson")
    burnt = rasterize(collection, (512, 512))
    np.testing.assert_array_equal(burnt > 0, np.kron(labels, np.ones((2, 2), np.uint8)) > 0)


def test_a_rerun_asking_for_geojson_adds_just_it(blob_file, tmp_path):
    out = tmp_path / "out.zarr"
    assert cli("run", blob_file, "--out", out, *ARGS, *BLOCKS).exit_code == 0
    assert not (out / "geojson").exists() and (out / "previews/blobs.png").is_file()
    before = image_files(out)
    level0 = out / "blobs/0/0/0/0"
    stamp = level0.stat().st_mtime_ns

    again = cli("run", blob_file, "--out", out, *ARGS, *BLOCKS, "--geojson", "--simplify", "1")

    assert again.exit_code == 0, again.output
    entry = json.loads((out / "report.json").read_text())["inputs"][0]
    assert entry["state"] == "skipped" and entry["reason"] == "up-to-date"
    assert "only its GeoJSON" in entry["message"]
    assert entry["geojson"] == "geojson/blobs.geojson" and entry["preview"]
    assert image_files(out) == before and level0.stat().st_mtime_ns == stamp  # not recomputed
    simple = read_geojson(out / "geojson/blobs.geojson")
    burnt = rasterize(simple, (SIDE, SIDE))
    mask = labels_of(out) > 0
    assert (burnt.astype(bool) & mask).sum() / (burnt.astype(bool) | mask).sum() >= 0.97
    # asked again: up to date, nothing made; other settings: made again; dropped: kept
    third = cli("run", blob_file, "--out", out, *ARGS, *BLOCKS, "--geojson", "--simplify", "1")
    entry = json.loads((out / "report.json").read_text())["inputs"][0]
    assert third.exit_code == 0 and "only its" not in entry["message"]
    assert cli("run", blob_file, "--out", out, *ARGS, *BLOCKS, "--geojson").exit_code == 0
    exact = read_geojson(out / "geojson/blobs.geojson")
    assert exact != simple and len(exact["features"]) == len(simple["features"])
    assert cli("run", blob_file, "--out", out, *ARGS, *BLOCKS).exit_code == 0
    assert (out / "geojson/blobs.geojson").is_file()  # still true of this image
    # a recomputed image does not keep a GeoJSON of its old pixels
    forced = cli("run", blob_file, "--out", out, *ARGS, *BLOCKS, "--force")
    assert forced.exit_code == 0 and not (out / "geojson/blobs.geojson").exists()
    assert json.loads((out / "report.json").read_text())["inputs"][0]["geojson"] is None


def test_threshold_and_class_names_are_part_of_the_run_key(blob_file, tmp_path):
    out = tmp_path / "out.zarr"
    assert cli("run", blob_file, "--out", out, *ARGS, *BLOCKS).exit_code == 0
    low = labels_of(out)
    higher = [a if a != "0.5" else "0.8" for a in ARGS]
    assert cli("run", blob_file, "--out", out, *higher, *BLOCKS).exit_code == 0
    entry = json.loads((out / "report.json").read_text())["inputs"][0]
    assert entry["state"] == "done" and low.any() and not labels_of(out).any()  # 0.78 < 0.8
    named = ("--class-names", "nucleus")
    assert cli("run", blob_file, "--out", out, *higher, *BLOCKS, *named).exit_code == 0
    entry = json.loads((out / "report.json").read_text())["inputs"][0]
    assert entry["state"] == "done"
    group = zarr.open_group(str(out / "blobs/labels/classes"), mode="r")
    assert group.attrs["image-label"]["properties"][1]["class"] == "nucleus"


@pytest.mark.parametrize("first", [("--geojson",), ()], ids=["with", "without"])
def test_a_killed_run_continues_with_the_same_labels_and_polygons(blob_file, tmp_path, first):
    """Blocks written before the kill keep their labels and polygon files; blocks whose
    run asked for no polygons are traced again from the label image."""
    ref = tmp_path / "ref.zarr"
    assert cli("run", blob_file, "--out", ref, *ARGS, *BLOCKS, "--geojson").exit_code == 0
    out = tmp_path / "out.zarr"
    common = ("run", blob_file, "--out", out, "--scheduler", "sync", *ARGS, *BLOCKS)
    env = {"PIPELINE_FAULTS": "block-written@blobs/9=killgroup"}
    killed = run_process(*common, *first, env=env)
    assert killed.returncode == -signal.SIGKILL

    again = run_process(*common, "--geojson")

    assert again.returncode == 0, again.stderr
    entry = json.loads((out / "report.json").read_text())["inputs"][0]
    assert entry["state"] == "done" and 0 < entry["resumed_blocks"] < 16
    # the terminal: what runs, that it continues, and only the tiles still to run
    assert f"continuing: {entry['resumed_blocks']} blocks written before" in again.stderr
    assert f"blobs: done, {entry['tiles']:,}/{entry['tiles']:,} tiles" in again.stderr
    assert image_files(out) == image_files(ref)  # the label image included
    assert read_geojson(out / "geojson/blobs.geojson") == read_geojson(
        ref / "geojson/blobs.geojson"
    )
