"""Tissue detection against synthetic slides with a known truth, the real slides, the
mask geometry (a tile with tissue is never skipped; crops answer as the whole mask),
NGFF labels read back with ome-zarr, and user masks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tifffile
import zarr
from conftest import write_tiff

from pipeline.core.geometry import Region
from pipeline.engine import tissue
from pipeline.engine.tissue import TissueMask, detect_tissue, load_user_mask
from pipeline.errors import ConfigError, InputError
from pipeline.io import ngff, sink
from pipeline.io.labels import write_tissue_labels
from pipeline.io.model_input import open_for_model, open_level
from pipeline.io.sources import open_image

GLASS = (240, 235, 240)
PINK = (225, 150, 200)
PALE = (235, 200, 225)  # faint eosin: the hardest tissue to tell from glass
PURPLE = (110, 60, 150)


def _ellipse(shape, centre, radii):
    y, x = np.ogrid[: shape[0], : shape[1]]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1


def _stain(truth, rng, pale=None):
    """H&E-like RGB: glass with noise; tissue pink with purple 8-px nuclei."""
    h, w = truth.shape
    nuclei = np.repeat(np.repeat(rng.random((-(-h // 8), -(-w // 8))) < 0.15, 8, 0), 8, 1)
    image = np.empty((h, w, 3), np.int16)
    image[:] = GLASS
    image[truth] = PINK
    if pale is not None:
        image[truth & pale] = PALE
    image[truth & nuclei[:h, :w]] = PURPLE
    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_pyramid(path, image, pixel_um, factors=(2, 4, 8)):
    meta = {
        "axes": "YXS" if image.ndim == 3 else "YX",
        "PhysicalSizeX": pixel_um,
        "PhysicalSizeY": pixel_um,
    }
    photometric = "rgb" if image.ndim == 3 else "minisblack"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            image, tile=(256, 256), subifds=len(factors), photometric=photometric, metadata=meta
        )
        for k in factors:
            h, w = (image.shape[0] // k) * k, (image.shape[1] // k) * k
            small = image[:h, :w].reshape(h // k, k, w // k, k, *image.shape[2:]).mean((1, 3))
            tif.write(
                small.astype(image.dtype), tile=(256, 256), subfiletype=1, photometric=photometric
            )
    return path


def _block_mean(truth, scale):
    """Truth on the mask grid: a cell is tissue when most of it is."""
    k = int(scale)
    h, w = -(-truth.shape[0] // k) * k, -(-truth.shape[1] // k) * k
    padded = np.zeros((h, w), bool)
    padded[: truth.shape[0], : truth.shape[1]] = truth
    return padded.reshape(h // k, k, w // k, k).mean((1, 3)) >= 0.5


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 2048x3072 px pyramidal slide at 1 µm/px: two tissue pieces, about a quarter."""
    rng = np.random.default_rng(1)
    shape = (2048, 3072)
    truth = _ellipse(shape, (900, 1100), (600, 700)) | _ellipse(shape, (1600, 2500), (300, 300))
    pale = _ellipse(shape, (700, 800), (200, 250))
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    _write_pyramid(path, _stain(truth, rng, pale), 1.0)
    return path, truth


@pytest.fixture(scope="module")
def slide_mask(slide):
    path, truth = slide
    source = open_image(path)
    return detect_tissue(source, truth.shape), truth


def test_brightfield_fraction_and_mask_match_truth(slide_mask):
    mask, truth = slide_mask
    assert mask.method == "otsu-od"
    assert mask.scale == (8.0, 8.0)  # 8 µm cells from the 1/8 level, no full decode
    assert mask.fraction == pytest.approx(truth.mean(), abs=0.05)
    assert 0.20 <= mask.fraction <= 0.30
    assert _iou(mask.mask, _block_mean(truth, 8)) > 0.9


def test_any_in_never_misses_tissue(slide_mask):
    mask, truth = slide_mask
    rng = np.random.default_rng(2)
    image = Region.of_shape(truth.shape)
    skipped = 0
    for _ in range(3000):
        size = rng.integers(1, 400, size=2)
        offset = rng.integers(-200, np.array(truth.shape) + 50, size=2)
        region = Region(offset, size)
        inside = region.intersect(image)
        has = not inside.empty and truth[inside.to_slices()].any()
        if has:
            assert mask.any_in(region), region
        skipped += not mask.any_in(region)
    assert skipped > 300  # and glass is actually skipped


def test_crop_answers_like_the_whole_mask(slide_mask):
    mask, _ = slide_mask
    rng = np.random.default_rng(3)
    for _ in range(40):
        block = Region(rng.integers(-100, 2000, size=2), rng.integers(1, 700, size=2))
        part = mask.crop(block)
        assert part.mask.size <= (block.shape[0] / 8 + 4) * (block.shape[1] / 8 + 4)
        np.testing.assert_array_equal(part.upsample(block), mask.upsample(block))
        for _ in range(10):
            sub = Region(
                np.array(block.offset) + rng.integers(0, block.shape), rng.integers(1, 64, size=2)
            ).intersect(block)
            assert part.any_in(sub) == mask.any_in(sub)


def test_upsample_zeroes_glass_keeps_tissue(slide_mask):
    mask, truth = slide_mask
    up = mask.upsample(Region.of_shape(truth.shape))
    assert up.shape == truth.shape
    assert up[truth].mean() > 0.99  # tissue output survives
    assert (~up[~truth]).mean() > 0.95  # glass output is zeroed


def test_resampled_run_grid_and_given_pixel_size(slide):
    """A run grid resampled to 2 µm/px (--mpp 2): cells stay at 8 µm, i.e. 4 run pixels;
    a pixel size given by the caller (--mpp-input) wins over the file's."""
    path, truth = slide
    source = open_image(path)
    half = (truth.shape[0] // 2, truth.shape[1] // 2)
    mask = detect_tissue(source, half)
    assert mask.scale == (4.0, 4.0)
    assert mask.fraction == pytest.approx(truth.mean(), abs=0.05)
    coarse = detect_tissue(source, truth.shape, pixel_size={"y": 0.25, "x": 0.25})
    assert coarse.scale == (32.0, 32.0)  # 8 µm at 0.25 µm/px


@pytest.mark.parametrize("fill", ["tissue", "glass"])
def test_no_background_means_all_tissue(tmp_path, fill):
    """Uniform tissue (Otsu splits noise or stain shades) and blank glass: skip nothing."""
    rng = np.random.default_rng(4)
    truth = np.full((600, 900), fill == "tissue")
    path = tmp_path / "uniform.tif"
    write_tiff(path, _stain(truth, rng), um=0.5, photometric="rgb", tile=(256, 256))
    source = open_image(path)
    assert len(source.levels) == 1  # single level: averaged down lazily
    mask = detect_tissue(source, (600, 900))
    assert mask.fraction == pytest.approx(1.0)
    assert mask.method == "otsu-od:no-background"
    assert mask.any_in(Region((0, 0), (16, 16)))


def test_fluorescence_16bit(tmp_path):
    rng = np.random.default_rng(5)
    shape = (1024, 1024)
    truth = _ellipse(shape, (500, 450), (300, 330))
    image = 100 + rng.integers(0, 40, size=shape)  # camera offset + noise
    cells = np.repeat(np.repeat(rng.random((128, 128)) < 0.3, 8, 0), 8, 1)
    image[truth] += 500 + 2500 * cells[truth]  # cytoplasm + nuclei
    path = tmp_path / "fluo.tif"
    write_tiff(path, image.astype(np.uint16), um=0.65, photometric="minisblack")
    mask = detect_tissue(open_image(path), shape)
    assert mask.method == "fluorescence-threshold"
    assert mask.fraction == pytest.approx(truth.mean(), abs=0.05)
    up = mask.upsample(Region.of_shape(shape))
    assert up[truth].mean() > 0.99 and (~up[~truth]).mean() > 0.9


def test_fluorescence_without_contrast_is_all_tissue(tmp_path):
    rng = np.random.default_rng(6)
    image = (1000 + rng.normal(0, 30, size=(512, 512))).astype(np.uint16)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, image)
    mask = detect_tissue(open_image(path), image.shape, kind="fluorescence")
    assert mask.fraction == 1.0 and mask.method.endswith(":no-background")


def test_bad_kind_and_volumes_are_refused(tmp_path):
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, np.zeros((4, 64, 64), np.uint8), photometric="minisblack")
    source = open_image(path)
    with pytest.raises(ConfigError, match="kind"):
        detect_tissue(source, (64, 64), kind="magic")
    with pytest.raises(InputError, match="2D"):
        detect_tissue(source, (4, 64, 64))
    with pytest.raises(InputError, match="4 planes"):
        detect_tissue(source, (64, 64))


@pytest.mark.slow
def test_real_slide_fraction(data_dir):
    source = open_image(data_dir / "wsi/CMU-1-Small-Region.svs")
    mask = detect_tissue(source, source.shape[:2])
    print(
        f"CMU-1-Small-Region.svs: tissue fraction {mask.fraction:.3f} ({mask.method}, "
        f"{mask.mask.shape} cells of {mask.scale})"
    )
    # the section covers a bit less than half of the field (thumbnail checked by eye)
    assert 0.2 < mask.fraction < 0.95
    assert mask.method == "otsu-od" and mask.scale == (16.0, 16.0)  # 0.499 µm -> ~8 µm
    corner = Region((0, 0), (256, 256))  # glass in the top-left corner
    assert not mask.any_in(corner)
    # the same pixels as a pyramidal OME-TIFF: another level path, the same answer
    pyramid = open_image(data_dir / "wsi/CMU-1-Small-Region.pyramid.ome.tif")
    again = detect_tissue(pyramid, pyramid.shape[:2])
    assert again.fraction == pytest.approx(mask.fraction, abs=0.02)


@pytest.mark.slow
def test_real_slide_without_pixel_size(data_dir):
    """JPEG 2000 SVS without a pixel size: 16 run pixels per cell, from the 2x level."""
    source = open_image(data_dir / "wsi/tcga-cr-7395-01a-01-ts1.svs")
    mask = detect_tissue(source, source.shape[:2])
    print(f"tcga-cr-7395: tissue fraction {mask.fraction:.3f} ({mask.mask.shape} cells)")
    assert mask.scale == pytest.approx((16.0, 16.0), rel=1e-3)
    assert 0.4 < mask.fraction < 0.9


# --------------------------------------------------------------------------- model's pixels


@pytest.fixture(scope="module")
def colour_models(tmp_path_factory):
    """The same slide three ways: a palette TIFF and the RGB it maps to; and a
    MINISWHITE fluorescence image (stored inverted) and the plain gray it means."""
    folder = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(11)
    shape = (1024, 1536)
    truth = _ellipse(shape, (500, 700), (330, 450))
    rgb = _stain(truth, rng)
    # palette: 256 colours between glass and nuclei; each pixel the nearest on the line
    line = np.linspace(0.0, 1.0, 256)[:, None]
    colours = np.rint(np.array(GLASS) * (1 - line) + np.array(PURPLE) * line).astype(np.uint8)
    ink = (np.array(GLASS, float) - rgb.astype(float)) @ (np.array(GLASS) - np.array(PURPLE))
    index = np.clip(np.rint(ink / ink.max() * 255), 0, 255).astype(np.uint8)
    mapped = colours[index]  # what the palette image looks like
    cmap = colours.T.astype(np.uint16) * 257  # TIFF colour maps are 16-bit
    bright = (20 + rng.integers(0, 15, size=shape)).astype(np.uint8)  # dark background
    bright[truth] = 150 + rng.integers(0, 60, size=int(truth.sum()))  # bright cells
    at = {"um": 1.0, "tile": (256, 256)}
    return {
        "palette": write_tiff(folder / "p.tif", index, photometric="palette", colormap=cmap, **at),
        "rgb": write_tiff(folder / "rgb.tif", mapped, photometric="rgb", **at),
        "miniswhite": write_tiff(folder / "inv.tif", 255 - bright, photometric="miniswhite", **at),
        "gray": write_tiff(folder / "gray.tif", bright, photometric="minisblack", **at),
        "truth": truth,
        "mapped": mapped,
        "bright": bright,
    }


@pytest.mark.parametrize(("converted", "plain"), [("palette", "rgb"), ("miniswhite", "gray")])
def test_tissue_detection_sees_the_models_pixels(colour_models, converted, plain):
    """Detection reads a palette image through its colour map and a MINISWHITE image
    inverted, as the model does: it finds the same tissue as on the plain image those
    pixels mean (reading the stored indices or the inverted values would not)."""
    truth = colour_models["truth"]
    model = open_for_model(colour_models[converted], ndim=2, in_channels=0)
    expected = colour_models["mapped" if plain == "rgb" else "bright"]
    expected = expected.transpose(2, 0, 1) if expected.ndim == 3 else expected[None]
    np.testing.assert_array_equal(model.array.compute(), expected)  # the model's input
    # the detection view at the model's level is that same array
    np.testing.assert_array_equal(open_level(model.ref, 0).array.compute(), expected)
    seen = detect_tissue(model, truth.shape)
    again = detect_tissue(open_image(colour_models[converted]), truth.shape)
    reference = detect_tissue(open_image(colour_models[plain]), truth.shape)
    assert seen.method == again.method == reference.method
    assert not seen.method.endswith(":no-background")
    np.testing.assert_array_equal(seen.mask, reference.mask)
    np.testing.assert_array_equal(again.mask, reference.mask)
    assert seen.scale == reference.scale == (8.0, 8.0)
    assert _iou(seen.mask, _block_mean(truth, 8)) > 0.9


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("scale", [(16.0, 16.0), (16.016, 15.97), (3.87, 3.87), (1.0, 1.0)])
def test_any_in_matches_upsampled_mask_dilated(scale):
    """any_in is True wherever the upsampled mask has tissue, for fractional scales too."""
    rng = np.random.default_rng(7)
    cells = rng.random((23, 31)) < 0.05
    mask = TissueMask(cells, scale, float(cells.mean()), "test")
    shape = (int(23 * scale[0]), int(31 * scale[1]))
    full = mask.upsample(Region.of_shape(shape))
    for _ in range(500):
        region = Region(rng.integers(-20, shape, size=2), rng.integers(1, 40, size=2))
        inside = region.intersect(Region.of_shape(shape))
        if not inside.empty and full[inside.to_slices()].any():
            assert mask.any_in(region)
        np.testing.assert_array_equal(mask.upsample(inside), full[inside.to_slices()])


def test_mask_on_volume_regions_and_outside_the_grid():
    cells = np.zeros((4, 4), bool)
    cells[1, 2] = True
    mask = TissueMask(cells, (10.0, 10.0), 1 / 16, "test")
    region = Region((0, 10, 20), (3, 10, 10))  # z, y, x: the 2D mask holds on every plane
    assert mask.any_in(region)
    up = mask.upsample(region)
    assert up.shape == (3, 10, 10) and up.all()
    assert not mask.any_in(Region((0, 0, 0), (5, 5, 5)))  # more than a cell away
    corner = TissueMask(np.ones((4, 4), bool), (10.0, 10.0), 1.0, "test")
    assert corner.upsample(Region((35, 35), (10, 10))).sum() == 5 * 5  # past the grid: no
    with pytest.raises(ValueError):
        TissueMask(cells, (1.0,), 0.0, "test")


def test_area_fraction_counts_partial_edge_cells():
    cells = np.zeros((2, 2), bool)
    cells[1, 1] = True  # covers [16, 20) x [16, 20) of a 20x20 image
    assert tissue.area_fraction(cells, (16.0, 16.0), (20, 20)) == pytest.approx(16 / 400)


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_tissue_labels_read_back_with_ome_zarr(tmp_path, version):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    fmt = ngff.get_format(version)
    shape, px = (600, 500), {"y": 0.5, "x": 0.5}
    writer = sink.create_image(
        tmp_path / "out.zarr", "slide", (2, *shape), "cyx", (2, 256, 256), "uint8", version
    )
    zarr.open_array(writer.level_path(0), mode="r+")[:] = 7
    levels = sink.write_pyramid(writer, 100)
    sink.write_metadata(writer, levels, px, {})
    cells = np.zeros((38, 32), bool)
    cells[5:20, 4:30] = True
    mask = TissueMask(
        cells, (16.0, 16.0), tissue.area_fraction(cells, (16.0, 16.0), shape), "otsu-od"
    )
    # another label already there stays listed
    other = zarr.open_group(str(writer.staging), mode="r+").require_group("labels")
    other.attrs.put(fmt.wrap(fmt.labels(["cells"])))
    write_tissue_labels(writer.staging, mask, shape, "cyx", px, fmt=version)
    final = writer.staging

    nodes = list(Reader(parse_url(str(final)))())
    label = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    assert len(label) == 1
    node = label[0]
    assert len(node.data) == len(image.data) == levels  # as many levels as the image
    np.testing.assert_array_equal(np.asarray(node.data[0])[0], cells.astype(np.uint8))
    for k, level in enumerate(node.data):
        assert level.dtype == np.uint8 and level.shape[0] == 1
        assert level.shape[1:] == tuple(-(-n // 2**k) for n in cells.shape)
        scale = node.metadata["coordinateTransformations"][k][0]["scale"]
        assert scale == [1.0, 8.0 * 2**k, 8.0 * 2**k]  # 0.5 µm x 16 px per cell
        assert np.asarray(level).max() == 1  # "any" pooling keeps the tissue
    assert set(node.metadata["color"]) == {0, 1}
    labels = zarr.open_group(str(final / "labels"), mode="r").attrs.asdict()
    assert fmt.unwrap(labels) == {"labels": ["cells", "tissue"]}
    attrs = zarr.open_group(str(final / "labels" / "tissue"), mode="r").attrs.asdict()
    assert fmt.unwrap(attrs)["image-label"]["source"] == {"image": "../../"}
    assert attrs["pipeline"]["tissue"]["method"] == "otsu-od"
    array = zarr.open_array(str(final / "labels/tissue/0"), mode="r")
    assert array.metadata.zarr_format == fmt.zarr_format
    if version == "0.5":
        assert array.metadata.dimension_names == ("c", "y", "x")


def test_labels_refuse_a_crop(tmp_path):
    mask = TissueMask(np.ones((4, 4), bool), (8.0, 8.0), 1.0, "x").crop(Region((40, 40), (8, 8)))
    zarr.open_group(str(tmp_path / "img"), mode="w", zarr_format=3)
    with pytest.raises(ValueError, match="crop"):
        write_tissue_labels(tmp_path / "img", mask, (32, 32), "yx", {})


# --------------------------------------------------------------------------- user masks


def _rect_mask(shape, box):
    out = np.zeros(shape, np.uint8)
    out[box[0] : box[1], box[2] : box[3]] = 255
    return out


def test_user_mask_png_scaled_to_the_run_grid(tmp_path):
    import imagecodecs

    run = (2967, 2220)
    small = _rect_mask((297, 222), (100, 200, 50, 150))
    imagecodecs.imwrite(tmp_path / "mask.png", small)
    mask = load_user_mask(tmp_path / "mask.png", run)
    assert mask.method == "user-mask"
    assert mask.scale == pytest.approx((2967 / 297, 10.0))
    assert mask.fraction == pytest.approx(100 * 100 / (297 * 222), rel=1e-6)
    assert mask.any_in(Region((1000, 500), (10, 10)))
    assert not mask.any_in(Region((0, 0), (900, 400)))
    assert not mask.any_in(Region((2100, 1600), (500, 500)))
    # a run on a volume: the last two axes are y and x
    assert load_user_mask(tmp_path / "mask.png", (5, *run)).scale == mask.scale


def test_user_mask_alpha_is_not_tissue(tmp_path):
    import imagecodecs

    rgba = np.zeros((50, 40, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[10:20, 10:20, 0] = 200
    imagecodecs.imwrite(tmp_path / "mask.png", rgba)
    mask = load_user_mask(tmp_path / "mask.png", (500, 400))
    assert mask.fraction == pytest.approx(100 / 2000)


def test_user_mask_tiff_and_zarr(tmp_path):
    truth = _rect_mask((600, 400), (0, 300, 0, 200)) > 0
    tifffile.imwrite(tmp_path / "mask.tif", truth.astype(np.uint8))
    zarr.create_array(
        str(tmp_path / "mask.zarr"), data=truth.astype(np.uint8), dimension_names=["y", "x"]
    )
    for name in ("mask.tif", "mask.zarr"):
        mask = load_user_mask(tmp_path / name, (600, 400))
        assert mask.scale == (1.0, 1.0)
        np.testing.assert_array_equal(mask.upsample(Region.of_shape((600, 400))), truth)


@pytest.mark.parametrize("name", ["big.tif", "big.png"])
def test_user_mask_larger_than_max_side_keeps_every_tissue_pixel(tmp_path, monkeypatch, name):
    import imagecodecs

    monkeypatch.setattr(tissue, "MAX_SIDE", 64)
    big = np.zeros((1000, 500), np.uint8)
    big[777, 333] = 1
    imagecodecs.imwrite(tmp_path / name, big)
    mask = load_user_mask(tmp_path / name, (1000, 500))
    assert max(mask.mask.shape) <= 64 and mask.mask.sum() == 1
    assert mask.any_in(Region((777, 333), (1, 1)))


def test_user_mask_errors(tmp_path, caplog):
    import imagecodecs

    imagecodecs.imwrite(tmp_path / "square.png", np.ones((100, 100), np.uint8))
    with pytest.raises(InputError, match="aspect ratio"):
        load_user_mask(tmp_path / "square.png", (3000, 1000))
    with pytest.raises(InputError, match="does not exist"):
        load_user_mask(tmp_path / "missing.png", (100, 100))
    imagecodecs.imwrite(tmp_path / "empty.png", np.zeros((100, 100), np.uint8))
    with caplog.at_level(logging.WARNING, logger="pipeline.engine.tissue"):
        assert load_user_mask(tmp_path / "empty.png", (1000, 1000)).fraction == 0.0
    assert "every tile will be skipped" in caplog.text
