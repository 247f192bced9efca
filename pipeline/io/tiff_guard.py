"""Decompression-bomb guard for TIFF tiles.

A JPEG or JPEG 2000 tile whose own header declares more pixels than the tile holds would
make the decoder allocate the declared size (libjpeg allocated 10 GB for a 32 × 32 tile):
such a tile is refused before decoding. zlib and friends already stop at the tile size.
This wraps tifffile's per-page decode function, an internal of tifffile.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

#: TIFF compression codes whose tiles are JPEG or JPEG 2000 streams with their own size.
_JPEG_CODES = frozenset({6, 7, 34892})
_J2K_CODES = frozenset({33003, 33004, 33005, 34712})


def guard_decoders(level: Any) -> None:
    """Refuse to decode a JPEG / JPEG 2000 tile whose header declares more pixels than
    the tile holds.

    The decoders allocate what the stream's header says before noticing that it does
    not fit (a 32 x 32 tile claiming 60,000 x 60,000 pixels takes 10 GB). tifffile
    caches each page's decode function on the page (``TiffPage.decode``); it is wrapped
    there, for this opened file only, with a check of the stream's header.
    """
    seen: set[int] = set()
    for page in (level[i] for i in range(len(level))):
        keyframe = getattr(page, "keyframe", None)
        if keyframe is None or id(keyframe) in seen:
            continue
        seen.add(id(keyframe))
        code = int(keyframe.compression)
        reader = _jpeg_size if code in _JPEG_CODES else _j2k_size if code in _J2K_CODES else None
        axes, chunks = keyframe.axes, keyframe.chunks  # planar RGB: axes SYX, chunks (y, x)
        sizes = dict(zip(axes[len(axes) - len(chunks) :], chunks))
        if reader is None or "Y" not in sizes or "X" not in sizes:
            continue
        try:
            original = keyframe.decode  # tifffile's cached per-page decode function
        except Exception:  # noqa: BLE001 - tifffile raises its own when it cannot decode
            continue  # reading will report it
        keyframe.__dict__["decode"] = functools.partial(
            _checked_decode, original, reader, (sizes["Y"], sizes["X"])
        )


def _checked_decode(
    original: Callable[..., Any],
    reader: Callable[[bytes], tuple[int, int] | None],
    limit: tuple[int, int],
    data: bytes | None,
    index: int,
    /,
    **kwargs: Any,
) -> Any:
    if data is not None:
        size = reader(bytes(data[:65536]))
        if size is None and kwargs.get("jpegheader"):
            size = reader(kwargs["jpegheader"])  # NDPI: the size is in the shared header
        if size is not None and (size[0] > limit[0] or size[1] > limit[1]):
            raise ValueError(
                f"a compressed tile declares {size[0]} x {size[1]} pixels but tiles are "
                f"{limit[0]} x {limit[1]} (corrupt, or a decompression bomb); not decoded"
            )
    return original(data, index, **kwargs)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG stream's start-of-frame marker, if it has one."""
    i = 2 if data[:2] == b"\xff\xd8" else 0
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no frame header here
            return None
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return height, width
        i += 2 + length
    return None


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG 2000 codestream's SIZ marker (raw or in a JP2 box)."""
    at = data.find(b"\xff\x4f\xff\x51")
    if at < 0 or at + 24 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", data[at + 8 : at + 24])
    return ysiz - yosiz, xsiz - xosiz
