"""Running at a physical resolution: level choice, area resampling, pixel sizes, InputRef."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import dask
import numpy as np
import pytest
import tifffile
import zarr
from conftest import write_zarr

from pipeline.errors import InputError
from pipeline.io import lazy, model_view
from pipeline.io.model_input import InputRef, open_for_model
from pipeline.io.resample import AreaAxis

SVS = "wsi/CMU-1-Small-Region.svs"
OME_TIFF = "wsi/CMU-1-Small-Region.pyramid.ome.tif"
OME_ZARR = "omezarr/CMU-1-Small-Region.ome.zarr"
ISBI = "isbi2012/train-volume.tif"
OVULE = "volume3d/ovule_raw.tif"


def area_matrix(n: int, factor: float, size: int) -> np.ndarray:
    """Oracle: (size, n) weights, output pixel i = mean over source [i f, (i+1) f) ∩ [0, n)."""
    start = np.arange(size)[:, None] * factor
    end = np.minimum(start + factor, n)
    j = np.arange(n)[None, :]
    overlap = np.clip(np.minimum(end, j + 1) - np.maximum(start, j), 0, None)
    return overlap / (end - start)


def area_oracle(image: np.ndarray, fy: float, fx: float, shape: tuple[int, int]) -> np.ndarray:
    """(C, y, x) image reduced by the oracle weights, in float64."""
    wy = area_matrix(image.shape[1], fy, shape[0])
    wx = area_matrix(image.shape[2], fx, shape[1])
    return wy @ image.astype(np.float64) @ wx.T


# --- the area filter ------------------------------------------------------------------------


def test_area_axis_weights_sum_to_one_and_cover_the_source() -> None:
    axis = AreaAxis.between(1000, 0.499, 1.0)
    assert axis.size == round(1000 * 0.499)
    first, w = axis.weights(0, axis.size)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    covered = np.zeros(1000)
    for i in range(axis.size):
        for k in range(axis.taps):
            if first[i] + k < 1000:
                width = min((i + 1) * axis.factor, 1000) - i * axis.factor
                covered[first[i] + k] += w[i, k] * width
    np.testing.assert_allclose(covered[:-1], 1.0)  # every source pixel counted once


@pytest.mark.parametrize(
    ("mpp", "chunks"), [(1.37, (1, 16, 16)), (2.0, (1, 7, 9)), (5.3, (1, 64, 64))]
)
def test_resampling_matches_the_area_oracle(tmp_path: Path, mpp: float, chunks) -> None:
    data = np.random.default_rng(0).random((2, 61, 83)).astype(np.float32)
    path = write_zarr(tmp_path / "img.zarr", data, chunks)
    model = open_for_model(path, ndim=2, in_channels=2, mpp=mpp, mpp_input=0.5)
    f = mpp / 0.5
    shape = (round(61 / f), round(83 / f))
    assert model.array.shape == (2, *shape) and model.array.dtype == np.float32
    assert model.pixel_size == {"y": mpp, "x": mpp} and model.factor == pytest.approx(f)
    np.testing.assert_allclose(model.array.compute(), area_oracle(data, f, f, shape), rtol=1e-6)


def test_integer_factor_is_the_block_mean(tmp_path: Path) -> None:
    data = np.random.default_rng(1).random((1, 64, 48))
    path = write_zarr(tmp_path / "img.zarr", data, (1, 16, 16))
    model = open_for_model(path, ndim=2, in_channels=1, mpp=2.0, mpp_input=1.0)
    blocks = data.reshape(1, 32, 2, 24, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(model.array.compute(), blocks, rtol=1e-12)


def test_no_seams_any_window_and_any_chunking_gives_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = np.random.default_rng(2).integers(0, 65535, (3, 301, 257), dtype=np.uint16)
    path = write_zarr(tmp_path / "img.zarr", data, (3, 32, 32))
    model = open_for_model(path, ndim=2, in_channels=3, mpp=0.5 * 2.37, mpp_input=0.5)
    whole = model.array.compute()
    assert whole.dtype == np.uint16
    np.testing.assert_array_equal(  # rounded from the float oracle
        whole, np.rint(area_oracle(data, 2.37, 2.37, whole.shape[1:])).astype(np.uint16)
    )
    rng = np.random.default_rng(3)
    for _ in range(12):
        y0, x0 = rng.integers(0, whole.shape[1] - 1), rng.integers(0, whole.shape[2] - 1)
        y1, x1 = rng.integers(y0 + 1, whole.shape[1] + 1), rng.integers(x0 + 1, whole.shape[2] + 1)
        window = model.array[:, y0:y1, x0:x1].compute()
        np.testing.assert_array_equal(window, whole[:, y0:y1, x0:x1])
    monkeypatch.setattr(lazy, "DASK_CHUNK_BYTES", 4096)  # many small chunks, other borders
    small = open_for_model(path, ndim=2, in_channels=3, mpp=0.5 * 2.37, mpp_input=0.5)
    assert len(small.array.chunks[1]) > 1
    np.testing.assert_array_equal(small.array.compute(), whole)


def test_large_factor_reads_in_bands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = np.random.default_rng(4).random((1, 200, 120)).astype(np.float32)
    path = write_zarr(tmp_path / "img.zarr", data, (1, 50, 50))
    expected = open_for_model(path, ndim=2, in_channels=1, mpp=9.7, mpp_input=1.0).array.compute()
    monkeypatch.setattr(model_view, "RESAMPLE_BAND_BYTES", 2000)  # a few output rows per step
    banded = open_for_model(path, ndim=2, in_channels=1, mpp=9.7, mpp_input=1.0)
    np.testing.assert_array_equal(banded.array.compute(), expected)


# --- choosing the level on real files -------------------------------------------------------


def test_svs_at_one_micrometre(data_dir: Path) -> None:
    model = open_for_model(data_dir / SVS, ndim=2, in_channels=3, mpp=1.0)
    assert model.array.shape == (3, round(2967 * 0.499), round(2220 * 0.499)) == (3, 1481, 1108)
    assert (model.level, model.pixel_size) == (0, {"y": 1.0, "x": 1.0})
    assert model.factor == pytest.approx(1 / 0.499)
    assert model.ref == InputRef(str(data_dir / SVS), 0, 0, 2, 3, None, 1.0, None)
    window = model.array[:, 500:540, 300:350].compute()
    f = 1 / 0.499
    ys, xs = math.floor(500 * f), math.floor(300 * f)
    source = tifffile.imread(data_dir / SVS)[ys : ys + 90, xs : xs + 110].transpose(2, 0, 1)
    # the oracle on a crop: its weights are shifted by the crop's origin
    wy = area_matrix(2967, f, 1481)[500:540, ys : ys + 90]
    wx = area_matrix(2220, f, 1108)[300:350, xs : xs + 110]
    expected = wy @ source.astype(np.float64) @ wx.T
    np.testing.assert_array_equal(window, np.rint(expected).astype(np.uint8))


def test_ome_tiff_pyramid_levels_match_or_resample(data_dir: Path) -> None:
    path = data_dir / OME_TIFF
    at1 = open_for_model(path, ndim=2, in_channels=3, mpp=1.0)
    assert (at1.level, at1.factor, at1.array.shape) == (1, 1.0, (3, 1483, 1110))
    assert at1.pixel_size == pytest.approx({"y": 0.998, "x": 0.998}, rel=1e-3)  # the level's own
    at2 = open_for_model(path, ndim=2, in_channels=3, mpp=2.0)
    assert (at2.level, at2.factor) == (2, 1.0)
    between = open_for_model(path, ndim=2, in_channels=3, mpp=1.5)
    assert between.level == 1
    assert between.factors == pytest.approx({"y": 1.5 / (0.499 * 2967 / 1483), "x": 1.5 / 0.998})
    assert between.array.shape == (3, round(2967 * 0.499 / 1.5), round(2220 * 0.499 / 1.5))


def test_omezarr_wrong_declared_scale_is_not_trusted(data_dir: Path) -> None:
    # level 1 declares 0.998 µm (2x) but is 768 x 574: 1.93 µm, too coarse for 1.0
    model = open_for_model(data_dir / OME_ZARR, ndim=2, in_channels=3, mpp=1.0)
    assert (model.level, model.array.shape) == (0, (3, 1481, 1108))
    true = 0.499 * 2967 / 768
    coarse = open_for_model(data_dir / OME_ZARR, ndim=2, in_channels=3, mpp=true)
    assert (coarse.level, coarse.factor) == (1, 1.0)


def test_inconsistent_levels_resample_each_axis(tmp_path: Path) -> None:
    """B12: a level declared 2x that is 3x in y and 2.5x in x."""
    group = zarr.open_group(tmp_path / "odd.zarr", mode="w", zarr_format=3)
    data = np.random.default_rng(5).integers(0, 255, (1, 300, 250), dtype=np.uint8)
    group.create_array("0", data=data, chunks=(1, 64, 64))
    group.create_array("1", data=data[:, ::3, ::2][:, :, :100].copy(), chunks=(1, 64, 64))
    axes = [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, s, s]}]}
        for i, s in ((0, 0.5), (1, 1.0))
    ]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    model = open_for_model(tmp_path / "odd.zarr", ndim=2, in_channels=1, mpp=2.0)
    assert model.level == 1  # y 1.5 µm, x 1.25 µm: both finer than 2.0
    assert model.factors == pytest.approx({"y": 2.0 / 1.5, "x": 2.0 / 1.25})
    assert model.array.shape == (1, round(300 * 0.5 / 2), round(250 * 0.5 / 2))


def test_upsampling_is_refused(data_dir: Path) -> None:
    with pytest.raises(InputError) as err:
        open_for_model(data_dir / SVS, ndim=2, in_channels=3, mpp=0.25)
    message = str(err.value)
    assert err.value.reason == "resolution-unavailable"
    assert str(data_dir / SVS) in message and "0.499" in message and "--level 0" in message
    with pytest.raises(InputError, match="model's training resolution 0.25"):
        open_for_model(data_dir / SVS, ndim=2, in_channels=3, model_mpp=0.25)


def test_model_mpp_is_the_default_and_level_overrides_it(data_dir: Path) -> None:
    by_model = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, model_mpp=2.0)
    assert by_model.level == 2
    chosen = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, level=0, model_mpp=2.0)
    assert (chosen.level, chosen.factor) == (0, 1.0)
    explicit = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, mpp=1.0, model_mpp=2.0)
    assert explicit.level == 1
    ignored = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, model_mpp="n/a")
    assert ignored.level == 0


def test_level_out_of_range_names_the_levels(data_dir: Path) -> None:
    with pytest.raises(InputError) as err:
        open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, level=5)
    message = str(err.value)
    assert "has no level 5" in message and "0 = 2967 x 2220 (0.499 µm/px)" in message
    assert "2 = 741 x 555" in message and str(data_dir / OME_TIFF) in message


# --- pixel sizes: missing, implausible, given by the user (B11) ------------------------------


def test_missing_pixel_size(data_dir: Path) -> None:
    with pytest.raises(InputError) as err:
        open_for_model(data_dir / ISBI, ndim=2, in_channels=1, mpp=1.0)
    assert err.value.reason == "missing-pixel-size"
    assert "does not state its pixel size" in str(err.value) and "--mpp-input" in str(err.value)
    plain = open_for_model(data_dir / ISBI, ndim=2, in_channels=1)  # no --mpp: fine
    assert plain.pixel_size == {} and plain.array.shape == (1, 30, 512, 512)
    given = open_for_model(data_dir / ISBI, ndim=2, in_channels=1, mpp=8.0, mpp_input=4.0)
    assert given.array.shape == (1, 30, 256, 256)  # z is never resampled
    assert given.pixel_size == {"y": 8.0, "x": 8.0}


@pytest.mark.parametrize(("per_cm", "shown"), [(1e-3, "1e+07 µm"), (0.0, "inf µm")])
def test_implausible_pixel_size(tmp_path: Path, per_cm: float, shown: str) -> None:
    path = tmp_path / "odd.tif"
    tifffile.imwrite(
        path, np.zeros((32, 32), np.uint8), resolution=(per_cm, per_cm), resolutionunit="CENTIMETER"
    )
    with pytest.raises(InputError) as err:
        open_for_model(path, ndim=2, in_channels=1, mpp=1.0)
    assert err.value.reason == "missing-pixel-size"
    assert "implausible pixel size" in str(err.value) and shown in str(err.value)
    assert open_for_model(path, ndim=2, in_channels=1).pixel_size == {}
    fixed = open_for_model(path, ndim=2, in_channels=1, mpp=1.0, mpp_input=0.5)
    assert fixed.array.shape == (1, 16, 16)


def test_mpp_input_overrides_the_file(data_dir: Path) -> None:
    model = open_for_model(data_dir / SVS, ndim=2, in_channels=3, mpp=0.5, mpp_input=0.25)
    assert model.array.shape == (3, round(2967 / 2), round(2220 / 2))
    assert model.factor == pytest.approx(2.0)
    same = open_for_model(data_dir / SVS, ndim=2, in_channels=3, mpp_input=0.25)
    assert same.pixel_size == {"y": 0.25, "x": 0.25} and same.factor == 1.0
    level2 = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, level=2, mpp_input=0.25)
    assert level2.pixel_size == pytest.approx({"y": 0.25 * 2967 / 741, "x": 0.25 * 2220 / 555})


def test_volume_keeps_z_spacing(data_dir: Path) -> None:
    model = open_for_model(data_dir / OVULE, ndim=3, in_channels=1, mpp=0.3)
    assert model.spatial_axes == "zyx" and model.array.shape == (1, 32, 64, 64)
    assert model.pixel_size == pytest.approx({"z": 0.235, "y": 0.3, "x": 0.3})


# --- InputRef on workers --------------------------------------------------------------------


def _read_in_worker(ref: InputRef) -> np.ndarray:
    return ref.open()[:, 100:140, 200:260].compute()


def test_input_ref_rebuilds_the_same_array_elsewhere(data_dir: Path) -> None:
    model = open_for_model(data_dir / SVS, ndim=2, in_channels=3, mpp=1.3)
    expected = model.array[:, 100:140, 200:260].compute()
    clone = pickle.loads(pickle.dumps(model.ref))
    assert clone == model.ref and clone.open() is model.ref.open()  # cached per process
    assert clone.open().name == model.array.name
    # a fresh process (dask's process pool spawns), with only the pickled ref to go on
    (got,) = dask.compute(
        dask.delayed(_read_in_worker)(model.ref), scheduler="processes", num_workers=1
    )
    np.testing.assert_array_equal(got, expected)


def test_identity_prediction_through_the_resampled_input(data_dir: Path) -> None:
    from pipeline.config import RunConfig
    from pipeline.predict import predict_array

    model = open_for_model(data_dir / OME_TIFF, ndim=2, in_channels=3, mpp=3.1, level=None)
    out = predict_array(model.array, cfg=RunConfig(backend="identity", tile=128))
    np.testing.assert_array_equal(out, model.array.compute())


def test_ngff_scale_of_zero_is_reported(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "zero.zarr", mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((1, 32, 32), np.uint8), chunks=(1, 32, 32))
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "yx"
    ]
    scale = [{"type": "scale", "scale": [1.0, 0.0, 0.0]}]
    image = {"axes": axes, "datasets": [{"path": "0", "coordinateTransformations": scale}]}
    group.attrs["ome"] = {"version": "0.5", "multiscales": [image]}
    with pytest.raises(InputError, match=r"implausible pixel size \(y = 0 µm, x = 0 µm") as err:
        open_for_model(tmp_path / "zero.zarr", ndim=2, in_channels=1, mpp=1.0)
    assert err.value.reason == "missing-pixel-size"
