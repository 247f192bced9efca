"""ONNX Runtime on NVIDIA GPUs: the CUDA and TensorRT execution providers, and runs that
keep the data on the device (I/O binding to torch tensors).

The CUDA provider is given torch's current CUDA stream, so ONNX Runtime's kernels queue
behind the copies and tile cutting torch issued on that stream and nothing has to wait
for the host. TensorRT is an opt-in (``--ort-provider tensorrt``): engines are built
for the first batch shape seen (minutes for a large network), kept in a user cache
folder and reused by later runs; ``fp16``/``bf16`` precision lets TensorRT use them.
This code runs only where a GPU is; the CPU tests cover what does not need one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import ORT_PROVIDERS
from pipeline.errors import ConfigError, DeviceError

if TYPE_CHECKING:
    import torch

__all__ = ["ORT_PROVIDERS", "IoBindingRunner", "gpu_providers", "user_cache_dir"]

_TRT_EP, _CUDA_EP, _CPU_EP = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


def user_cache_dir(*parts: str) -> Path:
    """``~/.cache/pipeline/...`` (``$XDG_CACHE_HOME``; ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows), created if missing. ``$PIPELINE_CACHE_DIR`` wins."""
    root = os.environ.get("PIPELINE_CACHE_DIR")
    if root:
        base = Path(root)
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "pipeline"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "pipeline"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def gpu_providers(
    device: str,
    provider: str = "auto",
    precision: str = "fp32",
    available: list[str] | None = None,
    stream: int | None = None,
) -> list[Any]:
    """The provider list for a session on ``device`` (``cuda`` or ``cuda:N``).

    Parameters
    ----------
    provider
        ``auto``/``cuda``: CUDA; ``tensorrt``: TensorRT first, CUDA for what it cannot
        run, then CPU for shape arithmetic.
    precision
        ``fp16``/``bf16`` let TensorRT build reduced-precision engines.
    available
        ``onnxruntime.get_available_providers()`` (asked when None).
    stream
        A CUDA stream handle (``torch.cuda.current_stream().cuda_stream``) to run on.

    Raises
    ------
    DeviceError
        The requested provider is not in this onnxruntime build (never a silent fallback).
    """
    if provider not in ORT_PROVIDERS:
        raise ConfigError(
            f"ort_provider must be one of {', '.join(ORT_PROVIDERS)}, got {provider!r}",
            where="option --ort-provider",
        )
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    wanted = [_TRT_EP, _CUDA_EP] if provider == "tensorrt" else [_CUDA_EP]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DeviceError(
            f"requested {device} with {provider} but onnxruntime has no "
            f"{', '.join(missing)} (available: {', '.join(available)})",
            where="option --ort-provider" if provider == "tensorrt" else "device",
            hint="install onnxruntime-gpu (and TensorRT for --ort-provider tensorrt), or "
            "use the torchscript backend",
        )
    cuda: dict[str, Any] = {"device_id": index}
    if stream is not None:
        cuda.update(has_user_compute_stream="1", user_compute_stream=str(stream))
    providers: list[Any] = [(_CUDA_EP, cuda), _CPU_EP]
    if provider == "tensorrt":
        cache = str(user_cache_dir("trt"))
        trt: dict[str, Any] = {
            "device_id": index,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
            "trt_fp16_enable": precision in ("fp16", "bf16"),
        }
        if stream is not None:
            trt.update(has_user_compute_stream="1", user_compute_stream=str(stream))
        providers.insert(0, (_TRT_EP, trt))
    return providers


class IoBindingRunner:
    """Run a session on torch CUDA tensors in place: the input and a preallocated output
    are bound by their device pointers, so nothing crosses to the host.

    Parameters
    ----------
    session
        An ``InferenceSession`` on the CUDA (or TensorRT) provider.
    out_shape
        ``(B, C, *spatial) -> (B, K, *spatial_out)``: the output shape of an input shape.
    """

    def __init__(self, session: Any, out_shape) -> None:
        self.session = session
        self.out_shape = out_shape
        self.input = session.get_inputs()[0].name
        self.output = session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        x = x.contiguous().float()
        out = torch.empty(self.out_shape(tuple(x.shape)), dtype=torch.float32, device=x.device)
        index = x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input, "cuda", index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(
            self.output, "cuda", index, np.float32, tuple(out.shape), out.data_ptr()
        )
        # the input was cut on torch's stream: it must be complete before ONNX Runtime
        # reads it (its Run() returns once its own stream is done)
        torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return out
