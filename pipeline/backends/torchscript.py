"""TorchScript backend: ``torch.jit.load`` on the requested device, inference mode.

TorchScript archives contain code: they are loaded only from paths the user names, and
their SHA-256 is recorded in the spec.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.backends.base import CheckedBackend, ModelSpec
from pipeline.backends.tuning import CudaGraphRunner, freeze_for_inference, to_channels_last
from pipeline.core._compat import jit_inference, jit_load
from pipeline.core.devices import host_threads
from pipeline.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def load_module(path: str | Path, device: str = "cpu") -> Any:
    """Load a TorchScript module for inference, or raise ModelError naming the file."""
    try:
        module = jit_load(path, map_location=device)
    except Exception as exc:  # torch raises RuntimeError/ValueError with long C++ traces
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"cannot load as TorchScript ({first[:300]})",
            where=path,
            hint="export the model with `pipeline export`, or torch.jit.save a scripted module",
        ) from exc
    module.eval()
    return module


def _first_tensor(y: Any) -> Any:
    # Deep-supervision networks return several maps; the first is the full-resolution one.
    if isinstance(y, (tuple, list)) and y:
        return y[0]
    return y


def probe_runner(path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """A CPU ``run(x) -> y`` over numpy arrays, for :mod:`pipeline.backends.probe`."""
    import torch

    module = load_module(path, "cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with jit_inference():
            return _first_tensor(module(torch.from_numpy(x))).float().numpy()

    return run


class TorchScriptBackend(CheckedBackend):
    """One TorchScript model on one device; ``spec`` and ``device`` as for
    :class:`~pipeline.backends.base.CheckedBackend`.

    Parameters
    ----------
    precision
        ``fp32``; ``fp16``/``bf16`` run under autocast and need a CUDA device (checked
        by :func:`pipeline.backends.load_backend`).
    threads
        CPU threads for torch's intra-op pool while the model runs.
    cuda_graphs
        Replay the network as a captured CUDA graph (CUDA only).

    The module is frozen when it is not yet (BatchNorm folded into the convolutions)
    and, on CUDA, optimised for inference; 2D batches run channels-last there, with
    cuDNN's algorithm search on (tiles have one shape).
    """

    def __init__(
        self,
        spec: ModelSpec,
        device: str,
        precision: str = "fp32",
        threads: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = device
        self.precision = precision
        self.threads = threads
        self._cuda = device.startswith("cuda")
        self._module = freeze_for_inference(load_module(spec.path or "", device), device)
        if self._cuda:
            # Tiles have one fixed shape, so cuDNN's per-shape algorithm search pays off.
            torch.backends.cudnn.benchmark = True
        self._autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self._forward = CudaGraphRunner(self._call) if cuda_graphs and self._cuda else self._call

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self._autocast_dtype)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        with jit_inference(), self._autocast():
            return _first_tensor(self._module(to_channels_last(x))).float()

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        with host_threads(None if self._cuda else self.threads):
            return self._forward(batch).contiguous()

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        return self.run_tensor(x).cpu().numpy()

    def close(self) -> None:
        """Drop the module and return cached GPU memory."""
        self._module = self._forward = None
        if self._cuda:
            import torch

            torch.cuda.empty_cache()
