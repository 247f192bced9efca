"""Bad inputs B1-B15 of RELIABILITY.md, as far as reading goes.

Each is a generated fixture; each must give an InputError that names the file, the
problem and a hint, with a reason class, or (B5, B10, B15) must simply work. Corruption
is escalated, never painted black.
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.errors import InputError
from pipeline.io import sources
from pipeline.io.model_input import open_for_model
from pipeline.io.sources import describe, open_image

SVS = "wsi/CMU-1-Small-Region.svs"
ISBI = "isbi2012/train-volume.tif"
OVULE = "volume3d/ovule_raw.tif"


def assert_clear(err: pytest.ExceptionInfo, path: Path, reason: str, *words: str) -> None:
    """The error names the file, says what is wrong, gives a hint and its reason class."""
    message = str(err.value)
    assert str(path) in message, message
    assert "Hint:" in message, message
    assert err.value.reason == reason, (err.value.reason, message)
    for word in words:
        assert word in message, (word, message)


def _patch_tag(path: Path, code: int, value: int, page: int = 0) -> None:
    """Overwrite an inline SHORT or LONG tag value of a classic TIFF."""
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[page].tags[code]
        at, short = tag.valueoffset, tag.dtype == 3
    data = bytearray(path.read_bytes())
    struct.pack_into("<H" if short else "<I", data, at, value)
    path.write_bytes(bytes(data))


# --- B1, B14: files that are not images, paths that do not lead to one ------------------------


def _empty(tmp: Path) -> Path:
    (tmp / "empty.tif").write_bytes(b"")
    return tmp / "empty.tif"


def _random_svs(tmp: Path) -> Path:
    (tmp / "random.svs").write_bytes(np.random.default_rng(1).bytes(4096))
    return tmp / "random.svs"


def _text_tif(tmp: Path) -> Path:
    (tmp / "notes.tif").write_text("this is not an image\n")
    return tmp / "notes.tif"


def _plain_dir(tmp: Path) -> Path:
    (tmp / "folder").mkdir()
    (tmp / "folder" / "a.txt").write_text("x")
    return tmp / "folder"


def _png(tmp: Path) -> Path:
    (tmp / "image.png").write_bytes(b"\x89PNG\r\n")
    return tmp / "image.png"


def _dangling(tmp: Path) -> Path:
    (tmp / "link.tif").symlink_to(tmp / "gone.tif")
    return tmp / "link.tif"


def _link_loop(tmp: Path) -> Path:
    (tmp / "a.tif").symlink_to(tmp / "b.tif")
    (tmp / "b.tif").symlink_to(tmp / "a.tif")
    return tmp / "a.tif"


def _zero_size(tmp: Path) -> Path:
    zarr.create_array(tmp / "empty.zarr", shape=(0, 16), chunks=(8, 8), dtype="u1")
    return tmp / "empty.zarr"


def _plain_group(tmp: Path) -> Path:
    group = zarr.open_group(tmp / "group.zarr", mode="w")
    group.create_array("data", shape=(4, 4), dtype="u1")
    return tmp / "group.zarr"


@pytest.mark.parametrize(
    ("make", "reason", "words"),
    [
        (_empty, "bad-input", "empty"),  # B1
        (_random_svs, "bad-input", "not a readable TIFF"),  # B1
        (_text_tif, "bad-input", "not a readable TIFF"),  # B1
        (_plain_dir, "bad-input", "not a Zarr"),
        (lambda tmp: tmp / "missing.svs", "not-found", "does not exist"),
        (_png, "unsupported-format", "unsupported file type '.png'"),
        (_dangling, "not-found", "symbolic link"),  # B14
        (_link_loop, "bad-input", "cannot be accessed"),  # B14
        (_zero_size, "bad-input", "zero-size"),  # B10
        (_plain_group, "unsupported-format", "without OME-Zarr"),
    ],
)
def test_bad_input(tmp_path: Path, make, reason: str, words: str) -> None:
    path = make(tmp_path)
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(err, path, reason, words)
    if make is not _zero_size:  # describe() lists an empty image; only opening refuses it
        with pytest.raises(InputError):
            describe(path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """B14. root reads anything, so there the permission check is simulated."""
    path = tmp_path / "locked.tif"
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8))
    path.chmod(0)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: str(p) != str(path) and real(p, m))
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(err, path, "bad-input", "permission denied")


# --- B2: cut short ----------------------------------------------------------------------------


def _open_for_rgb_model(path: Path) -> object:
    return open_for_model(path, ndim=2, in_channels=3)


@pytest.mark.parametrize(
    ("name", "keep", "match", "opener"),
    [
        # tifffile alone opens the first half of this stack as ONE 512x512 page
        (ISBI, lambda n: n // 2, "damaged|truncated", open_image),
        (OVULE, lambda n: n - 1000, "truncated", open_image),  # the last tile's data cut
        (SVS, lambda n: int(n * 0.6), "truncated|damaged", _open_for_rgb_model),  # tiled slide
    ],
    ids=["stack", "tile-data", "tiled-slide"],
)
def test_truncated_file_is_refused(data_dir: Path, tmp_path: Path, name, keep, match, opener):
    data = (data_dir / name).read_bytes()
    path = tmp_path / f"cut{Path(name).suffix}"
    path.write_bytes(data[: keep(len(data))])
    with pytest.raises(InputError, match=match) as err:
        opener(path)
    assert_clear(err, path, "bad-input")


def test_tiles_that_were_never_written_are_refused(tmp_path: Path) -> None:
    """tifffile returns zeros for a tile with byte count 0; that would be a black hole."""
    path = tmp_path / "holes.tif"
    tifffile.imwrite(path, np.full((64, 96), 7, np.uint8), tile=(32, 32), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        counts = tif.pages.first.tags["TileByteCounts"]
        at, size = counts.valueoffset, 4 if counts.dtype == 4 else 2
    data = bytearray(path.read_bytes())
    data[at + 4 * size : at + 5 * size] = b"\0" * size  # tile 4: row 1, column 1
    path.write_bytes(bytes(data))
    assert "have no data" in describe(path)["series"][0]["levels"][0]["problem"]
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(err, path, "corrupt-input", "1 of 6 tiles of level 0", "y, x = 32, 32")


# --- B3: flipped bytes inside one compressed tile ---------------------------------------------


def test_corrupt_jpeg_tile_fails_on_read(data_dir: Path, tmp_path: Path) -> None:
    with tifffile.TiffFile(data_dir / SVS) as tif:
        page = tif.pages.first
        start, count = page.dataoffsets[5], page.databytecounts[5]  # tile row 0, column 5
    data = bytearray((data_dir / SVS).read_bytes())
    for i in range(start + 100, start + count - 10, 7):
        data[i] ^= 0xFF
    path = tmp_path / "flipped.svs"
    path.write_bytes(bytes(data))
    src = open_image(path)  # metadata is intact
    src.array[300:400, :200].compute()  # other tiles still read
    with pytest.raises(InputError) as err:
        src.array[0:240, 1200:1440].compute()
    assert_clear(err, path, "corrupt-input", "series 0 level 0", "0:240")


def test_one_flipped_byte_in_a_zlib_tile_fails_on_read(tmp_path: Path) -> None:
    path = tmp_path / "flip.tif"
    image = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64), compression="zlib", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages.first.dataoffsets[3], tif.pages.first.databytecounts[3]
    data = bytearray(path.read_bytes())
    data[start + count // 2] ^= 0x01
    path.write_bytes(bytes(data))
    model = open_for_model(path, ndim=2, in_channels=3)
    np.testing.assert_array_equal(model.array[:, :64].compute(), image[:64].transpose(2, 0, 1))
    with pytest.raises(InputError) as err:
        model.array[:, 70:80, 70:80].compute()
    assert_clear(
        err, path, "corrupt-input", "cannot decode series 0 level 0 tile at y 64:128, x 64:128"
    )


def test_one_flipped_byte_in_a_jpeg_tile_is_not_detectable(tmp_path: Path) -> None:
    """Documents a limit: JPEG (like JPEG 2000, zstd, WebP) has no checksum, so a flipped
    byte inside the entropy-coded data decodes to plausible wrong pixels."""
    path = tmp_path / "flip.tif"
    image = np.full((64, 64, 3), 128, np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64), compression="jpeg", photometric="rgb")
    clean = tifffile.imread(path)
    with tifffile.TiffFile(path) as tif:
        start, count = tif.pages.first.dataoffsets[0], tif.pages.first.databytecounts[0]
    data = bytearray(path.read_bytes())
    data[start + count - 6] ^= 0x10
    path.write_bytes(bytes(data))
    read = open_image(path).array.compute()
    assert read.shape == clean.shape  # no error; the pixels may differ


# --- B4: compression this installation cannot decode ------------------------------------------


def test_unknown_compression_is_refused_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib")
    _patch_tag(path, 259, 12345)
    assert "code 12345" in describe(path)["series"][0]["info"]["unreadable"]
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(err, path, "unsupported-format", "compression code 12345", "imagecodecs")


def test_codec_not_installed(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class WithoutJpeg2000(dict):
        def __contains__(self, code: object) -> bool:
            return code in (1, 7, 8, 5)

    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", WithoutJpeg2000())
    sources._open_cached.cache_clear()  # an earlier test may have opened it with the codec
    path = data_dir / "wsi/tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(InputError) as err:
        open_for_model(path, ndim=2, in_channels=3)
    assert_clear(err, path, "unsupported-format", "APERIO_JP2000_RGB", "cannot decode")


# --- B5: a huge striped TIFF ------------------------------------------------------------------


def test_huge_uncompressed_striped_tiff_is_read_in_place(tmp_path: Path) -> None:
    """40,000 x 40,000 in one strip (1.5 GiB, sparse on disk): memory-mapped, a window
    reads just its rows and columns."""
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, shape=(40000, 40000), dtype=np.uint8, photometric="minisblack")
    with open(path, "r+b") as f:  # a few known pixels
        offset = tifffile.TiffFile(path).pages.first.dataoffsets[0]
        f.seek(offset + 30000 * 40000 + 20000)
        f.write(bytes(range(1, 9)))
    src = open_image(path)
    assert src.info["storage_chunks"] == (512, 512)
    model = open_for_model(path, ndim=2, in_channels=1)
    tracemalloc.start()
    window = model.array[:, 29900:30156, 19900:20156].compute()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    np.testing.assert_array_equal(window[0, 100, 100:108], np.arange(1, 9))
    assert int(window.sum()) == sum(range(1, 9))


def test_huge_compressed_strip_is_refused_with_a_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "MAX_STORED_CHUNK_BYTES", 2**20)  # keeps the fixture small
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, np.zeros((2000, 1000), np.uint8), compression="zlib", rowsperstrip=2000)
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(
        err,
        path,
        "unsupported-format",
        "2000 x 1000 uint8",
        "1.9 MiB decoded",
        "more than the 1.0 MiB allowed",
        "re-save it tiled",
    )


# --- B6: absurd declared sizes and decompression bombs ----------------------------------------


def test_tiny_file_declaring_a_terapixel_tiled_image(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib", metadata=None
    )
    _patch_tag(path, 256, 10**6)
    _patch_tag(path, 257, 10**6)
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(
        err,
        path,
        "corrupt-input",
        "declares 1000000 x 1000000 pixels in 976562500 tiles but the file lists 4",
    )
    assert os.path.getsize(path) < 2000


def test_tiny_file_declaring_a_terapixel_strip(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression="zlib", metadata=None)
    _patch_tag(path, 256, 10**6)
    _patch_tag(path, 257, 10**6)
    _patch_tag(path, 278, 10**6)  # RowsPerStrip: one strip, as declared
    with pytest.raises(InputError) as err:
        open_image(path)
    assert_clear(err, path, "unsupported-format", "931.3 GiB")


def _replace_tile(path: Path, index: int, payload: bytes) -> None:
    """Append ``payload`` and point tile ``index`` of page 0 at it."""
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages.first.tags
        offsets, counts = tags["TileOffsets"], tags["TileByteCounts"]
        osize = 4 if offsets.dtype == 4 else 8
        csize = {3: 2, 4: 4, 16: 8}[counts.dtype]
        o_at, c_at = offsets.valueoffset, counts.valueoffset
    data = bytearray(path.read_bytes())
    struct.pack_into("<I" if osize == 4 else "<Q", data, o_at + index * osize, len(data))
    struct.pack_into({2: "<H", 4: "<I", 8: "<Q"}[csize], data, c_at + index * csize, len(payload))
    path.write_bytes(bytes(data) + payload)


def test_jpeg_tile_declaring_a_giant_size_is_not_decoded(tmp_path: Path) -> None:
    """Undefended, libjpeg allocates and fills 60,000 x 60,000 x 3 (10 GB) for this tile."""
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(
        path,
        np.zeros((64, 64, 3), np.uint8),
        tile=(32, 32),
        compression="jpeg",
        photometric="rgb",
        metadata=None,
    )
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        tile = path.read_bytes()[page.dataoffsets[0] : page.dataoffsets[0] + page.databytecounts[0]]
    sof = tile.index(b"\xff\xc0")
    bomb = bytearray(tile)
    struct.pack_into(">HH", bomb, sof + 5, 60000, 60000)
    _replace_tile(path, 0, bytes(bomb))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    src = open_image(path)
    src.array[40:64, 40:64].compute()  # the other tiles read
    with pytest.raises(InputError) as err:
        src.array[:32, :32].compute()
    assert_clear(err, path, "corrupt-input", "declares 60000 x 60000 pixels", "decompression bomb")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    assert grown < 512 * 1024


def test_jpeg2000_tile_declaring_a_giant_size_is_not_decoded(
    data_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "bomb.svs"
    shutil.copyfile(data_dir / "wsi/tcga-cr-7395-01a-01-ts1.svs", path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        start = page.dataoffsets[0]
    data = bytearray(path.read_bytes())
    siz = data.index(b"\xff\x4f\xff\x51", start)
    struct.pack_into(">II", data, siz + 8, 50000, 50000)  # Xsiz, Ysiz
    path.write_bytes(bytes(data))
    src = open_image(path)
    with pytest.raises(InputError) as err:
        src.array[:256, :256].compute()
    assert_clear(err, path, "corrupt-input", "50000 x 50000")


def test_zlib_bomb_tile_stops_at_the_tile_size(tmp_path: Path) -> None:
    path = tmp_path / "bomb.tif"
    tifffile.imwrite(
        path, np.zeros((64, 64), np.uint8), tile=(32, 32), compression="zlib", metadata=None
    )
    squeeze = zlib.compressobj(9)
    zeros = bytes(2**20)
    payload = b"".join(squeeze.compress(zeros) for _ in range(64)) + squeeze.flush()  # 64 MiB
    _replace_tile(path, 0, payload)
    tracemalloc.start()
    with pytest.raises(InputError) as err:
        open_image(path).array[:32, :32].compute()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_clear(err, path, "corrupt-input", "cannot decode series 0 level 0")
    assert peak < 8 * 2**20, peak


# --- B9: NaN and Inf --------------------------------------------------------------------------


def test_float_volume_with_nan_fails_where_it_is_read(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).random((8, 64, 64)).astype(np.float32)
    volume[5, 40, 50] = np.nan
    volume[6, 1, 2] = np.inf
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, volume, imagej=True, metadata={"axes": "ZYX"})
    model = open_for_model(path, ndim=3, in_channels=1)
    np.testing.assert_array_equal(model.array[:, :4].compute()[0], volume[:4])  # clean planes
    with pytest.raises(InputError) as err:
        model.array[:, 4:6, 32:64, 32:64].compute()
    assert_clear(err, path, "nonfinite-input", "NaN or Inf", "series 0 level 0", "z=5, y=40, x=50")


# --- B10: tiny images -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (40, 30)])
def test_tiny_images_run_padded(tmp_path: Path, shape: tuple[int, int]) -> None:
    from pipeline.config import RunConfig
    from pipeline.predict import predict_array

    image = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiny.tif", image, photometric="rgb")
    model = open_for_model(tmp_path / "tiny.tif", ndim=2, in_channels=3)
    out = predict_array(model.array, cfg=RunConfig(backend="identity", tile=64))
    np.testing.assert_array_equal(out, image.transpose(2, 0, 1))
    assert open_for_model(
        tmp_path / "tiny.tif", ndim=2, in_channels=3, mpp=10.0, mpp_input=1.0
    ).array.shape == (3, 1, 1) or shape != (1, 1)


# --- B13: Zarr inputs with a deleted or truncated chunk ---------------------------------------


@pytest.mark.parametrize(("zarr_format", "codec"), [(2, "blosc"), (3, "zstd"), (3, None)])
def test_zarr_truncated_chunk_fails_deleted_chunk_is_fill(
    tmp_path: Path, zarr_format: int, codec: str | None
) -> None:
    """A missing chunk is the fill value in Zarr (writers skip empty chunks, zarr 3 by
    default), so a deleted chunk of an input reads as the fill value; a truncated one
    is corrupt."""
    import numcodecs
    from zarr.codecs import ZstdCodec

    compressors = {"blosc": numcodecs.Blosc(cname="lz4"), "zstd": ZstdCodec(), None: None}[codec]
    path = tmp_path / "a.zarr"
    arr = zarr.create_array(
        path,
        shape=(64, 64),
        chunks=(32, 32),
        dtype="u2",
        zarr_format=zarr_format,
        compressors=compressors,
        dimension_names=None if zarr_format == 2 else ["y", "x"],
        attributes={"_ARRAY_DIMENSIONS": ["y", "x"]} if zarr_format == 2 else None,
        fill_value=0,
    )
    arr[:] = 7
    chunk = path / ("1.1" if zarr_format == 2 else "c/1/1")
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    model = open_for_model(path, ndim=2, in_channels=1)
    assert int(model.array[:, :32, :32].sum().compute()) == 7 * 32 * 32
    with pytest.raises(InputError) as err:
        model.array[:, 40:50, 40:50].compute()
    assert_clear(err, path, "corrupt-input", "cannot decode", "level 0")
    chunk.unlink()
    again = open_for_model(path, ndim=2, in_channels=1)
    assert int(again.array[:, 32:, 32:].sum().compute()) == 0  # the fill value


# --- B15: names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "with space.tif",
        "brackets [1] (copy).tif",
        "Präparat_δ_標本.tif",
        "-starts-with-dash.tif",
        "two..dots.tif",
        "..tif",
    ],
)
def test_odd_file_names_are_read(tmp_path: Path, name: str) -> None:
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / name
    tifffile.imwrite(path, image, photometric="rgb")
    model = open_for_model(path, ndim=2, in_channels=3)
    assert model.ref.path == str(path)
    np.testing.assert_array_equal(model.array.compute(), image.transpose(2, 0, 1))
    with pytest.raises(InputError) as err:
        open_for_model(path, ndim=2, in_channels=1)
    assert str(path) in str(err.value)
