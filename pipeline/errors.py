"""Error hierarchy.

Every error a user can cause derives from :class:`PipelineError` and renders as
``<where>: <problem>. Hint: <hint>``; each carries a short ``reason`` class used in
reports (``bad-input``, ``bad-model``, ``channel-mismatch``...).
"""

from __future__ import annotations

import os


class PipelineError(Exception):
    """Base of all errors the pipeline raises on purpose.

    Parameters
    ----------
    problem
        What is wrong, in one sentence.
    where
        The file, option or object concerned (a path is shown as given).
    hint
        What the user can do about it.
    reason
        Short machine-readable class, e.g. ``bad-input``.
    """

    reason = "error"

    def __init__(
        self,
        problem: str,
        *,
        where: str | os.PathLike | None = None,
        hint: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.problem = problem
        self.where = None if where is None else str(where)
        self.hint = hint
        if reason is not None:
            self.reason = reason
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = self.problem if self.where is None else f"{self.where}: {self.problem}"
        if self.hint:
            text = f"{text.rstrip('.')}. Hint: {self.hint}"
        return text

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # errors raised on Dask workers travel back pickled: keep every field
        return (_rebuild, (type(self), self.problem, self.where, self.hint, self.reason))


def _rebuild(cls, problem, where, hint, reason):
    return cls(problem, where=where, hint=hint, reason=reason)


class ConfigError(PipelineError, ValueError):
    """A bad option, config file or combination of them."""

    reason = "bad-config"


class InputError(PipelineError, ValueError):
    """An input image that cannot be read or used."""

    reason = "bad-input"


class ModelError(PipelineError, ValueError):
    """A model file that cannot be loaded, or a model that cannot take the input."""

    reason = "bad-model"


class DeviceError(PipelineError, RuntimeError):
    """A requested device (e.g. ``cuda:1``) that is not available."""

    reason = "device-unavailable"


class OutputError(PipelineError, OSError):
    """The output location cannot be written."""

    reason = "output-error"
