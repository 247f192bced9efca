"""Whole-slide and multiplex formats through tifffile, on fixtures generated here.

NDPI is written by hand (:func:`write_ndpi`: tifffile cannot write it): a classic TIFF
header with NDPI's 64-bit IFD layout, a level-0 JPEG with restart markers and McuStarts
(so tifffile reads it tile by tile, as in real NDPI), JPEG strips for the lower levels
and a macro image. QPTIFF-like files are one page per channel with PerkinElmer-QPI
software tags; the rest uses tifffile's writer.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import tifffile.zarr
import zarr

from pipeline.errors import InputError
from pipeline.io.model_input import open_for_model
from pipeline.io.sources import describe, open_image

SVS = "wsi/CMU-1-Small-Region.svs"
SVS_J2K = "wsi/tcga-cr-7395-01a-01-ts1.svs"


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it within a few levels)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([yy % 256, (xx // 2 + 40) % 256, ((yy + xx) // 2) % 256], -1).astype(np.uint8)


# --- fixture writers --------------------------------------------------------------------


def _jpeg(rgb: np.ndarray, restart_blocks: int | None = None) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    extra = {"restart_marker_blocks": restart_blocks} if restart_blocks else {}
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, **extra)
    return buffer.getvalue()


def _mcu_starts(jpeg: bytes) -> list[int]:
    """Byte offsets of each restart interval's entropy-coded data (NDPI's McuStarts)."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + struct.unpack(">H", jpeg[sos + 2 : sos + 4])[0]
    starts, i = [start], start
    while (i := jpeg.find(b"\xff", i)) >= 0 and i + 1 < len(jpeg):
        marker = jpeg[i + 1]
        if 0xD0 <= marker <= 0xD7:
            starts.append(i + 2)
        elif marker == 0xD9:
            break
        i += 2
    return starts


def _ndpi_tags(h: int, w: int, data_offset: int, data: bytes, mag: float, mpp: float | None):
    tags = {
        256: ("I", [w]),
        257: ("I", [h]),
        258: ("H", [8, 8, 8]),
        259: ("H", [7]),
        262: ("H", [6]),
        271: ("s", b"Hamamatsu\0"),
        272: ("s", b"C13210\0"),
        273: ("I", [data_offset]),
        277: ("H", [3]),
        278: ("I", [h]),
        279: ("I", [len(data)]),
        305: ("s", b"NDP.scan 3.2\0"),
        65420: ("I", [1]),
        65421: ("f", [mag]),
        65422: ("I", [0]),
        65423: ("I", [0]),
    }
    if mpp:
        per_cm = round(1e4 / mpp * 1000)
        tags.update({282: ("R", [per_cm, 1000]), 283: ("R", [per_cm, 1000]), 296: ("H", [3])})
    return tags


def write_ndpi(
    path: Path,
    levels: list[np.ndarray],
    mpp: float,
    magnification: float = 20.0,
    macro: np.ndarray | None = None,
) -> None:
    """Write an NDPI-like slide: RGB ``levels`` (finest first) plus an optional macro."""
    types = {"H": (3, 2), "I": (4, 4), "f": (11, 4), "R": (5, 8), "s": (2, 1)}
    out = bytearray(b"II" + struct.pack("<H", 42) + b"\0" * 8)  # NDPI: 8-byte IFD offset
    pages = [
        (lv, magnification, mpp * levels[0].shape[1] / lv.shape[1], n == 0)
        for n, lv in enumerate(levels)
    ]
    if macro is not None:
        pages.append((macro, -1.0, None, False))
    next_at = 4
    for rgb, mag, px, tiled in pages:
        data = _jpeg(rgb, 2 if tiled else None)
        offset = len(out)
        out += data
        tags = _ndpi_tags(rgb.shape[0], rgb.shape[1], offset, data, mag, px)
        if tiled:
            tags[65426] = ("I", _mcu_starts(data))
        fields = []
        for code in sorted(tags):
            kind, value = tags[code]
            typ = types[kind][0]
            if kind == "s":
                raw, count = value, len(value)
            elif kind == "R":
                raw, count = struct.pack("<2I", *value), 1
            else:
                raw, count = struct.pack(f"<{len(value)}{kind}", *value), len(value)
            if len(raw) > 4:
                at = len(out)
                out += raw + b"\0" * (len(raw) % 2)
                raw = struct.pack("<I", at)
            fields.append(struct.pack("<HHI", code, typ, count) + raw.ljust(4, b"\0"))
        ifd = len(out)
        struct.pack_into("<Q", out, next_at, ifd)
        out += struct.pack("<H", len(fields)) + b"".join(fields)
        next_at = len(out)
        out += b"\0" * 8 + b"\0\0\0\0" * len(fields)  # next IFD, then the high offset bytes
    path.write_bytes(bytes(out))


def write_qptiff(
    path: Path,
    channels: np.ndarray,
    names: list[str],
    *,
    tile: tuple[int, int] | None,
    mpp: float = 0.5,
    pyramid: bool = False,
) -> None:
    """A QPTIFF-like multiplex file: one page per channel, a thumbnail, optional level 1."""

    def description(name: str) -> str:
        return (
            "<?xml version='1.0' encoding='utf-8'?><PerkinElmer-QPI-ImageDescription>"
            f"<ImageType>FullResolution</ImageType><Name>{name}</Name>"
            f"<Biomarker>{name}</Biomarker></PerkinElmer-QPI-ImageDescription>"
        )

    common = {"software": "PerkinElmer-QPI", "metadata": None, "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        for plane, name in zip(channels, names):
            tif.write(
                plane,
                tile=tile,
                description=description(name),
                resolution=(1e4 / mpp, 1e4 / mpp),
                **common,
            )
        thumb = np.zeros((channels.shape[1] // 8, channels.shape[2] // 8, 3), np.uint8)
        tif.write(thumb, photometric="rgb", description=description("Thumbnail"), **common)
        if pyramid:
            for plane, name in zip(channels, names):
                tif.write(
                    plane[::2, ::2].copy(),
                    tile=tile,
                    description=description(name),
                    resolution=(1e4 / (2 * mpp), 1e4 / (2 * mpp)),
                    **common,
                )


# --- Hamamatsu NDPI -----------------------------------------------------------------------


def test_ndpi_levels_magnification_and_tiles(tmp_path: Path, tile_reads: list[int]) -> None:
    image = smooth_rgb(192, 256)
    path = tmp_path / "slide.ndpi"
    write_ndpi(path, [image, image[::2, ::2].copy()], mpp=0.46, macro=image[::8, ::8].copy())
    info = describe(path)
    assert info["format"] == "ndpi" and info["info"]["vendor"] == "hamamatsu"
    assert info["info"]["magnification"] == 20.0
    main = info["series"][info["default_series"]]
    assert [lv["shape"] for lv in main["levels"]] == [[192, 256, 3], [96, 128, 3]]
    assert main["levels"][1]["pixel_size"]["x"] == pytest.approx(0.92)
    assert [s["associated"] for s in info["series"]] == [False, True]  # the macro is skipped

    src = open_image(path)
    assert src.pixel_size == pytest.approx({"y": 0.46, "x": 0.46})
    assert src.info["storage_chunks"] == (16, 32, 3)  # one restart interval per tile
    tile_reads.clear()
    region = src.array[48:64, 64:128].compute()
    assert len(tile_reads) == 2  # two 16 x 32 tiles of 96, not the whole JPEG
    with tifffile.TiffFile(path) as tif:
        expected = zarr.open_array(tif.series[0].aszarr(level=0), mode="r")[48:64, 64:128]
    np.testing.assert_array_equal(region, expected)  # exactly what tifffile decodes
    assert np.abs(region.astype(int) - image[48:64, 64:128]).max() <= 4  # and the slide

    model = open_for_model(path, ndim=2, in_channels=3, mpp=0.92)
    assert (model.level, model.factor, model.array.shape) == (1, 1.0, (3, 96, 128))


# --- QPTIFF-like multiplex, OME-TIFF multiplex ------------------------------------------------


@pytest.mark.parametrize("tile", [None, (64, 64)], ids=["striped", "tiled"])
def test_qptiff_multiplex(tmp_path: Path, tile) -> None:
    rng = np.random.default_rng(0)
    planes = rng.integers(0, 4096, (5, 200, 160), dtype=np.uint16)
    names = ["DAPI", "CD3", "CD8", "PanCK", "Autofluorescence"]
    path = tmp_path / "multiplex.qptiff"
    write_qptiff(path, planes, names, tile=tile, pyramid=tile is not None)
    src = open_image(path)
    assert (src.format, src.axes, src.dtype) == ("qptiff", "cyx", "uint16")
    assert src.shape == (5, 200, 160)
    assert src.info["vendor"] == "akoya" and src.info["channel_names"] == names
    assert src.pixel_size == pytest.approx({"y": 0.5, "x": 0.5})
    assert len(src.levels) == (2 if tile else 1)
    assert describe(path)["series"][1]["name"] == "Thumbnail"

    model = open_for_model(path, ndim=2, in_channels=5)
    np.testing.assert_array_equal(model.array.compute(), planes)
    picked = open_for_model(path, ndim=2, in_channels=2, channels=(3, 0))
    got = picked.array[:, 10:90, 20:60].compute()
    np.testing.assert_array_equal(got, planes[[3, 0], 10:90, 20:60])
    with pytest.raises(InputError, match="got 5 channels, model expects 3") as err:
        open_for_model(path, ndim=2, in_channels=3)
    assert err.value.reason == "channel-mismatch" and "--channels" in str(err.value)
    with pytest.raises(InputError, match=r"has 5 channels \(0..4\); --channels asks for 7"):
        open_for_model(path, ndim=2, in_channels=2, channels=(0, 7))


def test_ome_tiff_multiplex_pyramid(tmp_path: Path) -> None:
    planes = np.random.default_rng(1).integers(0, 60000, (3, 256, 192), dtype=np.uint16)
    path = tmp_path / "cycif.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        meta = {
            "axes": "CYX",
            "PhysicalSizeX": 0.325,
            "PhysicalSizeY": 0.325,
            "Channel": {"Name": ["DNA", "CD45", "Ki67"]},
        }
        tif.write(planes, subifds=1, tile=(64, 64), compression="zlib", metadata=meta)
        tif.write(planes[:, ::2, ::2].copy(), subfiletype=1, tile=(64, 64), compression="zlib")
    src = open_image(path)
    assert (src.format, src.axes, src.levels) == ("ome-tiff", "cyx", ((3, 256, 192), (3, 128, 96)))
    model = open_for_model(path, ndim=2, in_channels=3, mpp=0.65)
    assert (model.level, model.array.shape) == (1, (3, 128, 96))
    assert model.pixel_size == pytest.approx({"y": 0.65, "x": 0.65})
    np.testing.assert_array_equal(model.array.compute(), planes[:, ::2, ::2])


# --- generic pyramids ------------------------------------------------------------------------


@pytest.mark.parametrize("subifds", [False, True], ids=["pages", "subifds"])
def test_generic_tiled_pyramid(tmp_path: Path, subifds: bool) -> None:
    image = np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    levels = [image, image[::2, ::2].copy(), image[::4, ::4].copy()]
    with tifffile.TiffWriter(path) as tif:
        for n, level in enumerate(levels):
            kwargs = {"subifds": 2} if subifds and n == 0 else {"subfiletype": 1} if n else {}
            tif.write(
                level,
                tile=(64, 64),
                compression="zlib",
                photometric="rgb",
                metadata=None,
                resolution=(1e4 / (0.25 * 2**n),) * 2,
                resolutionunit="CENTIMETER",
                **kwargs,
            )
    info = describe(path)
    main = info["series"][0]
    assert [lv["shape"] for lv in main["levels"]] == [[300, 400, 3], [150, 200, 3], [75, 100, 3]]
    assert main["pixel_size"] == pytest.approx({"y": 0.25, "x": 0.25})
    assert main["info"]["pixel_size_source"] == "TIFF resolution tags"
    model = open_for_model(path, ndim=2, in_channels=3, mpp=1.0)
    assert (model.level, model.factor) == (2, 1.0)
    np.testing.assert_array_equal(model.array.compute(), levels[2].transpose(2, 0, 1))


# --- colour models and sample types (B7, B8) ------------------------------------------------


def test_rgba_drops_alpha_and_keeps_it_when_asked(tmp_path: Path) -> None:
    rgba = np.random.default_rng(0).integers(0, 255, (40, 30, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    model = open_for_model(tmp_path / "rgba.tif", ndim=2, in_channels=3)
    np.testing.assert_array_equal(model.array.compute(), rgba[..., :3].transpose(2, 0, 1))
    four = open_for_model(tmp_path / "rgba.tif", ndim=2, in_channels=4)
    assert four.array.shape == (4, 40, 30)


def test_gray_alpha_drops_alpha(tmp_path: Path) -> None:
    la = np.random.default_rng(0).integers(0, 255, (20, 30, 2), dtype=np.uint8)
    tifffile.imwrite(
        tmp_path / "la.tif",
        la,
        photometric="minisblack",
        planarconfig="contig",
        extrasamples=["assocalpha"],
    )
    model = open_for_model(tmp_path / "la.tif", ndim=2, in_channels=1)
    np.testing.assert_array_equal(model.array.compute(), la[None, ..., 0])


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    index = np.random.default_rng(0).integers(0, 4, (30, 40), dtype=np.uint8)
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, :4] = [[0, 65535, 0, 32896], [0, 0, 65535, 32896], [0, 0, 0, 65535]]
    tifffile.imwrite(tmp_path / "palette.tif", index, photometric="palette", colormap=cmap)
    model = open_for_model(tmp_path / "palette.tif", ndim=2, in_channels=3)
    assert model.array.dtype == np.uint8
    expected = np.rint(cmap[:, index] / 257).astype(np.uint8)
    np.testing.assert_array_equal(model.array.compute(), expected)
    assert "_colormap" not in describe(tmp_path / "palette.tif")["series"][0]["info"]


def test_miniswhite_is_inverted(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, (20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "mw.tif", data, photometric="miniswhite")
    model = open_for_model(tmp_path / "mw.tif", ndim=2, in_channels=1)
    np.testing.assert_array_equal(model.array.compute()[0], 255 - data)


@pytest.mark.parametrize(
    "dtype", ["bool", "uint8", "uint16", "int8", "int16", "float32", "float64"]
)
def test_sample_types_are_kept_for_normalisation(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((24, 36)) * (1 if dtype == "bool" else 100)).astype(dtype)
    if dtype == "bool":
        data = rng.random((24, 36)) > 0.5
    tifffile.imwrite(tmp_path / "img.tif", data, photometric="minisblack")
    model = open_for_model(tmp_path / "img.tif", ndim=2, in_channels=1)
    assert model.array.dtype == data.dtype  # stages.normalize scales by the dtype
    np.testing.assert_array_equal(model.array.compute()[0], data)


def test_one_bit_resampled_becomes_a_fraction(tmp_path: Path) -> None:
    data = np.zeros((8, 8), bool)
    data[:4, :2] = True
    tifffile.imwrite(
        tmp_path / "bits.tif",
        data,
        photometric="minisblack",
        resolution=(1e4, 1e4),
        resolutionunit="CENTIMETER",
    )  # 1 µm/px
    model = open_for_model(tmp_path / "bits.tif", ndim=2, in_channels=1, mpp=4.0)
    assert model.array.dtype == np.float32
    np.testing.assert_array_equal(model.array.compute()[0], [[0.5, 0.0], [0.0, 0.0]])


def test_sixteen_bit_fluorescence_keeps_its_range(tmp_path: Path) -> None:
    data = np.array([[0, 4095], [65535, 1000]], np.uint16)
    tifffile.imwrite(tmp_path / "fl.tif", data)
    model = open_for_model(tmp_path / "fl.tif", ndim=2, in_channels=1)
    np.testing.assert_array_equal(model.array.compute()[0], data)


def test_unsupported_dtype_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((8, 8), np.complex64))
    with pytest.raises(InputError, match="complex64") as err:
        open_for_model(tmp_path / "c.tif", ndim=2, in_channels=1)
    assert err.value.reason == "unsupported-format"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: (np.zeros((20, 20, 4), np.uint8), {"photometric": "separated"}), "CMYK"),
        (lambda: (np.zeros((20, 20), np.uint8), {}), "--channels 0,0,0"),
        (
            lambda: (
                np.zeros((5, 20, 20), np.uint8),
                {"photometric": "minisblack", "metadata": {"axes": "CYX"}},
            ),
            "choose 3",
        ),
    ],
    ids=["cmyk", "gray", "five-channel"],
)
def test_rgb_model_refuses_what_it_cannot_take(tmp_path: Path, make, words: str) -> None:
    data, kwargs = make()
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, data, **kwargs)
    with pytest.raises(InputError) as err:
        open_for_model(path, ndim=2, in_channels=3)
    message = str(err.value)
    assert err.value.reason == "channel-mismatch" and "model expects 3" in message
    assert str(path) in message and words in message


def test_gray_to_rgb_model_by_repeating_the_channel(tmp_path: Path) -> None:
    data = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    tifffile.imwrite(tmp_path / "gray.tif", data)
    model = open_for_model(tmp_path / "gray.tif", ndim=2, in_channels=3, channels=(0, 0, 0))
    np.testing.assert_array_equal(model.array.compute(), np.stack([data] * 3))


# --- real slides: exact reads and what `inspect` shows -------------------------------------


def test_jpeg2000_svs_level0_is_exact(data_dir: Path) -> None:
    path = data_dir / SVS_J2K
    model = open_for_model(path, ndim=2, in_channels=3)
    assert (model.level, model.factor, model.array.shape) == (0, 1.0, (3, 3567, 4443))
    expected = tifffile.imread(path)
    np.testing.assert_array_equal(model.array.compute(), expected.transpose(2, 0, 1))


def test_describe_svs_shows_vendor_levels_pixel_size(data_dir: Path) -> None:
    info = describe(data_dir / SVS)
    assert info["format"] == "svs"
    assert info["info"] == {"vendor": "aperio", "bigtiff": False, "magnification": 20.0}
    main = info["series"][0]
    assert main["pixel_size"] == {"y": 0.499, "x": 0.499}
    assert main["info"]["pixel_size_source"] == "aperio MPP"
    assert [s["associated"] for s in info["series"]] == [False, True, True, True]
