"""Axis names: from what files call them to what the model needs.

Readers keep a file's own axis order but name the axes with the canonical letters
``t``, ``c``, ``z``, ``y``, ``x`` (:func:`plan_axes`); :func:`to_model_layout` then
brings an image into the model's ``c`` + spatial order, lazily.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.errors import InputError

if TYPE_CHECKING:
    import dask.array

    from pipeline.io.sources import ImageSource

logger = logging.getLogger(__name__)

CANONICAL = "tczyx"

#: Letters that mean "a stack of something" without saying what (tifffile's I and Q).
STACK = "i"
#: Interleaved samples (tifffile's S): colour components, they become channels.
SAMPLES = "s"


def plan_axes(
    labels: Sequence[str], shape: Sequence[int], where: str
) -> tuple[tuple[Any, ...], str]:
    """Name a stored array's axes canonically, dropping unnamed axes of length 1.

    Parameters
    ----------
    labels
        One label per stored axis: a canonical letter, ``"s"`` (samples), ``"i"``
        (an unnamed stack) or anything else (an axis the pipeline does not know).
    shape
        The stored shape.
    where
        The file, for error messages.

    Returns
    -------
    index, axes
        ``array[index]`` has the axes ``axes`` (letters from ``"tczyx"``, stored order).
    """
    labels = [str(label).lower() for label in labels]
    sizes = dict(zip(labels, shape))
    if SAMPLES in sizes and "c" in sizes:
        # Both channels and samples: keep whichever is not a singleton.
        drop = SAMPLES if sizes[SAMPLES] == 1 else "c" if sizes["c"] == 1 else None
        if drop is None:
            raise InputError(
                f"has both {sizes['c']} channels and {sizes[SAMPLES]} samples per pixel",
                where=where,
                hint="export one channel or convert the samples to channels",
                reason="unsupported-format",
            )
        labels[labels.index(drop)] = "?" + drop
    index: list[Any] = []
    axes = ""
    for label, size in zip(labels, shape):
        name = _canonical(label, axes, labels)
        if name is None or name in axes:
            if size != 1:
                raise InputError(
                    f"has an axis {label!r} of length {size} the pipeline cannot place "
                    f"among {CANONICAL!r} (axes {''.join(labels)!r}, shape {tuple(shape)})",
                    where=where,
                    hint="export the image with t, c, z, y, x axes only",
                    reason="unsupported-format",
                )
            index.append(0)
            continue
        index.append(slice(None))
        axes += name
    if "y" not in axes or "x" not in axes:
        raise InputError(
            f"has no y and x axes (axes {''.join(labels)!r}, shape {tuple(shape)})",
            where=where,
            hint="pass an image with at least two spatial axes",
            reason="unsupported-format",
        )
    return tuple(index), axes


def apply_plan(values: Sequence[int], index: Sequence[Any]) -> tuple[int, ...]:
    """The entries of ``values`` (a shape or chunks) on the axes ``index`` keeps."""
    return tuple(int(v) for v, i in zip(values, index) if isinstance(i, slice))


def _canonical(label: str, taken: str, labels: Sequence[str]) -> str | None:
    if label in CANONICAL:
        return label
    if label == SAMPLES:
        return "c"
    if label == STACK:
        # An unnamed page stack is z (an EM section series), unless z is named elsewhere.
        for name in "zt":
            if name not in taken and name not in labels:
                return name
    return None


def _take(array: "dask.array.Array", axes: str, axis: str, index: Any) -> "dask.array.Array":
    selection = tuple(index if a == axis else slice(None) for a in axes)
    return array[selection]


def to_model_layout(
    source: "ImageSource", ndim: int, in_channels: int
) -> tuple["dask.array.Array", str, dict[str, float]]:
    """Bring an image into the axes a model takes: ``c`` then the spatial axes.

    Parameters
    ----------
    source
        An opened image.
    ndim
        2 for a 2D model, 3 for a 3D model. A 2D model on a volume keeps ``z`` (the
        caller runs it plane by plane).
    in_channels
        Channels the model expects; 0 means any.

    Returns
    -------
    array, spatial, pixel_size
        A lazy array with axes ``"c" + spatial``; ``spatial`` is ``"yx"`` or
        ``"zyx"``; the pixel sizes (µm) known for those axes.

    Raises
    ------
    InputError
        A time series, a 3D model on a 2D image, or a channel count the model cannot
        take (reason ``channel-mismatch``).
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    array, axes = source.array, source.axes
    sizes = dict(zip(axes, array.shape))
    if "t" in axes:
        if sizes["t"] != 1:
            raise InputError(
                f"is a time series of {sizes['t']} time points",
                where=source.path,
                hint="export the time points as separate images",
            )
        array, axes = _take(array, axes, "t", 0), axes.replace("t", "")
    if "z" in axes and sizes["z"] == 1 and ndim == 2:
        array, axes = _take(array, axes, "z", 0), axes.replace("z", "")
    if ndim == 3 and sizes.get("z", 1) == 1:
        raise InputError(
            "is a 2D image but the model is 3D",
            where=source.path,
            hint="use a 2D model, or pass a volume (a z stack)",
        )
    if "c" not in axes:
        array, axes = array[None], "c" + axes
    spatial = "zyx" if "z" in axes else "yx"
    order = "c" + spatial
    array = array.transpose([axes.index(a) for a in order])
    array = _match_channels(source, array, in_channels)
    pixel_size = {a: source.pixel_size[a] for a in spatial if a in source.pixel_size}
    return array, spatial, pixel_size


def _match_channels(
    source: "ImageSource", array: "dask.array.Array", in_channels: int
) -> "dask.array.Array":
    channels = int(array.shape[0])
    if in_channels <= 0 or channels == in_channels:
        return array
    if channels == 4 and in_channels == 3 and _is_rgba(source):
        logger.info("%s: dropping the alpha channel for an RGB model", source.path)
        return array[:3]
    raise InputError(
        f"channel-mismatch: got {channels} channels, model expects {in_channels}",
        where=source.path,
        hint=f"use a model trained on {channels}-channel images, or convert the image "
        f"to {in_channels} channels",
        reason="channel-mismatch",
    )


def _is_rgba(source: "ImageSource") -> bool:
    """Whether four channels are red, green, blue and alpha (so alpha may go)."""
    if source.info.get("photometric") is not None:  # TIFF says what its samples are
        return str(source.info["photometric"]).upper() == "RGB"
    labels = [str(n).strip().lower() for n in source.info.get("channel_names") or ()]
    if labels:
        return len(labels) == 4 and labels[3] in ("a", "alpha")
    # No metadata: four interleaved samples per pixel are conventionally RGBA.
    return source.axes.endswith("c")
