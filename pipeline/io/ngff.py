"""The NGFF (OME-Zarr) metadata the pipeline writes, in one place, for NGFF 0.4 and 0.5.

Images (:mod:`pipeline.io.sink`), the tissue labels (:mod:`pipeline.io.labels`), the
class labels (:mod:`pipeline.io.class_labels`) and the output root
(:mod:`pipeline.io.collection`) take everything NGFF from here. The content is the same
for both versions: ``axes`` (``c`` a channel axis, the others space in micrometres when
the pixel size is known), one ``datasets`` entry per level (level ``i`` halves ``y`` and
``x`` ``i`` times), label colours and class names, channel names. One class per version
owns what differs, so writers never spell a version:

=================  ==================================  ====================================
                   0.4 (:class:`FormatV04`)            0.5 (:class:`FormatV05`)
=================  ==================================  ====================================
Zarr               v2: ``.zgroup``, ``.zattrs``,       v3: ``zarr.json``
                   ``.zarray``
metadata           at the top of the attributes;       under ``"ome"``, with
                   ``multiscales[]`` and               ``"version": "0.5"`` once
                   ``image-label`` carry ``version``
chunk keys         ``0/1/2`` (``/`` separator)         ``c/0/1/2`` (default encoding)
array axes         none stored (v2 has no names)       ``dimension_names``
compression        Blosc LZ4 + shuffle (what           Zstd, level 1 (3x faster to write
                   bioformats2raw, QuPath and jzarr    than Zarr's default level 3)
                   write and read)
=================  ==================================  ====================================

Reading NGFF (0.4 and 0.5) is :mod:`pipeline.io.zarr_source`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from pipeline.errors import ConfigError

__all__ = [
    "COLLECTION_GROUP",
    "COLLECTION_KEY",
    "DEFAULT_VERSION",
    "FORMATS",
    "UNIT",
    "VERSIONS",
    "FormatV04",
    "FormatV05",
    "NgffFormat",
    "axes_metadata",
    "datasets",
    "detect_format",
    "get_format",
    "level_count",
    "omero_channels",
]

#: The unit of a calibrated spatial axis.
UNIT = "micrometer"

#: Versions ``--ngff`` takes, oldest first.
VERSIONS = ("0.4", "0.5")
#: What ``--ngff`` writes by default: 0.4, the version QuPath, OMERO, ilastik and Fiji's
#: Bio-Formats and MoBIE read (see the README's viewer table).
DEFAULT_VERSION = "0.4"
#: Key of the output root's collection metadata (NGFF's transitional layout for a set of images).
COLLECTION_KEY = "bioformats2raw.layout"
#: Name of the group that lists the output root's images (``series``).
COLLECTION_GROUP = "OME"


class NgffFormat:
    """What one NGFF version writes: Zarr format, attribute layout and array options."""

    version: ClassVar[str]
    zarr_format: ClassVar[int]

    def wrap(self, content: Mapping[str, Any]) -> dict[str, Any]:
        """The attributes that store NGFF ``content`` (``multiscales``, ``labels``...)."""
        raise NotImplementedError

    def unwrap(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """The NGFF content of a group's attributes (inverse of :meth:`wrap`)."""
        raise NotImplementedError

    def multiscale(
        self,
        name: str,
        axes: str,
        pixel_size: Mapping[str, float],
        levels: int,
        kind: str,
        cell: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """One ``multiscales`` entry (:func:`axes_metadata`, :func:`datasets`); ``kind``
        says how levels were made (``mean``, ``max``, ``nearest``)."""
        return {
            "name": name,
            "axes": axes_metadata(axes, pixel_size),
            "datasets": datasets(axes, pixel_size, levels, cell),
            "type": kind,
        }

    def image_label(
        self,
        colors: Sequence[Sequence[int]],
        names: Sequence[str],
        source: str = "../../",
    ) -> dict[str, Any]:
        """``image-label``: RGBA colour and ``class`` name of label values ``0, 1, ...``,
        and the image the labels belong to (relative path)."""
        if len(colors) != len(names):
            raise ValueError(f"{len(colors)} colours for {len(names)} label names")
        return {
            "colors": [
                {"label-value": i, "rgba": [int(c) for c in rgba]} for i, rgba in enumerate(colors)
            ],
            "properties": [{"label-value": i, "class": str(n)} for i, n in enumerate(names)],
            "source": {"image": source},
        }

    def labels(self, names: Sequence[str]) -> dict[str, Any]:
        """Content of an image's ``labels`` group: the label images it holds."""
        return {"labels": list(names)}

    def collection(self, series: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Attributes of an output root and of its ``OME`` group that list ``series``.

        NGFF 0.4 and 0.5 describe a set of images in one hierarchy with the transitional
        ``bioformats2raw.layout`` (layout 3): the root says it holds a collection, the
        ``OME`` group's ``series`` lists the image groups by path, in order.

        The root's ``labels`` lists the same images: ome-zarr-py (``ome_zarr info``,
        napari-ome-zarr) descends from a group only into what its ``labels``, plate, well
        or ``multiscales`` metadata name, and follows no ``bioformats2raw.layout``
        (ome-zarr-py#421); with ``labels`` it finds every image (as a multiscales image).
        ome-zarr-models' ``BioFormats2Raw`` (0.4) still validates the root: its attributes
        model has a ``labels`` field.
        """
        root = self.wrap({COLLECTION_KEY: 3, "labels": [str(s) for s in series]})
        group = self.wrap({"series": [str(s) for s in series]})
        return root, group

    def array_options(self, axes: str) -> dict[str, Any]:
        """Keyword arguments of ``zarr.Group.create_array`` for an array with ``axes``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(self.version)


class FormatV04(NgffFormat):
    """NGFF 0.4 on Zarr v2."""

    version = "0.4"
    zarr_format = 2

    def wrap(self, content: Mapping[str, Any]) -> dict[str, Any]:
        return dict(content)

    def unwrap(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        return dict(attrs)

    def multiscale(self, name, axes, pixel_size, levels, kind, cell=None) -> dict[str, Any]:
        base = super().multiscale(name, axes, pixel_size, levels, kind, cell)
        return {**base, "version": self.version}

    def image_label(self, colors, names, source="../../") -> dict[str, Any]:
        return {**super().image_label(colors, names, source), "version": self.version}

    def array_options(self, axes: str) -> dict[str, Any]:
        from numcodecs import Blosc

        return {
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
            "compressors": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
        }


class FormatV05(NgffFormat):
    """NGFF 0.5 on Zarr v3."""

    version = "0.5"
    zarr_format = 3

    def wrap(self, content: Mapping[str, Any]) -> dict[str, Any]:
        return {"ome": {"version": self.version, **content}}

    def unwrap(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        content = dict(attrs.get("ome") or {})
        content.pop("version", None)
        return content

    def array_options(self, axes: str) -> dict[str, Any]:
        from zarr.codecs import ZstdCodec

        # Zstd level 1, not Zarr's default 3: a 4096² RGB block of a real slide compresses
        # about 3x faster for 6 % more bytes (at level 3 it was the slowest stage of a block)
        return {"dimension_names": list(axes), "compressors": [ZstdCodec(level=1)]}


FORMATS: dict[str, NgffFormat] = {f.version: f for f in (FormatV04(), FormatV05())}


def format_for_zarr(zarr_format: int) -> NgffFormat:
    """The NGFF version written on Zarr v``zarr_format`` (2: 0.4, 3: 0.5)."""
    return next(f for f in FORMATS.values() if f.zarr_format == zarr_format)


def get_format(version: str | NgffFormat | None = None) -> NgffFormat:
    """The format of ``version`` (``"0.4"``, ``"0.5"``; None: :data:`DEFAULT_VERSION`)."""
    if isinstance(version, NgffFormat):
        return version
    key = DEFAULT_VERSION if version is None else str(version)
    try:
        return FORMATS[key]
    except KeyError:
        raise ConfigError(
            f"NGFF version must be one of {', '.join(VERSIONS)}, got {version!r}",
            where="option --ngff",
        ) from None


def detect_format(attrs: Mapping[str, Any]) -> NgffFormat | None:
    """The format a group's attributes were written in, or None if they hold no NGFF."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping) and str(ome.get("version")) in FORMATS:
        return FORMATS[str(ome["version"])]
    multiscales = attrs.get("multiscales")
    versions = [m.get("version") for m in multiscales or () if isinstance(m, Mapping)]
    label = attrs.get("image-label")
    if isinstance(label, Mapping):
        versions.append(label.get("version"))
    if "0.4" in versions or COLLECTION_KEY in attrs or "labels" in attrs or multiscales:
        return FORMATS["0.4"]
    return None


def omero_channels(
    names: Sequence[str],
    colors: Sequence[Sequence[int]],
    window: tuple[float, float],
) -> dict[str, Any]:
    """``omero`` metadata naming the channels (``channels[].label``) with display colours.

    NGFF 0.4 and 0.5 have no other place for channel names; napari, OMERO and vizarr show
    these labels. ``window`` is the value range shown (0-255 for uint8 output, 0-1 else).
    """
    low, high = (float(w) for w in window)
    return {
        "channels": [
            {
                "label": str(name),
                "color": "".join(f"{int(c):02X}" for c in rgb[:3]),
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {"min": low, "max": high, "start": low, "end": high},
            }
            for name, rgb in zip(names, colors)
        ],
        "rdefs": {"model": "color"},
    }


def axes_metadata(axes: str, pixel_size: Mapping[str, float]) -> list[dict[str, str]]:
    """NGFF axes: ``c`` a channel axis, the others space in micrometres when known."""
    out = []
    for a in axes:
        entry = {"name": a, "type": "channel" if a == "c" else "space"}
        if a != "c" and a in pixel_size:
            entry["unit"] = UNIT
        out.append(entry)
    return out


def datasets(
    axes: str,
    pixel_size: Mapping[str, float],
    levels: int,
    cell: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One entry per level (path ``"0"``, ``"1"``...) with its scale transformation.

    Level ``i`` has ``2**i`` times level 0's pixel size on ``y`` and ``x``; ``cell``
    multiplies the scale of an axis whose level-0 pixel covers several run pixels (a
    coarse mask). Axes without a pixel size get 1 (pixels).
    """
    cell = cell or {}
    out = []
    for level in range(levels):
        scale = [
            1.0
            if a == "c"
            else float(pixel_size.get(a, 1.0)) * cell.get(a, 1.0) * (2**level if a in "yx" else 1)
            for a in axes
        ]
        out.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    return out


def level_count(attrs: Mapping[str, Any]) -> int:
    """Levels an NGFF image's attributes list, either version (1 when it lists none yet)."""
    fmt = detect_format(attrs)
    content = fmt.unwrap(attrs) if fmt is not None else {}
    multiscales = content.get("multiscales") or [{}]
    return max(1, len(multiscales[0].get("datasets", [])))
