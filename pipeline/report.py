"""What happened to each input of a run: states, reasons, timings; ``OUT/report.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import __version__

STATES = ("pending", "done", "failed", "skipped")


@dataclass
class InputResult:
    path: str
    name: str
    state: str = "pending"          # done | failed | skipped
    reason: str | None = None
    message: str | None = None
    output: str | None = None
    shape: list[int] | None = None
    pixels: int = 0
    tiles: int = 0
    blocks: int = 0
    seconds: float = 0.0


@dataclass
class RunReport:
    inputs: list[InputResult] = field(default_factory=list)
    seconds: float = 0.0
    model: dict | None = None
    config: dict | None = None
    version: str = __version__

    @property
    def ok(self) -> bool:
        return all(r.state == "done" for r in self.inputs)

    @property
    def pixels(self) -> int:
        return sum(r.pixels for r in self.inputs if r.state == "done")

    @property
    def mpix_per_s(self) -> float:
        return self.pixels / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"version": self.version, "ok": self.ok, "seconds": round(self.seconds, 3),
                "pixels": self.pixels, "mpix_per_s": round(self.mpix_per_s, 3),
                "model": self.model, "config": self.config,
                "inputs": [asdict(r) for r in self.inputs]}
