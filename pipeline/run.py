"""Orchestration: which inputs need work, where blocks run, the lock, ledger and reports.

This layer never touches pixels. :func:`run` takes the output's lock, repairs what an
earlier crash left, decides per input from the ledger whether its output is up to date,
and hands the others to the :class:`~pipeline.batch.driver.Driver`, which keeps several inputs
in flight on a Dask cluster (or runs them in-process: ``scheduler="sync"``, or a single
block on the default layout). :class:`~pipeline.batch.batch.Batch` publishes and records each
input as it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.backends.base import ModelSpec
from pipeline.batch.batch import Batch
from pipeline.batch.driver import Driver, SyncClient, ThreadClient
from pipeline.batch.ledger import Ledger, init_state_dir, new_run_id, output_settings, run_key
from pipeline.batch.lock import OutputLock, short_lock
from pipeline.batch.products import Products, products_current
from pipeline.batch.shard import Shard
from pipeline.batch.tasks import InputJob, Model
from pipeline.cluster.clients import (
    model_threads,
    open_cluster,
    slurm_layout,
    slurm_settings,
    worker_layout,
)
from pipeline.config import RunConfig
from pipeline.core import faults
from pipeline.core.atomic import output_error
from pipeline.core.classes import label_names
from pipeline.core.collector import frozen
from pipeline.core.report import InputResult, RunReport
from pipeline.core.retry import retrying
from pipeline.engine.plan import check_options
from pipeline.engine.stages import BLOCK_THREADS, BackendRef
from pipeline.errors import UP_TO_DATE, ConfigError, PipelineError
from pipeline.io import ngff, sink
from pipeline.io.collection import damaged, write_collection
from pipeline.io.fingerprint import fingerprint
from pipeline.io.staging import StagingArea

log = logging.getLogger(__name__)

#: The older progress callback ``(name, done blocks, total blocks)``; an object with
#: ``start_input``/``advance``/``finish_input`` (:class:`pipeline.cli.progress.TerminalProgress`)
#: gets a what-will-run line per input and tiles instead.
Progress = Callable[[str, int, int], None]


def resolve_model(model: str | None, cfg: RunConfig) -> ModelSpec:
    """Read the model's geometry once in the driver (probing foreign files)."""
    from pipeline.backends import read_model_spec, resolve_device

    resolve_device(cfg.device)  # a missing GPU is an error before any work starts
    overrides = _overrides(cfg)
    if cfg.backend == "identity":
        from pipeline.backends import load_backend

        if cfg.tile is not None and len(cfg.tile) == 3:
            overrides["ndim"] = 3  # identity is dimension-agnostic: a 3-D tile asks for 3-D
        return load_backend(None, backend="identity", overrides=overrides).spec
    if model is None:
        raise ConfigError(
            "no model given",
            where="option --model",
            hint="pass --model FILE (make one with `pipeline export`)",
        )
    return read_model_spec(model, backend=cfg.backend, overrides=overrides)


def _overrides(cfg: RunConfig) -> dict:
    out = {k: getattr(cfg, k) for k in ("in_channels", "classes") if getattr(cfg, k) is not None}
    if cfg.normalize != "auto":
        out["normalize"] = cfg.normalize
    return out


def run(
    inputs: Sequence[str],
    out: str | os.PathLike,
    model: str | None,
    cfg: RunConfig,
    *,
    progress: Progress | None = None,
    decided: Sequence[InputResult] = (),
    force: bool = False,
    shard: Shard | None = None,
) -> RunReport:
    """Segment every input into ``out``; one input's failure never stops the others.

    ``decided``: inputs settled before the run (skipped or failed while finding inputs,
    see :func:`pipeline.io.discover.find_inputs`); they are added to the report as they
    are. ``force``: recompute inputs whose output is up to date. ``shard``: run only this
    shard's share of the inputs (a job array; see :mod:`pipeline.batch.shard`). ``progress``:
    see :data:`Progress`.

    Raises
    ------
    OutputError
        The output cannot be written, or another run holds its lock (``output-locked``).
    PipelineError
        A bad model or configuration, before any input is run.
    KeyboardInterrupt
        After writing the reports: unfinished inputs stay staged for the next run.
    """
    t0 = time.perf_counter()
    out = Path(out)
    fmt = ngff.get_format(cfg.ngff)
    sink.check_root(out, fmt)  # a file, or an output of the other NGFF version
    if cfg.cluster == "slurm":
        slurm_layout(slurm_settings(cfg))  # a bad slurm: section
    spec = resolve_model(model, cfg)  # its geometry, read here (a model file is not run)
    check_options(spec, cfg)
    if spec.classes:  # as many class names as the model has classes (identity: per input)
        label_names(spec.classes, Products.of(cfg, spec.class_names).names)
    # usage errors (exit 2) are all raised above: OUT is created only now
    sink.open_root(out, fmt)
    try:
        state = init_state_dir(out)
    except OSError as exc:
        raise output_error(exc, out) from exc
    run_id = new_run_id()
    with frozen(), OutputLock(state / "locks", run_id, shard) as lock:
        if shard is not None:
            inputs = [p for p in inputs if shard.owns(p)]
            decided = [r for r in decided if shard.owns(r.path)]
        report = RunReport(
            model=spec.to_dict(),
            config=cfg.to_dict(),
            run=run_id,
            shard=None if shard is None else str(shard),
        )
        try:
            batch, jobs = _plan(inputs, out, spec, cfg, report, force, shard)
        except OSError as exc:
            if isinstance(exc, PipelineError):
                raise
            raise output_error(exc, out) from exc
        for result in decided:
            result.run = run_id
            report.inputs.append(result)
        batch.lock = lock
        try:
            if jobs:
                _execute(batch, jobs, spec, cfg, progress)
        except KeyboardInterrupt:
            batch.interrupted(jobs)
            _finish(batch, t0, fmt)
            raise
        except PipelineError:
            # the cluster refused before any input started: a usage error (exit 2);
            # nothing ran, so nothing is reported
            if batch.started:
                _finish(batch, t0, fmt)
            raise
        _finish(batch, t0, fmt)
    return report


def _finish(batch: Batch, t0: float, fmt: ngff.NgffFormat) -> None:
    """The root lists its images again (listing it then raises no warnings), then the
    reports are written; shards of an array do it one at a time, so the last one lists
    everything."""
    try:
        with short_lock(batch.ledger.root / "locks" / "finish.flock"):
            write_collection(batch.out, fmt)
            batch.report.seconds = time.perf_counter() - t0
            batch.write_reports(final=True)
        return
    except OSError as exc:
        note = f"{batch.out}: its list of images could not be written: {output_error(exc, batch.out).problem}"
        batch.report.errors.append(note)
        log.error("%s", note)
    batch.report.seconds = time.perf_counter() - t0
    batch.write_reports(final=True)


def _plan(
    inputs: Sequence[str],
    out: Path,
    spec: ModelSpec,
    cfg: RunConfig,
    report: RunReport,
    force: bool,
    shard: Shard | None,
) -> tuple[Batch, list[InputJob]]:
    """Names, repairs, keys; the up-to-date inputs decided; a batch of the others."""
    ledger = Ledger(out).load()
    names = ledger.bind_names(inputs)
    area = StagingArea(out)
    for line in area.repair(None if shard is None else names):
        log.warning("repaired %s", line)
    digest = "identity" if spec.format == "identity" else str(spec.sha256)
    settings = output_settings(cfg)
    products = Products.of(cfg, spec.class_names)
    results: dict[str, InputResult] = {}
    jobs = []
    for path, name in zip(inputs, names):
        result = InputResult(str(path), name, run=report.run, model=digest)
        report.inputs.append(result)
        results[os.path.abspath(path)] = result
        try:
            fp = retrying(_fingerprint, path, what=f"reading {path}")
        except OSError:
            fp = None  # opening the input will say what is wrong with it
        key = None if fp is None else run_key(fp, digest, settings)
        result.key = key
        refresh = False
        current = key is not None and not force and ledger.up_to_date(key, name)
        if current and (problem := damaged(out / name)):
            log.warning(
                "%s: its output %s is damaged (%s): it is computed again", path, name, problem
            )
            current = False
        if current:
            record = ledger.record(os.path.realpath(path)) or {}
            if products_current(record.get("products"), key, products, out, name):
                _up_to_date(result, record, out)
                continue
            refresh = True  # the image stays; what it lacks (a GeoJSON...) is made
            _carry(result, record)
        jobs.append(
            InputJob(
                os.path.abspath(path),  # workers may run elsewhere (another cwd, a node)
                name,
                str(out.resolve()),
                key,
                "" if fp is None else fp.sample,
                (0, 0) if fp is None else fp.stamp,
                report.run,
                refresh,
            )
        )
    _sweep(area, ledger, jobs, names if shard is not None else None)
    batch = Batch(out, None, ledger, report, results, merge_on_write=shard is not None)
    for result in results.values():
        if result.state == "skipped":
            batch.record_skipped(result)
    return batch, jobs


def _fingerprint(path: str):
    faults.point("fingerprint", path)
    return fingerprint(path)


def _carry(result: InputResult, record: dict) -> None:
    """The figures and files of an input's last done entry (its ledger ``record``), for
    an image that stays."""
    before = record.get("result") or {}
    if before.get("state") in ("done", "skipped") and before.get("output"):
        for field in (
            "shape",
            "pixels",
            "tiles",
            "skipped_tiles",
            "tissue_fraction",
            "blocks",
            "preview",
            "geojson",
        ):
            setattr(result, field, before.get(field, getattr(result, field)))


def _up_to_date(result: InputResult, record: dict, out: Path) -> None:
    """An input whose output holds its key: skipped, its last done entry (in its ledger
    ``record``) carried over."""
    _carry(result, record)
    result.state, result.reason = "skipped", UP_TO_DATE
    result.output = str(out / result.name)
    result.message = (
        f"{result.path}: its output {result.name} was made from the same input, model and "
        "settings. Hint: --force recomputes it"
    )


def _sweep(
    area: StagingArea, ledger: Ledger, jobs: list[InputJob], mine: Sequence[str] | None
) -> None:
    """Delete staging no run will continue: work of an input of this run under another
    key, of an input whose output now holds that key, or of an input that is gone. A shard
    (``mine``: its names) touches only its own inputs' staging."""
    current = {j.name: j.key for j in jobs}
    owned = None if mine is None else set(mine)

    def keep(stage, owner) -> bool:
        if owner is None or "name" not in owner:
            return owned is not None  # a half-created stage: whole-output runs remove it
        name, key = owner["name"], owner.get("key")
        if owned is not None and name not in owned:
            return True
        if name in current:
            return current[name] == key
        record = ledger.record(os.path.realpath(owner.get("input", ""))) or {}
        if record.get("output_key") == key:
            return False
        return os.path.exists(owner.get("input", ""))

    for name in area.sweep(keep):
        log.info("removed stale staging %s", name)


def _execute(batch: Batch, jobs: list[InputJob], spec: ModelSpec, cfg: RunConfig, progress) -> None:
    """Choose where blocks run, run the driver."""
    batch.model = Model(spec, backend_ref(spec, cfg), cfg)
    if hasattr(progress, "start_input"):  # tiles and a what-will-run line, from the batch
        batch.progress, progress = progress, None
    with contextlib.ExitStack() as stack:
        ready = {}
        if cfg.scheduler == "sync":
            client, slots = SyncClient(), 1
        elif all(j.refresh for j in jobs):  # only GeoJSON and previews to make: no cluster
            client, slots = stack.enter_context(ThreadClient(BLOCK_THREADS)), BLOCK_THREADS
        elif len(jobs) == 1 and cfg.cluster == "local" and not cfg.workers and not cfg.scheduler:
            # one input: planned here first; a single block, or a default layout of one
            # worker, runs in-process on a worker's block threads, where a cluster's start
            # and its imports would cost more than they save
            step = batch.prepare(jobs[0])
            try:
                ready[0] = step.fn(*step.args)
            except Exception as exc:
                batch.failed(jobs[0], exc, "opening and planning")
                batch.settled(jobs[0], None)
                return
            if sum(not t.done for t in ready[0].tasks) <= 1 or worker_layout(cfg)[0] == 1:
                client, slots = stack.enter_context(ThreadClient(BLOCK_THREADS)), BLOCK_THREADS
            else:
                client, slots = stack.enter_context(open_cluster(cfg, _warm(spec)))
        else:
            client, slots = stack.enter_context(open_cluster(cfg, _warm(spec)))
        driver = Driver(
            client, batch, max_open=slots + 1, max_queued=2 * slots + 1, progress=progress
        )
        driver.run(jobs, ready)


def _warm(spec: ModelSpec) -> tuple[str, ...]:
    """What a fresh local worker imports before its first block: the block stages, the
    model's runtime and torch (the engine's tensors)."""
    runtime = ("onnxruntime",) if spec.format == "onnx" else ()
    return ("pipeline.batch.tasks", "pipeline.io.model_input", *runtime, "torch")


def backend_ref(spec: ModelSpec, cfg: RunConfig) -> BackendRef:
    """How workers load the model resolved in the driver."""
    overrides = _overrides(cfg)
    if spec.format == "identity":
        overrides["ndim"] = spec.ndim
    elif spec.extra.get("metadata") is False:
        # a model without metadata was probed once here; workers reuse the geometry
        overrides.update(
            {
                k: getattr(spec, k)
                for k in ("ndim", "in_channels", "classes", "margin", "step", "min_tile")
            }
        )
    return BackendRef(
        spec.path,
        spec.format if cfg.backend == "auto" else cfg.backend,
        _device(cfg),
        cfg.precision,
        tuple(sorted(overrides.items())),
        model_threads(cfg),
        cfg.ort_provider,
        cfg.cuda_graphs,
    )


def _device(cfg: RunConfig) -> str:
    from pipeline.backends import resolve_device

    return resolve_device(cfg.device)
