"""ONNX Runtime backend: CPU, or CUDA when asked (never a silent fallback to CPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.backends.base import CheckedBackend, ModelSpec
from pipeline.backends.ort_gpu import IoBindingRunner, gpu_providers
from pipeline.errors import DeviceError, ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"


def _providers(device: str, provider: str, precision: str) -> list[Any]:
    if not device.startswith("cuda"):
        return [_CPU_EP]
    import torch

    # ONNX Runtime queues its kernels on torch's stream: behind the tiles cut there. A
    # torch without CUDA has no stream to give: the session then says which provider
    # could not start (a DeviceError in make_session), not torch's assertion
    stream = (
        torch.cuda.current_stream(torch.device(device)).cuda_stream
        if torch.cuda.is_available()
        else None
    )
    return gpu_providers(device, provider, precision, stream=stream)


def make_session(
    path: str | Path,
    device: str = "cpu",
    threads: int | None = None,
    quiet: bool = False,
    provider: str = "auto",
    precision: str = "fp32",
) -> Any:
    """An ``InferenceSession`` with full graph optimisation on the requested device.

    ``quiet`` also hides error logs (the probe expects most of its runs to fail).
    ``provider`` and ``precision`` choose the GPU provider
    (:func:`~pipeline.backends.ort_gpu.gpu_providers`).

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
    providers = _providers(device, provider, precision)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ModelError(
            f"onnxruntime cannot load the model ({str(exc).strip()[:300]})",
            where=path,
            hint="check the file with `python -m onnx.checker`, or re-export it",
        ) from exc
    wanted = [p if isinstance(p, str) else p[0] for p in providers if p != _CPU_EP]
    missing = [p for p in wanted if p not in session.get_providers()]
    if missing:
        # ORT drops a provider whose libraries fail to load with only a log line.
        raise DeviceError(
            f"requested {device} but onnxruntime could not start {', '.join(missing)} "
            f"(providers in use: {', '.join(session.get_providers())})",
            where="device",
            hint="check the CUDA/cuDNN (and TensorRT) versions onnxruntime-gpu needs",
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
    """One ONNX model in an onnxruntime session; ``spec`` and ``device`` as for
    :class:`~pipeline.backends.base.CheckedBackend`.

    Parameters
    ----------
    threads
        ``SessionOptions.intra_op_num_threads`` (None: onnxruntime's default).
    provider, precision
        On a GPU: ``cuda`` (``auto``) or ``tensorrt``, whose engines may use fp16/bf16.
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        threads: int | None = None,
        provider: str = "auto",
        precision: str = "fp32",
    ) -> None:
        self.spec = spec
        self.device = device
        self._session = make_session(
            spec.path or "", device, threads, provider=provider, precision=precision
        )
        self._input = self._session.get_inputs()[0].name
        # Some exports fix the batch size (often 1): feed them in slices of that size.
        self._batch = input_facts(self._session)["batch"]
        self._bound = IoBindingRunner(self._session, self._out_shape)
        # TensorRT builds an engine per input shape (minutes): a smaller last batch is
        # padded to the largest one seen instead of getting its own engine
        self._pad = device.startswith("cuda") and provider == "tensorrt"
        self._largest = 0

    def _out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        classes = self.spec.classes or shape[1]
        return (shape[0], classes, *(self.spec.output_size(s) for s in shape[2:]))

    def _sliced(self, fn: Callable[[Any], Any], x: Any, concat: Callable[[list], Any]) -> Any:
        if self._batch is None or self._batch == x.shape[0]:
            return fn(x)
        if x.shape[0] % self._batch:
            raise ModelError(
                f"the model takes batches of exactly {self._batch}, got {x.shape[0]}",
                where=self.spec.path,
                hint=f"use a batch size that is a multiple of {self._batch}",
            )
        return concat([fn(x[i : i + self._batch]) for i in range(0, x.shape[0], self._batch)])

    def run(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        out = self._sliced(
            lambda b: self._session.run(None, {self._input: b})[0], x, np.concatenate
        )
        return np.asarray(out, dtype=np.float32)

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """CPU: the tensor's memory handed to onnxruntime and back without a copy; CUDA:
        input and output bound by device pointer (no host round trip)."""
        import torch

        if batch.device.type == "cpu":
            return torch.from_numpy(self.run(batch.contiguous().numpy()))
        n = batch.shape[0]
        self._largest = max(self._largest, n)
        if self._pad and n < self._largest:
            fill = batch.new_zeros((self._largest - n, *batch.shape[1:]))
            return self._sliced(self._bound, torch.cat([batch, fill]), torch.cat)[:n]
        return self._sliced(self._bound, batch, torch.cat)

    def close(self) -> None:
        """Release the session (and its GPU memory arena)."""
        self._session = None
