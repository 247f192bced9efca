"""What ``pipeline inspect`` shows: a model, an input image or an output root.

:func:`inspect_path` gathers the facts as plain JSON-able data (floats rounded to 6
significant digits, so no ``0.49900000000000005``); :func:`render` lays them out as a
short table for people. The CLI prints one or the other (``--json``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.core.atomic import read_json

__all__ = ["MODEL_SUFFIXES", "compact", "inspect_path", "open_hints", "render"]

MODEL_SUFFIXES = (".onnx", ".pt", ".ts", ".pth")
_DIGITS = 6


def compact(value: Any) -> Any:
    """``value`` with floats rounded to 6 significant digits (JSON noise removed)."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return value
        return round(value, _DIGITS - 1 - int(math.floor(math.log10(abs(value)))))
    if isinstance(value, Mapping):
        return {str(k): compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    return value


def inspect_path(path: str | os.PathLike) -> dict[str, Any]:
    """Facts about ``path``: ``{"kind": "model" | "image" | "output", ...}``.

    Raises
    ------
    pipeline.errors.PipelineError
        The path cannot be read as a model, an image or an output.
    """
    where = os.fspath(path)
    if where.lower().endswith(MODEL_SUFFIXES):
        from pipeline.backends import read_model_spec

        return compact({"kind": "model", **read_model_spec(where).to_dict()})
    if _is_output(Path(where)):
        return compact({"kind": "output", **describe_output(where)})
    from pipeline.io.sources import describe

    return compact({"kind": "image", **describe(where)})


def _is_output(path: Path) -> bool:
    """An output root: it lists its images, or holds a run report, or NGFF images but no
    image of its own."""
    from pipeline.io.collection import find_images, read_collection, root_format

    if not path.is_dir():
        return False
    if (path / "report.json").is_file() or read_collection(path) is not None:
        return True
    zarr_format = root_format(path)
    return (
        zarr_format is not None
        and bool(find_images(path, zarr_format))
        and not (_has_multiscales(path, zarr_format))
    )


def _has_multiscales(path: Path, zarr_format: int) -> bool:
    from pipeline.io.collection import group_content

    return bool((group_content(path, zarr_format) or {}).get("multiscales"))


def describe_output(out: str | os.PathLike) -> dict[str, Any]:
    """The images of an output root with their states (from ``report.json``, if any)."""
    from pipeline.io.collection import find_images, image_summary, read_collection, root_format
    from pipeline.io.ngff import format_for_zarr

    out = Path(out)
    zarr_format = root_format(out)
    listed = read_collection(out)
    names = listed if listed is not None else (find_images(out, zarr_format) if zarr_format else [])
    report = _read_report(out)
    by_name = {str(r.get("name")): r for r in report.get("inputs", []) if isinstance(r, dict)}
    images = []
    for name in names:
        entry = by_name.pop(name, {})
        summary = image_summary(out, name, zarr_format) if (out / name).is_dir() else {}
        images.append({"state": entry.get("state", "done" if summary else "missing"), **summary})
        images[-1].setdefault("name", name)
    for name, entry in by_name.items():  # inputs of the report without an image here
        images.append(
            {
                "name": name,
                "state": entry.get("state"),
                "input": entry.get("path"),
                "reason": entry.get("reason"),
                "message": entry.get("message"),
            }
        )
    return {
        "path": str(out),
        "ngff": format_for_zarr(zarr_format).version if zarr_format else None,
        "listed": listed is not None,
        "report": bool(report),
        "images": images,
    }


def _read_report(out: Path) -> dict[str, Any]:
    data = read_json(out / "report.json")
    return data if isinstance(data, dict) else {}


def open_hints(out: str | os.PathLike, names: Sequence[str], ngff: str | None = None) -> list[str]:
    """How to open an output: napari, QuPath (the images, the GeoJSON), a browser for the
    run page; only what exists. Paths in commands are quoted for a shell."""
    import shlex

    out = Path(out)
    lines = []
    if names:
        first = shlex.quote(str(out / names[0]))
        lines.append(f"napari: napari {first}   (each image with its labels)")
        if ngff == "0.5":
            lines.append("QuPath, OMERO, Fiji: they read NGFF 0.4; run with --ngff 0.4 for them")
        else:
            lines.append(f"QuPath: File > Open... {out}   (one image per input)")
        polygons = out / "geojson" / f"{names[0]}.geojson"
        if polygons.is_file():
            lines.append(f"QuPath: drag {polygons} onto its image   (objects as polygons)")
    if (out / "index.html").is_file():
        lines.append(f"browser: {(out / 'index.html').resolve().as_uri()}")
    return lines


# --- rendering ---------------------------------------------------------------------------


def render(info: Mapping[str, Any]) -> str:
    """A short human-readable table of :func:`inspect_path`'s result."""
    kind = info.get("kind")
    if kind == "model":
        return _render_model(info)
    if kind == "output":
        return _render_output(info)
    return _render_image(info)


def _um(pixel_size: Mapping[str, Any] | None) -> str:
    if not pixel_size:
        return "-"
    values = sorted({float(v) for v in pixel_size.values()})
    return "/".join(f"{v:g}" for v in values) + " µm/px"


def _shape(shape: Sequence[int] | None) -> str:
    return " x ".join(str(int(n)) for n in shape) if shape else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> list[str]:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def _render_model(info: Mapping[str, Any]) -> str:
    extra = info.get("extra") or {}
    nested = extra.get("extra") or {}
    names = extra.get("class_names") or nested.get("class_names")
    mpp = extra.get("mpp", nested.get("mpp"))
    trained = extra.get("trained", nested.get("trained"))
    step, low = info.get("step"), info.get("min_tile")
    rows = [
        ("format", f"{info.get('format')} ({Path(str(info.get('path'))).name})"),
        (
            "network",
            f"{info.get('ndim')}D, {info.get('in_channels')} channels in, "
            f"{info.get('classes')} out ({info.get('activation')})",
        ),  # fmt: skip
        (
            "tile sizes",
            f"{low} + k x {step}"
            + (f", valid margin {info['margin']}" if info.get("margin") else ""),
        ),
        ("normalize", info.get("normalize")),
        ("resolution", f"{mpp:g} µm/px" if mpp is not None else "not declared (runs at level 0)"),
        ("classes", _class_names(info.get("classes"), names)),
        ("sha256", str(info.get("sha256") or "-")[:16] + "…"),
    ]
    if trained is False:
        rows.append(("weights", "random: exported without --weights (untrained)"))
    return "\n".join(["model " + str(info.get("path"))] + _table(("", ""), rows)[1:])


def _class_names(classes: Any, names: Sequence[str] | None) -> str:
    from pipeline.core.classes import label_names

    if not names or not isinstance(classes, int) or classes < 1:
        return "not named (pipeline export --class-names)"
    try:
        return ", ".join(label_names(classes, names))
    except ValueError:  # names that do not fit the classes: show them as stored
        return ", ".join(map(str, names))


def _render_image(info: Mapping[str, Any]) -> str:
    lines = [f"{info.get('path')}  ({info.get('format')})"]
    main = info.get("default_series")
    for s in info.get("series", []):
        role = "main" if s.get("index") == main else "associated" if s.get("associated") else ""
        head = f"series {s.get('index')} {s.get('name') or ''}".rstrip()
        lines.append(
            f"{head}{f' ({role})' if role else ''}: axes {s.get('axes')}, {s.get('dtype')}, "
            f"{_um(s.get('pixel_size'))}"
        )
        rows = [
            (
                lv.get("level"),
                _shape(lv.get("shape")),
                _shape(lv.get("chunks")),
                _um(lv.get("pixel_size")),
            )
            for lv in s.get("levels", [])
        ]
        lines += _table(("level", f"shape ({s.get('axes')})", "chunks", "pixel size"), rows)
        if (s.get("info") or {}).get("unreadable"):
            lines.append(f"  unreadable: {s['info']['unreadable']}")
    return "\n".join(lines)


def _render_output(info: Mapping[str, Any]) -> str:
    images = info.get("images", [])
    done = [i["name"] for i in images if i.get("shape")]
    lines = [
        f"{info.get('path')}: NGFF {info.get('ngff') or '?'} output, {len(done)} image"
        f"{'s' if len(done) != 1 else ''}"
        + ("" if info.get("listed") else " (not listed in the root)")
    ]
    rows = []
    for i in images:
        if i.get("shape"):
            rows.append((i.get("state"), i["name"], _shape(i["shape"]), i.get("levels"), i.get("dtype"),
                         _um(i.get("pixel_size")), ", ".join(i.get("labels") or []) or "-"))  # fmt: skip
        else:
            why = i.get("reason") or ""
            rows.append((i.get("state"), i["name"], "-", "-", "-", "-", why))
    lines += _table(
        ("state", "image", "shape", "levels", "dtype", "pixel size", "labels / reason"), rows
    )
    hints = open_hints(info.get("path", "."), done, info.get("ngff"))
    lines += ["open it with:"] + ["  " + h for h in hints]
    return "\n".join(lines)
