"""What happened to each input of a run: states, reasons, timings; ``OUT/report.json``.

Every input ends in exactly one state:

``done``
    its output image is complete and in place (``output``);
``failed``
    it could not be run; ``reason`` is a short class (``bad-input``, ``not-found``,
    ``unsupported-format``, ``channel-mismatch``...) and ``message`` names the file, the
    problem and a hint;
``skipped``
    left out by design, not a failure: ``not-an-image`` (a file in a searched folder
    whose suffix is not searched), ``duplicate`` (the same file reached twice)...

A run is ``ok`` when no input failed: skipped inputs do not spoil it.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import __version__

STATES = ("pending", "done", "failed", "skipped")


@dataclass
class InputResult:
    """One input's outcome.

    Attributes
    ----------
    path
        The input as given or found.
    name
        Its output group name inside the output root (sanitised, unique in the run).
    state, reason, message
        See the module docstring; ``reason`` and ``message`` are None for ``done``.
    output
        Path of the published output image (``done`` only).
    shape
        Output shape ``(classes, *spatial)``.
    pixels
        Spatial pixels of the input image (level run on).
    tiles
        Lattice tiles run through the model.
    skipped_tiles
        Lattice tiles not run because they hold no tissue (their output is background).
    tissue_fraction
        Fraction 0..1 of the image detected as tissue; None when not measured.
    blocks
        Blocks (units of work) the image was split into.
    seconds
        Wall time spent on this input.
    """

    path: str
    name: str
    state: str = "pending"
    reason: str | None = None
    message: str | None = None
    output: str | None = None
    shape: list[int] | None = None
    pixels: int = 0
    tiles: int = 0
    skipped_tiles: int = 0
    tissue_fraction: float | None = None
    blocks: int = 0
    seconds: float = 0.0

    @property
    def skipped_fraction(self) -> float:
        """Share of lattice tiles whose computation was skipped (0 when none ran)."""
        total = self.tiles + self.skipped_tiles
        return self.skipped_tiles / total if total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "skipped_fraction": round(self.skipped_fraction, 4)}


@dataclass
class RunReport:
    inputs: list[InputResult] = field(default_factory=list)
    seconds: float = 0.0
    model: dict | None = None
    config: dict | None = None
    version: str = __version__

    @property
    def ok(self) -> bool:
        """True when every input is ``done`` or ``skipped``."""
        return all(r.state in ("done", "skipped") for r in self.inputs)

    @property
    def counts(self) -> dict[str, int]:
        """Inputs per state (every state listed, zeros included)."""
        return {s: sum(r.state == s for r in self.inputs) for s in STATES}

    @property
    def pixels(self) -> int:
        return sum(r.pixels for r in self.inputs if r.state == "done")

    @property
    def mpix_per_s(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "ok": self.ok,
            "counts": self.counts,
            "seconds": round(self.seconds, 3),
            "pixels": self.pixels,
            "mpix_per_s": round(self.mpix_per_s, 3),
            "model": self.model,
            "config": self.config,
            "inputs": [r.to_dict() for r in self.inputs],
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON, atomically: readers see the old file or the new one.

        The text goes to a temporary file beside ``path``, is flushed to disk, then renamed
        over ``path``; on any error the temporary file is removed and ``path`` is unchanged.
        """
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            # os.open with 0o666 honours the umask (mkstemp would leave the report 0600)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path
