"""What a run leaves for people and viewers: NGFF 0.4 and 0.5 outputs with the same pixels,
named channels, a root that lists its images and lists without Zarr warnings, and
``pipeline inspect`` / ``ome_zarr info`` on it."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import cli, write_tiff

from pipeline.io.collection import read_collection
from pipeline.io.ngff import get_format

SVS = Path("wsi/CMU-1-Small-Region.svs")


def write_slide(path: Path, seed: int = 0) -> np.ndarray:
    """A small brightfield-like RGB slide: white background, a pink blob of tissue."""
    rng = np.random.default_rng(seed)
    image = np.full((300, 260, 3), 242, np.uint8)
    yy, xx = np.mgrid[:300, :260]
    blob = (yy - 150) ** 2 / 90**2 + (xx - 120) ** 2 / 70**2 < 1
    image[blob] = (200, 120, 170) + rng.integers(-20, 20, (int(blob.sum()), 3))
    write_tiff(path, image, tile=(64, 64), um=0.5, photometric="rgb")
    return image


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """The same two slides run with --ngff 0.4 (the default) and --ngff 0.5."""
    folder = tmp_path_factory.mktemp("in")
    write_slide(folder / "slide-a.tif", 0)
    write_slide(folder / "slide-b.tif", 1)
    (folder / "broken.tif").write_text("not a slide")
    found = {}
    for version, extra in (("0.4", ()), ("0.5", ("--ngff", "0.5"))):
        out = tmp_path_factory.mktemp(version) / "out.zarr"
        args = ("--backend", "identity", "--scheduler", "sync", "--class-names", "a,b", "--geojson")
        result = cli("run", folder, "--out", out, *args, *extra)
        assert result.exit_code == 1, result.output  # the broken file fails, the rest ran
        found[version] = out
    return found


def test_04_is_zarr_v2_and_05_is_zarr_v3_with_the_same_pixels(outputs):
    v4, v5 = outputs["0.4"], outputs["0.5"]
    assert (v4 / ".zgroup").is_file() and not list(v4.rglob("zarr.json"))
    assert (v4 / "slide-a" / "0" / ".zarray").is_file()
    assert (v5 / "zarr.json").is_file() and not list(v5.rglob(".zgroup"))
    for name in ("slide-a", "slide-b"):
        a = zarr.open_group(str(v4 / name), mode="r")
        b = zarr.open_group(str(v5 / name), mode="r")
        assert sorted(a.array_keys()) == sorted(b.array_keys())  # same pyramid
        for level in a.array_keys():
            np.testing.assert_array_equal(a[level][:], b[level][:])
        scales = [
            get_format(v).unwrap(g.attrs.asdict())["multiscales"][0]["datasets"]
            for v, g in (("0.4", a), ("0.5", b))
        ]
        assert scales[0] == scales[1]
        np.testing.assert_array_equal(a["labels/tissue/0"][:], b["labels/tissue/0"][:])
        # the class labels: written by the block with its levels, the same in both versions
        classes = a["labels/classes/0"][0]
        assert sorted(a["labels/classes"].array_keys()) == sorted(a.array_keys())
        for level in a["labels/classes"].array_keys():
            got = a[f"labels/classes/{level}"][0]
            step = 2 ** int(level)
            np.testing.assert_array_equal(
                got, classes[::step, ::step][: got.shape[0], : got.shape[1]]
            )
            np.testing.assert_array_equal(got, b[f"labels/classes/{level}"][0])


def test_04_validates_as_ngff_04_image_and_image_label(outputs):
    from ome_zarr_models.v04.image import Image
    from ome_zarr_models.v04.image_label import ImageLabel
    from ome_zarr_models.v05.image import Image as ImageV05
    from ome_zarr_models.v05.image_label import ImageLabel as ImageLabelV05

    for version, image_model, label_model in (
        ("0.4", Image, ImageLabel),
        ("0.5", ImageV05, ImageLabelV05),
    ):
        out = outputs[version]
        for name in read_collection(out):
            image_model.from_zarr(zarr.open_group(str(out / name), mode="r"))
            for label in ("tissue", "classes"):
                label_model.from_zarr(zarr.open_group(str(out / name / "labels" / label), mode="r"))


def test_channels_carry_the_class_names(outputs):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    for out in outputs.values():
        node = next(iter(Reader(parse_url(str(out / "slide-a")))()))
        # identity: 3 channels = background + the 2 names given
        assert node.metadata["channel_names"] == ["background", "a", "b"]


def test_root_lists_done_images_and_lists_without_zarr_warnings(outputs):
    for out in outputs.values():
        assert read_collection(out) == ["slide-a", "slide-b"]
        # beside the images: the report, the run page, previews and GeoJSON files
        assert (out / "index.html").is_file() and (out / "report.json").is_file()
        assert sorted(p.name for p in (out / "previews").iterdir()) == [
            "slide-a.png",
            "slide-b.png",
        ]
        assert sorted(p.name for p in (out / "geojson").iterdir()) == [
            "slide-a.geojson",
            "slide-b.geojson",
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # report.json at the root must not warn
            members = [k for k, _ in zarr.open_group(str(out), mode="r").members(max_depth=None)]
        assert "slide-a/labels/tissue/0" in members and "OME" in members
        assert "slide-a/labels/classes/0" in members
        assert not [m for m in members if m.split("/")[0] in ("previews", "geojson")]


def test_inspect_lists_the_images_with_shapes_levels_and_states(outputs):
    out = outputs["0.4"]
    table = cli("inspect", out)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].endswith("NGFF 0.4 output, 2 images")
    row = next(line for line in lines if "slide-a" in line)
    assert row.split()[:2] == ["done", "slide-a"] and "3 x 300 x 260" in row
    assert "tissue" in row and "0.5 µm/px" in row
    assert "failed" in next(line for line in lines if "broken" in line)
    assert any("napari" in line and "slide-a" in line for line in lines)
    data = json.loads(cli("inspect", out, "--json").output)
    assert data["kind"] == "output" and data["ngff"] == "0.4"
    images = {i["name"]: i for i in data["images"]}
    assert images["slide-b"]["shape"] == [3, 300, 260] and images["slide-b"]["levels"] >= 1
    assert images["broken"]["state"] == "failed" and images["broken"]["reason"]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_info_on_the_output_lists_every_image(outputs, version):
    cli_path = shutil.which("ome_zarr")
    if cli_path is None:
        pytest.skip("ome_zarr CLI not installed (test extra)")
    out = outputs[version]
    result = subprocess.run([cli_path, "info", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for name in read_collection(out):
        block = result.stdout.split(f"{out / name} [zgroup]\n", 1)[1].split("[zgroup]")[0]
        assert f"version: {version}" in block and "(3, 300, 260)" in block
        for label in ("tissue", "classes"):
            assert f"{out / name}/labels/{label} [zgroup]" in result.stdout
    assert "broken" not in result.stdout


def test_inspect_json_has_no_float_noise(data_dir):
    text = cli("inspect", data_dir / SVS, "--json").output
    assert "0.499," in text or "0.499\n" in text
    assert not any(
        len(tok) > 12 for tok in text.replace(",", " ").split() if "." in tok and tok[0].isdigit()
    )


def test_inspect_an_image_as_a_table(data_dir):
    result = cli("inspect", data_dir / SVS)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert "series 0 Baseline (main): axes yxc, uint8, 0.499 µm/px" in lines
    assert any(line.split()[:2] == ["0", "2967"] for line in lines)
    assert len(lines) < 30  # a table, not 200 lines of JSON


def test_a_slide_without_pixel_size_warns_what_mpp_input_does(data_dir, caplog):
    from pipeline.io.model_input import open_for_model

    slide = data_dir / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"
    with caplog.at_level("WARNING", logger="pipeline"):
        open_for_model(slide, ndim=2, in_channels=3, level=1)
    (record,) = [r for r in caplog.records if "no pixel size" in r.getMessage()]
    assert "tcga-cr-7395" in record.getMessage() and "--mpp-input" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline"):
        inp = open_for_model(slide, ndim=2, in_channels=3, level=1, mpp_input=0.25)
    assert inp.pixel_size == pytest.approx({"y": 0.5, "x": 0.5}, rel=1e-3)  # level 1 of 0.25
    assert not [r for r in caplog.records if "no pixel size" in r.getMessage()]


def test_image_names_never_take_the_root_own_names():
    from pipeline.io.sink import sanitize_name

    assert sanitize_name("OME.tif") == "OME_"  # the group that lists the images
    assert sanitize_name("previews.svs") == "previews_"
    assert sanitize_name("index.html") == "index_html"  # the run page
    assert sanitize_name("a.geojson") == "a_geojson"
    assert sanitize_name("OME-slide.tif") == "OME-slide"
