"""Tissue and background: a coarse mask of where an image has something to segment.

Most of a whole-slide image is glass. :func:`detect_tissue` finds the tissue on a
low-resolution view of the slide (a pyramid level, or the image averaged down lazily)
read exactly as the model reads the image (:func:`pipeline.io.model_input.open_level`:
the same channels, palette mapping and MINISWHITE inversion); :func:`load_user_mask`
takes a mask the user drew. Both return a :class:`~pipeline.core.tissue_mask.TissueMask`
(cells over the run grid; see that module for the geometry).

When in doubt, tissue
---------------------
Skipping tissue loses results; processing glass only costs time. So detection returns
an all-tissue mask (method ``"...:no-background"``) when its threshold does not
separate a real background:

- brightfield: the background class must be bright glass (median optical density at
  most :data:`BG_MAX_OD`) and the tissue class must be clearly darker (median optical
  density at least :data:`MIN_CONTRAST_OD` above it). The threshold itself is Otsu's on
  log optical density, lowered to :data:`GLASS_MARGIN_OD` above the glass when Otsu
  splits pale from dark tissue;
- fluorescence: the tissue class must be clearly brighter (median intensity at least
  :data:`MIN_CONTRAST_RATIO` times the background's);
- a constant image has nothing to threshold.

Background regions smaller than :data:`MAX_HOLE` cells (about 128 x 128 µm) are filled,
so small images (a few hundred pixels) come out all tissue: at that scale gaps between
cells, lumina and the inside of membrane-stained cells would pass for background. A
clean-up that would remove every object keeps the thresholded pixels instead, so a
detected mask is never empty.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence

import numpy as np

from pipeline.core.tissue_mask import TissueMask, area_fraction
from pipeline.errors import ConfigError, InputError
from pipeline.io.masks import read_mask
from pipeline.io.model_input import InputRef, ModelInput, open_level
from pipeline.io.resample import reduce_blocks
from pipeline.io.sources import ImageSource

__all__ = ["KINDS", "TissueMask", "area_fraction", "detect_tissue", "load_user_mask"]

log = logging.getLogger(__name__)

KINDS = ("auto", "brightfield", "fluorescence")

#: Detection resolution (µm per mask cell) when the image states its pixel size.
TARGET_UM = 8.0
#: Without a pixel size: run pixels per cell, as if the slide were scanned at 0.5 µm/px.
#: Never finer: at fine cells, gaps between cells and lumina look like glass (small
#: images thereby end up all tissue: their background regions are below MAX_HOLE).
UNCALIBRATED_FACTOR = 16
#: Longest mask side: without a pixel size, and in any case (memory in the driver).
MAX_SIDE_UNCALIBRATED = 2048
MAX_SIDE = 4096
#: A pyramid level up to this much coarser than the target is still taken as is.
LEVEL_SLACK = 1.25

#: Brightfield: optical density (log10) of glass, and the least tissue/glass contrast.
BG_MAX_OD = 0.12
MIN_CONTRAST_OD = 0.05
#: Tissue is at least this much denser than the glass (its 90th percentile).
GLASS_MARGIN_OD = 0.02
#: Keeps log(OD) finite on saturated-white glass; well below any stain's density.
OD_FLOOR = 0.01
#: Fluorescence: the least ratio of tissue to background median intensity.
MIN_CONTRAST_RATIO = 2.0
#: Brightfield auto-detection: median luminance (uint8) of a slide with bright glass.
BRIGHT_MEDIAN = 100.0

#: Clean-up, in mask cells (about 8 µm each on a calibrated slide): specks of dust
#: below MIN_OBJECT go, holes below MAX_HOLE (vessel lumina, tears) are filled, and the
#: result grows by DILATE so faint tissue edges stay in.
MIN_OBJECT = 16
MAX_HOLE = 256
DILATE = 1
#: Fluorescence: gaps between nuclei closed with this radius; no object is removed
#: (a sparse cell may be a single cell at this resolution).
CLOSE = 2


# --------------------------------------------------------------------------- detection


def detect_tissue(
    source: ModelInput | ImageSource,
    run_shape: Sequence[int],
    *,
    kind: str = "auto",
    pixel_size: dict[str, float] | None = None,
) -> TissueMask:
    """Find the tissue of a 2D image on a low-resolution view of it.

    Parameters
    ----------
    source
        The input as the model reads it (:func:`~pipeline.io.model_input.open_for_model`):
        detection reads another level of it with the same channels and colour
        conversions. Or an opened level, read with every channel.
    run_shape
        Spatial shape ``(y, x)`` of the grid the model runs on: a level of ``source``,
        or any grid over the same extent (e.g. resampled to a requested µm/px).
    kind
        ``"brightfield"`` (stained tissue on bright glass: Otsu on log optical density),
        ``"fluorescence"`` (bright objects on a dark background: Otsu on log intensity)
        or ``"auto"``: brightfield for 8-bit RGB with a bright median, else fluorescence.
    pixel_size
        µm per run-grid pixel (``y``, ``x``), when known better than the file says
        (e.g. ``--mpp-input``); default: the source's, scaled to ``run_shape``.

    Returns
    -------
    TissueMask
        On a grid of about :data:`TARGET_UM` µm per cell, or of
        :data:`UNCALIBRATED_FACTOR` run pixels per cell without a pixel size (coarser
        where the mask would be longer than :data:`MAX_SIDE` or
        :data:`MAX_SIDE_UNCALIBRATED`). See the module notes for when it is all tissue.

    Raises
    ------
    ConfigError
        An unknown ``kind``.
    InputError
        A volume (tissue detection is for 2D images) or an unreadable level.
    """
    if kind not in KINDS:
        raise ConfigError(
            f"unknown tissue detection kind {kind!r}",
            where="tissue kind",
            hint=f"use one of {', '.join(KINDS)}",
        )
    run_shape = tuple(int(n) for n in run_shape)
    if isinstance(source, ModelInput):
        ref, source = source.ref, source.source
    else:
        ref = InputRef.of(source)
    image, scale, dtype = _detection_view(source, ref, run_shape, pixel_size)
    if kind == "auto":
        kind = _guess_kind(image, dtype)
    if kind == "brightfield":
        mask, method = _brightfield(image, dtype)
    else:
        mask, method = _fluorescence(image)
    fraction = area_fraction(mask, scale, run_shape)
    log.info(
        "%s: tissue %.1f %% (%s, %s cells of %s run pixels)",
        source.path,
        100 * fraction,
        method,
        "x".join(map(str, mask.shape)),
        "x".join(f"{s:.3g}" for s in scale),
    )
    return TissueMask(mask, scale, fraction, method)


def _detection_view(
    source: ImageSource, ref: InputRef, run_shape: tuple[int, ...], pixel_size: dict | None
) -> tuple[np.ndarray, tuple[float, ...], str]:
    """A small ``(C, y, x)`` float32 image of the slide, run pixels per its pixel, and
    the dtype the model reads.

    Takes the pyramid level nearest the target resolution (never much coarser), read as
    ``ref`` reads the image, then averages it down lazily by a whole factor if that is
    still too large.
    """
    planes = dict(zip(source.axes, source.shape)).get("z", 1)
    if len(run_shape) != 2 or planes > 1:
        raise InputError(
            f"is not a 2D image (run grid {run_shape}, {planes} planes); "
            "tissue detection works on slides",
            where=source.path,
            hint="run without tissue detection, or pass a 2D mask file",
        )
    yx = [source.axes.index("y"), source.axes.index("x")]
    shapes = [tuple(level[i] for i in yx) for level in source.levels]
    want, longest = _target(source, run_shape, pixel_size)
    ratios = [float(np.mean([r / n for r, n in zip(run_shape, shape)])) for shape in shapes]
    fits = [i for i, d in enumerate(ratios) if d <= want * LEVEL_SLACK]
    level = max(fits, key=lambda i: ratios[i]) if fits else int(np.argmin(ratios))
    factor = max(1, math.ceil(want / ratios[level] - 0.25), math.ceil(max(shapes[level]) / longest))
    array = open_level(ref, level).array
    image = reduce_blocks(array, factor, np.mean).astype(np.float32, copy=False)
    scale = tuple(r / n * factor for r, n in zip(run_shape, shapes[level]))
    log.debug(
        "%s: tissue detection on level %d / %d (%s)",
        source.path,
        level,
        factor,
        "x".join(map(str, image.shape)),
    )
    return image, scale, str(array.dtype)


def _target(
    source: ImageSource, run_shape: tuple[int, ...], pixel_size: dict[str, float] | None
) -> tuple[float, int]:
    """Run pixels per mask cell to aim for, and the longest mask side allowed."""
    if pixel_size is None:  # the source level's extent over the run grid
        extent = dict(zip(source.axes, source.shape))
        pixel_size = {
            a: source.pixel_size[a] * extent[a] / n
            for a, n in zip("yx", run_shape)
            if a in source.pixel_size
        }
    sizes = [pixel_size.get(a) for a in "yx"]
    longest = MAX_SIDE if all(sizes) else MAX_SIDE_UNCALIBRATED
    finest = TARGET_UM / float(np.mean(sizes)) if all(sizes) else UNCALIBRATED_FACTOR
    return max(1.0, finest, max(run_shape) / longest), longest


def _guess_kind(image: np.ndarray, dtype: str) -> str:
    if image.shape[0] in (3, 4) and dtype == "uint8":
        luminance = image[:3].mean(axis=0)
        if float(np.median(luminance)) >= BRIGHT_MEDIAN:
            return "brightfield"
    return "fluorescence"


def _white(image: np.ndarray, dtype: str) -> float:
    """Full scale of the detector: the dtype's for 8 bits, else the bit depth in use.

    Never estimated from the brightest pixels: on an all-tissue slide those are tissue,
    and calling them glass would skip it.
    """
    if dtype == "uint8":
        return 255.0
    top = float(image.max(initial=0))
    if np.issubdtype(np.dtype(dtype), np.integer):
        return float(2 ** max(1, math.ceil(math.log2(top + 1))) - 1)
    return max(1.0, top)


def _brightfield(image: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """Otsu on log optical density: glass is near zero, every stain well above it."""
    rgb = image[:3]
    white = _white(rgb, dtype)
    od = -np.log10(np.clip(rgb, 1.0, white) / white).mean(axis=0)
    threshold = otsu_threshold(np.log(od + OD_FLOOR))
    if threshold is None:
        return _everything(image, "otsu-od", "the image is uniform")
    # Otsu may split pale from dark tissue; anything clearly above the glass is tissue
    glass = od[np.log(od + OD_FLOOR) <= threshold]
    threshold = min(
        math.exp(threshold) - OD_FLOOR, float(np.percentile(glass, 90)) + GLASS_MARGIN_OD
    )
    raw = od > threshold
    if raw.all() or not raw.any():
        return _everything(image, "otsu-od", "the image is uniform")
    background, tissue = float(np.median(od[~raw])), float(np.median(od[raw]))
    if background > BG_MAX_OD:
        return _everything(
            image,
            "otsu-od",
            f"no bright glass (background optical density {background:.3f} > {BG_MAX_OD})",
        )
    if tissue - background < MIN_CONTRAST_OD:
        return _everything(
            image,
            "otsu-od",
            f"tissue barely darker than glass (optical density {tissue:.3f} vs {background:.3f})",
        )
    return _clean(raw, fluorescence=False), "otsu-od"


def _fluorescence(image: np.ndarray) -> tuple[np.ndarray, str]:
    """Otsu on log intensity (channels scaled to their own range, brightest taken)."""
    top = np.percentile(image.reshape(image.shape[0], -1), 99.9, axis=1)
    bottom = image.reshape(image.shape[0], -1).min(axis=1)
    span = np.maximum(top - bottom, 1e-12).reshape(-1, 1, 1)
    intensity = ((image - bottom.reshape(-1, 1, 1)) / span).max(axis=0)
    feature = np.log(np.clip(intensity, 0.0, None) + 1e-3)
    threshold = otsu_threshold(feature)
    if threshold is None:
        return _everything(image, "fluorescence-threshold", "the image is uniform")
    raw = feature > threshold
    if raw.all() or not raw.any():
        return _everything(image, "fluorescence-threshold", "the image is uniform")
    # contrast on the stored values, so a camera offset does not pass for background;
    # the channel that separates best decides
    ratios = [float(np.median(c[raw])) / max(float(np.median(c[~raw])), 1e-12) for c in image]
    if max(ratios) < MIN_CONTRAST_RATIO:
        return _everything(
            image,
            "fluorescence-threshold",
            f"objects barely brighter than the background (median ratio {max(ratios):.2f})",
        )
    return _clean(raw, fluorescence=True), "fluorescence-threshold"


def _everything(image: np.ndarray, method: str, why: str) -> tuple[np.ndarray, str]:
    log.info("no background found (%s): treating the whole image as tissue", why)
    return np.ones(image.shape[1:], bool), f"{method}:no-background"


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float | None:
    """Otsu's threshold of the finite ``values`` (``values > t`` is the upper class).

    None when the values are constant.
    """
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return None
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    # the upper edge of the best lower class: everything above it is the upper class
    return float(edges[int(np.argmax(np.nan_to_num(between[:-1]))) + 1])


def _clean(raw: np.ndarray, *, fluorescence: bool) -> np.ndarray:
    """Remove specks, fill small holes, grow a little; never returns an empty mask."""
    from scipy import ndimage

    mask = raw
    if fluorescence:
        mask = ndimage.binary_closing(mask, _disk(CLOSE), border_value=0) | mask
    else:
        mask = _drop_small(mask, MIN_OBJECT)
        if not mask.any():  # only specks: keep them rather than skip the whole slide
            mask = raw
    mask = ~_drop_small(~mask, MAX_HOLE)
    return ndimage.binary_dilation(mask, _disk(DILATE))


def _drop_small(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` without its 8-connected components smaller than ``size`` cells."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= size
    keep[0] = False
    return keep[labels]


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius + radius  # round-ish


# --------------------------------------------------------------------------- user masks


def load_user_mask(path: str | os.PathLike, run_shape: Sequence[int]) -> TissueMask:
    """A mask file the user made: nonzero pixels are tissue.

    Parameters
    ----------
    path
        A 2D image of any size with the slide's aspect ratio: PNG/JPEG/BMP, a TIFF, a
        Zarr array or an OME-Zarr image (a pyramid level near the mask's size is used).
        Several channels: tissue where any is nonzero (RGB only for RGBA images).
    run_shape
        Shape of the grid the model runs on; its last two axes are ``(y, x)``.

    Returns
    -------
    TissueMask
        Method ``"user-mask"``; masks longer than :data:`MAX_SIDE` are reduced with
        "any" (a cell is tissue if any of its pixels is).

    Raises
    ------
    InputError
        Unreadable, not 2D, or an aspect ratio that does not match the image.
    """
    where = os.fspath(path)
    run_shape = tuple(int(n) for n in run_shape)
    if len(run_shape) < 2:
        raise ValueError(f"run_shape needs y and x, got {run_shape}")
    run_yx = run_shape[-2:]
    nonzero, stored, factor = read_mask(where, min(max(run_yx), MAX_SIDE), MAX_SIDE)
    _check_aspect(where, stored, run_yx)
    scale = tuple(r / n * factor for r, n in zip(run_yx, stored))
    fraction = area_fraction(nonzero, scale, run_yx)
    if fraction == 0.0:
        log.warning("%s: the mask has no tissue; every tile will be skipped", where)
    return TissueMask(nonzero, scale, fraction, "user-mask")


def _check_aspect(where: str, stored: Sequence[int], run_yx: Sequence[int]) -> None:
    """A mask must cover the image: same aspect ratio, within rounding of its pixels."""
    (my, mx), (ry, rx) = stored, run_yx
    mismatch = abs((my / mx) / (ry / rx) - 1.0)
    if mismatch > 0.02 + 1.0 / min(my, mx):
        raise InputError(
            f"has shape {my}x{mx}, which does not have the image's aspect ratio "
            f"({ry}x{rx} pixels on the run grid)",
            where=where,
            hint="export the mask over the whole slide (any size, same proportions)",
        )
