"""Job-array shards: ``--shard I/N`` takes a deterministic share of the inputs.

An input belongs to shard ``1 + h mod N``, where ``h`` is a hash of its real path: the same
input always lands in the same shard however the folder grows, so a nightly array job
finds its own staged work again. Inside a Slurm job array the shard defaults to the
array task: ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP + 1``
of ``SLURM_ARRAY_TASK_COUNT``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def tag(self) -> str:
        """A file-name friendly form, ``3-of-8``."""
        return f"{self.index}-of-{self.count}"

    def owns(self, path: str | os.PathLike) -> bool:
        """True if the input ``path`` belongs to this shard."""
        real = os.path.realpath(path).encode("utf-8", "surrogateescape")
        h = int.from_bytes(hashlib.sha256(real).digest()[:8], "big")
        return h % self.count == self.index - 1


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """``"I/N"`` → :class:`Shard`; None (and outside a job array) → None.

    ``env`` (default ``os.environ``) supplies the Slurm array defaults when ``text`` is None.
    """
    if text is None:
        env = os.environ if env is None else env
        task, count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
        if not task or not count:
            return None
        first = env.get("SLURM_ARRAY_TASK_MIN", "0")
        step = env.get("SLURM_ARRAY_TASK_STEP", "1")
        try:
            index, total = (int(task) - int(first)) // max(1, int(step)) + 1, int(count)
        except ValueError:
            raise ConfigError(
                f"SLURM_ARRAY_TASK_ID={task!r}, SLURM_ARRAY_TASK_COUNT={count!r} are not numbers",
                where="environment",
                hint="give --shard I/N",
            ) from None
        where = "SLURM_ARRAY_TASK_ID"
    else:
        head, sep, tail = str(text).partition("/")
        try:
            index, total = int(head), int(tail)
        except ValueError:
            index = total = 0
        if not sep:
            index = total = 0
        where = "option --shard"
    if not (total >= 1 and 1 <= index <= total):
        raise ConfigError(
            f"shard must be I/N with 1 <= I <= N, got {text if text is not None else index}",
            where=where,
            hint="e.g. --shard 2/8 for the second of eight array tasks "
            "(inside a Slurm job array it is set by itself)",
        )
    return Shard(index, total)
