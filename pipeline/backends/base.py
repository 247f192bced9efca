"""The backend protocol and the model geometry every backend reports.

A backend maps a batch of normalised tiles ``(B, C, *spatial)`` float32 to
probabilities ``(B, K, *spatial_out)`` float32, where ``spatial_out`` is the input
size minus ``2 * margin`` on every spatial axis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

ACTIVATIONS = ("sigmoid", "softmax", "none")
NORMALIZATIONS = ("dtype", "none")


@dataclass(frozen=True)
class ModelSpec:
    """What running a model needs to know: its geometry, channels and conventions.

    Attributes
    ----------
    format
        ``torchscript``, ``onnx`` or ``identity``.
    ndim
        Number of spatial axes the network takes (2 or 3).
    in_channels, classes
        Channels in and out. ``in_channels=0`` means "any" (identity backend).
    margin
        Pixels lost on each side of every spatial axis (``valid`` networks), 0 for ``same``.
    step
        Tile sizes the network accepts are ``min_tile + k * step`` (``step = 2**depth``).
    min_tile
        Smallest input size the network accepts.
    activation
        Output activation already applied inside the model file.
    normalize
        How integer input is scaled before the network (``dtype``: divide by the
        dtype's maximum; ``none``: cast to float32 unchanged).
    """

    format: str
    ndim: int
    in_channels: int
    classes: int
    margin: int = 0
    step: int = 1
    min_tile: int = 1
    activation: str = "none"
    normalize: str = "dtype"
    path: str | None = None
    sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def accepts_tile(self, size: int) -> bool:
        return size >= self.min_tile and (size - self.min_tile) % self.step == 0

    def nearest_tiles(self, size: int) -> tuple[int, int]:
        """The accepted tile sizes just below and just above ``size``."""
        k = max(0, (size - self.min_tile) // self.step)
        below = self.min_tile + k * self.step
        return below, below + (0 if below == size else self.step)

    def output_size(self, size: int) -> int:
        return size - 2 * self.margin

    @property
    def mpp(self) -> float | None:
        """Training resolution in µm/px, when the model file declares one (``extra.mpp``)."""
        value = self.extra.get("mpp", (self.extra.get("extra") or {}).get("mpp"))
        return None if value is None else float(value)

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "ndim": self.ndim,
            "in_channels": self.in_channels,
            "classes": self.classes,
            "margin": self.margin,
            "step": self.step,
            "min_tile": self.min_tile,
            "activation": self.activation,
            "normalize": self.normalize,
            "path": self.path,
            "sha256": self.sha256,
            **({"extra": self.extra} if self.extra else {}),
        }


class Backend(Protocol):
    """One loaded model on one device."""

    spec: ModelSpec
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C, *spatial)`` float32 → ``(B, K, *(spatial - 2*margin))`` float32."""
        ...

    def close(self) -> None: ...
