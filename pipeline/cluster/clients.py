"""Where blocks run: a local Dask cluster, an existing scheduler, or Dask workers as Slurm
jobs through dask-jobqueue (:func:`open_cluster` picks by ``RunConfig.cluster``).

A local cluster (:func:`dask_client`) has one worker process per GPU (or ``--workers``),
each with one task thread and ``--threads-per-worker`` model threads, and listens on
loopback only: a Dask scheduler runs whatever code a client sends it.

Slurm
-----

HPC users already describe their site in dask-jobqueue's configuration: ``jobqueue.slurm``
in ``~/.config/dask/jobqueue.yaml`` (or any Dask config file) and the matching
``DASK_JOBQUEUE__SLURM__*`` environment variables (``..._CORES=8``, ``..._MEMORY=32GB``,
``..._WALLTIME=02:00:00``, ``..._QUEUE=gpu``...). :func:`slurm_client` starts a
``dask_jobqueue.SLURMCluster`` from that configuration; a :class:`SlurmSettings` (our config's
``slurm:`` section) overrides only the keys it sets, and its list keys
(``job_extra_directives``) are added to the site's lists rather than replacing them.

Behaviour
---------
* Adaptive between 0 and ``jobs`` Slurm jobs: jobs are submitted when tasks wait and
  cancelled after ``idle_timeout`` seconds without work.
* ``gpus: N`` asks for N GPUs per job (``--gres=gpu:N``, or ``--gpus=N`` with
  ``gpu_directive: gpus``) and runs one worker process per GPU, each pinned to its own GPU
  (``CUDA_VISIBLE_DEVICES``) and given an equal share of the job's cores.
* Workers retire before the walltime: ``--lifetime`` ends them a margin before Slurm would
  kill them, staggered so that jobs do not all end together
  (:func:`pipeline.cluster.slurm.lifetime_for`); the finished job is then replaced by a fresh one
  while work remains. A ``--lifetime`` in the site's ``worker-extra-args`` is kept as it is.
* Jobs run the same Python and import the same ``pipeline`` as the driver: the interpreter is
  the driver's ``sys.executable`` (unless ``python`` is configured) and the driver's
  ``PYTHONPATH`` is exported in the job script (it also holds with ``--export=NONE``).
* The scheduler listens where workers on other nodes can reach it (``interface`` selects the
  network); its dashboard only on loopback (``127.0.0.1``, a free port, logged) unless the
  site's ``scheduler-options`` set ``dashboard_address``.
* Every job is cancelled when the context ends: normally, on an exception, on Ctrl-C
  (``KeyboardInterrupt``) or on SIGTERM (raised as ``SystemExit(143)`` while the context is
  open, when no other SIGTERM handler is installed). Teardown is not interrupted by further
  signals (they are handled once it is done); job ids the cluster submitted that are still
  queued or running afterwards are cancelled with ``scancel``. A driver killed with SIGKILL
  cancels nothing; its workers lose the scheduler and end their jobs by themselves (about
  30 s here, distributed's connect timeout).
* Before any job is submitted the job script is checked with ``sbatch --test-only``, so a
  bad partition, account, GPU request or size is a :class:`ConfigError`, not a silent hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from pipeline.cluster import worker_start
from pipeline.cluster.slurm import SlurmSettings, cluster_kwargs, import_jobqueue
from pipeline.config import RunConfig
from pipeline.core.devices import usable_cores
from pipeline.engine.stages import BLOCK_THREADS
from pipeline.errors import ConfigError

__all__ = [
    "SlurmSettings",
    "open_cluster",
    "dask_client",
    "worker_layout",
    "slurm_client",
    "make_cluster",
    "check_job_script",
    "cancel_leftovers",
]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_cluster(cfg: RunConfig, warm: Sequence[str] = ()) -> Iterator[tuple[Any, int]]:
    """``(client, slots)``: a client where ``cfg`` says blocks run, and how many blocks
    run at once there (the driver keeps about twice as many queued). ``warm``: modules a
    local cluster's workers import in the background as soon as they start (see
    :func:`pipeline.cluster.worker_start.dask_setup`)."""
    _quiet_distributed()
    if cfg.cluster == "slurm":
        settings = slurm_settings(cfg)
        processes, cores = slurm_layout(settings)
        threads = max(1, cores)  # a Slurm worker's task threads: its cores
        with slurm_client(settings, cfg.jobs or 1) as client:
            yield client, (cfg.jobs or 1) * processes * threads
        return
    with dask_client(cfg, warm) as client:
        slots = sum(client.nthreads().values()) if cfg.scheduler else worker_layout(cfg)[0]
        yield client, max(1, slots) * (1 if cfg.scheduler else BLOCK_THREADS)


def _quiet_distributed() -> None:
    """distributed logs every cluster event (and, on Ctrl-C, tracebacks of the connections
    it closes) in this process: the terminal is the progress bar's and the summary's,
    unless the user asked for debug output (``-vv``)."""
    if not log.isEnabledFor(logging.DEBUG):
        # tornado logs "Exception in callback ..." with a traceback when a connection's
        # callback fails while the cluster closes (seen on Ctrl-C): the same noise
        for name in ("distributed", *worker_start.TORNADO_LOGS):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def slurm_settings(cfg: RunConfig) -> SlurmSettings:
    """Our ``slurm:`` section, validated (a :class:`ConfigError` names a bad key or value)."""
    return SlurmSettings.from_mapping(cfg.slurm)


def slurm_layout(settings: SlurmSettings) -> tuple[int, int]:
    """(worker processes, cores each) of one Slurm job, from the site's configuration and
    ours; a :class:`ConfigError` when cores or memory per job are set nowhere."""
    import_jobqueue()
    kwargs = cluster_kwargs(settings)
    processes = int(kwargs.get("processes") or 1)
    return processes, max(1, int(kwargs["cores"]) // processes)


def model_threads(cfg: RunConfig) -> int:
    """Threads each worker's model may use: its share of the cores where it runs."""
    if cfg.cluster == "slurm":
        return cfg.threads_per_worker or slurm_layout(slurm_settings(cfg))[1]
    return worker_layout(cfg)[1]


@contextlib.contextmanager
def dask_client(cfg: RunConfig, warm: Sequence[str] = ()) -> Iterator[Any]:
    """A client on ``cfg.scheduler``, or on a loopback-only LocalCluster whose workers
    import the modules ``warm`` names in the background from their start."""
    import dask
    from distributed import Client, LocalCluster

    _quiet_distributed()
    if cfg.scheduler:
        with Client(cfg.scheduler) as client:
            yield client
        return
    workers, threads = worker_layout(cfg)
    # the scheduler's HTTP endpoint tries port 8787 first and warns when it is taken
    warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
    # loopback only: a Dask scheduler runs whatever code a client sends it. One task per
    # worker thread at a time (no task waits on a worker): a worker that dies then takes
    # only the block that killed it, and the others keep their attempts (allowed-failures)
    with (
        dask.config.set({"distributed.scheduler.worker-saturation": 1.0}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=BLOCK_THREADS,  # one block computes, others read and write
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            # workers' own logs (tracebacks of lost connections when one dies) stay quiet:
            # what happened to each input is in the summary and the report
            silence_logs=logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
            memory_limit=0,
            env={
                "OMP_NUM_THREADS": str(threads),
                worker_start.WARM_ENV: ",".join(warm),
                worker_start.QUIET_ENV: "" if log.isEnabledFor(logging.DEBUG) else "1",
            },
            preload=[worker_start.__name__],  # Ctrl-C is the driver's; imports start early
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def worker_layout(cfg: RunConfig) -> tuple[int, int]:
    """(worker processes, model threads per worker) for the local cluster."""
    workers = cfg.workers or _gpu_count(cfg) or 1
    threads = cfg.threads_per_worker or max(1, usable_cores() // workers)
    return workers, threads


def _gpu_count(cfg: RunConfig) -> int:
    """One worker per GPU when the device is ``cuda`` (or ``auto`` finds CUDA)."""
    from pipeline.backends import resolve_device

    if not cfg.device.startswith(("cuda", "auto")) or ":" in cfg.device:
        return 0
    if resolve_device(cfg.device) == "cpu":
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_cluster(settings: SlurmSettings, **extra: Any) -> Any:
    """A ``SLURMCluster`` from the site's configuration and ``settings`` (no job submitted).

    Its ``submitted`` attribute is the set of Slurm job ids it has submitted so far.
    """
    import_jobqueue()
    from dask_jobqueue.slurm import SLURMCluster, SLURMJob

    submitted: set[str] = set()
    numbers = itertools.count()

    class TrackedJob(SLURMJob):
        async def start(self) -> None:
            try:
                await super().start()
            finally:
                if self.job_id:
                    submitted.add(str(self.job_id))

    class PipelineSLURMCluster(SLURMCluster):
        def _new_worker_name(self, worker_number: int) -> str:
            # never reuse a name: the delayed cleanup of a finished job would cancel a
            # successor of the same name that is still waiting in the queue
            return f"{self._name}-{next(numbers)}"

    kwargs = {**cluster_kwargs(settings), **extra}
    try:
        cluster = PipelineSLURMCluster(job_cls=TrackedJob, **kwargs)
    except ValueError as exc:  # dask-jobqueue's own checks of its arguments
        raise ConfigError(
            str(exc), where="slurm", hint="check the slurm: section and jobqueue.yaml"
        ) from None
    cluster.submitted = submitted
    return cluster


def check_job_script(script: str) -> None:
    """Ask Slurm whether it would accept ``script`` (``sbatch --test-only``; nothing runs).

    Raises
    ------
    ConfigError
        Slurm refuses it (unknown partition or account, a size no node has...).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="pipeline-job-") as file:
        file.write(script)
        file.flush()
        done = subprocess.run(
            ["sbatch", "--test-only", file.name], capture_output=True, text=True, timeout=60
        )
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().replace("sbatch: error: ", "")
        raise ConfigError(
            f"Slurm refuses the worker job: {message}",
            where="slurm",
            hint="check partition, account, walltime, cores, memory and GPUs "
            "(slurm: section or jobqueue.yaml); `sinfo` lists what the cluster offers",
        )


def _adaptive_class():
    from distributed.deploy.adaptive import Adaptive

    class ReplacingAdaptive(Adaptive):
        """Adaptive scaling that also replaces jobs whose workers have all gone.

        A job ends when its workers reach their lifetime (or Slurm ends it). dask-jobqueue
        keeps such a job in its plan, so adaptive scaling never submits a successor
        (dask-jobqueue issues 122 and 611): here a job whose workers were all seen and are
        all gone leaves the plan, and the next round submits a new job if work remains.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._seen: set[str] = set()
            self._closing: set[asyncio.Task] = set()

        async def recommendations(self, target: int) -> dict:
            self._forget_finished_jobs()
            return await super().recommendations(target)

        def _forget_finished_jobs(self) -> None:
            cluster = self.cluster
            alive = {str(w.get("name")) for w in cluster.scheduler_info["workers"].values()}
            for job, spec in list(cluster.worker_spec.items()):
                names = {f"{job}{suffix}" for suffix in spec.get("group", [""])}
                if names & alive:
                    self._seen.add(job)
                elif job in self._seen:
                    self._seen.discard(job)
                    del cluster.worker_spec[job]
                    handle = cluster.workers.pop(job, None)
                    log.info("Slurm job %s has ended; a new one replaces it if needed", job)
                    if handle is not None:  # scancel, in case the job lingers
                        task = asyncio.ensure_future(handle.close())
                        self._closing.add(task)
                        task.add_done_callback(self._closing.discard)

    return ReplacingAdaptive


def queued_jobs(job_ids: set[str]) -> dict[str, str] | None:
    """Those of ``job_ids`` that ``squeue`` still lists, with their state code (``R``, ``PD``,
    ``CG``...); ``None`` when ``squeue`` cannot say."""
    if not job_ids:
        return {}
    try:
        done = subprocess.run(
            ["squeue", "--noheader", "--format=%i %t", "--jobs=" + ",".join(sorted(job_ids))],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        return None
    # older Slurm fails with "Invalid job id" when none of the jobs is known any more
    states = dict(line.split()[:2] for line in done.stdout.splitlines() if line.strip())
    return {job: state for job, state in states.items() if job in job_ids}


def cancel_leftovers(job_ids: set[str]) -> list[str]:
    """``scancel`` the jobs of ``job_ids`` that are still queued or running (all of them
    when ``squeue`` cannot tell); the ids it cancelled."""
    states = queued_jobs(job_ids)
    if states is None:
        left = sorted(job_ids)
    else:
        left = sorted(job for job, state in states.items() if state != "CG")
    if left:
        log.warning("cancelling Slurm jobs left after the cluster closed: %s", " ".join(left))
        try:
            subprocess.run(["scancel", *left], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            log.error("scancel failed; cancel these Slurm jobs by hand: %s", " ".join(left))
    return left


def _dashboard(cluster: Any) -> str:
    server = getattr(cluster.scheduler, "http_server", None)
    if server is not None and server.address in ("127.0.0.1", "::1"):
        # dashboard_link names the scheduler's host, where the loopback port is not reachable
        return f"http://127.0.0.1:{server.port}/status (from this machine only)"
    return cluster.dashboard_link


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While open, SIGTERM raises ``SystemExit(143)`` (Slurm and kill send it) so that
    ``finally`` blocks run, unless the program handles SIGTERM itself."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while jobs are being cancelled; act on them afterwards."""
    if not _main_thread():
        yield
        return
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)
        log.warning("still cancelling Slurm jobs; exiting once that is done")

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGINT in received:
        raise KeyboardInterrupt
    if received:
        raise SystemExit(128 + received[0])


def _close(client: Any, cluster: Any) -> None:
    with _signals_deferred():
        try:
            if client is not None:
                client.close(timeout=10)
        except Exception:  # the cluster below is what must close
            log.debug("closing the Dask client failed", exc_info=True)
        try:
            if cluster is not None:
                cluster.close(timeout=60)
        except Exception:
            log.warning("closing the Slurm cluster failed", exc_info=True)
        finally:
            if cluster is not None:
                cancel_leftovers(cluster.submitted)


@contextlib.contextmanager
def slurm_client(
    settings: SlurmSettings | None, jobs: int, *, idle_timeout: float = 60.0
) -> Iterator[Any]:
    """A ``distributed.Client`` on Dask workers that run as Slurm jobs (see the module doc).

    Parameters
    ----------
    settings
        Our overrides of the site's dask-jobqueue configuration (``None``: none).
    jobs
        At most this many Slurm jobs at once; adaptive between 0 and ``jobs``.
    idle_timeout
        Seconds a job may sit without work before it is cancelled.

    Yields
    ------
    distributed.Client
        Its ``cluster`` is the ``SLURMCluster`` (``cluster.submitted``: the job ids so far).

    Raises
    ------
    ConfigError
        Slurm is not installed here, the settings are incomplete, or Slurm refuses the job.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(
            f"the number of Slurm jobs must be a whole number >= 1, not {jobs!r}",
            where="jobs",
            hint="e.g. --jobs 4",
        )
    missing = [tool for tool in ("sbatch", "squeue", "scancel") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(
            f"Slurm's {', '.join(missing)} not found on PATH",
            where="slurm",
            hint="run on a Slurm login node (or load its module), or use a local cluster",
            reason="slurm-unavailable",
        )
    settings = settings or SlurmSettings()
    from distributed import Client

    client = cluster = None
    with _sigterm_raises():
        try:
            cluster = make_cluster(settings)
            log.debug("Slurm job script:\n%s", cluster.job_script())
            check_job_script(cluster.job_script())
            interval = 1.0
            cluster.adapt(
                Adaptive=_adaptive_class(),
                minimum_jobs=0,
                maximum_jobs=jobs,
                interval=f"{interval}s",
                wait_count=max(1, round(idle_timeout / interval)),
            )
            client = Client(cluster)
            log.info("Slurm cluster of up to %d jobs; dashboard %s", jobs, _dashboard(cluster))
            yield client
        finally:
            _close(client, cluster)
