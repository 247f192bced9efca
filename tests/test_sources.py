"""Lazy readers: real slides and volumes, generated Zarr/OME-Zarr, bad inputs."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import tifffile.zarr
import zarr

from pipeline.errors import InputError
from pipeline.io import lazy
from pipeline.io.sources import describe, open_image, open_image_cached

SVS = "wsi/CMU-1-Small-Region.svs"
SVS_J2K = "wsi/tcga-cr-7395-01a-01-ts1.svs"
OME_TIFF = "wsi/CMU-1-Small-Region.pyramid.ome.tif"
OME_ZARR = "omezarr/CMU-1-Small-Region.ome.zarr"
ISBI = "isbi2012/train-volume.tif"
OVULE = "volume3d/ovule_raw.tif"


@pytest.fixture(scope="module")
def svs_pixels(data_dir: Path) -> np.ndarray:
    """tifffile's own full decode of the small SVS: the oracle for region reads."""
    return tifffile.imread(data_dir / SVS)


# --- real whole-slide images -------------------------------------------------------


def test_svs_main_image(data_dir: Path, svs_pixels: np.ndarray) -> None:
    src = open_image(data_dir / SVS)
    assert src.format == "svs"
    assert (src.axes, src.shape, src.dtype) == ("yxc", (2967, 2220, 3), "uint8")
    assert isinstance(src.array, da.Array)
    assert src.pixel_size == pytest.approx({"y": 0.499, "x": 0.499})
    assert (src.series, src.level, src.levels) == (0, 0, ((2967, 2220, 3),))
    assert src.info["vendor"] == "aperio" and src.info["magnification"] == 20
    assert src.info["storage_chunks"] == (240, 240, 3)
    region = src.array[1000:1300, 700:1000].compute()
    np.testing.assert_array_equal(region, svs_pixels[1000:1300, 700:1000])


def test_svs_region_decodes_only_touched_tiles(data_dir: Path, tile_reads: list[int]) -> None:
    src = open_image(data_dir / SVS)
    assert tile_reads == []  # opening decodes nothing
    src.array[300:556, 300:556].compute()
    # 240-px tiles: rows 1-2 and columns 1-2 of 13 x 10 tiles, not the 130 of the level.
    assert len(tile_reads) == 4


def test_svs_associated_images_are_not_the_default(data_dir: Path) -> None:
    info = describe(data_dir / SVS)
    names = [s["name"] for s in info["series"]]
    assert names == ["Baseline", "Thumbnail", "Label", "Macro"]
    assert [s["associated"] for s in info["series"]] == [False, True, True, True]
    assert info["default_series"] == 0
    thumb = open_image(data_dir / SVS, series=1)
    assert thumb.shape == (768, 574, 3) and thumb.pixel_size == {}
    with pytest.raises(InputError, match="has no series 7") as err:
        open_image(data_dir / SVS, series=7)
    assert str(data_dir / SVS) in str(err.value)


def test_jpeg2000_svs_levels(data_dir: Path) -> None:
    path = data_dir / SVS_J2K
    src = open_image(path, level=1)
    assert src.levels == ((3567, 4443, 3), (1783, 2221, 3))
    assert src.shape == (1783, 2221, 3) and src.info["compression"] == "APERIO_JP2000_RGB"
    assert src.pixel_size == {}  # this slide's description carries no MPP
    expected = tifffile.imread(path, level=1)
    np.testing.assert_array_equal(src.array[500:800, 1900:].compute(), expected[500:800, 1900:])


def test_ome_tiff_pyramid(data_dir: Path) -> None:
    path = data_dir / OME_TIFF
    src = open_image(path)
    assert src.format == "ome-tiff" and src.axes == "yxc"
    assert src.levels == ((2967, 2220, 3), (1483, 1110, 3), (741, 555, 3))
    assert src.pixel_size == pytest.approx({"y": 0.499, "x": 0.499})
    low = open_image(path, level=2)
    # derived from the real shape ratio, not the nominal factor 4
    assert low.pixel_size == pytest.approx({"y": 0.499 * 2967 / 741, "x": 0.499 * 2220 / 555})
    np.testing.assert_array_equal(
        low.array[100:300, 200:400].compute(), tifffile.imread(path, level=2)[100:300, 200:400]
    )


def test_describe_is_json(data_dir: Path) -> None:
    info = describe(data_dir / OME_TIFF)
    text = json.dumps(info)
    assert info["format"] == "ome-tiff"
    levels = info["series"][0]["levels"]
    assert [lv["shape"] for lv in levels] == [[2967, 2220, 3], [1483, 1110, 3], [741, 555, 3]]
    assert levels[0]["chunks"] == [256, 256, 3] and levels[0]["axes"] == "yxc"
    assert levels[0]["pixel_size"] == {"y": 0.499, "x": 0.499}
    assert "Baseline" in json.dumps(describe(data_dir / SVS)) and text


# --- real volumes ---------------------------------------------------------------------


def test_isbi_page_stack(data_dir: Path) -> None:
    src = open_image(data_dir / ISBI)
    assert (src.format, src.axes, src.shape, src.dtype) == ("tiff", "zyx", (30, 512, 512), "uint8")
    assert src.pixel_size == {}  # resolution unit NONE: not a physical size
    expected = tifffile.imread(data_dir / ISBI)
    region = np.s_[7:9, 100:300, 50:]
    np.testing.assert_array_equal(src.array[region].compute(), expected[region])


def test_imagej_hyperstack_spacing(data_dir: Path) -> None:
    src = open_image(data_dir / OVULE)
    assert (src.axes, src.shape) == ("zyx", (32, 128, 128))
    assert src.pixel_size == pytest.approx({"z": 0.235, "y": 0.15, "x": 0.15})
    assert src.info["vendor"] == "imagej"
    np.testing.assert_array_equal(src.array.compute(), tifffile.imread(data_dir / OVULE))


def test_name_with_spaces_and_brackets(data_dir: Path) -> None:
    path = data_dir / "nuclei2d/bbbc007/images/A9 p5d (cropped 1).tif"
    src = open_image(path)
    assert src.axes == "yx" and src.path == str(path)
    np.testing.assert_array_equal(src.array.compute(), tifffile.imread(path))


# --- the real OME-Zarr (bioformats2raw layout, NGFF 0.4, a level with a wrong scale) ---


def test_bioformats2raw_omezarr(data_dir: Path, svs_pixels: np.ndarray) -> None:
    src = open_image(data_dir / OME_ZARR)
    assert (src.format, src.series, src.axes) == ("ome-zarr", 0, "tczyx")
    assert src.shape == (1, 3, 1, 2967, 2220) and src.dtype == "uint8"
    assert src.info["storage_chunks"] == (1, 1, 1, 1024, 1024)
    assert src.info["ngff_version"] == "0.4"
    assert src.pixel_size == pytest.approx({"y": 0.499, "x": 0.499})  # z has no unit
    region = src.array[0, :, 0, 900:1200, 1000:1300].compute()
    np.testing.assert_array_equal(np.moveaxis(region, 0, -1), svs_pixels[900:1200, 1000:1300])
    names = [s["name"] for s in describe(data_dir / OME_ZARR)["series"]]
    assert names == ["", "macro image", "label image"]


def test_omezarr_level_scale_quirk(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        src = open_image(data_dir / OME_ZARR, level=1)
    assert src.shape == (1, 3, 1, 768, 574)
    # the file declares 0.998 µm (2x); the shapes say ~3.87x
    assert src.pixel_size["y"] == pytest.approx(0.499 * 2967 / 768)
    assert src.pixel_size["x"] == pytest.approx(0.499 * 2220 / 574)
    assert "declares" in caplog.text and "0.998" in caplog.text


# --- generated Zarr and OME-Zarr ---------------------------------------------------------


def _pixels(shape: tuple[int, ...], dtype: str = "uint16") -> np.ndarray:
    return np.random.default_rng(0).integers(0, 1000, shape).astype(dtype)


def test_zarr_v2_array(tmp_path: Path) -> None:
    data = _pixels((5, 70, 90))
    arr = zarr.create_array(
        tmp_path / "v2.zarr",
        shape=data.shape,
        chunks=(1, 32, 32),
        dtype=data.dtype,
        zarr_format=2,
        attributes={"_ARRAY_DIMENSIONS": ["z", "y", "x"]},
    )
    arr[:] = data
    src = open_image(tmp_path / "v2.zarr")
    assert (src.format, src.axes, src.dtype, src.pixel_size) == ("zarr", "zyx", "uint16", {})
    assert src.info["storage_chunks"] == (1, 32, 32)
    np.testing.assert_array_equal(src.array[1:3, 10:50, 5:77].compute(), data[1:3, 10:50, 5:77])


def test_zarr_v3_sharded_array(tmp_path: Path) -> None:
    data = _pixels((3, 100, 80), "uint8")
    arr = zarr.create_array(
        tmp_path / "v3.zarr",
        shape=data.shape,
        chunks=(3, 10, 10),
        shards=(3, 50, 40),
        dtype="uint8",
        zarr_format=3,
        dimension_names=["c", "y", "x"],
    )
    arr[:] = data
    src = open_image(tmp_path / "v3.zarr")
    assert src.axes == "cyx" and src.info["storage_chunks"] == (3, 50, 40)
    np.testing.assert_array_equal(src.array[:, 45:55, 30:70].compute(), data[:, 45:55, 30:70])


def test_zarr_without_dimension_names_guesses(tmp_path: Path) -> None:
    rgb = zarr.create_array(
        tmp_path / "rgb.zarr", shape=(40, 30, 3), chunks=(16, 16, 3), dtype="uint8", zarr_format=3
    )
    assert open_image(tmp_path / "rgb.zarr").axes == "yxc"
    zarr.create_array(tmp_path / "vol.zarr", shape=(8, 40, 30), chunks=(4, 16, 16), dtype="f4")
    assert open_image(tmp_path / "vol.zarr").axes == "zyx" and rgb.ndim == 3


def _write_ngff05(root: Path, data: np.ndarray, declared_factor: float) -> None:
    """An NGFF 0.5 image (czyx, nanometres) written with zarr 3 directly."""
    group = zarr.open_group(root, mode="w", zarr_format=3)
    levels = [data, data[:, :, ::2, ::2]]
    datasets = []
    for i, level in enumerate(levels):
        arr = group.create_array(
            str(i),
            shape=level.shape,
            chunks=(1, 1, 32, 32),
            dtype=level.dtype,
            dimension_names=list("czyx"),
        )
        arr[:] = level
        factor = 1 if i == 0 else declared_factor
        scale = [1.0, 400.0, 100.0 * factor, 100.0 * factor]
        transforms = [{"type": "scale", "scale": scale}]
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"
    ]
    image = {"name": "cells", "axes": axes, "datasets": datasets}
    group.attrs["ome"] = {"version": "0.5", "multiscales": [image]}


def test_ngff05_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _pixels((2, 4, 64, 96))
    _write_ngff05(tmp_path / "img.zarr", data, declared_factor=2)
    with caplog.at_level(logging.WARNING):
        src = open_image(tmp_path / "img.zarr")
        low = open_image(tmp_path / "img.zarr", level=1)
    assert "declares" not in caplog.text  # the declared scale matches the shapes
    assert (src.format, src.axes, src.info["ngff_version"]) == ("ome-zarr", "czyx", "0.5")
    assert src.levels == ((2, 4, 64, 96), (2, 4, 32, 48))
    assert src.pixel_size == pytest.approx({"z": 0.4, "y": 0.1, "x": 0.1})  # nm → µm
    assert low.pixel_size == pytest.approx({"z": 0.4, "y": 0.2, "x": 0.2})
    np.testing.assert_array_equal(low.array.compute(), data[:, :, ::2, ::2])


def test_ngff05_wrong_declared_scale_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_ngff05(tmp_path / "img.zarr", _pixels((1, 2, 64, 64)), declared_factor=3)
    with caplog.at_level(logging.WARNING):
        low = open_image(tmp_path / "img.zarr", level=1)
    assert low.pixel_size["y"] == pytest.approx(0.2)
    assert "declares y pixel size 0.3" in caplog.text


@pytest.mark.filterwarnings("ignore:Scale value not provided")
def test_ngff04_group_written_by_ome_zarr(tmp_path: Path) -> None:
    writer = pytest.importorskip("ome_zarr.writer")
    from ome_zarr.format import FormatV04

    data = _pixels((3, 64, 48), "uint8")
    group = zarr.open_group(tmp_path / "v04.zarr", mode="w", zarr_format=2)
    mm = {"y": "millimeter", "x": "millimeter"}
    writer.write_image(
        data,
        group,
        fmt=FormatV04(),
        axes="cyx",
        scale_factors=[2],
        scale={"y": 0.002, "x": 0.002},
        axes_units=mm,
    )
    src = open_image(tmp_path / "v04.zarr")
    assert (src.axes, src.shape, src.info["ngff_version"]) == ("cyx", (3, 64, 48), "0.4")
    assert src.pixel_size == pytest.approx({"y": 2.0, "x": 2.0})  # mm → µm
    np.testing.assert_array_equal(src.array.compute(), data)
    assert len(src.levels) == 2


# --- laziness on workers: pickling, caching, changed files ----------------------------


def test_array_pickles_and_reopens(data_dir: Path, svs_pixels: np.ndarray) -> None:
    src = open_image(data_dir / SVS)
    clone = pickle.loads(pickle.dumps(src.array))
    lazy._open_level.cache_clear()  # as on a fresh worker process
    np.testing.assert_array_equal(clone[:50, -50:].compute(), svs_pixels[:50, -50:])


def test_open_image_cached_follows_file_changes(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ovule.tif"
    shutil.copyfile(data_dir / OVULE, path)
    first = open_image_cached(path, None, 0)
    assert open_image_cached(path, None, 0) is first
    os.utime(path, ns=(1, 1))
    assert open_image_cached(path, None, 0) is not first


def test_file_changed_under_an_open_source(data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ovule.tif"
    shutil.copyfile(data_dir / OVULE, path)
    src = open_image(path)
    shutil.copyfile(data_dir / ISBI, path)
    with pytest.raises(InputError, match="changed") as err:
        src.array[0].compute()
    assert err.value.reason == "input-changed" and str(path) in str(err.value)


def test_array_reads_in_other_processes(data_dir: Path, svs_pixels: np.ndarray) -> None:
    """tifffile's store cannot be pickled; the source array must still reach workers."""
    src = open_image(data_dir / SVS)
    region = src.array[1000:1100, 2000:2200]
    got = region.compute(scheduler="processes", num_workers=1)
    np.testing.assert_array_equal(got, svs_pixels[1000:1100, 2000:2200])
