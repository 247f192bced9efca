"""Naming a stored array's axes: from what files call them to the canonical letters.

Readers keep a file's own axis order but name the axes with the letters ``t``, ``c``,
``z``, ``y``, ``x`` (:func:`select_axes`), dropping unnamed axes of length 1. The result,
an :class:`AxisSelection`, indexes the stored array down to the named axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from pipeline.errors import UnsupportedFormatError

CANONICAL = "tczyx"

#: tifffile's letters for axes it names without meaning: ``i``, a stack of something
#: (its I and Q), and ``s``, interleaved samples (its S: colour components, which become
#: channels).
STACK, SAMPLES = "i", "s"


class AxisSelection(NamedTuple):
    """Which stored axes a reader keeps, and their canonical names.

    Attributes
    ----------
    index
        One entry per stored axis: ``slice(None)`` keeps it, ``0`` drops it (length 1);
        ``stored[index]`` has the axes ``axes``.
    axes
        Letters from ``"tczyx"`` in stored order, one per kept axis.
    """

    index: tuple[Any, ...]
    axes: str

    def kept(self, values: Sequence[int]) -> tuple[int, ...]:
        """The entries of ``values`` (a stored shape or chunks) on the kept axes."""
        return kept_values(values, self.index)


def kept_values(values: Sequence[int], index: Sequence[Any]) -> tuple[int, ...]:
    """The entries of ``values`` on the axes ``index`` keeps (see :class:`AxisSelection`)."""
    return tuple(int(v) for v, i in zip(values, index) if isinstance(i, slice))


def select_axes(labels: Sequence[str], shape: Sequence[int], where: str) -> AxisSelection:
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
    AxisSelection
        ``(index, axes)``: ``array[index]`` has the axes ``axes``.

    Raises
    ------
    UnsupportedFormatError
        Channels and samples both longer than 1, an unknown axis longer than 1, or no
        ``y`` and ``x``.
    """
    labels = [str(label).lower() for label in labels]
    sizes = dict(zip(labels, shape))
    if SAMPLES in sizes and "c" in sizes:
        # Both channels and samples: keep whichever is not a singleton.
        drop = SAMPLES if sizes[SAMPLES] == 1 else "c" if sizes["c"] == 1 else None
        if drop is None:
            raise UnsupportedFormatError(
                f"has both {sizes['c']} channels and {sizes[SAMPLES]} samples per pixel",
                where=where,
                hint="export one channel or convert the samples to channels",
            )
        labels[labels.index(drop)] = "?" + drop
    index: list[Any] = []
    axes = ""
    for label, size in zip(labels, shape):
        name = _canonical(label, axes, labels)
        if name is None or name in axes:
            if size != 1:
                raise UnsupportedFormatError(
                    f"has an axis {label!r} of length {size} the pipeline cannot place "
                    f"among {CANONICAL!r} (axes {''.join(labels)!r}, shape {tuple(shape)})",
                    where=where,
                    hint="export the image with t, c, z, y, x axes only",
                )
            index.append(0)
            continue
        index.append(slice(None))
        axes += name
    if "y" not in axes or "x" not in axes:
        raise UnsupportedFormatError(
            f"has no y and x axes (axes {''.join(labels)!r}, shape {tuple(shape)})",
            where=where,
            hint="pass an image with at least two spatial axes",
        )
    return AxisSelection(tuple(index), axes)


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
