"""Model backends behind one interface: TorchScript, ONNX Runtime and identity.

>>> spec = read_model_spec("unet.onnx")                       # doctest: +SKIP
>>> with load_backend("unet.onnx", device="cpu") as model:    # doctest: +SKIP
...     probs = model.predict(batch)

Importing this package imports neither torch nor onnxruntime; each backend imports its
runtime when it is created.

Foreign models (a TorchScript or ONNX file without pipeline metadata) are probed with
dummy forward passes on CPU (see :mod:`pipeline.backends.probe`). Their spec records
``activation="none"`` and ``normalize="dtype"``, but their output is still taken as
probabilities: export the network with its final activation inside, or pass
``overrides``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.backends.base import (
    Backend,
    ModelSpec,
    check_batch,
    check_channels,
    check_output,
    check_tile,
)
from pipeline.backends.files import (
    GEOMETRY,
    load_onnx_proto,
    read_onnx_metadata,
    read_torchscript_metadata,
    sha256_of,
    sniff_format,
    spec_from_metadata,
    validate_fields,
)
from pipeline.backends.identity import IdentityBackend, identity_spec
from pipeline.config import BACKENDS, PRECISIONS
from pipeline.errors import ConfigError, DeviceError, ModelError

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "ModelSpec",
    "check_batch",
    "check_channels",
    "check_output",
    "check_tile",
    "load_backend",
    "read_model_spec",
    "resolve_device",
]

log = logging.getLogger(__name__)

OVERRIDABLE = GEOMETRY + ("activation", "normalize")
_SPEC_CACHE: dict[tuple[str, ...], ModelSpec] = {}
_SPEC_LOCK = threading.Lock()


def _may_have_cuda() -> bool:
    """False when this Linux machine certainly has no NVIDIA GPU (no device node)."""
    if not sys.platform.startswith("linux"):
        return True
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def resolve_device(device: str) -> str:
    """Turn ``auto``/``cpu``/``cuda``/``cuda:N`` into a device that exists.

    Raises
    ------
    DeviceError
        CUDA was asked for but is not there (never a silent fallback to CPU).
    ConfigError
        Any other spelling.
    """
    text = device.strip().lower() if isinstance(device, str) else ""
    if text == "cpu":
        return "cpu"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if text != "auto" and match is None:
        raise ConfigError(
            f"unknown device {device!r}", where="device", hint="use auto, cpu, cuda or cuda:N"
        )
    if match is None and not _may_have_cuda():
        return "cpu"  # no NVIDIA device: decided without importing torch (seconds)
    import torch

    if match is None:  # "auto"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise DeviceError(
            f"requested {text} but CUDA is not available on this machine",
            where="device",
            hint="use device 'cpu' (or 'auto'), or check the NVIDIA driver and CUDA_VISIBLE_DEVICES",
        )
    count, index = torch.cuda.device_count(), int(match.group(1) or 0)
    if index >= count:
        raise DeviceError(
            f"requested {text} but only {count} CUDA device(s) are visible",
            where="device",
            hint=f"use cuda:0 ... cuda:{count - 1}, or check CUDA_VISIBLE_DEVICES",
        )
    return text


def _check_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    ov = dict(overrides or {})
    unknown = sorted(set(ov) - set(OVERRIDABLE))
    if unknown:
        raise ConfigError(
            f"unknown model override(s) {unknown}",
            where="overrides",
            hint=f"use {', '.join(OVERRIDABLE)}",
        )
    validate_fields(ov, where="overrides", error=ConfigError)
    return ov


def read_model_spec(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    overrides: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Read the spec of a model file: embedded metadata, else probed geometry.

    Parameters
    ----------
    path
        A TorchScript (``.pt``/``.ts``) or ONNX (``.onnx``) file; the kind is told by content.
    backend
        ``auto``, ``torchscript`` or ``onnx`` (``identity`` returns the identity spec).
    overrides
        ModelSpec fields (``ndim``, ``in_channels``, ``classes``, ``margin``, ``step``,
        ``min_tile``, ``activation``, ``normalize``) that win over the file. When all six
        geometry fields are given, a foreign model is not probed.

    Returns
    -------
    ModelSpec
        With ``path`` and ``sha256`` filled. Results are cached per (file hash, overrides).

    Raises
    ------
    ModelError
        Not a model, a checkpoint, unreadable metadata, external data outside the model's
        folder, or a foreign model the probe cannot run.
    """
    _check_backend_name(backend)
    ov = _check_overrides(overrides)
    if backend == "identity":
        return identity_spec(ov)
    p = Path(path)
    fmt = sniff_format(p, backend)
    sha = sha256_of(p)
    key = (str(p.resolve()), sha, fmt, json.dumps(ov, sort_keys=True))
    with _SPEC_LOCK:
        if key in _SPEC_CACHE:
            return _SPEC_CACHE[key]
    if fmt == "torchscript":
        meta = read_torchscript_metadata(p)
    else:
        meta = read_onnx_metadata(load_onnx_proto(p), p)
    if meta is not None:
        spec = spec_from_metadata(meta, fmt, p)
        _refuse_contradictions(spec, ov, p)
    else:
        spec = _foreign_spec(p, fmt, ov)
    spec = spec.with_(**ov, path=str(p), sha256=sha)
    with _SPEC_LOCK:
        _SPEC_CACHE[key] = spec
    return spec


def _refuse_contradictions(spec: ModelSpec, ov: Mapping[str, Any], p: Path) -> None:
    """Options may fill in what a model file lacks, never contradict what it declares."""
    clash = [
        f"{k}={ov[k]} (the file says {getattr(spec, k)})"
        for k in GEOMETRY
        if k in ov and ov[k] != getattr(spec, k)
    ]
    if clash:
        raise ConfigError(
            f"options contradict the model's embedded metadata: {', '.join(clash)}",
            where=p,
            hint="drop these options; they are only for models without metadata",
        )


def _foreign_spec(p: Path, fmt: str, ov: dict[str, Any]) -> ModelSpec:
    """Spec of a model without metadata: geometry from overrides, else from probing."""
    extra: dict[str, Any] = {"metadata": False}
    if all(k in ov for k in GEOMETRY):
        geometry = {k: ov[k] for k in GEOMETRY}
    else:
        from pipeline.backends.probe import probe_geometry

        ndims: tuple[int, ...] = (ov["ndim"],) if "ndim" in ov else (2, 3)
        channels: tuple[int, ...] = (ov["in_channels"],) if "in_channels" in ov else (1, 3)
        if fmt == "torchscript":
            from pipeline.backends.torchscript import probe_runner

            run = probe_runner(p)
        else:
            from pipeline.backends.onnx import probe_runner as onnx_runner

            run, facts = onnx_runner(p)
            ndims, channels = _narrow_onnx(p, facts, ndims, channels)
        geometry = probe_geometry(run, where=p, ndims=ndims, channels=channels)
        extra["probed"] = True
    log.warning(
        "%s has no pipeline metadata: using %s; its output is taken as probabilities", p, geometry
    )
    return ModelSpec(format=fmt, activation="none", normalize="dtype", extra=extra, **geometry)


def _narrow_onnx(
    p: Path, facts: dict[str, Any], ndims: tuple[int, ...], channels: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Use what the ONNX input declaration fixes (rank, channels) to skip probe runs."""
    if any(s is not None for s in facts["spatial"]):
        raise ModelError(
            f"the model's input has fixed spatial sizes {facts['spatial']}",
            where=p,
            hint="re-export it with dynamic spatial axes (torch.onnx.export dynamic_axes)",
        )
    if facts["rank"] in (4, 5):
        ndims = tuple(n for n in ndims if n == facts["rank"] - 2) or ndims
    if facts["channels"] is not None:
        channels = (facts["channels"],)
    return ndims, channels


def _check_backend_name(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown backend {backend!r}", where="backend", hint=f"use one of {BACKENDS}"
        )


def _check_load_options(
    model: str | os.PathLike | None, backend: str, precision: str, threads: int | None
) -> None:
    _check_backend_name(backend)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}", where="precision", hint=f"use one of {PRECISIONS}"
        )
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"threads must be a positive integer, got {threads!r}", where="threads")
    if backend == "identity" and model is not None:
        raise ConfigError(
            "the identity backend takes no model file", where="model", hint="pass model=None"
        )
    if backend != "identity" and model is None:
        raise ConfigError(
            "no model file given",
            where="model",
            hint="pass a .pt/.onnx file (make one with `pipeline export`) or use backend 'identity'",
        )


def load_backend(
    model: str | os.PathLike | None,
    *,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    overrides: Mapping[str, Any] | None = None,
    threads: int | None = None,
    ort_provider: str = "auto",
    cuda_graphs: bool = False,
) -> Backend:
    """Load a model for inference on one device.

    Parameters
    ----------
    model
        Path of a TorchScript or ONNX file; None with ``backend="identity"``.
    backend
        ``auto`` (by file content), ``torchscript``, ``onnx`` or ``identity``.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (see :func:`resolve_device`).
    precision
        ``fp32``, or ``fp16``/``bf16`` on CUDA: TorchScript via autocast, ONNX through
        TensorRT engines (``ort_provider="tensorrt"``).
    overrides
        Spec fields that win over the file (see :func:`read_model_spec`).
    threads
        CPU threads for the runtime (None: its default).
    ort_provider
        ONNX Runtime's provider on a GPU: ``auto``/``cuda`` or ``tensorrt``.
    cuda_graphs
        TorchScript on CUDA: replay the network as a CUDA graph.

    Raises
    ------
    ConfigError, DeviceError, ModelError
    """
    _check_load_options(model, backend, precision, threads)
    dev = resolve_device(device)
    if backend == "identity":
        return IdentityBackend(identity_spec(_check_overrides(overrides)), dev)
    spec = read_model_spec(model or "", backend=backend, overrides=overrides)
    half_ok = spec.format == "torchscript" or ort_provider == "tensorrt"
    if precision != "fp32" and (not half_ok or not dev.startswith("cuda")):
        raise ConfigError(
            f"precision {precision} needs a CUDA device and the torchscript backend or "
            f"--ort-provider tensorrt (got {spec.format} on {dev})",
            where="precision",
            hint="use precision 'fp32' here",
        )
    if spec.format == "torchscript":
        from pipeline.backends.torchscript import TorchScriptBackend

        return TorchScriptBackend(spec, dev, precision, threads, cuda_graphs)
    from pipeline.backends.onnx import OnnxBackend

    return OnnxBackend(spec, dev, threads, ort_provider, precision)
