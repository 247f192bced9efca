"""Preview images: an input's thumbnail with its segmentation over it in class colours, as PNG.

:func:`compose_preview` is pure (arrays in, an RGB array out); :func:`write_png` stores it
atomically; :func:`make_preview` reads what a preview needs, cheaply: the coarsest pyramid
level of the input that is still at least ``size`` pixels on its longer side (strided
reading through dask when the only level is large, so memory stays bounded by a few
chunks), and the level of the output nearest that size. Volumes show their middle z plane.

Label value 0 is background and stays uncoloured. An output image of class probabilities
becomes labels the way the class label image does: ``argmax`` over classes when there are
several (class channel 0 is background, as for a softmax U-Net), ``probability >=
threshold`` when there is one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.atomic import write_output
from pipeline.core.classes import PALETTE as CLASS_PALETTE
from pipeline.core.classes import class_labels, default_colour
from pipeline.errors import OutputError

if TYPE_CHECKING:
    import dask.array

__all__ = [
    "MAX_SIDE",
    "PALETTE",
    "PREVIEW_SIZE",
    "coarsest_level",
    "compose_preview",
    "encode_png",
    "labels_from_probabilities",
    "make_preview",
    "read_input_thumbnail",
    "read_output_labels",
    "to_rgb8",
    "write_png",
]

logger = logging.getLogger(__name__)

#: A preview never exceeds this many pixels on either side.
MAX_SIDE = 2048
#: The input level read for a preview is the coarsest one at least this long (longer side).
PREVIEW_SIZE = 1024
#: Colours of labels 1, 2, 3... (cycled): the classes' colours everywhere (pipeline.core.classes).
PALETTE = CLASS_PALETTE

Colours = Mapping[int, Sequence[int]] | Sequence[Sequence[int]]


def compose_preview(
    thumbnail: np.ndarray,
    mask: np.ndarray,
    *,
    colours: Colours | None = None,
    alpha: float = 0.4,
    contour: bool = True,
    threshold: float = 0.5,
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """The thumbnail with the segmentation drawn over it.

    Parameters
    ----------
    thumbnail
        ``(H, W)`` grey, ``(H, W, 1|2|3|4)`` channels last; any dtype (see :func:`to_rgb8`).
    mask
        Labels ``(h, w)`` (integers or bool, 0 = background) or class probabilities
        ``(C, h, w)`` (float 0..1 or uint8 0..255, see :func:`labels_from_probabilities`);
        resized to the thumbnail by nearest neighbour.
    colours
        Colour of each label: a mapping ``{label: (r, g, b)}`` or a sequence whose item
        ``i`` colours label ``i + 1``; labels without one take :data:`PALETTE`'s.
    alpha
        Opacity of the fill (0..1).
    contour
        Draw each region's one-pixel border opaque.
    threshold
        For one-class probabilities.
    max_side
        The result is shrunk (aspect kept) to at most this many pixels a side.

    Returns
    -------
    numpy.ndarray
        ``(H', W', 3)`` uint8 RGB.
    """
    thumbnail = np.asarray(thumbnail)
    height, width = thumbnail.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:  # shrink first: the contrast stretch then sees fewer pixels
        height = max(1, round(height * scale))
        width = max(1, round(width * scale))
        thumbnail = _resize_nearest(thumbnail, height, width)
    rgb = to_rgb8(thumbnail)
    mask = np.asarray(mask)
    if mask.ndim == 3:
        labels = labels_from_probabilities(mask, threshold)
    elif mask.ndim == 2:
        labels = mask.astype(np.int64) if mask.dtype == bool else mask
    else:
        raise ValueError(f"mask must be (h, w) labels or (C, h, w) probabilities, got {mask.shape}")
    labels = _resize_nearest(labels, height, width)
    fg = labels != 0
    if not fg.any():
        return rgb
    colour = _colours(labels, fg, colours)
    edge = fg & _edges(labels) if contour else None
    out = np.empty(rgb.shape, np.uint8)
    # band by band (temporaries in cache), the same float32 arithmetic per pixel as
    # blending only the foreground, in whole-array operations (no gathers by mask)
    for top in range(0, height, _BAND_ROWS):
        rows = slice(top, top + _BAND_ROWS)
        c = colour(rows)
        band = rgb[rows].astype(np.float32)
        band = np.where(fg[rows, :, None], (1.0 - alpha) * band + alpha * c, band)
        if edge is not None:
            band = np.where(edge[rows, :, None], c, band)
        out[rows] = np.clip(np.rint(band), 0, 255)
    return out


#: Rows per band of :func:`compose_preview`'s blending.
_BAND_ROWS = 32


#: Up to this label value a colour table covers every value (counting which values occur,
#: an int64 copy of the labels, costs more than colouring them all).
_ALL_COLOURS = 4096


def _colours(labels: np.ndarray, fg: np.ndarray, colours: Colours | None):
    """``rows -> (len(rows), w, 3)`` float32 colour of each pixel's label (background:
    black): a lookup table over the label values for small non-negative integers, a
    sort of the foreground's values otherwise."""
    if labels.dtype.kind in "ub" or (labels.dtype.kind == "i" and labels.min() >= 0):
        top = int(labels.max())
        if top < 2**16:
            if top <= _ALL_COLOURS:  # every value up to the largest: no count needed
                present = np.arange(1, top + 1)
            else:
                present = np.flatnonzero(np.bincount(labels.ravel(), minlength=top + 1)[1:]) + 1
            table = np.zeros((top + 1, 3), np.float32)
            table[present] = [_colour_of(int(v), colours) for v in present]
            return lambda rows: table[labels[rows]]
    values, index = np.unique(labels[fg], return_inverse=True)
    table = np.array([_colour_of(int(v), colours) for v in values], dtype=np.float32)
    full = np.zeros((*labels.shape, 3), np.float32)
    full[fg] = table[index]
    return lambda rows: full[rows]


def labels_from_probabilities(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """``(C, h, w)`` class probabilities → ``(h, w)`` labels (0 = background), the way the
    class label image makes them (:func:`pipeline.core.classes.class_labels`): uint8 values
    are probability × 255; one class: 1 where ``p >= threshold``; several: the most
    probable class (channel 0 being background). NaN counts as 0.
    """
    probs = np.asarray(probabilities)
    if probs.ndim != 3 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must be (C, h, w) with C >= 1, got {probs.shape}")
    return class_labels(probs, threshold)


def to_rgb8(image: np.ndarray) -> np.ndarray:
    """Any 2-D image (channels last) → ``(H, W, 3)`` uint8 RGB for display.

    uint8 is kept as is; bool becomes 0/255; other types are stretched per channel from
    their 0.5th to 99.5th percentile (finite values only). One channel is grey, two are
    shown magenta/green, three or more as RGB from the first three.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] == 0:
        raise ValueError(f"a thumbnail must be (H, W) or (H, W, C), got {img.shape}")
    img = img[:, :, :3]
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    elif img.dtype != np.uint8:
        img = np.stack([_stretch(img[:, :, c]) for c in range(img.shape[2])], axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 2:
        return np.stack([img[:, :, 0], img[:, :, 1], img[:, :, 0]], axis=2)
    return np.ascontiguousarray(img)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W, 3)`` (or ``(H, W)``, ``(H, W, 1|2|4)``) image.

    Rows filtered with PNG's SUB filter (in numpy), compressed with libdeflate at level
    1: a 2048² slide preview encodes about twice as fast as libpng at zlib level 1, and
    in fewer bytes. The file is a plain 8-bit PNG (signature, IHDR, one IDAT, IEND).
    """
    import imagecodecs

    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in _PNG_COLOUR_TYPES:
        raise ValueError(f"a PNG image must be (H, W) or (H, W, 1|2|3|4), got {image.shape}")
    height, width, channels = image.shape
    rows = image.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = 1  # SUB: each byte minus the byte one pixel to its left (mod 256)
    filtered[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels :])
    if imagecodecs.DEFLATE.available:
        data = bytes(imagecodecs.deflate_encode(filtered, level=1))  # a zlib stream
    else:
        data = zlib.compress(filtered.tobytes(), 1)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join(
        [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", data),
         _png_chunk(b"IEND", b"")]
    )  # fmt: skip


#: PNG colour type by channels: grey, grey + alpha, RGB, RGBA.
_PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write ``rgb`` as PNG atomically (a temporary file beside ``path``, then a rename).

    Readers see the old file or the new one, never half of one; the folder is created.

    Raises
    ------
    OutputError
        When the file cannot be written.
    """
    return write_output(path, encode_png(rgb), "preview")


def make_preview(
    input_path: str | os.PathLike,
    output_image: str | os.PathLike,
    png_path: str | os.PathLike,
    *,
    series: int | None = None,
    colours: Colours | None = None,
    threshold: float = 0.5,
    size: int = PREVIEW_SIZE,
    max_side: int = MAX_SIDE,
    alpha: float = 0.4,
    contour: bool = True,
) -> Path:
    """Write the preview PNG of one input and its output.

    Parameters
    ----------
    input_path, series
        The input image as the run opened it.
    output_image
        The output's NGFF image group (class probabilities), or an NGFF label image
        (``image-label`` metadata: its values are the labels and its colours are used).
    png_path
        Where the PNG goes (written atomically).
    colours, threshold, alpha, contour
        As for :func:`compose_preview`.
    size, max_side
        The coarsest input level at least ``size`` long is read, at most ``max_side`` a side.

    Returns
    -------
    pathlib.Path
        ``png_path``.

    Raises
    ------
    pipeline.errors.PipelineError
        ``InputError`` when the input cannot be read, ``OutputError`` when the output is
        not an NGFF image or the PNG cannot be written. A preview is an extra: callers
        log the error and carry on.
    """
    thumbnail = read_input_thumbnail(input_path, series=series, size=size, max_side=max_side)
    labels, label_colours = read_output_labels(
        output_image, target=thumbnail.shape[:2], threshold=threshold
    )
    rgb = compose_preview(
        thumbnail,
        labels,
        colours=colours if colours is not None else label_colours,
        alpha=alpha,
        contour=contour,
        max_side=max_side,
    )
    return write_png(png_path, rgb)


def read_input_thumbnail(
    path: str | os.PathLike,
    *,
    series: int | None = None,
    size: int = PREVIEW_SIZE,
    max_side: int = MAX_SIDE,
) -> np.ndarray:
    """The input's middle plane, small: ``(H, W, 3)`` uint8 with ``H, W <= max_side``.

    Reads the coarsest pyramid level at least ``size`` pixels long, every ``s``-th pixel
    of it when it is longer than ``max_side``; nothing else is decoded.
    """
    array, axes = _open_input(path, series, size)
    plane = _plane(array, axes, max_side, channels=3)
    return to_rgb8(np.moveaxis(plane, 0, -1) if "c" in axes else plane)


def _open_input(
    path: str | os.PathLike, series: int | None, size: int
) -> tuple[dask.array.Array, str]:
    """The lazy input level a preview reads: the only place that knows the read path."""
    from pipeline.io.sources import open_image

    source = open_image(path, series=series, level=0)
    level = coarsest_level(source.levels, source.axes, size)
    if level:
        source = open_image(path, series=series, level=level)
    return source.array, source.axes


def read_output_labels(
    image: str | os.PathLike, *, target: Sequence[int], threshold: float = 0.5
) -> tuple[np.ndarray, dict[int, tuple[int, int, int]] | None]:
    """Labels ``(h, w)`` of an output image at about ``target`` (h, w), and their colours.

    The level read is the coarsest whose longer side is at least ``target``'s (strided
    when it is more than twice as long). Probabilities become labels as in
    :func:`labels_from_probabilities`; a label image gives its values and colours.
    """
    import dask.array as da
    import zarr

    where = os.fspath(image)
    try:
        group = zarr.open_group(where, mode="r")
        attrs = group.attrs.asdict()
        meta = attrs.get("ome", attrs)
        multiscale = meta["multiscales"][0]
        paths = [d["path"] for d in multiscale["datasets"]]
        axes = "".join(
            (a["name"] if isinstance(a, dict) else str(a)) for a in multiscale["axes"]
        ).lower()
        arrays = [group[p] for p in paths]
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise OutputError.because(
            exc,
            "is not a readable NGFF image",
            where=where,
            hint="pass the output image group (or its label image) the run published",
        ) from exc
    if not arrays or {"y", "x"} - set(axes) or any(a.ndim != len(axes) for a in arrays):
        raise OutputError(
            f"has multiscales axes {axes!r} that do not match its arrays",
            where=where,
            hint="pass an NGFF image with y and x axes",
        )
    want = max(int(t) for t in target)
    level = coarsest_level([a.shape for a in arrays], axes, want)
    try:
        plane = _plane(da.from_zarr(arrays[level]), axes, 2 * want)
    except (OSError, ValueError, RuntimeError) as exc:
        raise OutputError.because(
            exc,
            f"level {paths[level]} cannot be read",
            where=where,
            hint="the output is damaged; rerun that input",
        ) from exc
    if "image-label" in meta:
        if plane.ndim == 3:
            plane = plane[0]
        return plane, _label_colours(meta["image-label"])
    if plane.ndim == 2:
        plane = plane[None]
    return labels_from_probabilities(plane, threshold), None


def coarsest_level(shapes: Sequence[Sequence[int]], axes: str, size: int) -> int:
    """Index of the coarsest level whose longer (y, x) side is ``>= size``; 0 if none."""
    y, x = axes.index("y"), axes.index("x")
    longest = [max(s[y], s[x]) for s in shapes]
    fits = [i for i, n in enumerate(longest) if n >= size]
    return min(fits, key=lambda i: longest[i]) if fits else 0


def _plane(
    array: dask.array.Array, axes: str, max_side: int, channels: int | None = None
) -> np.ndarray:
    """One (c, y, x) or (y, x) plane: t = 0, the middle z, y and x strided to ``max_side``.

    Only the chunks the plane touches are decoded, a few at a time.
    """
    longest = max(array.shape[axes.index("y")], array.shape[axes.index("x")])
    step = max(1, math.ceil(longest / max_side))
    index: list[Any] = []
    for axis, n in zip(axes, array.shape):
        if axis in "yx":
            index.append(slice(None, None, step))
        elif axis == "c":
            index.append(slice(0, channels))
        elif axis == "z":
            index.append(n // 2)
        else:
            index.append(0)
    kept = "".join(a for a in axes if a in "cyx")
    plane = array[tuple(index)]
    order = [kept.index(a) for a in "cyx" if a in kept]
    # threads, not a Dask client that may be the default here: a preview is a small read
    return np.asarray(plane.transpose(order).compute(scheduler="threads"))


def _label_colours(meta: Mapping[str, Any]) -> dict[int, tuple[int, int, int]] | None:
    colours = {}
    for entry in meta.get("colors") or []:
        with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
            rgba = entry["rgba"]
            colours[int(entry["label-value"])] = (int(rgba[0]), int(rgba[1]), int(rgba[2]))
    return colours or None


def _colour_of(label: int, colours: Colours | None) -> tuple[int, int, int]:
    if isinstance(colours, Mapping) and label in colours:
        return tuple(int(c) for c in colours[label][:3])
    if colours is not None and not isinstance(colours, Mapping) and len(colours):
        return tuple(int(c) for c in colours[(label - 1) % len(colours)][:3])
    return default_colour(label)


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes (pixel centres map to centres)."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return image[rows][:, cols]


def _edges(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbourhood holds another label (image borders do not count)."""
    edge = np.zeros(labels.shape, dtype=bool)
    diff_y = labels[1:] != labels[:-1]
    diff_x = labels[:, 1:] != labels[:, :-1]
    edge[1:] |= diff_y
    edge[:-1] |= diff_y
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    return edge


def _stretch(channel: np.ndarray) -> np.ndarray:
    values = channel.astype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(channel.shape, dtype=np.uint8)
    low, high = np.percentile(finite, (0.5, 99.5))
    if high <= low:
        high = low + 1.0
    scaled = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)
