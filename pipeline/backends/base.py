"""The backend protocol, the model geometry every backend reports, and the checks of
what goes into a model and comes out of it.

A backend maps a batch of normalised tiles ``(B, C, *spatial)`` float32 to
probabilities ``(B, K, *spatial_out)`` float32, where ``spatial_out`` is the input
size minus ``2 * margin`` on every spatial axis. :class:`CheckedBackend` checks both
sides of every batch (:func:`check_batch`, :func:`check_output`) around the runtime's
own call, once, for every backend.

Two entries: :meth:`CheckedBackend.predict` takes and returns numpy arrays (for people
and tests); :meth:`CheckedBackend.predict_tensor` takes and returns torch tensors on the
backend's device, which is what the pipeline feeds (the batch was cut on that device,
and the prediction is blended there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.config import ACTIVATIONS, NORMALIZATIONS
from pipeline.errors import ChannelMismatchError, ConfigError, ModelError, TileError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ACTIVATIONS",
    "NORMALIZATIONS",
    "Backend",
    "CheckedBackend",
    "ModelSpec",
    "check_batch",
    "check_channels",
    "check_output",
    "check_tile",
]


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

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Class names the model file declares (``pipeline export --class-names``)."""
        value = self.extra.get("class_names", (self.extra.get("extra") or {}).get("class_names"))
        if not isinstance(value, (list, tuple)) or not value:
            return None
        return tuple(str(v) for v in value)

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

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """The same on torch tensors on the backend's device."""
        ...

    def close(self) -> None: ...


class CheckedBackend:
    """What every backend shares: the checks around a batch, and a context manager.

    Subclasses set ``spec`` (the model's spec; a model file is loaded from
    ``spec.path``) and ``device`` (a resolved device: ``cpu``, ``cuda`` or ``cuda:N``),
    and implement :meth:`run` (numpy) and, where the runtime can take device tensors,
    :meth:`run_tensor`.
    """

    spec: ModelSpec
    device: str

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """``(B, C, *spatial)`` float32 → ``(B, K, *(spatial - 2*margin))`` float32."""
        check_batch(self.spec, batch)
        out = self.run(batch)
        check_output(self.spec, batch.shape, out.shape)
        return out

    def predict_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` float32 on :attr:`device` → ``(B, K, *(spatial -
        2*margin))`` float32 on the same device."""
        check_batch(self.spec, batch)
        out = self.run_tensor(batch)
        check_output(self.spec, batch.shape, out.shape)
        return out

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The runtime's forward pass on a checked batch."""
        raise NotImplementedError

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """The forward pass on a checked tensor batch (by default through :meth:`run`)."""
        import torch

        out = self.run(batch.detach().cpu().contiguous().numpy())
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(batch.device)

    def close(self) -> None:
        """Release what the runtime holds (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_channels(spec: ModelSpec, n: int, where: str | os.PathLike | None) -> None:
    """Raise :class:`ChannelMismatchError` unless the model takes ``n`` channels."""
    if spec.in_channels and n != spec.in_channels:
        raise ChannelMismatchError(
            f"got {n} channels, model expects {spec.in_channels}",
            where=where,
            hint=f"convert the image to {spec.in_channels} channel(s) or use a model trained on {n}",
        )


def check_tile(spec: ModelSpec, tile: Sequence[int], where: str = "tile") -> None:
    """Raise :class:`TileError` unless every size of ``tile`` is ``min_tile + k * step``.

    The one check of a tile size, for ``--tile`` and for every batch.
    """
    tile = tuple(int(t) for t in tile)
    if len(tile) != spec.ndim:
        raise TileError(
            f"tile {tile} has {len(tile)} axes, the model takes {spec.ndim}",
            where=where,
            hint=f"give one size or {spec.ndim} sizes",
        )
    for size in tile:
        if size < spec.min_tile:
            raise TileError(
                f"tile {size} is not accepted by the model (tile {tile}): below its minimum "
                f"{spec.min_tile}",
                where=where,
                hint=f"the smallest accepted size is {spec.min_tile} (then + k * {spec.step})",
            )
        if not spec.accepts_tile(size):
            below, above = spec.nearest_tiles(size)
            raise TileError(
                f"tile {size} is not accepted by the model (tile {tile}): sizes are "
                f"{spec.min_tile} + k * {spec.step}",
                where=where,
                hint=f"nearest accepted sizes: {below} or {above}",
            )


def check_batch(spec: ModelSpec, batch: np.ndarray | torch.Tensor) -> None:
    """Check a ``(B, C, *spatial)`` batch (numpy array or torch tensor) against the spec
    before running the model."""
    if getattr(batch, "ndim", None) != spec.ndim + 2 or not hasattr(batch, "shape"):
        shape = getattr(batch, "shape", None)
        raise ConfigError(
            f"expected a (B, C, {spec.ndim} spatial axes) array, got shape {shape}",
            where="batch",
        )
    check_channels(spec, batch.shape[1], "batch")
    check_tile(spec, batch.shape[2:])


def check_output(spec: ModelSpec, in_shape: Sequence[int], out_shape: Sequence[int]) -> None:
    """Raise ModelError when the model's output disagrees with its spec (checked once per
    batch, by :class:`CheckedBackend`)."""
    classes = spec.classes or in_shape[1]
    expected = (in_shape[0], classes, *(spec.output_size(s) for s in in_shape[2:]))
    if tuple(out_shape) != expected:
        raise ModelError(
            f"model returned shape {tuple(out_shape)} for input {tuple(in_shape)}, expected "
            f"{expected}",
            where=spec.path,
            hint="the embedded or probed geometry is wrong: pass classes/margin as overrides",
        )
