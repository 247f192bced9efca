"""Moving a block's pixels to the compute device and back, and the per-pixel maths
done there: input scaling and output quantisation.

Everything here takes and returns torch tensors; a CPU "device" is the same code on CPU
tensors (zero-copy views of numpy arrays). On CUDA, data crosses the bus once each way
in its smallest form (the stored dtype in, the output dtype out) through pinned host
memory with non-blocking copies. The arithmetic is exactly what numpy did before
(float32 division by the dtype's maximum in; ``rint(clip(p, 0, 1) * 255)`` with ties to
even out), so outputs do not change with the device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.buffers import reused

if TYPE_CHECKING:
    import torch

__all__ = [
    "empty",
    "host_threads",
    "quantize",
    "scale_into",
    "scale_of",
    "to_device",
    "to_host",
    "torch_device",
]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def torch_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device`` (CUDA with its index)."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor on ``device``, in its own dtype.

    CPU: a zero-copy view. CUDA: one copy into pinned (page-locked) host memory, then
    an asynchronous copy over the bus; the pinned block returns to torch's caching host
    allocator only once that copy is done.
    """
    import torch

    if device.type != "cpu" and array.dtype.kind == "u" and array.dtype.itemsize > 1:
        # torch's CUDA kernels lack unsigned 16/32/64-bit types: widen to a signed type
        # that holds every value (the scale still comes from the stored dtype)
        array = array.astype(np.int32 if array.dtype.itemsize == 2 else np.int64)
    host = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return host
    pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    pinned.copy_(host)
    return pinned.to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of ``tensor`` (zero-copy on CPU; one synchronised copy from CUDA)."""
    import torch

    if tensor.device.type == "cpu":
        return tensor.contiguous().numpy()
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    pinned.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return pinned.numpy()


def scale_of(dtype: np.dtype | str, mode: str) -> float | None:
    """The divisor ``normalize="dtype"`` applies to integers of ``dtype`` (None: none)."""
    dtype = np.dtype(dtype)
    if mode == "dtype" and np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return None


def scale_into(out: torch.Tensor, values: torch.Tensor, scale: float | None) -> torch.Tensor:
    """``values`` (any dtype) into the float32 ``out``, divided by ``scale`` (see
    :func:`scale_of`) in the same pass: the bits of a float32 copy then divided, with one
    pass over the memory instead of two. The division is float32, as numpy's was."""
    import torch

    if scale is None:
        return out.copy_(values)
    return torch.div(values, scale, out=out)


def quantize(prob: torch.Tensor, dtype: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Output pixels from probabilities, in place where possible.

    ``uint8``: ``rint(clip(p, 0, 1) * 255)`` (ties to even, as ``np.rint``);
    ``float16``/``float32``: the value, rounded to the nearest representable. The
    result is always new memory (``prob`` may be scratch the next block reuses), or
    ``out`` when given.
    """
    import torch

    if out is None:
        out = torch.empty(prob.shape, dtype=getattr(torch, dtype), device=prob.device)
    if dtype == "uint8":
        prob.clamp_(0.0, 1.0).mul_(255.0).round_()
    # copy_ into a uint8 tensor converts 3x faster than .to(torch.uint8) on CPU
    return out.copy_(prob)


def empty(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, role: str | None = None
) -> torch.Tensor:
    """An uninitialised tensor; on CPU with ``role``, in this thread's previous buffer of
    that role when nothing holds it any more (:func:`pipeline.core.buffers.reused`)."""
    import torch

    if role is None or device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return torch.from_numpy(reused(role, shape, np_dtype))


@contextlib.contextmanager
def host_threads(count: int | None) -> Iterator[None]:
    """Run the enclosed torch CPU ops on ``count`` intra-op threads (None: unchanged).

    A block's per-tile ops are small (a tile is ~10⁵ values): splitting each across
    OpenMP threads costs a fork/join per op, which on a busy machine (a descheduled
    thread) costs milliseconds per op. One thread does them in microseconds, and the
    other cores read and write other blocks meanwhile.
    """
    import torch

    if count is None or count == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
