"""Error hierarchy and reason codes.

Every error a user can cause derives from :class:`PipelineError` and renders as
``<where>: <problem>. Hint: <hint>``; each carries a short ``reason`` code, the value
``report.json`` records for a failed input. The codes are defined here once, as the
constants below; each error class has its own, so raising code picks a class and never
spells a code::

    PipelineError                   error
    ├── ConfigError                 bad-config      (ValueError)
    │   └── TileError               bad-tile
    ├── InputError                  bad-input       (ValueError)
    │   ├── NotFoundError           not-found
    │   ├── UnsupportedFormatError  unsupported-format
    │   ├── CorruptInputError       corrupt-input
    │   ├── InputChangedError       input-changed
    │   ├── NonFiniteInputError     nonfinite-input
    │   ├── MissingPixelSizeError   missing-pixel-size
    │   ├── ResolutionError         resolution-unavailable
    │   └── ChannelMismatchError    channel-mismatch (also a ModelError)
    ├── ModelError                  bad-model       (ValueError)
    │   ├── ModelRunError           model-error
    │   └── ModelOutputError        model-output-nonfinite
    ├── DeviceError                 device-unavailable (RuntimeError)
    ├── OutputError                 output-error    (OSError)
    │   ├── DiskFullError           disk-full
    │   ├── ReadOnlyOutputError     output-read-only
    │   └── OutputLockedError       output-locked
    ├── WorkerCrashError            worker-crash    (RuntimeError)
    └── InternalError               internal-error  (RuntimeError)

Inputs are also decided without an error of their own: ``skipped`` with
:data:`NOT_AN_IMAGE`, :data:`DUPLICATE` or :data:`UP_TO_DATE`, ``failed`` with
:data:`UNREADABLE_FOLDER`, or with :data:`INTERNAL_ERROR` for any other exception (a bug,
caught so the batch goes on); ``pending`` with :data:`INTERRUPTED` when the run stopped.
"""

from __future__ import annotations

import os

# --- reason codes (the ``reason`` of report.json) ---------------------------------------
ERROR = "error"
BAD_CONFIG = "bad-config"
BAD_TILE = "bad-tile"
BAD_INPUT = "bad-input"
NOT_FOUND = "not-found"
UNSUPPORTED_FORMAT = "unsupported-format"
CORRUPT_INPUT = "corrupt-input"
INPUT_CHANGED = "input-changed"
NONFINITE_INPUT = "nonfinite-input"
MISSING_PIXEL_SIZE = "missing-pixel-size"
RESOLUTION_UNAVAILABLE = "resolution-unavailable"
CHANNEL_MISMATCH = "channel-mismatch"
BAD_MODEL = "bad-model"
MODEL_ERROR = "model-error"
MODEL_OUTPUT_NONFINITE = "model-output-nonfinite"
DEVICE_UNAVAILABLE = "device-unavailable"
OUTPUT_ERROR = "output-error"
DISK_FULL = "disk-full"
OUTPUT_READ_ONLY = "output-read-only"
OUTPUT_LOCKED = "output-locked"
#: An I/O error that persisted through the retries (a failing disk or network file system).
IO_ERROR = "io-error"
#: A block (or step) whose worker process died on every attempt.
WORKER_CRASH = "worker-crash"
#: A bug: an exception that is not a PipelineError, caught so the batch goes on.
INTERNAL_ERROR = "internal-error"
#: Left out by a folder search: not an image suffix, or a macOS metadata file.
NOT_AN_IMAGE = "not-an-image"
#: The same file reached twice (or the run's own output).
DUPLICATE = "duplicate"
#: A folder that cannot be listed: slides in it may have been missed.
UNREADABLE_FOLDER = "unreadable-folder"
#: Its published output was made from the same input, model and settings.
UP_TO_DATE = "up-to-date"
#: The run was stopped (Ctrl-C) before this input finished; a rerun continues it.
INTERRUPTED = "interrupted"


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
        Overrides the class's reason code (for errors rebuilt from a pickle).
    """

    reason = ERROR

    def __init_subclass__(cls, *, reason: str | None = None, **kwargs: object) -> None:
        # a subclass names its code in its header: ``class X(InputError, reason=...)``
        super().__init_subclass__(**kwargs)
        if reason is not None:
            cls.reason = reason

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

    @classmethod
    def because(
        cls,
        exc: BaseException,
        problem: str,
        *,
        where: str | os.PathLike | None = None,
        hint: str | None = None,
    ) -> PipelineError:
        """This error, caused by ``exc``: its problem reads ``problem (ExcType: message)``.
        Raise it ``from exc``."""
        return cls(f"{problem} ({type(exc).__name__}: {exc})", where=where, hint=hint)

    @property
    def message(self) -> str:
        return message(self.problem, self.where, self.hint)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        # errors raised on Dask workers travel back pickled: keep every field
        return (_rebuild, (type(self), self.problem, self.where, self.hint, self.reason))


def message(problem: str, where: str | os.PathLike | None = None, hint: str | None = None) -> str:
    """``<where>: <problem>. Hint: <hint>``, the one way messages about inputs read
    (also for inputs skipped by design, which are not errors)."""
    text = problem if where is None else f"{os.fspath(where)}: {problem}"
    if hint:
        text = f"{text.rstrip('.')}. Hint: {hint}"
    return text


def _rebuild(cls, problem, where, hint, reason):
    return cls(problem, where=where, hint=hint, reason=reason)


class ConfigError(PipelineError, ValueError, reason=BAD_CONFIG):
    """A bad option, config file or combination of them."""


class TileError(ConfigError, reason=BAD_TILE):
    """A tile size the model does not accept."""


class InputError(PipelineError, ValueError, reason=BAD_INPUT):
    """An input image that cannot be read or used."""


class NotFoundError(InputError, reason=NOT_FOUND):
    """An input (or a mask, a list file) that does not exist."""


class UnsupportedFormatError(InputError, reason=UNSUPPORTED_FORMAT):
    """A file type, layout, codec or dtype the readers cannot take."""


class CorruptInputError(InputError, reason=CORRUPT_INPUT):
    """Stored data that does not decode, or tiles that were never written."""


class InputChangedError(InputError, reason=INPUT_CHANGED):
    """An input modified on disk while a run reads it."""


class NonFiniteInputError(InputError, reason=NONFINITE_INPUT):
    """NaN or Inf pixel values."""


class MissingPixelSizeError(InputError, reason=MISSING_PIXEL_SIZE):
    """A physical resolution was asked for but the file states no plausible pixel size."""


class ResolutionError(InputError, reason=RESOLUTION_UNAVAILABLE):
    """A requested resolution finer than the file's finest level."""


class ModelError(PipelineError, ValueError, reason=BAD_MODEL):
    """A model file that cannot be loaded, or a model that cannot take the input."""


class ChannelMismatchError(InputError, ModelError, reason=CHANNEL_MISMATCH):
    """An image's channels and a model's input channels that do not fit together.

    Both an :class:`InputError` (the image is refused) and a :class:`ModelError` (the
    model refuses a batch), so either ``except`` catches it.
    """


class ModelRunError(ModelError, reason=MODEL_ERROR):
    """The model's runtime failed on a batch."""


class ModelOutputError(ModelError, reason=MODEL_OUTPUT_NONFINITE):
    """The model returned NaN or Inf."""


class DeviceError(PipelineError, RuntimeError, reason=DEVICE_UNAVAILABLE):
    """A requested device (e.g. ``cuda:1``) that is not available."""


class OutputError(PipelineError, OSError, reason=OUTPUT_ERROR):
    """The output location cannot be written."""


class DiskFullError(OutputError, reason=DISK_FULL):
    """No space left (or quota exceeded) where the output is written."""


class ReadOnlyOutputError(OutputError, reason=OUTPUT_READ_ONLY):
    """The output is on a read-only file system."""


class OutputLockedError(OutputError, reason=OUTPUT_LOCKED):
    """Another run is writing the same output."""


class WorkerCrashError(PipelineError, RuntimeError, reason=WORKER_CRASH):
    """A worker process died on every attempt at a block (out of memory, a crash)."""


class InternalError(PipelineError, RuntimeError, reason=INTERNAL_ERROR):
    """Something that should not happen did (a bug, or the demo's own slides failing)."""
