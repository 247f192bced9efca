"""Model files on disk: what kind a file is, the metadata it embeds, and safety checks.

Nothing here runs a model. TorchScript metadata is read straight from the zip archive
(``<archive>/extra/pipeline.json``) and ONNX metadata from ``metadata_props["pipeline"]``
without loading external data, so inspecting a file never executes it.

Metadata (JSON, ``format_version`` 1)::

    {"format_version": 1, "producer": "pipeline", "pipeline_version": "0.1.0",
     "torch_version": "2.13.0", "format": "onnx", "exporter": "torchscript",
     "ndim": 2, "axes": "bcyx", "in_channels": 1, "classes": 1,
     "margin": 0, "step": 16, "min_tile": 32,
     "activation": "sigmoid", "normalize": "dtype",
     "padding": "same", "base": 64, "depth": 4, "extra": {}}

``ndim`` … ``normalize`` are the :class:`ModelSpec` fields; everything else lands in
``ModelSpec.extra``.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.backends.base import ModelSpec
from pipeline.config import ACTIVATIONS, NORMALIZATIONS
from pipeline.errors import ModelError

if TYPE_CHECKING:
    import onnx

METADATA_KEY = "pipeline"
EXTRA_FILE = "pipeline.json"
FORMAT_VERSION = 1
GEOMETRY = ("ndim", "in_channels", "classes", "margin", "step", "min_tile")
CORE = GEOMETRY + ("activation", "normalize")
EXPORT_HINT = "export one with `pipeline export`, or pass a TorchScript (.pt) or ONNX (.onnx) file"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


def axes_for(ndim: int) -> str:
    """Axis letters of the network's input: ``bcyx`` (2D) or ``bczyx`` (3D)."""
    return "bc" + "zyx"[3 - ndim :]


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def sniff_format(path: str | os.PathLike, backend: str = "auto") -> str:
    """Tell a TorchScript archive from an ONNX file by content (suffix only as a tie-break).

    Raises
    ------
    ModelError
        Missing, empty, a ``torch.save`` checkpoint, or neither format; or content that
        contradicts an explicit ``backend``.
    """
    p = Path(path)
    if p.is_dir():
        raise ModelError("is a folder, not a model file", where=p, hint=EXPORT_HINT)
    if not p.is_file():
        raise ModelError("model file not found", where=p, hint=EXPORT_HINT)
    with open(p, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise ModelError("model file is empty", where=p, hint=EXPORT_HINT)
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(p) or []
        if not any("/code/" in n for n in names):
            raise _checkpoint_error(p)
        found = "torchscript"
    elif head.startswith(_PICKLE_MAGIC):
        raise _checkpoint_error(p)
    else:
        found = "onnx"  # confirmed or refused when the protobuf is parsed
    if backend == "onnx" and found == "torchscript":
        raise ModelError(
            "is a TorchScript archive, not ONNX",
            where=p,
            hint="use backend 'auto' or 'torchscript'",
        )
    if backend == "torchscript" and found == "onnx":
        raise ModelError(
            "is not a TorchScript archive (no zip container)", where=p, hint=EXPORT_HINT
        )
    return found


def _checkpoint_error(p: Path) -> ModelError:
    return ModelError(
        "looks like a torch.save checkpoint (weights or pickled objects), not a model file",
        where=p,
        hint=f"turn weights into a model with `pipeline export --weights {p.name} OUT.pt`",
    )


def read_torchscript_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The embedded ``pipeline.json`` of a TorchScript archive, or None if it has none."""
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if name.endswith(f"/extra/{EXTRA_FILE}"):
                    return _parse_json(zf.read(name), p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(
            f"cannot read TorchScript archive ({exc})", where=p, hint=EXPORT_HINT
        ) from exc
    return None


def _parse_json(raw: bytes | str, p: Path) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"embedded pipeline metadata is not valid JSON ({exc})", where=p) from exc
    if not isinstance(meta, dict):
        raise ModelError("embedded pipeline metadata is not a JSON object", where=p)
    return meta


def load_onnx_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without its external data, refusing anything that is not a model."""
    import onnx

    p = Path(path)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ...
        raise ModelError(
            f"is neither a TorchScript archive nor an ONNX model ({type(exc).__name__})",
            where=p,
            hint=EXPORT_HINT,
        ) from exc
    graph = proto.graph
    # Random bytes sometimes decode as a protobuf; a real model has IR, a graph and I/O.
    if proto.ir_version <= 0 or not graph.node or not graph.input or not graph.output:
        raise ModelError(
            "is neither a TorchScript archive nor an ONNX model (no graph inside)",
            where=p,
            hint=EXPORT_HINT,
        )
    check_external_data(proto, p)
    return proto


def read_onnx_metadata(proto: onnx.ModelProto, path: str | os.PathLike) -> dict[str, Any] | None:
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return _parse_json(prop.value, Path(path))
    return None


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto in a graph (or function), its subgraphs and node attributes."""
    yield from getattr(graph, "initializer", ())
    for sparse in getattr(graph, "sparse_initializer", ()):
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def check_external_data(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Refuse external-data references that leave the model's folder (path traversal)."""
    import onnx

    p = Path(path)
    folder = p.resolve().parent
    for graph in [proto.graph, *proto.functions]:
        for tensor in _tensors(graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            target = (folder / location).resolve()
            if not location or Path(location).is_absolute() or not target.is_relative_to(folder):
                raise ModelError(
                    f"external data {location!r} of tensor {tensor.name!r} lies outside the "
                    "model's folder",
                    where=p,
                    hint="keep external data files beside the .onnx file (relative names only)",
                )


def build_metadata(
    *,
    fmt: str,
    ndim: int,
    in_channels: int,
    classes: int,
    margin: int,
    step: int,
    min_tile: int,
    activation: str,
    normalize: str,
    **info: Any,
) -> dict[str, Any]:
    """The JSON object embedded in an exported model (see the module docstring)."""
    from pipeline import __version__

    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "producer": "pipeline",
        "pipeline_version": __version__,
        "format": fmt,
        "ndim": ndim,
        "axes": axes_for(ndim),
        "in_channels": in_channels,
        "classes": classes,
        "margin": margin,
        "step": step,
        "min_tile": min_tile,
        "activation": activation,
        "normalize": normalize,
    }
    meta.update(info)
    return meta


def spec_from_metadata(meta: dict[str, Any], fmt: str, path: str | os.PathLike) -> ModelSpec:
    """Validate embedded metadata and turn it into a :class:`ModelSpec`."""
    p = Path(path)
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelError(
            f"metadata format_version {version!r} is not supported (this pipeline reads "
            f"up to {FORMAT_VERSION})",
            where=p,
            hint="upgrade the pipeline or re-export the model",
        )
    missing = [k for k in GEOMETRY if k not in meta]
    if missing:
        raise ModelError(f"embedded metadata lacks {', '.join(missing)}", where=p, hint=EXPORT_HINT)
    fields = {k: meta[k] for k in CORE if k in meta}
    validate_fields(fields, where=p, error=ModelError)
    extra = {k: v for k, v in meta.items() if k not in CORE}
    return ModelSpec(format=fmt, extra=extra, **fields)


def validate_fields(fields: dict[str, Any], *, where: Any, error: type) -> None:
    """Check ModelSpec field values (ints in range, known activation/normalize)."""
    minimum = {"ndim": 2, "in_channels": 0, "classes": 0, "margin": 0, "step": 1, "min_tile": 1}
    for key, value in fields.items():
        if key in minimum:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum[key]:
                raise error(
                    f"{key} must be an integer >= {minimum[key]}, got {value!r}", where=where
                )
        elif key == "activation" and value not in ACTIVATIONS:
            raise error(f"activation must be one of {ACTIVATIONS}, got {value!r}", where=where)
        elif key == "normalize" and value not in NORMALIZATIONS:
            raise error(f"normalize must be one of {NORMALIZATIONS}, got {value!r}", where=where)
    if fields.get("ndim", 2) not in (2, 3):
        raise error(f"ndim must be 2 or 3, got {fields['ndim']!r}", where=where)
