"""ONNX Runtime backend: CPU, or CUDA when asked (never a silent fallback to CPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.base import CheckedBackend, ModelSpec
from pipeline.errors import DeviceError, ModelError

log = logging.getLogger(__name__)

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return [_CPU_EP]
    available = ort.get_available_providers()
    if _CUDA_EP not in available:
        raise DeviceError(
            f"requested {device} but onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)})",
            where="device",
            hint="install onnxruntime-gpu, or use the torchscript backend or cpu",
        )
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    # CPU stays listed for the few ops CUDA lacks (shape arithmetic), as ORT recommends.
    return [(_CUDA_EP, {"device_id": index}), _CPU_EP]


def make_session(
    path: str | Path, device: str = "cpu", threads: int | None = None, quiet: bool = False
) -> Any:
    """An ``InferenceSession`` with full graph optimisation on the requested device.

    ``quiet`` also hides error logs (the probe expects most of its runs to fail).

    Raises
    ------
    DeviceError
        CUDA requested but not usable by onnxruntime.
    ModelError
        The file does not load, or has more than one input.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: ORT warns about harmless unused initialisers.
    options.log_severity_level = 4 if quiet else 3
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = _providers(device)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(
            f"onnxruntime cannot load the model ({str(exc).strip()[:300]})",
            where=path,
            hint="check the file with `python -m onnx.checker`, or re-export it",
        ) from exc
    if device.startswith("cuda") and _CUDA_EP not in session.get_providers():
        # ORT drops a provider whose libraries fail to load with only a log line.
        raise DeviceError(
            f"requested {device} but onnxruntime could not start CUDA (providers in use: "
            f"{', '.join(session.get_providers())})",
            where="device",
            hint="check the CUDA/cuDNN versions onnxruntime-gpu needs",
        )
    if len(session.get_inputs()) != 1:
        names = [i.name for i in session.get_inputs()]
        raise ModelError(
            f"the model has {len(names)} inputs {names}; the pipeline feeds exactly one",
            where=path,
            hint="export a model with a single image input",
        )
    return session


def input_facts(session: Any) -> dict[str, Any]:
    """What the input declaration fixes: rank, channels, static batch and spatial sizes."""
    shape = session.get_inputs()[0].shape
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    return {
        "rank": len(shape) if shape else None,
        "batch": static[0] if shape else None,
        "channels": static[1] if len(static) > 1 else None,
        "spatial": static[2:],
    }


def probe_runner(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """A CPU ``run(x) -> y`` for :mod:`pipeline.backends.probe`, and :func:`input_facts`."""
    session = make_session(path, "cpu", quiet=True)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run, input_facts(session)


class OnnxBackend(CheckedBackend):
    """One ONNX model in an onnxruntime session.

    Parameters
    ----------
    spec, device
        See :class:`~pipeline.backends.base.CheckedBackend`.
    threads
        ``SessionOptions.intra_op_num_threads`` (None: onnxruntime's default).
    """

    def __init__(self, spec: ModelSpec, device: str, threads: int | None = None) -> None:
        self.spec = spec
        self.device = device
        self._session = make_session(spec.path or "", device, threads)
        self._input = self._session.get_inputs()[0].name
        # Some exports fix the batch size (often 1): feed them in slices of that size.
        self._batch = input_facts(self._session)["batch"]

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._batch is None or self._batch == x.shape[0]:
            out = self._session.run(None, {self._input: x})[0]
        elif x.shape[0] % self._batch == 0:
            parts = [
                self._session.run(None, {self._input: x[i : i + self._batch]})[0]
                for i in range(0, x.shape[0], self._batch)
            ]
            out = np.concatenate(parts)
        else:
            raise ModelError(
                f"the model takes batches of exactly {self._batch}, got {x.shape[0]}",
                where=self.spec.path,
                hint=f"use a batch size that is a multiple of {self._batch}",
            )
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Release the session (and its GPU memory arena)."""
        self._session = None
