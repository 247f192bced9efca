"""Classes of a segmentation: their names, their colours, and labels from probabilities.

Pure (numpy only): the label image writer, the previews and the GeoJSON output take their
names and colours from here, so one class looks the same everywhere.

Conventions
-----------
A model with ``K`` output channels gives label values ``0 .. L-1``:

* ``K >= 2``: the label is the most probable channel (``argmax``); channel 0 is the
  background, as for a softmax U-Net, so ``L = K``.
* ``K == 1``: the label is 1 where the probability is ``>= threshold``, else 0, so ``L = 2``.

Label 0 is always background (transparent in every output). Probabilities stored as
uint8 are ``p x 255``; they are compared as ``value / 255 >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import ConfigError

__all__ = [
    "BACKGROUND",
    "DEFAULT_THRESHOLD",
    "PALETTE",
    "channel_names",
    "class_labels",
    "default_colour",
    "default_name",
    "label_colors",
    "label_count",
    "label_dtype",
    "label_names",
    "parse_class_names",
]

#: Name of label 0 when none is given.
BACKGROUND = "background"
#: ``--threshold`` default: a one-class model's pixel is foreground at probability 0.5.
DEFAULT_THRESHOLD = 0.5
#: RGB of labels 1, 2, 3... (cycled): bright hues that stand out on H&E and on grey.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 230, 90),
    (255, 50, 50),
    (40, 130, 255),
    (255, 210, 0),
    (190, 70, 255),
    (0, 220, 220),
    (255, 130, 0),
    (255, 90, 190),
)
_MAX_NAME = 100


def label_count(classes: int) -> int:
    """Label values a model with ``classes`` output channels gives (background included)."""
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    return 2 if classes == 1 else classes


def label_dtype(classes: int) -> np.dtype:
    """The smallest unsigned integer type that holds every label value."""
    return np.dtype(np.uint8 if label_count(classes) <= 256 else np.uint16)


def parse_class_names(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """``"tumor,stroma"`` or a list → a tuple of stripped, non-empty, distinct names."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(str(p).strip() for p in parts)
    bad = [n for n in names if not n or len(n) > _MAX_NAME or not n.isprintable()]
    if not names or bad:
        raise ConfigError(
            f"class names must be printable, non-empty and at most {_MAX_NAME} characters, "
            f"got {value!r}",
            where="option --class-names",
            hint="give names separated by commas, e.g. --class-names tumor,stroma",
        )
    if len({n.lower() for n in names}) != len(names):
        raise ConfigError(
            f"class names must be distinct, got {', '.join(names)}", where="option --class-names"
        )
    return names


def default_name(label: int) -> str:
    """The name of label ``label`` >= 1 when none is given."""
    return f"class {label}"


def default_colour(label: int) -> tuple[int, int, int]:
    """The colour of label ``label`` >= 1 when none is given: :data:`PALETTE`, cycled."""
    return PALETTE[(label - 1) % len(PALETTE)]


def label_names(classes: int, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Names of label values ``0 .. L-1`` (see :func:`label_count`).

    ``names`` may name every label (``L`` names, the first being the background) or only
    the foreground ones (``L - 1`` names; label 0 is then ``"background"``). Without
    names, labels are ``background``, ``class 1``, ``class 2``...

    Raises
    ------
    ConfigError
        A number of names that fits neither form.
    """
    count = label_count(classes)
    if names is None:
        return (BACKGROUND, *(default_name(i) for i in range(1, count)))
    names = tuple(names)
    if len(names) == count:
        return names
    if len(names) == count - 1 and BACKGROUND not in (n.lower() for n in names):
        return (BACKGROUND, *names)
    channels = "1 channel" if classes == 1 else f"{classes} channels"
    raise ConfigError(
        f"{len(names)} class name{'s' if len(names) != 1 else ''} for a model with {channels} "
        f"({count} labels: background and {count - 1} class{'es' if count > 2 else ''})",
        where="option --class-names",
        hint=f"give {count - 1} name{'s' if count > 2 else ''} (the foreground "
        f"class{'es' if count > 2 else ''}) or {count} (background first)",
    )


def channel_names(classes: int, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """Names of the probability channels: a one-class model's channel is its foreground."""
    labels = label_names(classes, names)
    return labels[1:] if classes == 1 else labels


def label_colors(count: int) -> tuple[tuple[int, int, int, int], ...]:
    """RGBA of label values ``0 .. count-1``: 0 transparent, then :data:`PALETTE`."""
    return ((0, 0, 0, 0), *((*default_colour(i), 255) for i in range(1, count)))


def class_labels(probabilities: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """``(K, *spatial)`` probabilities → ``(*spatial)`` labels (see the module's conventions).

    Works for any number of spatial axes and for uint8 (``p x 255``), float16 and float32
    input; NaN counts as probability 0. Ties go to the lower class (as ``argmax``).
    """
    probs = np.asarray(probabilities)
    if probs.ndim < 2 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must be (K, *spatial) with K >= 1, got {probs.shape}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    classes = probs.shape[0]
    if classes == 1:
        p = probs[0].astype(np.float32)
        if probs.dtype == np.uint8:
            p /= 255.0
        return (np.nan_to_num(p, nan=0.0) >= threshold).astype(np.uint8)
    if probs.dtype.kind == "f":
        probs = np.nan_to_num(probs, nan=0.0)
    return _argmax(probs, label_dtype(classes))


#: Pixels per band of :func:`_argmax`: its temporaries stay in cache.
_BAND_PIXELS = 2**16


def _argmax(probs: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``np.argmax(probs, axis=0).astype(dtype)``, class by class in whole-array
    arithmetic: a class takes a pixel only where it is strictly more probable than every
    class before it (so ties stay with the lower class, as argmax's first maximum). Band
    by band over the flattened pixels, in cache: about 15x faster than numpy's argmax
    over the leading axis of a block."""
    flat = probs.reshape(probs.shape[0], -1)
    out = np.empty(flat.shape[1], dtype)
    for start in range(0, flat.shape[1], _BAND_PIXELS):
        part = flat[:, start : start + _BAND_PIXELS]
        best = part[0].copy()
        labels = out[start : start + _BAND_PIXELS]
        labels[...] = 0
        for c in range(1, part.shape[0]):
            better = np.greater(part[c], best)
            labels *= ~better
            labels += better * dtype.type(c)
            np.maximum(best, part[c], out=best)
    return out.reshape(probs.shape[1:])
