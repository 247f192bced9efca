"""Axis naming and the model layout (c + spatial), kept lazy."""

from __future__ import annotations

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import InputError
from pipeline.io.axes import select_axes
from pipeline.io.model_input import to_model_layout
from pipeline.io.sources import ImageSource, open_image


def _source(shape: tuple[int, ...], axes: str, **info) -> ImageSource:
    data = np.arange(int(np.prod(shape)), dtype="uint16").reshape(shape)
    return ImageSource(
        path="/data/img.tif",
        format="zarr",
        array=da.from_array(data, chunks=8),
        axes=axes,
        pixel_size={"z": 2.0, "y": 0.5, "x": 0.5},
        series=0,
        level=0,
        levels=(shape,),
        dtype="uint16",
        info=info,
    )


# --- select_axes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "shape", "index", "axes"),
    [
        ("yxs", (5, 6, 3), (slice(None),) * 3, "yxc"),
        ("iyx", (30, 5, 6), (slice(None),) * 3, "zyx"),  # a page stack is z
        ("izyx", (4, 3, 5, 6), (slice(None),) * 4, "tzyx"),  # ...unless z is named
        ("tczyx", (1, 3, 1, 5, 6), (slice(None),) * 5, "tczyx"),
        ("ayx", (1, 5, 6), (0, slice(None), slice(None)), "yx"),  # unknown singleton dropped
        ("cyxs", (2, 5, 6, 1), (slice(None),) * 3 + (0,), "cyx"),
    ],
)
def test_select_axes(labels: str, shape, index, axes: str) -> None:
    assert select_axes(list(labels), shape, "f.tif") == (index, axes)


@pytest.mark.parametrize(
    ("labels", "shape", "words"),
    [
        ("cyxs", (2, 5, 6, 3), "2 channels and 3 samples"),
        ("ayx", (4, 5, 6), "axis 'a' of length 4"),
        ("zc", (4, 3), "no y and x"),
    ],
)
def test_select_axes_refuses(labels: str, shape, words: str) -> None:
    with pytest.raises(InputError, match=words) as err:
        select_axes(list(labels), shape, "f.tif")
    assert "f.tif" in str(err.value)


# --- to_model_layout --------------------------------------------------------------------


def test_rgb_slide_becomes_cyx(data_dir: Path) -> None:
    src = open_image(data_dir / "wsi/CMU-1-Small-Region.svs")
    array, spatial, pixel_size = to_model_layout(src, ndim=2, in_channels=3)
    assert isinstance(array, da.Array) and spatial == "yx"
    assert array.shape == (3, 2967, 2220)
    assert pixel_size == pytest.approx({"y": 0.499, "x": 0.499})
    expected = tifffile.imread(data_dir / "wsi/CMU-1-Small-Region.svs")[100:150, 200:260]
    np.testing.assert_array_equal(array[:, 100:150, 200:260].compute(), expected.transpose(2, 0, 1))


def test_omezarr_tczyx_drops_t_and_z(data_dir: Path) -> None:
    src = open_image(data_dir / "omezarr/CMU-1-Small-Region.ome.zarr")
    array, spatial, pixel_size = to_model_layout(src, ndim=2, in_channels=3)
    assert (array.shape, spatial) == ((3, 2967, 2220), "yx")
    assert set(pixel_size) == {"y", "x"}


def test_volume_with_2d_model_keeps_z(data_dir: Path) -> None:
    src = open_image(data_dir / "volume3d/ovule_raw.tif")
    array, spatial, pixel_size = to_model_layout(src, ndim=2, in_channels=1)
    assert (array.shape, spatial) == ((1, 32, 128, 128), "zyx")
    assert pixel_size == pytest.approx({"z": 0.235, "y": 0.15, "x": 0.15})
    array3, spatial3, _ = to_model_layout(src, ndim=3, in_channels=1)
    assert (array3.shape, spatial3) == ((1, 32, 128, 128), "zyx")


def test_channel_last_volume_is_transposed() -> None:
    src = _source((4, 5, 6, 2), "zyxc")
    array, spatial, pixel_size = to_model_layout(src, ndim=3, in_channels=2)
    assert (array.shape, spatial) == ((2, 4, 5, 6), "zyx")
    np.testing.assert_array_equal(array.compute(), src.array.compute().transpose(3, 0, 1, 2))
    assert pixel_size == {"z": 2.0, "y": 0.5, "x": 0.5}


def test_single_plane_z_is_dropped_for_2d() -> None:
    array, spatial, pixel_size = to_model_layout(_source((1, 5, 6), "zyx"), 2, 1)
    assert (array.shape, spatial, pixel_size) == ((1, 5, 6), "yx", {"y": 0.5, "x": 0.5})


def test_3d_model_on_2d_image_is_refused() -> None:
    for shape, axes in (((5, 6, 3), "yxc"), ((1, 5, 6), "zyx")):
        with pytest.raises(InputError, match="2D image but the model is 3D") as err:
            to_model_layout(_source(shape, axes), ndim=3, in_channels=0)
        assert "/data/img.tif" in str(err.value) and err.value.hint


def test_time_series_is_refused() -> None:
    with pytest.raises(InputError, match="time series of 3") as err:
        to_model_layout(_source((3, 1, 5, 6), "tcyx"), ndim=2, in_channels=1)
    assert err.value.hint
    array, _, _ = to_model_layout(_source((1, 2, 5, 6), "tcyx"), ndim=2, in_channels=2)
    assert array.shape == (2, 5, 6)


def test_channel_mismatch(data_dir: Path) -> None:
    src = open_image(data_dir / "wsi/CMU-1-Small-Region.svs")
    with pytest.raises(InputError) as err:
        to_model_layout(src, ndim=2, in_channels=1)
    assert err.value.reason == "channel-mismatch"
    assert "got 3 channels, model expects 1" in str(err.value)
    assert str(data_dir / "wsi/CMU-1-Small-Region.svs") in str(err.value)
    array, _, _ = to_model_layout(src, ndim=2, in_channels=0)  # 0 = any
    assert array.shape[0] == 3


def test_rgba_tiff_drops_alpha_for_rgb_model(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 255, (40, 30, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    array, _, _ = to_model_layout(open_image(tmp_path / "rgba.tif"), ndim=2, in_channels=3)
    np.testing.assert_array_equal(array.compute(), rgba[..., :3].transpose(2, 0, 1))


def test_cmyk_and_4_channel_stacks_are_not_taken_for_rgba(tmp_path: Path) -> None:
    cmyk = np.zeros((40, 30, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "cmyk.tif", cmyk, photometric="separated")
    zarr.create_array(
        tmp_path / "four.zarr", shape=(4, 40, 30), dtype="u1", dimension_names=["c", "y", "x"]
    )
    for path in (tmp_path / "cmyk.tif", tmp_path / "four.zarr"):
        with pytest.raises(InputError, match="got 4 channels, model expects 3") as err:
            to_model_layout(open_image(path), ndim=2, in_channels=3)
        assert err.value.reason == "channel-mismatch"


def test_model_layout_reads_only_the_tiles_under_a_window(
    data_dir: Path, tile_reads: list[int]
) -> None:
    """Moving axes with dask (transpose) defeated slice fusion: a 256 x 256 window
    decoded its whole 16 MiB dask chunk (100 tiles). The layout view reads 4."""
    from pipeline.core.geometry import Region
    from pipeline.engine.device_section import read_box

    reads = tile_reads
    src = open_image(data_dir / "wsi/CMU-1-Small-Region.svs")
    array, _, _ = to_model_layout(src, ndim=2, in_channels=3)
    box = read_box(array, Region((300, 300), (256, 256)))  # inside the image: no mirroring
    assert box.index == [None, None]
    block = box.data
    assert len(reads) == 4  # 240-px tiles: rows 1-2, columns 1-2
    expected = tifffile.imread(data_dir / "wsi/CMU-1-Small-Region.svs")[300:556, 300:556]
    np.testing.assert_array_equal(block, expected.transpose(2, 0, 1))
