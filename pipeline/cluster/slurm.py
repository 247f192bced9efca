"""What a Slurm worker job looks like: our ``slurm:`` settings, merged into the site's
dask-jobqueue configuration (``jobqueue.slurm``), the worker lifetime that the walltime
allows, and the preload that gives each worker process of a multi-GPU job its own GPU.

Nothing here submits a job (:mod:`pipeline.cluster.clients` does); it reads ``dask.config`` and,
through :func:`import_jobqueue`, imports dask-jobqueue without its SIGINT handler.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shlex
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

GPU_DIRECTIVES = ("gres", "gpus")
# set in the job script when each worker process of a job must take one GPU of the job's
PIN_GPU_ENV = "PIPELINE_PIN_GPU"
_CONFIG = "jobqueue.slurm"
_TEXT_FIELDS = (
    "partition",
    "account",
    "local_directory",
    "log_directory",
    "job_name",
    "python",
    "interface",
)
_WALLTIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# a key that users of sbatch or of dask-jobqueue might reach for, and ours
_ALIASES = {
    "queue": "partition",
    "project": "account",
    "time": "walltime",
    "mem": "memory",
    "cpus": "cores",
    "gres": "gpus",
    "name": "job_name",
    "job_extra": "job_extra_directives",
}


@dataclass(frozen=True)
class SlurmSettings:
    """Our ``slurm:`` overrides of the site's dask-jobqueue configuration.

    ``None`` (or an empty list) leaves the site's value (``jobqueue.slurm.*``) in force.

    Parameters
    ----------
    partition
        Slurm partition (dask-jobqueue's ``queue``; ``#SBATCH -p``).
    account
        Account to charge (``#SBATCH -A``).
    walltime
        Per job, in a Slurm time format: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``.
    cores, memory, processes
        Per job: CPU cores, memory (``"16GB"``) and Dask worker processes.
    gpus
        GPUs per job; one worker process per GPU.
    gpu_directive
        ``"gres"`` (``--gres=gpu:N``) or ``"gpus"`` (``--gpus=N``).
    job_extra_directives
        More ``#SBATCH`` options (e.g. ``"--qos=high"``), added to the site's.
    local_directory, log_directory
        Worker scratch space (node-local disk) and the folder for Slurm's job output files.
    job_name
        Slurm job name (``#SBATCH -J``).
    python
        Interpreter the jobs run (default: the driver's).
    interface
        Network interface (``ib0``...) for the scheduler and the workers.
    """

    partition: str | None = None
    account: str | None = None
    walltime: str | None = None
    cores: int | None = None
    memory: str | None = None
    processes: int | None = None
    gpus: int | None = None
    gpu_directive: str = "gres"
    job_extra_directives: tuple[str, ...] = ()
    local_directory: str | None = None
    log_directory: str | None = None
    job_name: str | None = None
    python: str | None = None
    interface: str | None = None

    def __post_init__(self) -> None:
        for name in _TEXT_FIELDS:
            _check_text(name, getattr(self, name))
        if self.walltime is not None:
            _check_walltime(self.walltime)
        for name in ("cores", "processes"):
            _check_count(name, getattr(self, name), minimum=1)
        _check_count("gpus", self.gpus, minimum=0)
        if self.memory is not None:
            _check_memory(self.memory)
        if self.gpu_directive not in GPU_DIRECTIVES:
            raise ConfigError(
                f"gpu_directive must be one of {', '.join(GPU_DIRECTIVES)}, not {self.gpu_directive!r}",
                where="slurm.gpu_directive",
                hint="'gres' emits --gres=gpu:N, 'gpus' emits --gpus=N",
            )
        directives = self.job_extra_directives
        if isinstance(directives, str) or not isinstance(directives, (list, tuple)):
            raise ConfigError(
                f"job_extra_directives must be a list of sbatch options, not {directives!r}",
                where="slurm.job_extra_directives",
                hint="write a list, e.g. job_extra_directives: ['--qos=high', '--constraint=a100']",
            )
        for item in directives:
            if not isinstance(item, str) or not item.strip().startswith("-"):
                raise ConfigError(
                    f"{item!r} is not an sbatch option",
                    where="slurm.job_extra_directives",
                    hint="give the option alone, e.g. '--qos=high' (without '#SBATCH')",
                )
        object.__setattr__(self, "job_extra_directives", tuple(directives))
        gpus, processes = self.gpus or 0, self.processes
        if gpus and processes is not None and processes != gpus:
            raise ConfigError(
                f"processes={processes} but gpus={gpus}: each GPU gets one worker process",
                where="slurm.processes",
                hint="leave processes out when gpus is set",
            )
        if gpus and self.cores is not None and self.cores < gpus:
            raise ConfigError(
                f"cores={self.cores} is fewer than gpus={gpus}",
                where="slurm.cores",
                hint="each GPU's worker process needs at least one core",
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, where: str = "slurm") -> SlurmSettings:
        """Validate a ``slurm:`` section (a mapping from YAML) into settings.

        Raises
        ------
        ConfigError
            An unknown key (naming it and listing the known ones) or a bad value.
        """
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            raise ConfigError(
                f"expected a mapping of settings, got {type(mapping).__name__}",
                where=where,
                hint="e.g. slurm: {partition: gpu, walltime: '02:00:00', gpus: 1}",
            )
        known = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for key, value in mapping.items():
            name = str(key).replace("-", "_")
            if name not in known:
                guess = _ALIASES.get(name) or next(
                    iter(difflib.get_close_matches(name, known, n=1)), None
                )
                hint = f"did you mean {guess!r}? " if guess else ""
                raise ConfigError(
                    f"unknown key {key!r}",
                    where=f"{where}.{key}",
                    hint=f"{hint}known keys: {', '.join(known)}",
                )
            values[name] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(
                exc.problem, where=f"{where}.{exc.where.split('.', 1)[-1]}", hint=exc.hint
            ) from None


def _check_text(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise ConfigError(
            f"{name} must be a non-empty string, not {value!r}",
            where=f"slurm.{name}",
            hint="quote it in YAML",
        )


def _check_count(name: str, value: Any, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{name} must be a whole number >= {minimum}, not {value!r}",
            where=f"slurm.{name}",
            hint=f"e.g. {name}: {max(minimum, 1)}",
        )


def _check_memory(value: Any) -> None:
    from dask.utils import parse_bytes

    try:
        ok = isinstance(value, str) and parse_bytes(value) > 0
    except (ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(
            f"memory must be an amount like '16GB', not {value!r}",
            where="slurm.memory",
            hint="memory per job with a unit: '4GB', '500MiB'",
        )


def _check_walltime(value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(
            f"walltime {value!r} is a number: YAML reads an unquoted 01:00:00 as seconds",
            where="slurm.walltime",
            hint="quote it: walltime: '01:00:00'",
        )
    if not isinstance(value, str) or walltime_seconds(value) is None:
        raise ConfigError(
            f"walltime {value!r} is not a Slurm time",
            where="slurm.walltime",
            hint="use MM, MM:SS, HH:MM:SS or D-HH:MM:SS, e.g. '02:00:00'",
        )


def walltime_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``).

    ``None`` for text that is not such a time; ``0`` for ``UNLIMITED``/``INFINITE``.
    """
    text = str(text).strip()
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    match = _WALLTIME.match(text)
    if not match:
        return None
    days, a, b, c = (int(g) if g is not None else None for g in match.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = a, b, c
    else:  # MM or MM:SS
        hours, minutes, seconds = 0, a, b or 0
    # only the leading field may overflow (Slurm reads "90" as 90 minutes)
    lead = days is not None or c is not None
    if (days is not None and hours > 23) or (lead and minutes > 59) or seconds > 59:
        return None
    return (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def lifetime_for(walltime: int) -> tuple[int, int] | None:
    """Worker ``(lifetime, stagger)`` in seconds for jobs of ``walltime`` seconds.

    A worker ends at a random moment in ``lifetime ± stagger``; the latest of them still
    leaves a margin (5 minutes, or a fifth of a short walltime) to hand its results over
    before Slurm kills the job. ``None`` when the walltime is unlimited.
    """
    if walltime <= 0:
        return None
    margin = min(300, walltime // 5)
    stagger = min(300, walltime // 20)
    return walltime - margin - stagger, stagger


# SLURMCluster argument, our settings field (if any), jobqueue.slurm key
_ARGUMENTS = (
    ("queue", "partition", "queue"),
    ("account", "account", "account"),
    ("walltime", "walltime", "walltime"),
    ("cores", "cores", "cores"),
    ("memory", "memory", "memory"),
    ("processes", "processes", "processes"),
    ("local_directory", "local_directory", "local-directory"),
    ("log_directory", "log_directory", "log-directory"),
    ("job_name", "job_name", "name"),
    ("python", "python", "python"),
    ("interface", "interface", "interface"),
    ("death_timeout", None, "death-timeout"),
    ("shebang", None, "shebang"),
    ("job_cpu", None, "job-cpu"),
    ("job_mem", None, "job-mem"),
)


def import_jobqueue() -> Any:
    """``dask_jobqueue``, imported without the SIGINT handler it installs.

    dask-jobqueue (0.9) replaces the SIGINT handler on import with ``sys.exit()``: Ctrl-C
    would end the program with exit status 0 instead of raising ``KeyboardInterrupt``.
    The handler in place before (Python's, normally) is put back; a handler of its found
    in place (imported earlier elsewhere) is replaced by Python's.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    import dask_jobqueue

    if main:
        current = signal.getsignal(signal.SIGINT)
        if getattr(current, "__module__", "").startswith("dask_jobqueue"):
            if getattr(previous, "__module__", "").startswith("dask_jobqueue"):
                previous = signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
    return dask_jobqueue


def _site(key: str, default: Any = None) -> Any:
    """The site's dask-jobqueue value for ``jobqueue.slurm.<key>``, read as jobqueue reads it."""
    import dask

    import_jobqueue()  # registers jobqueue's defaults with dask.config
    return dask.config.get(f"{_CONFIG}.{key}", default)


def _site_list(key: str, deprecated: str) -> list:
    # a list we pass replaces the site's, so start from the site's (or its deprecated name's)
    return list(_site(key) or _site(deprecated) or [])


def cluster_kwargs(settings: SlurmSettings) -> dict[str, Any]:
    """Keyword arguments for ``SLURMCluster``: the site's configuration plus our overrides.

    Every value is resolved now (ours where ``settings`` sets it, else the site's), so the
    cluster builds the same job script for its whole life even if ``dask.config`` changes.

    Raises
    ------
    ConfigError
        Cores or memory per job are set nowhere, or the GPU layout does not fit.
    """
    s = settings
    kwargs: dict[str, Any] = {}
    for argument, ours, key in _ARGUMENTS:
        value = getattr(s, ours) if ours else None
        value = _site(key) if value is None else value
        if value is not None:
            kwargs[argument] = value
    for name in ("cores", "memory"):
        if kwargs.get(name) is None:
            raise ConfigError(
                f"{name} per Slurm job is not set",
                where=f"slurm.{name}",
                hint=f"set {name} in the slurm: section, in ~/.config/dask/jobqueue.yaml "
                f"(jobqueue: slurm: {name}: ...) or DASK_JOBQUEUE__SLURM__{name.upper()}",
            )
    cores = kwargs["cores"]
    if "processes" not in kwargs:
        from distributed.deploy.local import nprocesses_nthreads

        # dask-jobqueue's default, made explicit: only then does it know that a job's
        # workers belong together (scaling down, replacing finished jobs)
        kwargs["processes"], _ = nprocesses_nthreads(cores)
    directives = _site_list("job-extra-directives", "job-extra") + list(s.job_extra_directives)
    prologue = _site_list("job-script-prologue", "env-extra")
    worker_args = _site_list("worker-extra-args", "extra")
    if s.gpus:
        if cores < s.gpus:
            raise ConfigError(
                f"{cores} cores per job cannot give each of {s.gpus} GPUs a worker process",
                where="slurm.cores",
                hint="ask for at least one core per GPU",
            )
        kwargs["processes"] = s.gpus
        directives.append(
            f"--gres=gpu:{s.gpus}" if s.gpu_directive == "gres" else f"--gpus={s.gpus}"
        )
        if s.gpus > 1:
            prologue.append(f"export {PIN_GPU_ENV}=1")
            worker_args += ["--preload", __name__]
    if os.environ.get("PYTHONPATH"):
        # sbatch passes the driver's environment on by default, but not with --export=NONE
        path = shlex.quote(os.environ["PYTHONPATH"])
        prologue.append(f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}")
    if not any(
        arg == "--lifetime" or arg.startswith("--lifetime=") for arg in map(str, worker_args)
    ):
        seconds = walltime_seconds(kwargs.get("walltime") or "")
        lifetime = lifetime_for(seconds) if seconds else None
        if lifetime:
            worker_args += [
                "--lifetime",
                f"{lifetime[0]}s",
                "--lifetime-stagger",
                f"{lifetime[1]}s",
            ]
    options = dict(_site("scheduler-options") or {})
    # a Dask scheduler runs whatever code a client sends it: the dashboard stays on loopback
    options.setdefault("dashboard_address", "127.0.0.1:0")
    kwargs.update(
        job_extra_directives=directives,
        job_script_prologue=prologue,
        worker_extra_args=worker_args,
        scheduler_options=options,
    )
    return kwargs


def dask_setup(worker: Any) -> None:
    """Worker preload (``--preload pipeline.cluster.slurm``): one GPU of the job per worker process.

    Slurm gives the job its GPUs in ``CUDA_VISIBLE_DEVICES``; the job's worker processes are
    named ``<job>-0``, ``<job>-1``...: process ``i`` keeps only the job's ``i``-th GPU. Runs
    before any task, so before CUDA is initialised in this process.
    """
    if os.environ.get(PIN_GPU_ENV) != "1":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    device = gpu_for_worker(str(worker.name), visible)
    if device is None:
        log.warning("worker %s: no GPU of %r for it; GPUs left as they are", worker.name, visible)
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = device


def gpu_for_worker(name: str, visible: str) -> str | None:
    """The GPU that worker process ``name`` (``<job>-<i>``) takes from the job's ``visible``."""
    devices = [d for d in visible.split(",") if d.strip()]
    index = name.rsplit("-", 1)[-1]
    if not index.isdigit() or int(index) >= len(devices):
        return None
    return devices[int(index)].strip()
