"""What happened to each input of a run: states, reasons, timings; ``OUT/report.json``.

Every input ends in exactly one state:

``done``
    its output image is complete and in place (``output``);
``failed``
    it could not be run; ``reason`` is a short class (``bad-input``, ``not-found``,
    ``unsupported-format``, ``channel-mismatch``...) and ``message`` names the file, the
    problem and a hint;
``skipped``
    left out by design, not a failure: ``up-to-date`` (its output was made from the same
    input, model and settings), ``not-an-image`` (a file in a searched folder whose suffix
    is not searched), ``duplicate`` (the same file reached twice)...
``pending``
    not finished: the run was interrupted (``interrupted``); a rerun continues it.

A run is ``ok`` when no input failed: skipped inputs do not spoil it.

``OUT/report.json`` describes every input the output holds: this run's inputs, then
those of earlier runs (or other shards) from the ledger, each as its last run left it.
Each run also keeps its own report, of its inputs only, in ``OUT/.pipeline/runs``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import __version__
from pipeline.core import atomic

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
    preview, geojson
        The input's preview PNG (``previews/NAME.png``) and, with ``--geojson``, its
        polygons (``geojson/NAME.geojson``), as paths relative to the output root, so the
        output can be moved; None when there is none.
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
    resumed_blocks
        Blocks an earlier, interrupted run had written already (not computed again).
    seconds
        Wall time spent on this input.
    key
        The run key its output was (or is being) made with (see :mod:`pipeline.batch.ledger`).
    model
        SHA-256 of the model file (``identity`` for the identity backend).
    run
        The id of the run that decided this entry.
    """

    path: str
    name: str
    state: str = "pending"
    reason: str | None = None
    message: str | None = None
    output: str | None = None
    preview: str | None = None
    geojson: str | None = None
    shape: list[int] | None = None
    pixels: int = 0
    tiles: int = 0
    skipped_tiles: int = 0
    tissue_fraction: float | None = None
    blocks: int = 0
    resumed_blocks: int = 0
    seconds: float = 0.0
    key: str | None = None
    model: str | None = None
    run: str | None = None

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
    run: str | None = None
    shard: str | None = None
    #: Problems writing the output's records (a full disk at report time...).
    errors: list[str] = field(default_factory=list)

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

    def to_dict(self, others: Sequence[dict] = ()) -> dict:
        """This run's report; with ``others`` (entries of inputs this run did not touch,
        from the ledger), the output's: ``ok`` and ``counts`` then cover every entry."""
        entries = [r.to_dict() for r in self.inputs] + list(others)
        return {
            "version": self.version,
            "run": self.run,
            "shard": self.shard,
            "ok": all(e.get("state") in ("done", "skipped") for e in entries),
            "counts": {s: sum(e.get("state") == s for e in entries) for s in STATES},
            "seconds": round(self.seconds, 3),
            "pixels": self.pixels,
            "mpix_per_s": round(self.mpix_per_s, 3),
            "model": self.model,
            "config": self.config,
            "inputs": entries,
        }

    def write(self, path: str | os.PathLike) -> Path:
        """Write this run's report (see :meth:`to_dict`) as JSON, atomically: readers see
        the old file or the new one, never a mix (:func:`pipeline.core.atomic.write_json`)."""
        return atomic.write_json(path, self.to_dict())
