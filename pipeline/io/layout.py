"""Axis names: from what files call them to what the model needs.

Readers keep a file's own axis order but name the axes with the canonical letters
``t``, ``c``, ``z``, ``y``, ``x`` (:func:`plan_axes`); :func:`model_axes` plans the
model's ``c`` + spatial order and :func:`choose_channels` the channels it gets;
:func:`to_model_layout` applies both to a lazy array.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class ModelAxes:
    """How a source's axes become the model's ``c`` + spatial order.

    ``take`` maps the axes that are dropped (a single time point, a single z plane for
    a 2D model) to the index kept; ``order`` lists the remaining source axes in model
    order (``c`` first when the source has one; otherwise the caller adds it).
    """

    take: dict[str, int]
    order: str
    spatial: str


def model_axes(axes: str, shape: Sequence[int], ndim: int, where: str) -> ModelAxes:
    """Plan the model layout of a source with ``axes`` and ``shape``.

    Raises
    ------
    InputError
        A time series, or a 3D model on a 2D image.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    sizes = dict(zip(axes, shape))
    take: dict[str, int] = {}
    if "t" in axes:
        if sizes["t"] != 1:
            raise InputError(
                f"is a time series of {sizes['t']} time points",
                where=where,
                hint="export the time points as separate images",
            )
        take["t"] = 0
    if "z" in axes and sizes["z"] == 1 and ndim == 2:
        take["z"] = 0
    if ndim == 3 and sizes.get("z", 1) == 1:
        raise InputError(
            "is a 2D image but the model is 3D",
            where=where,
            hint="use a 2D model, or pass a volume (a z stack)",
        )
    spatial = "zyx" if "z" in axes and "z" not in take else "yx"
    order = ("c" if "c" in axes else "") + spatial
    return ModelAxes(take, order, spatial)


def to_model_layout(
    source: ImageSource, ndim: int, in_channels: int
) -> tuple[dask.array.Array, str, dict[str, float]]:
    """Bring an image into the axes a model takes: ``c`` then the spatial axes.

    Only rearranges axes and drops an alpha channel; colour conversions, channel
    selection and resampling are :func:`pipeline.resolution.open_for_model`'s.

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
    from pipeline.io.lazy import ModelView  # lazy imports the readers, which import this

    plan = model_axes(source.axes, source.array.shape, ndim, source.path)
    channels = dict(zip(source.axes, source.array.shape)).get("c", 1)
    keep = choose_channels(source, channels, in_channels, None)
    view = ModelView(
        source,
        take=plan.take,
        order=plan.order,
        spatial=plan.spatial,
        keep=keep,
        colormap=None,
        invert=False,
        resample={},
        check_finite=False,
    )
    pixel_size = {a: source.pixel_size[a] for a in plan.spatial if a in source.pixel_size}
    return view.to_dask(), plan.spatial, pixel_size


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
    InputError
        An index out of range, or a channel count the model cannot take (reason
        ``channel-mismatch``; the message says ``got N channels, model expects M``).
    """
    keep: tuple[int, ...] | None = None
    if selection is not None:
        bad = [i for i in selection if not 0 <= i < channels]
        if bad:
            raise InputError(
                f"has {channels} channel{'s' if channels != 1 else ''} (0..{channels - 1}); "
                f"--channels asks for {', '.join(map(str, bad))}",
                where=source.path,
                hint=f"choose channel indices from 0 to {channels - 1}",
                reason="channel-mismatch",
            )
        keep = tuple(int(i) for i in selection)
    elif in_channels > 0 and channels != in_channels:
        alpha = alpha_channels(source, channels)
        if alpha and channels - len(alpha) == in_channels:
            logger.info("%s: dropping the alpha channel for the model", source.path)
            keep = tuple(i for i in range(channels) if i not in alpha)
    got = len(keep) if keep is not None else channels
    if in_channels > 0 and got != in_channels:
        raise InputError(
            f"channel-mismatch: got {got} channel{'s' if got != 1 else ''}, "
            f"model expects {in_channels}",
            where=source.path,
            hint=_mismatch_hint(source, got, in_channels, spatial),
            reason="channel-mismatch",
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
