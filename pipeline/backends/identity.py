"""The identity backend: output = input. For tests (an oracle) and I/O benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.backends.base import CheckedBackend, ModelSpec
from pipeline.backends.files import validate_fields
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch


def identity_spec(overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """Spec of the identity "model": any channels, no margin, any tile size.

    ``ndim`` (default 2) and ``normalize`` (default ``dtype``) may be overridden, and
    ``in_channels``/``classes`` to pin the channel count (both the same: output = input).
    """
    ov = dict(overrides or {})
    unknown = set(ov) - {"ndim", "normalize", "in_channels", "classes"}
    if unknown:
        raise ConfigError(
            f"the identity backend has a fixed geometry; cannot override {sorted(unknown)}",
            where="overrides",
            hint="only ndim, normalize, in_channels and classes apply",
        )
    validate_fields(ov, where="overrides", error=ConfigError)
    channels = ov.get("in_channels") or ov.get("classes") or 0
    if ov.get("classes", channels) != channels:
        raise ConfigError(
            f"the identity backend returns its input: classes {ov['classes']} cannot differ "
            f"from in_channels {channels}",
            where="overrides",
        )
    return ModelSpec(
        format="identity",
        ndim=ov.get("ndim", 2),
        in_channels=channels,
        classes=channels,
        margin=0,
        step=1,
        min_tile=1,
        activation="none",
        normalize=ov.get("normalize", "dtype"),
    )


class IdentityBackend(CheckedBackend):
    """Returns its input as float32 (a copy from :meth:`predict`); ``classes=0`` means
    "as many as the input"."""

    def __init__(self, spec: ModelSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device  # where the pipeline runs its blocks (the host ceiling there)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.array(batch, dtype=np.float32, copy=True)

    def run_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch itself (no copy: the pipeline blends it before cutting the next)."""
        import torch

        return batch.to(torch.float32)
