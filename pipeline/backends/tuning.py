"""What makes a loaded network fast on its device: BatchNorm folded into the
convolutions, channels-last memory on CUDA, CUDA graphs, and a batch size that fills
the device.

Only :func:`freeze_for_inference` and :func:`auto_batch_size`'s CPU answer run here;
the CUDA paths are small and run where a GPU is (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "CPU_BATCH",
    "CudaGraphRunner",
    "auto_batch_size",
    "freeze_for_inference",
    "is_frozen",
    "to_channels_last",
]

log = logging.getLogger(__name__)

#: Tiles per batch on CPU (measured: larger batches do not run faster there).
CPU_BATCH = 8
#: Input pixels per batch that keep a large GPU busy (e.g. 32 tiles of 512²).
GPU_BATCH_PIXELS = 32 * 512 * 512
#: Share of the free device memory a batch may take (activations, workspace).
GPU_MEMORY_SHARE = 0.5
MAX_BATCH = 256


def is_frozen(module: Any) -> bool:
    """A frozen TorchScript module holds its weights as constants: no parameters left."""
    return not any(True for _ in module.parameters())


def freeze_for_inference(module: Any, device: str) -> Any:
    """Freeze a TorchScript module that is not frozen yet (``torch.jit.freeze`` folds
    BatchNorm into the preceding convolutions and inlines the weights), and on CUDA run
    ``torch.jit.optimize_for_inference`` (further conv fusions for cuDNN). A module
    that cannot be frozen is used as it is."""
    import torch

    from pipeline.core._compat import quiet_torch

    with quiet_torch():
        if not is_frozen(module):
            try:
                module = torch.jit.freeze(module.eval())
            except Exception as exc:  # interfaces, attributes mutated in forward, ...
                log.info("the model cannot be frozen (%s); running it as it is", exc)
                return module
        if device.startswith("cuda"):
            try:
                module = torch.jit.optimize_for_inference(module)
            except Exception as exc:
                log.info("optimize_for_inference failed (%s); running the frozen model", exc)
    return module


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC memory for 2D batches on CUDA (what cuDNN's tensor-core kernels use)."""
    import torch

    if x.is_cuda and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class CudaGraphRunner:
    """Replays ``fn`` as a captured CUDA graph: one launch per batch instead of one per
    layer (what small networks are limited by). Batches smaller than the first are
    padded to its size, so one graph serves a whole run.

    The output is copied out of the graph's static buffer, which the next replay reuses.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn
        self.graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:

        n = x.shape[0]
        key = next((k for k in self.graphs if k[1:] == tuple(x.shape[1:]) and k[0] >= n), None)
        if key is None:
            key = tuple(x.shape)
            self.graphs[key] = self._capture(x)
        graph, static_in, static_out = self.graphs[key]
        static_in[:n].copy_(x)
        if n < key[0]:
            static_in[n:].zero_()
        graph.replay()
        return static_out[:n].clone()

    def _capture(self, x: torch.Tensor):
        import torch

        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN picks its algorithms outside the capture
                self.fn(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(static_in)
        return graph, static_in, static_out


def auto_batch_size(
    run: Callable[[torch.Tensor], Any],
    sample: Sequence[int],
    device: str,
    *,
    pixels: int = GPU_BATCH_PIXELS,
    share: float = GPU_MEMORY_SHARE,
) -> int:
    """Tiles per batch for input tiles of shape ``sample`` = ``(C, *tile)``.

    CPU: :data:`CPU_BATCH`. CUDA: enough tiles for ``pixels`` input pixels, but no more
    than ``share`` of the free device memory holds, measured by running two tiles once
    (torch's peak allocation, or the drop in free memory for runtimes with their own
    allocator, such as ONNX Runtime).
    """
    if not device.startswith("cuda"):
        return CPU_BATCH
    import torch

    dev = torch.device(device)
    tile_pixels = math.prod(sample[1:])
    by_pixels = max(1, pixels // tile_pixels)
    torch.cuda.synchronize(dev)
    free_before, _ = torch.cuda.mem_get_info(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    run(torch.zeros((2, *sample), dtype=torch.float32, device=dev))
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) - base
    free_after, _ = torch.cuda.mem_get_info(dev)
    per_tile = max(peak, free_before - free_after, 1) / 2
    by_memory = int(free_after * share // per_tile)
    size = max(1, min(by_pixels, by_memory, MAX_BATCH))
    log.info(
        "batch size %d on %s (%.0f MB per tile, %.0f MB free; %d tiles fill %d px)",
        size,
        device,
        per_tile / 2**20,
        free_after / 2**20,
        by_pixels,
        pixels,
    )
    return size
