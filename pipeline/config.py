"""One validated, frozen run configuration, and the choices its options take.

Defaults are :class:`RunConfig`'s field defaults (``configs/default.yaml`` repeats them;
a test keeps the two equal); a YAML file (``--config``) and then explicit CLI flags
override them. Unknown keys and bad values are :class:`ConfigError`. YAML is read with
``safe_load`` only: tags such as ``!!python/object`` are refused.

The option choices (:data:`BLENDS`, :data:`BACKENDS`...) are defined here once; the
CLI and the backends take them from here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.classes import DEFAULT_THRESHOLD, parse_class_names
from pipeline.errors import ConfigError
from pipeline.io.formats import SEARCHED_SUFFIXES
from pipeline.io.ngff import DEFAULT_VERSION, VERSIONS

#: How tile predictions are blended (``auto``: crop for valid models, else gaussian).
BLENDS = ("auto", "gaussian", "cosine", "constant", "crop")
#: Model file formats (``pipeline export --format``).
MODEL_FORMATS = ("torchscript", "onnx")
#: Backends (``auto``: from the model file's content).
BACKENDS = ("auto", *MODEL_FORMATS, "identity")
#: Output dtypes.
DTYPES = ("uint8", "float16", "float32")
#: Inference precisions (half precisions on CUDA only).
PRECISIONS = ("fp32", "fp16", "bf16")
#: How integer input is scaled for a model (a model file declares one of these).
NORMALIZATIONS = ("dtype", "none")
#: ``--normalize``: ``auto`` takes the model's declaration.
NORMALIZE = ("auto", *NORMALIZATIONS)
#: Output activations a model file may declare (already applied inside it).
ACTIVATIONS = ("sigmoid", "softmax", "none")
#: U-Net convolutions (``pipeline export --padding``).
PADDINGS = ("same", "valid")
#: Where blocks run: a local Dask cluster (or ``scheduler``), or Slurm jobs (dask-jobqueue).
CLUSTERS = ("local", "slurm")
#: Test-time augmentation: none, the axis flips, or the 8 symmetries of the (y, x) square.
TTA = ("none", "flip", "d4")
#: ONNX Runtime's provider on a GPU (``tensorrt``: opt-in, builds engines on first use).
ORT_PROVIDERS = ("auto", "cuda", "tensorrt")
#: NGFF versions written (``--ngff``): 0.4 on Zarr v2, 0.5 on Zarr v3.
NGFF_VERSIONS = VERSIONS
#: QuPath object types of GeoJSON features (``--object-type``): editable annotations, or
#: detections (many small objects, drawn faster and counted by QuPath).
OBJECT_TYPES = ("annotation", "detection")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``pipeline run`` needs besides inputs, output and model.

    ``None`` means "derive from the model and the image" (the README's table of
    ``pipeline run`` options says how).
    """

    tile: tuple[int, ...] | None = None
    overlap: int | None = None
    blend: str = "auto"
    batch_size: int | None = None
    backend: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    dtype: str = "uint8"
    ngff: str = DEFAULT_VERSION
    normalize: str = "auto"
    chunk: int | None = None
    block: int | None = None
    pyramid_min: int = 256
    in_channels: int | None = None
    classes: int | None = None
    class_names: tuple[str, ...] | None = None
    threshold: float = DEFAULT_THRESHOLD
    geojson: bool = False
    simplify: float = 0.0
    object_type: str = "annotation"
    series: int | None = None
    level: int | None = None
    mpp: float | None = None
    mpp_input: float | None = None
    channels: tuple[int, ...] | None = None
    skip_background: bool = True
    mask: str | None = None
    extensions: tuple[str, ...] = SEARCHED_SUFFIXES
    memory_budget_mb: int = 512
    # where blocks run: a local cluster, a running scheduler, or Slurm jobs
    workers: int | None = None
    threads_per_worker: int | None = None
    scheduler: str | None = None
    cluster: str = "local"
    jobs: int | None = None
    #: The ``slurm:`` section (partition, account, walltime, cores, memory, processes,
    #: gpus...), validated by :class:`pipeline.cluster.slurm.SlurmSettings` when a run starts.
    slurm: Mapping[str, Any] | None = dataclasses.field(default=None, hash=False)
    tta: str = "none"
    ort_provider: str = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _check_choice("cluster", self.cluster, CLUSTERS)
        if self.slurm is not None and not isinstance(self.slurm, Mapping):
            raise ConfigError(
                f"slurm must be a mapping of settings, got {self.slurm!r}",
                where="option slurm",
                hint="e.g. slurm: {partition: gpu, walltime: '02:00:00', cores: 8, memory: 32GB}",
            )
        _check_choice("blend", self.blend, BLENDS)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("normalize", self.normalize, NORMALIZE)
        _check_choice("tta", self.tta, TTA)
        _check_choice("ort_provider", self.ort_provider, ORT_PROVIDERS)
        if isinstance(self.ngff, float):  # YAML reads `ngff: 0.4` as a number
            object.__setattr__(self, "ngff", str(self.ngff))
        _check_choice("ngff", self.ngff, NGFF_VERSIONS)
        if isinstance(self.threshold, bool) or not (
            isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0
        ):
            raise ConfigError(
                f"threshold must be a probability in 0..1, got {self.threshold!r}",
                where="option threshold",
            )
        if self.class_names is not None:
            object.__setattr__(self, "class_names", parse_class_names(self.class_names))
        _check_choice("object_type", self.object_type, OBJECT_TYPES)
        if isinstance(self.simplify, bool) or not (
            isinstance(self.simplify, (int, float)) and 0.0 <= self.simplify < float("inf")
        ):
            raise ConfigError(
                f"simplify must be a tolerance in pixels >= 0, got {self.simplify!r}",
                where="option simplify",
                hint="e.g. --simplify 1 (0: exact pixel outlines)",
            )
        if not isinstance(self.geojson, bool):
            raise ConfigError(
                f"geojson must be true or false, got {self.geojson!r}", where="option geojson"
            )
        for name in (
            "batch_size",
            "workers",
            "threads_per_worker",
            "chunk",
            "block",
            "pyramid_min",
            "in_channels",
            "classes",
            "memory_budget_mb",
            "jobs",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(
                    f"{name} must be a positive integer, got {value!r}", where=f"option {name}"
                )
        if self.overlap is not None and (not isinstance(self.overlap, int) or self.overlap < 0):
            raise ConfigError(
                f"overlap must be a non-negative integer, got {self.overlap!r}",
                where="option overlap",
            )
        if self.tile is not None:
            object.__setattr__(self, "tile", parse_tile(self.tile))
        if self.level is not None and (not isinstance(self.level, int) or self.level < 0):
            raise ConfigError(
                f"level must be a non-negative integer, got {self.level!r}", where="option level"
            )
        for name in ("mpp", "mpp_input"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 1e-3 <= value <= 1e3):
                raise ConfigError(
                    f"{name} must be micrometres per pixel in 0.001..1000, got {value!r}",
                    where=f"option {name}",
                )
        if self.mpp is not None and self.level is not None:
            raise ConfigError("give --mpp or --level, not both", where="option mpp")
        if self.channels is not None:
            object.__setattr__(self, "channels", parse_ints(self.channels, "channels"))
        if isinstance(self.extensions, str):
            object.__setattr__(
                self,
                "extensions",
                tuple(
                    e.strip().lower() if e.strip().startswith(".") else "." + e.strip().lower()
                    for e in self.extensions.split(",")
                    if e.strip()
                ),
            )
        else:
            object.__setattr__(self, "extensions", tuple(self.extensions))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("tile", "channels", "extensions", "class_names"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name} must be one of {', '.join(choices)}, got {value!r}", where=f"option {name}"
        )


def parse_tile(value: Any) -> tuple[int, ...]:
    """``256``, ``"256"``, ``"32,128,128"`` or a list → tuple of positive ints."""
    if isinstance(value, int):
        parts: list[Any] = [value]
    elif isinstance(value, str):
        parts = [p for p in value.replace("x", ",").split(",") if p.strip()]
    else:
        parts = list(value)
    try:
        tile = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"tile must be N or Z,Y,X, got {value!r}", where="option tile") from None
    if not tile or len(tile) > 3 or any(t < 1 for t in tile):
        raise ConfigError(
            f"tile must be N or Z,Y,X with positive sizes, got {value!r}", where="option tile"
        )
    return tile


def parse_ints(value: Any, name: str) -> tuple[int, ...]:
    """``"0,2"``, ``2`` or a list → tuple of non-negative ints."""
    parts = (
        value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else value
    )
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be a comma-separated list of integers, got {value!r}",
            where=f"option {name}",
        ) from None
    if not out or any(v < 0 for v in out):
        raise ConfigError(
            f"{name} must list non-negative integers, got {value!r}", where=f"option {name}"
        )
    return out


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file (safe loader only) into a dict of known keys."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config ({exc.strerror})", where=path) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"invalid YAML: {exc}", where=path, hint="only plain YAML is accepted (no Python tags)"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of option: value", where=path)
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)}",
            where=path,
            hint=f"known keys: {', '.join(sorted(FIELDS))}",
        )
    return data


def resolve_config(
    file: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> RunConfig:
    """Defaults < YAML ``file`` < ``overrides`` (keys whose value is ``None`` are ignored)."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(load_yaml(file))
    for key, value in (overrides or {}).items():
        if key not in FIELDS:
            raise ConfigError(f"unknown option {key!r}")
        if value is not None:
            values[key] = value
    try:
        return RunConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc), where=file) from exc
