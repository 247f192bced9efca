"""Write a network to a model file (TorchScript or ONNX) that carries its own geometry.

The file embeds the JSON described in :mod:`pipeline.backends.files` (margin, step,
min_tile, channels, activation, normalisation, ...), so the pipeline derives the halo
and the tile sizes from the model instead of guessing them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.backends import load_backend, read_model_spec
from pipeline.backends.base import ModelSpec
from pipeline.backends.files import EXTRA_FILE, METADATA_KEY, build_metadata
from pipeline.config import MODEL_FORMATS, NORMALIZATIONS
from pipeline.core import _compat
from pipeline.errors import ConfigError, ModelError
from pipeline.model.fold import fold_batchnorm
from pipeline.model.unet import UNet

log = logging.getLogger(__name__)

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "output"
_SUFFIXES = {".pt": "torchscript", ".ts": "torchscript", ".onnx": "onnx"}
_WEIGHTS_HINT = (
    "save plain weights with torch.save(model.state_dict(), path); pickled objects are "
    "refused because loading them runs code"
)


def _resolve_format(out: Path, fmt: str | None) -> str:
    if fmt is None:
        found = _SUFFIXES.get(out.suffix.lower())
        if found is None:
            raise ConfigError(
                f"cannot tell the model format from the suffix {out.suffix!r}",
                where=out,
                hint="name the file .pt/.ts (TorchScript) or .onnx, or pass fmt",
            )
        return found
    if fmt not in MODEL_FORMATS:
        raise ConfigError(
            f"unknown model format {fmt!r}",
            where="fmt",
            hint=f"use {' or '.join(repr(f) for f in MODEL_FORMATS)}",
        )
    return fmt


def _state_dict(obj: Any, where: Path) -> dict[str, torch.Tensor]:
    """Unwrap the usual checkpoint layouts to a plain state dict."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            "does not contain a state dict (name → tensor)", where=where, hint=_WEIGHTS_HINT
        )
    # nn.DataParallel / DDP checkpoints prefix every name with "module.".
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(net: torch.nn.Module, weights: str | os.PathLike) -> None:
    """Load a state dict into ``net`` with ``torch.load(weights_only=True)``.

    Raises
    ------
    ModelError
        Missing file, a pickled payload (refused, never run), or weights that do not fit.
    """
    p = Path(weights)
    if not p.is_file():
        raise ModelError("weights file not found", where=p, hint=_WEIGHTS_HINT)
    try:
        obj = _compat.load_weights(p)
    except Exception as exc:  # UnpicklingError for payloads, RuntimeError for junk
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"refused to load weights ({first[:200]})", where=p, hint=_WEIGHTS_HINT
        ) from exc
    state = _state_dict(obj, p)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"weights do not fit the network ({str(exc).strip()[:400]})",
            where=p,
            hint="match base, depth, ndim, padding, in_channels and classes to the training run",
        ) from exc


def _describe(net: torch.nn.Module, in_channels: int, ndim: int, activation: str) -> dict[str, Any]:
    """Geometry and architecture facts for the metadata (probed for non-UNet modules)."""
    if isinstance(net, UNet):
        return {
            "ndim": net.ndim,
            "in_channels": net.in_channels,
            "classes": net.classes,
            "margin": net.margin,
            "step": net.step,
            "min_tile": net.min_tile,
            "activation": net.activation,
            "architecture": "unet",
            "padding": net.padding,
            "base": net.base,
            "depth": net.depth,
        }
    from pipeline.backends.probe import probe_geometry

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    # The given ndim/in_channels are tried first; the usual alternatives after them.
    geometry = probe_geometry(
        run,
        where=type(net).__name__,
        ndims=tuple(dict.fromkeys((ndim, 2, 3))),
        channels=tuple(dict.fromkeys((in_channels, 1, 3))),
    )
    return {
        **geometry,
        "activation": "none" if activation == "auto" else activation,
        "architecture": type(net).__name__,
    }


def _write_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    compiled, how = _compat.jit_script_or_trace(net, example)
    meta["exporter"] = f"torch.jit.{how}+freeze"
    _compat.jit_save(compiled, path, {EXTRA_FILE: json.dumps(meta)})


def _write_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    import onnx

    axes = [0, *range(2, example.dim())]
    raw = path.with_name(path.name + ".raw")
    try:
        how = _compat.onnx_export(
            net,
            example,
            raw,
            input_name=INPUT_NAME,
            output_name=OUTPUT_NAME,
            dynamic_axes=axes,
            opset=ONNX_OPSET,
        )
        proto = onnx.load(str(raw))
    finally:
        raw.unlink(missing_ok=True)
    meta["exporter"] = f"torch.onnx.export(dynamo={how == 'dynamo'})"
    meta["opset"] = next(
        (o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None
    )
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _write_atomically(
    net: torch.nn.Module, example: torch.Tensor, out: Path, fmt: str, meta: dict
) -> None:
    """Write beside ``out`` and rename, so a crash never leaves a half-written model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        (_write_torchscript if fmt == "torchscript" else _write_onnx)(net, example, tmp, meta)
        os.replace(tmp, out)
    except Exception as exc:  # torch/onnx raise many types; report them as one ModelError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"{fmt} export failed ({first[:500]})",
            where=out,
            hint="a network that torch.jit.script or torch.onnx.export cannot handle; try the other format",
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _check_file(net: torch.nn.Module, path: Path, spec: ModelSpec, tolerance: float) -> float:
    """Max |eager - file| on random input of another batch size and shape than the export."""
    rng = np.random.default_rng(0)
    shape = [spec.min_tile] * (spec.ndim - 1) + [spec.min_tile + spec.step]
    x = rng.random((2, spec.in_channels, *shape), dtype=np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    backend = load_backend(path, device="cpu")
    try:
        got = backend.predict(x)
    finally:
        backend.close()
    diff = float(np.max(np.abs(got - ref)))
    if not diff <= tolerance:  # also catches NaN
        raise ModelError(
            f"the written model differs from the network by {diff:.3g} (tolerance {tolerance}); "
            "the file was removed",
            where=path,
            hint="report this with the torch/onnx versions; try the other format meanwhile",
        )
    return diff


def export_model(
    out_path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    weights: str | os.PathLike | None = None,
    normalize: str = "dtype",
    fmt: str | None = None,
    check: bool = True,
    tolerance: float = 1e-4,
    extra: dict | None = None,
    **arch: Any,
) -> ModelSpec:
    """Export a U-Net (or ``model``) to TorchScript or ONNX with embedded metadata.

    Parameters
    ----------
    out_path
        ``.pt``/``.ts`` for TorchScript (scripted, frozen: BatchNorm folded into the
        convolutions), ``.onnx`` for ONNX (opset 17, dynamic batch and spatial axes).
    model
        A network to export instead of a fresh :class:`UNet`; it is put in eval mode on
        the CPU. A ``UNet`` reports its geometry; any other module is probed.
    weights
        A ``torch.save``-d state dict, loaded with ``weights_only=True``.
    normalize
        How the pipeline scales integer input for this model (``dtype`` or ``none``).
    fmt
        ``torchscript`` or ``onnx``; None infers it from the suffix.
    check
        Compare the written file (through its backend) with the eager network on random
        input of a different batch and size; on failure the file is removed.
    tolerance
        Largest accepted max-abs difference (fp32).
    extra
        JSON-serialisable facts stored under ``"extra"`` in the metadata.
    **arch
        The :class:`UNet` to build, by its arguments (``in_channels``, ``classes``,
        ``base``, ``depth``, ``ndim``, ``padding``, ``activation``; its defaults for those
        not given). ``ndim``, ``in_channels`` and ``activation`` also guide the probe of a
        foreign ``model``.

    Returns
    -------
    ModelSpec
        The spec read back from the written file (``sha256`` filled).

    Raises
    ------
    ConfigError, ModelError
    """
    out = Path(out_path)
    fmt = _resolve_format(out, fmt)
    if normalize not in NORMALIZATIONS:
        raise ConfigError(
            f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}", where="normalize"
        )
    try:
        user_extra = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extra is not JSON-serialisable ({exc})", where="extra") from exc
    if model is None:
        try:
            model = UNet(**arch)
        except (TypeError, ValueError) as exc:  # an unknown argument, a bad value
            raise ConfigError(str(exc), where="model options") from exc
    if weights is not None:
        load_weights(model, weights)
    net = model.cpu().float().eval()
    info = _describe(
        net, arch.get("in_channels", 1), arch.get("ndim", 2), arch.get("activation", "auto")
    )
    example = torch.rand(1, info["in_channels"], *[info["min_tile"]] * info["ndim"])
    meta = build_metadata(
        fmt=fmt, normalize=normalize, torch_version=torch.__version__, extra=user_extra, **info
    )
    # BatchNorm folded into the convolutions: the file runs one pass less per layer (the
    # check below compares it with the network as given)
    folded, meta["batchnorm_folded"] = fold_batchnorm(net)
    _write_atomically(folded, example, out, fmt, meta)
    spec = read_model_spec(out, backend=fmt)
    if check:
        try:
            diff = _check_file(net, out, spec, tolerance)
        except Exception:
            out.unlink(missing_ok=True)
            raise
        log.info("exported %s (%s), max |eager - file| = %.2g", out, meta["exporter"], diff)
    return spec
