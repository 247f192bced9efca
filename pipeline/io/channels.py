"""Which of an image's channels feed the model: selection, alpha, palettes.

``--channels`` picks channels by index; without it an alpha channel is dropped when the
rest is what the model takes. A palette image becomes RGB through its colour map
(:func:`palette_colormap`) before channels are chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ChannelMismatchError

if TYPE_CHECKING:
    from pipeline.io.sources import ImageSource

log = logging.getLogger(__name__)


def choose_channels(
    source: ImageSource,
    channels: int,
    in_channels: int,
    selection: Sequence[int] | None,
    *,
    spatial: str = "yx",
) -> tuple[int, ...] | None:
    """Which of the image's ``channels`` feed the model; None for all of them.

    ``selection`` (``--channels``) picks channels by index, in that order, repeats
    allowed (``0,0,0`` feeds a gray image to an RGB model); without it an alpha channel
    is dropped when the rest is what the model takes. The result must have
    ``in_channels`` channels (0: any).

    Raises
    ------
    ChannelMismatchError
        An index out of range, or a channel count the model cannot take (the message
        says ``got N channels, model expects M``).
    """
    keep: tuple[int, ...] | None = None
    if selection is not None:
        bad = [i for i in selection if not 0 <= i < channels]
        if bad:
            raise ChannelMismatchError(
                f"has {channels} channel{'s' if channels != 1 else ''} (0..{channels - 1}); "
                f"--channels asks for {', '.join(map(str, bad))}",
                where=source.path,
                hint=f"choose channel indices from 0 to {channels - 1}",
            )
        keep = tuple(int(i) for i in selection)
    elif in_channels > 0 and channels != in_channels:
        alpha = alpha_channels(source, channels)
        if alpha and channels - len(alpha) == in_channels:
            log.info("%s: dropping the alpha channel for the model", source.path)
            keep = tuple(i for i in range(channels) if i not in alpha)
    got = len(keep) if keep is not None else channels
    if in_channels > 0 and got != in_channels:
        raise ChannelMismatchError(
            f"channel-mismatch: got {got} channel{'s' if got != 1 else ''}, "
            f"model expects {in_channels}",
            where=source.path,
            hint=_mismatch_hint(source, got, in_channels, spatial),
        )
    return keep


def _mismatch_hint(source: ImageSource, got: int, want: int, spatial: str) -> str:
    photometric = str(source.info.get("photometric", "")).upper()
    if photometric == "SEPARATED":
        return (
            "the image is CMYK, which needs a colour-managed conversion to RGB; convert "
            "it (e.g. with ImageMagick or vips) and rerun"
        )
    if got == 1 and want == 3:
        hint = "--channels 0,0,0 feeds the gray channel to all three model inputs"
        if "z" in spatial:
            hint += (
                "; a multi-page TIFF without metadata is read as a z stack, so if its "
                "pages are channels save it as OME-TIFF (axes CYX) or QPTIFF"
            )
        return hint
    if got > want:
        return (
            f"choose {want} of the {got} channels with --channels (e.g. --channels "
            f"{','.join(map(str, range(want)))}), or use a model trained on {got}"
        )
    return f"use a model trained on {got}-channel images, or convert the image to {want} channels"


def alpha_channels(source: ImageSource, channels: int) -> tuple[int, ...]:
    """Indices of alpha (opacity) channels, which carry no image content."""
    extras = [str(e).upper() for e in source.info.get("extrasamples") or ()]
    if extras:  # TIFF names its extra samples; they follow the colour samples
        first = channels - len(extras)
        return tuple(first + i for i, e in enumerate(extras) if e.endswith("ALPHA"))
    if source.info.get("photometric") is not None:  # TIFF says what its samples are
        rgb = str(source.info["photometric"]).upper() == "RGB"
        return (3,) if rgb and channels == 4 else ()
    labels = [str(n).strip().lower() for n in source.info.get("channel_names") or ()]
    if labels:
        return tuple(i for i, n in enumerate(labels) if n in ("a", "alpha"))
    # No metadata: four interleaved samples per pixel are conventionally RGBA.
    return (3,) if channels == 4 and source.axes.endswith("c") else ()


def palette_colormap(source: ImageSource, channels: int) -> np.ndarray | None:
    """A palette image's colour map as (3, entries) uint8, or None."""
    cmap = source.info.get("_colormap")
    if cmap is None or channels != 1 or str(source.info.get("photometric")).upper() != "PALETTE":
        return None
    cmap = np.asarray(cmap, dtype=np.float64)[:3]
    if cmap.max() > 255:  # TIFF colour maps are 16-bit
        cmap = cmap / 257.0
    return np.clip(np.rint(cmap), 0, 255).astype(np.uint8)
