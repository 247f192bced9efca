"""Find the geometry of a model without metadata by running it on dummy input.

Used for "foreign" files (a plain TorchScript or ONNX export, e.g. from MONAI). The
probe only needs a function ``run(x) -> y`` over numpy arrays, so it works the same for
TorchScript, ONNX Runtime and eager modules.

How it works:

1. Rank, channels and a first working size: try ``ndim`` 2 then 3, each candidate
   channel count, and the sizes in :data:`PROBE_SIZES` (smallest first) on a cube. The
   sizes are chosen so that, for the usual U-Nets with step <= 32 (``same``: multiples
   of the step; ``valid``: ``-4`` modulo the step), the first size that runs is one the
   network truly accepts, not one it only survives by flooring an odd pooling input.
2. ``margin = (size - output) / 2``; ``classes`` = output channels.
3. ``step``: the smallest power of two ``<= 32`` such that ``size + step`` and
   ``size + 2 * step`` give outputs consistent with that margin (only the last axis
   changes, which is cheaper).
4. ``min_tile``: bisect downwards in multiples of ``step``.

Each run costs one forward pass on CPU; unusual architectures (or 3D valid networks,
whose first accepted size is large) are better described with ``overrides``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.errors import ModelError

log = logging.getLogger(__name__)

PROBE_SIZES = (32, 44, 64, 92, 128, 188, 256, 380)
STEPS = (1, 2, 4, 8, 16, 32)
Runner = Callable[[np.ndarray], np.ndarray]


class _Prober:
    def __init__(self, run: Runner) -> None:
        self.run = run
        self.calls = 0

    def out_shape(self, channels: int, spatial: tuple[int, ...]) -> tuple[int, ...] | None:
        """Output shape for a ``(1, channels, *spatial)`` input, None if the model refuses it."""
        self.calls += 1
        x = np.full((1, channels, *spatial), 0.5, dtype=np.float32)
        try:
            y = np.asarray(self.run(x))
        except Exception as exc:  # any refusal (torch, onnxruntime) means "not this shape"
            log.debug("probe %s refused: %s", x.shape, str(exc).splitlines()[0][:200])
            return None
        if y.ndim != x.ndim or y.shape[0] != 1:
            return None
        return tuple(int(v) for v in y.shape)


def _first_fit(
    p: _Prober, ndims: Sequence[int], channels: Sequence[int], sizes: Sequence[int]
) -> tuple[int, int, int, tuple[int, ...]] | None:
    for ndim in ndims:
        for c in channels:
            for size in sizes:
                out = p.out_shape(c, (size,) * ndim)
                if out is None:
                    continue
                spatial = out[2:]
                lost = size - spatial[0]
                if len(set(spatial)) == 1 and lost >= 0 and lost % 2 == 0 and spatial[0] > 0:
                    return ndim, c, size, out
    return None


def probe_geometry(
    run: Runner,
    *,
    where: Any,
    ndims: Sequence[int] = (2, 3),
    channels: Sequence[int] = (1, 3),
    sizes: Sequence[int] = PROBE_SIZES,
) -> dict[str, int]:
    """Find ``ndim``, ``in_channels``, ``classes``, ``margin``, ``step`` and ``min_tile``.

    Parameters
    ----------
    run
        Runs the model on a float32 ``(B, C, *spatial)`` array; raises if it cannot.
    where
        The file (or object) named in errors.
    ndims, channels
        Candidates to try, in order (narrow them when the file or the user says).
    sizes
        Cube sizes to try for the first working input.

    Raises
    ------
    ModelError
        When no candidate runs, or no step up to 32 gives consistent output sizes.
    """
    started = time.perf_counter()
    p = _Prober(run)
    found = _first_fit(p, ndims, channels, sizes)
    hint = "pass the geometry as overrides (ndim, in_channels, margin, step, min_tile)"
    if found is None:
        raise ModelError(
            f"the model ran on none of the probe inputs (ndim {list(ndims)}, channels "
            f"{list(channels)}, sizes {list(sizes)})",
            where=where,
            hint=hint,
        )
    ndim, c, size, out = found
    classes, margin = out[1], (size - out[2]) // 2

    def fits(last: int) -> bool:
        if last - 2 * margin < 1:
            return False
        spatial = (size,) * (ndim - 1) + (last,)
        got = p.out_shape(c, spatial)
        return got == (1, classes, *(s - 2 * margin for s in spatial))

    step = next((s for s in STEPS if fits(size + s) and fits(size + 2 * s)), None)
    if step is None:
        raise ModelError(
            f"output sizes are inconsistent for every step up to {STEPS[-1]} (ran at "
            f"{size}, margin {margin})",
            where=where,
            hint=hint,
        )
    ok, bad = 0, (size - 1) // step + 1  # multiples of step below size: ok known, bad assumed
    while bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if fits(size - mid * step) else (ok, mid)
    geometry = {
        "ndim": ndim,
        "in_channels": c,
        "classes": classes,
        "margin": margin,
        "step": step,
        "min_tile": size - ok * step,
    }
    log.info(
        "probed %s in %d runs (%.1f s): %s", where, p.calls, time.perf_counter() - started, geometry
    )
    return geometry
