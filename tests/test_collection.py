"""The output root as a whole: it lists its images the NGFF way, validates, and lists
without Zarr warnings although report files, previews and hidden folders sit in it."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import zarr
from ngff_helpers import blobs, write_image

from pipeline.io.class_labels import create_class_labels, finish_class_labels, open_label_level
from pipeline.io.class_labels import write_label_block as write_labels
from pipeline.io.collection import (
    damaged,
    drop_consolidated,
    find_images,
    image_summary,
    read_collection,
    root_format,
    write_collection,
)
from pipeline.io.ngff import get_format

NAMES = ["CMU-1-Small-Region", "slide_2"]


def make_root(path: Path, version: str, names=NAMES) -> Path:
    """An output root as a run leaves it: images with class labels, report files, a
    preview folder, a hidden half-written image and a hidden internal folder."""
    fmt = get_format(version)
    zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    for i, name in enumerate(names):
        add_image(path, name, version, seed=i)
    (path / "report.json").write_text("{}")
    (path / "index.html").write_text("<!doctype html>")
    (path / "previews").mkdir()
    (path / "previews" / f"{names[0]}.png").write_bytes(b"\x89PNG")
    write_image(path / ".slide_3.partial-0a1b2c3d", blobs(1, (40, 40)), version)
    (path / ".ledger").mkdir()
    (path / ".ledger" / "inputs.jsonl").write_text("{}\n")
    return path


def add_image(root: Path, name: str, version: str, seed: int = 0) -> None:
    probs = blobs(1, (150, 130), seed=seed)
    shapes = write_image(root / name, probs, version)
    labels = create_class_labels(root / name, probs.shape, "cyx", (1, 64, 64), 1, fmt=version)
    write_labels(open_label_level(labels), (0, 0), probs)
    finish_class_labels(labels, shapes, {"y": 0.5, "x": 0.5}, names=["tissue"])


def members(path: Path) -> list[str]:
    """List the whole hierarchy the way Zarr users do; any Zarr warning is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = zarr.open_group(str(path), mode="r")
        return sorted(k for k, _ in group.members(max_depth=None))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_root_lists_its_images_and_lists_without_warnings(tmp_path, version):
    out = make_root(tmp_path / "out.zarr", version)
    assert root_format(out) == get_format(version).zarr_format
    assert find_images(out, root_format(out)) == sorted(NAMES)
    assert write_collection(out, get_format(version)) == sorted(NAMES)
    assert read_collection(out) == sorted(NAMES)
    listed = members(out)
    assert {k.split("/")[0] for k in listed} == {*NAMES, "OME"}  # hidden ones stay hidden
    assert f"{NAMES[0]}/labels/classes/0" in listed
    group = zarr.open_group(str(out), mode="r")
    assert group[f"{NAMES[1]}/0"].shape == (1, 150, 130)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_an_image_with_unreadable_metadata_is_left_out_of_the_list_with_a_warning(
    tmp_path, version, caplog
):
    """An image damaged outside the pipeline (an empty level metadata file, as a power
    loss left it before outputs were flushed) does not stop the root being written."""
    out = make_root(tmp_path / "out.zarr", version)
    damaged = out / NAMES[0] / "0" / (".zarray" if version == "0.4" else "zarr.json")
    damaged.write_bytes(b"")

    listed = write_collection(out, get_format(version))

    assert listed == [NAMES[1]] == read_collection(out)
    assert {k.split("/")[0] for k in members(out)} == {NAMES[1], "OME"}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        str(out / NAMES[0]) in m and "metadata cannot be read" in m and "run its input" in m
        for m in warned
    ), warned


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_damaged_names_what_is_unreadable_in_an_image(tmp_path, version):
    v2 = version == "0.4"
    cases = [  # (file emptied or folder removed, what damaged says)
        ("labels/classes/0/" + (".zattrs" if v2 else "zarr.json"), "empty"),
        ("1/" + (".zarray" if v2 else "zarr.json"), "empty"),
        ("2", "level 2: no array metadata"),
        (".zattrs" if v2 else "zarr.json", "empty"),
    ]
    for i, (where, says) in enumerate(cases):
        add_image(tmp_path / f"root{i}", "image", version)
        image = tmp_path / f"root{i}" / "image"
        assert damaged(image) is None
        target = image / where
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.write_bytes(b"")
        assert damaged(image) == (f"{where}: {says}" if says == "empty" else says)


def test_without_consolidated_metadata_zarr_warns_about_report_files(tmp_path):
    """Why the root is consolidated: plain files at the root do warn in zarr 3."""
    out = make_root(tmp_path / "out.zarr", "0.5")
    write_collection(out, get_format("0.5"))
    drop_consolidated(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        list(zarr.open_group(str(out), mode="r").members(max_depth=None))
    messages = " ".join(str(w.message) for w in caught)
    assert "Object at report.json is not recognized" in messages


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_dropping_then_rewriting_picks_up_new_images(tmp_path, version):
    out = make_root(tmp_path / "out.zarr", version, names=["a"])
    write_collection(out, get_format(version))
    drop_consolidated(out)
    drop_consolidated(out)  # twice is fine (nothing to drop)
    add_image(out, "b", version)
    write_collection(out, get_format(version))
    assert read_collection(out) == ["a", "b"]
    assert "b/0" in members(out)


def test_root_validates_as_an_ngff_collection(tmp_path):
    from ome_zarr_models.v04.bioformats2raw import BioFormats2Raw as B2RV04
    from ome_zarr_models.v04.image import Image as ImageV04
    from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw as B2RV05
    from ome_zarr_models.v05.image import Image as ImageV05

    for version, image_model, root_model in (
        ("0.4", ImageV04, B2RV04),
        ("0.5", ImageV05, B2RV05),
    ):
        out = make_root(tmp_path / f"{version}.zarr", version)
        write_collection(out, get_format(version))
        root = zarr.open_group(str(out), mode="r")
        # the root's "labels" (for ome-zarr-py) is a field of the collection's attributes
        assert root_model.from_zarr(root).ome_attributes.labels == read_collection(out)
        for name in read_collection(out):
            image_model.from_zarr(zarr.open_group(str(out / name), mode="r"))


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_info_on_the_root_prints_every_listed_image(tmp_path, version):
    """The real ``ome_zarr`` CLI on the root: ome-zarr-py's reader follows no collection
    metadata, but descends into the images the root's ``labels`` names."""
    cli = shutil.which("ome_zarr")
    if cli is None:
        pytest.skip("ome_zarr CLI not installed (test extra)")
    out = make_root(tmp_path / "out.zarr", version)
    write_collection(out, get_format(version))
    result = subprocess.run([cli, "info", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in read_collection(out):
        block = result.stdout.split(f"{out / name} [zgroup]\n", 1)[1].split("[zgroup]")[0]
        assert f"version: {version}" in block and "Multiscales" in block
        assert "(1, 150, 130)" in block
        assert f"{out / name}/labels/classes [zgroup]" in result.stdout


def test_image_summary_for_inspect(tmp_path):
    out = make_root(tmp_path / "out.zarr", "0.4")
    info = image_summary(out, NAMES[0], 2)
    assert info["ngff"] == "0.4" and info["axes"] == "cyx"
    assert info["shape"] == [1, 150, 130] and info["dtype"] == "uint8"
    assert info["levels"] == 3 and info["labels"] == ["classes"]
    assert info["pixel_size"] == {"y": 0.5, "x": 0.5}
