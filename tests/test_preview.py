"""Preview PNGs: composition (pure), PNG writing, and cheap reading of inputs and outputs."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import OutputError
from pipeline.outputs.preview import (
    MAX_SIDE,
    PALETTE,
    coarsest_level,
    compose_preview,
    encode_png,
    labels_from_probabilities,
    make_preview,
    read_input_thumbnail,
    to_rgb8,
    write_png,
)

SVS = Path("wsi/CMU-1-Small-Region.svs")
OME_TIFF = Path("wsi/CMU-1-Small-Region.pyramid.ome.tif")
OVULE_RAW = Path("volume3d/ovule_raw.tif")
OVULE_LABELS = Path("volume3d/ovule_labels.tif")
GREEN = np.array(PALETTE[0], dtype=np.float64)


def write_ngff(path: Path, level0: np.ndarray, axes: str, *, ngff: str = "0.5", label=None) -> None:
    """A minimal NGFF image (or label image) written with zarr directly: 2x pyramid in y, x."""
    fmt = 3 if ngff == "0.5" else 2
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    levels, data = [], level0
    while True:
        levels.append(data)
        if max(data.shape[-2:]) <= 256:
            break
        data = data[..., ::2, ::2]
    for i, lv in enumerate(levels):
        chunks = tuple(min(s, 1 if a in "cz" else 512) for a, s in zip(axes, lv.shape))
        group.create_array(str(i), shape=lv.shape, chunks=chunks, dtype=lv.dtype)[...] = lv
    multiscales = [
        {
            "axes": [{"name": a, "type": "channel" if a == "c" else "space"} for a in axes],
            "datasets": [
                {
                    "path": str(i),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1.0 if a in "cz" else 2.0**i for a in axes]}
                    ],
                }
                for i in range(len(levels))
            ],
        }
    ]
    meta = {"multiscales": multiscales, **({"image-label": label} if label else {})}
    group.attrs.update({"ome": {"version": "0.5", **meta}} if fmt == 3 else meta)


def decode_preview(path: Path) -> np.ndarray:
    """The PNG decoded; checks what every preview must be: RGB, <= 2048 a side, not blank."""
    image = imagecodecs.png_decode(path.read_bytes())
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) <= MAX_SIDE
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 16, "preview is (nearly) uniform"
    return image


def blend(base: np.ndarray, colour: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    return (1 - alpha) * base.astype(np.float64) + alpha * np.asarray(colour, np.float64)


# --- composition (pure) ---------------------------------------------------------------


def test_compose_fills_mask_in_class_colours_and_leaves_background() -> None:
    yy, xx = np.mgrid[0:300, 0:400]
    thumb = np.stack([yy % 256, xx % 256, (yy + xx) % 256], axis=2).astype(np.uint8)
    labels = np.zeros((150, 200), np.int32)  # half the thumbnail's size: resized 2x
    labels[20:60, 30:90] = 1
    labels[100:140, 120:190] = 2
    out = compose_preview(thumb, labels, alpha=0.4, contour=False)
    assert out.shape == thumb.shape and out.dtype == np.uint8
    big = np.repeat(np.repeat(labels, 2, axis=0), 2, axis=1)
    for value in (1, 2):
        colour = np.array(PALETTE[value - 1], dtype=np.float64)
        np.testing.assert_allclose(out[big == value], blend(thumb[big == value], colour), atol=0.51)
    np.testing.assert_array_equal(out[big == 0], thumb[big == 0])


def test_compose_contour_is_opaque_on_region_border_only() -> None:
    thumb = np.full((100, 100, 3), 90, np.uint8)
    labels = np.zeros((100, 100), np.uint8)
    labels[30:70, 30:70] = 1
    out = compose_preview(thumb, labels, colours={1: (10, 20, 250)}, contour=True)
    border = np.zeros_like(labels, bool)
    border[30:70, 30:70] = True
    border[31:69, 31:69] = False
    assert (out[border] == (10, 20, 250)).all()
    np.testing.assert_allclose(
        out[31:69, 31:69], blend(thumb[31:69, 31:69], [10, 20, 250]), atol=0.51
    )
    assert (out[labels == 0] == 90).all()


def test_compose_caps_the_longer_side_and_keeps_aspect() -> None:
    thumb = np.zeros((5000, 1250), np.uint16)
    thumb[:, 600:] = 4000
    out = compose_preview(thumb, np.ones((50, 25), bool), max_side=2048)
    assert out.shape == (2048, 512, 3)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) >= 2


def test_labels_from_probabilities() -> None:
    one = np.array([[[0, 127, 128, 255]]], np.uint8)
    assert labels_from_probabilities(one).tolist() == [[0, 0, 1, 1]]
    assert labels_from_probabilities(one.astype(np.float32) / 255, 0.9).tolist() == [[0, 0, 0, 1]]
    probs = np.array([[[0.7, 0.1, np.nan]], [[0.2, 0.3, 0.4]], [[0.1, 0.6, 0.1]]], np.float32)
    assert labels_from_probabilities(probs).tolist() == [[0, 2, 1]]
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        labels_from_probabilities(np.zeros((4, 4)))


def test_to_rgb8_grey_float_and_two_channels() -> None:
    grey = to_rgb8(np.arange(12, dtype=np.uint8).reshape(3, 4))
    assert grey.shape == (3, 4, 3) and (grey[..., 0] == grey[..., 2]).all()
    floats = to_rgb8(np.linspace(-1, 1, 400, dtype=np.float32).reshape(20, 20))
    assert floats.min() == 0 and floats.max() == 255
    two = to_rgb8(np.stack([np.zeros((4, 4)), np.ones((4, 4))], axis=2))
    assert two.shape == (4, 4, 3)


def test_write_png_round_trips_atomically(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    path = write_png(tmp_path / "previews" / "a b.png", rgb)
    np.testing.assert_array_equal(imagecodecs.png_decode(path.read_bytes()), rgb)
    assert [p.name for p in path.parent.iterdir()] == ["a b.png"]  # no temporary left
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match="cannot write the preview"):
        write_png(tmp_path / "file" / "x.png", rgb)


@pytest.mark.parametrize("shape", [(31, 45), (31, 45, 1), (31, 45, 2), (31, 45, 3), (5, 3, 4)])
def test_png_decodes_to_the_same_pixels_in_libpng_and_pillow(shape) -> None:
    """The hand-assembled PNG (SUB-filtered rows, libdeflate) is a valid file for two
    independent decoders, with every value kept (the filter's differences wrap mod 256)."""
    import io

    from PIL import Image

    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    image.reshape(-1)[:4] = [255, 0, 1, 254]  # wrapping differences next to each other
    data = encode_png(image)
    squeezed = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    np.testing.assert_array_equal(imagecodecs.png_decode(data), squeezed)
    with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        channels = 1 if image.ndim == 2 else image.shape[2]
        assert pil.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
        np.testing.assert_array_equal(np.asarray(pil), squeezed)
    with pytest.raises(ValueError, match="PNG image must be"):
        encode_png(np.zeros((4, 4, 5), np.uint8))


def test_coarsest_level_at_least_size() -> None:
    shapes = [(4096, 3000, 3), (2048, 1500, 3), (1024, 750, 3), (512, 375, 3)]
    assert coarsest_level(shapes, "yxc", 1024) == 2
    assert coarsest_level(shapes, "yxc", 1025) == 1
    assert coarsest_level(shapes, "yxc", 9999) == 0


# --- reading inputs and outputs cheaply --------------------------------------------------


def test_pyramid_input_reads_only_a_coarse_level(tmp_path: Path, tile_reads: list[int]) -> None:
    # each level a different colour: the thumbnail shows which one was read
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 90)]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        for i, colour in enumerate(colours):
            size = 2048 >> i
            level = np.empty((size, size, 3), np.uint8)
            level[:] = colour
            level[: size // 8, : size // 8] = 255  # not uniform
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                compression="zlib",
                **({"subifds": 3} if i == 0 else {"subfiletype": 1}),
            )
    tile_reads.clear()
    thumb = read_input_thumbnail(path)
    assert thumb.shape == (1024, 1024, 3)
    assert tuple(thumb[600, 600]) == colours[1]
    assert 0 < len(tile_reads) <= 16  # level 1's tiles; level 0 alone has 64


def test_single_large_level_is_read_strided_in_bounded_memory(tmp_path: Path) -> None:
    size, tile = 8192, 512
    n = size // tile

    def colour(i: int, j: int) -> tuple[int, int, int]:
        return (i * 16 % 256, j * 16 % 256, (i + j) * 8 % 256)

    def tiles():
        for i in range(n):
            for j in range(n):
                block = np.empty((tile, tile, 3), np.uint8)
                block[:] = colour(i, j)
                yield block

    path = tmp_path / "large.tif"
    tifffile.imwrite(
        path,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        photometric="rgb",
        compression="zlib",
        compressionargs={"level": 1},
    )
    tracemalloc.start()
    try:
        thumb = read_input_thumbnail(path, size=1024, max_side=2048)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert thumb.shape == (2048, 2048, 3)
    step = tile * 2048 // size
    for i, j in [(0, 0), (3, 7), (15, 15), (9, 2)]:
        assert tuple(thumb[i * step + 5, j * step + 5]) == colour(i, j)
    level_bytes = size * size * 3  # 192 MiB decoded
    assert peak < level_bytes / 3, f"peak {peak / 2**20:.0f} MiB while reading a preview"


def test_make_preview_real_slide_with_one_class_output(tmp_path: Path, data_dir: Path) -> None:
    slide = tifffile.imread(data_dir / SVS)  # oracle only: the preview reads through the pipeline
    tissue = (slide.mean(axis=2) < 200).astype(np.uint8) * 255  # "probability" x 255
    write_ngff(tmp_path / "out.zarr", tissue[None], "cyx")
    png = make_preview(data_dir / SVS, tmp_path / "out.zarr", tmp_path / "previews" / "cmu.png")
    image = decode_preview(png)
    assert image.shape == (1484, 1110, 3)  # single level 2967 x 2220, every 2nd pixel
    thumb = slide[::2, ::2].astype(np.float64)
    inside = tissue[::2, ::2] > 0
    inside &= ~_near_edge(inside)
    assert inside.mean() > 0.05
    np.testing.assert_allclose(image[inside], blend(thumb[inside], GREEN), atol=0.51)
    outside = (tissue[::2, ::2] == 0) & ~_near_edge(tissue[::2, ::2] > 0)
    np.testing.assert_array_equal(image[outside], slide[::2, ::2][outside])


def test_make_preview_real_pyramid_reads_level_1(tmp_path: Path, data_dir: Path) -> None:
    probs = np.zeros((3, 2967, 2220), np.float32)  # three classes, float: argmax
    probs[0] = 0.5
    probs[1, 1000:2000, 500:1500] = 0.9
    probs[2, 2200:2900, 100:2000] = 0.8
    write_ngff(tmp_path / "out.zarr", probs, "cyx", ngff="0.4")  # Zarr v2 output too
    png = make_preview(data_dir / OME_TIFF, tmp_path / "out.zarr", tmp_path / "p.png")
    image = decode_preview(png)
    assert image.shape == (1483, 1110, 3)  # level 1 of the pyramid as it is
    level1 = tifffile.imread(data_dir / OME_TIFF, level=1).astype(np.float64)
    for (y, x), colour in [((750, 500), PALETTE[0]), ((1250, 500), PALETTE[1])]:
        np.testing.assert_allclose(image[y, x], blend(level1[y, x], colour), atol=0.51)
    np.testing.assert_array_equal(image[200, 200], level1[200, 200])


def test_make_preview_volume_middle_plane_from_a_label_image(
    tmp_path: Path, data_dir: Path
) -> None:
    labels = tifffile.imread(data_dir / OVULE_LABELS)  # (32, 128, 128) real cells, dense
    labels[labels >= 500] = 0  # a label image of some of them
    values = np.unique(labels)[1:]
    rgb = {int(v): (255, 0, 255) if v % 2 else (0, 255, 255) for v in values}
    label = {"colors": [{"label-value": v, "rgba": [*c, 255]} for v, c in rgb.items()]}
    write_ngff(tmp_path / "labels", labels[None], "czyx", label=label)
    png = make_preview(data_dir / OVULE_RAW, tmp_path / "labels", tmp_path / "v.png", contour=False)
    image = decode_preview(png)
    raw = np.repeat(tifffile.imread(data_dir / OVULE_RAW)[16, :, :, None], 3, axis=2)
    middle = labels[16]  # the middle plane of both
    assert image.shape == (128, 128, 3) and 0 < (middle > 0).mean() < 1
    for v in np.unique(middle)[1:]:
        cell = middle == v
        np.testing.assert_allclose(image[cell], blend(raw[cell], rgb[int(v)]), atol=0.51)
    np.testing.assert_array_equal(image[middle == 0], raw[middle == 0])


def test_make_preview_refuses_an_output_that_is_not_ngff(tmp_path: Path, data_dir: Path) -> None:
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(OutputError, match="not a readable NGFF image") as err:
        make_preview(data_dir / SVS, tmp_path / "plain.zarr", tmp_path / "x.png")
    assert "plain.zarr" in str(err.value)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(OutputError, match="not a readable NGFF image"):
        make_preview(data_dir / SVS, tmp_path / "missing.zarr", tmp_path / "x.png")


def _near_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels within one of a mask border (the contour, and nearest-neighbour seams)."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
