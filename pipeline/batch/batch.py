"""The driver's side of a batch: what happens when an input's steps end.

:class:`Batch` is the :class:`~pipeline.batch.driver.Work` of a run: it names the worker steps
(:mod:`pipeline.batch.tasks`) and, in the driver, publishes each finished input
(:meth:`~pipeline.io.staging.StagingArea.publish`), records every outcome in the ledger,
and rewrites ``OUT/report.json`` (every input the output holds) and this run's own
report after each input.

A failed input's staging is marked so that its tasks still running write nothing; once
they have settled it is deleted, unless the failure leaves the written blocks valid (a
full or read-only disk, a worker crash, an I/O error): then they are kept for the next run
to continue. After a full or read-only disk no further input is started.

An input's preview and GeoJSON are moved into the output root right after its image
(:func:`~pipeline.batch.products.publish_products`), and every time ``report.json`` is written
the run page ``OUT/index.html`` is written from the same report
(:meth:`Batch.report_written`).

Progress: with a ``progress`` object (the CLI's :class:`~pipeline.cli.progress.TerminalProgress`),
each input gets one line of what will run when its prepare task returns
(:func:`~pipeline.engine.plan.summary_line`), then counts tiles as its blocks finish, and
ends with its state. The library only calls it; the CLI draws.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

from pipeline.batch.driver import Step
from pipeline.batch.ledger import Ledger
from pipeline.batch.products import products_record, publish_products
from pipeline.batch.tasks import (
    InputJob,
    Model,
    Prepared,
    finalize_input,
    prepare_input,
    run_block,
    run_shared,
)
from pipeline.core import atomic, faults
from pipeline.core.atomic import output_error
from pipeline.core.report import InputResult, RunReport
from pipeline.core.retry import ATTEMPTS
from pipeline.engine.blocks import block_tiles
from pipeline.engine.plan import summary_line
from pipeline.errors import (
    INTERNAL_ERROR,
    INTERRUPTED,
    IO_ERROR,
    UP_TO_DATE,
    DiskFullError,
    OutputError,
    OutputLockedError,
    PipelineError,
    ReadOnlyOutputError,
    WorkerCrashError,
)
from pipeline.io.staging import StagingArea

log = logging.getLogger(__name__)

#: Failures after which an input's written blocks stay valid for the next run.
_KEEP_WORK = (DiskFullError, ReadOnlyOutputError, WorkerCrashError)
#: Reports of this many runs are kept in ``OUT/.pipeline/runs``.
RUNS_KEPT = 365
#: A report rewrite may take at most this share of the run's time (large outputs).
_REPORT_SHARE = 0.1


class Batch:
    """The inputs of one run and what becomes of them (see the module docstring)."""

    def __init__(
        self,
        out: str | os.PathLike,
        model: Model | None,
        ledger: Ledger,
        report: RunReport,
        results: dict[str, InputResult],
        *,
        merge_on_write: bool = False,
    ) -> None:
        self.out = Path(out)
        self.model = model
        self.ledger = ledger
        self.area = StagingArea(out)
        self.report = report
        self.results = results  # by absolute input path (InputJob.path)
        self.merge_on_write = merge_on_write  # shards: re-read the others' records
        self.started: dict[str, float] = {}
        self.halt: OutputError | None = None
        self.lock: Any = None  # the run's OutputLock: no input starts once it is lost
        self.progress: Any = None  # start_input / advance / finish_input (pipeline.cli.progress)
        self._last_write = self._write_cost = 0.0
        self._reals: dict[str, str] = {}

    def _real(self, path: str) -> str:
        """``path`` resolved (symbolic links, ``..``), once per run: a report write names
        every input of the run, and resolving each again would make writing the reports
        of a batch of N inputs O(N²) file-system lookups."""
        real = self._reals.get(path)
        if real is None:
            real = self._reals[path] = os.path.realpath(path)
        return real

    # --- the steps (driver.Work) ------------------------------------------------------

    def name(self, job: InputJob) -> str:
        return job.name

    def prepare(self, job: InputJob) -> Step:
        if self.lock is not None and self.lock.lost and self.halt is None:
            self.halt = OutputLockedError(
                "another run took over this run's lock (its heartbeat stalled); no further "
                "input is started here",
                where=self.out,
                hint="check that one run at a time writes this output",
            )
        if self.halt is not None:
            raise self.halt  # the output is full, or not ours: the input is not started
        self.started[job.path] = time.perf_counter()
        given = self.results[job.path].path
        self._record(self.ledger.start, self._real(job.path), given, job.name, job.key, job.run)
        return Step(prepare_input, (job, self.model))

    def shared(self, prepared: Prepared, task: Any) -> Step:
        return Step(run_shared, (prepared.job, prepared.stage, task.job))

    def block(self, prepared: Prepared, task: Any) -> Step:
        return Step(run_block, (prepared.job, prepared.stage, task.job))

    def deaths(self, prepared: Prepared, kind: str, task: Any) -> int:
        return prepared.stage.deaths(kind, task.job.write)

    def finalize(self, job: InputJob, prepared: Prepared) -> Step:
        # the blocks' jobs stay here: finishing needs their record names only
        return Step(finalize_input, (dataclasses.replace(prepared, tasks=[]), self.model))

    # --- what the driver reports ------------------------------------------------------

    def prepared(self, job: InputJob, prepared: Prepared) -> None:
        result = self.results[job.path]
        if prepared.complete:
            log.info("%s: its staged image is finished; publishing it", job.path)
            return
        if job.refresh:
            log.info("%s: its image is up to date; making its GeoJSON and preview", job.path)
            return
        result.shape = list(prepared.shape)
        result.blocks = len(prepared.tasks)
        result.resumed_blocks = sum(t.done for t in prepared.tasks)
        if self.progress is not None:
            self._start_progress(job, prepared)

    def _start_progress(self, job: InputJob, prepared: Prepared) -> None:
        by_index = {t.job.index: t for t in prepared.tasks}
        todo = sum(block_tiles(t, by_index) for t in prepared.tasks if not t.done)
        run = prepared.provenance
        model = self.model
        summary = summary_line(
            job.name,
            model=os.path.basename(model.spec.path or "") or model.spec.format,
            backend=str(run.get("backend")),
            device=model.ref.device,
            tile=run.get("tile") or (),
            overlap=run.get("overlap") or (),
            blend=str(run.get("blend")),
            pixel_size=prepared.pixel_size,
            blocks=len(prepared.tasks),
            tiles=prepared.run_tiles,
            shape=prepared.shape[1:],
        )
        done = sum(t.done for t in prepared.tasks)
        if done:
            summary += f" | continuing: {done} block{'s' if done != 1 else ''} written before"
        self.progress.start_input(job.name, summary, todo)

    def block_done(self, job: InputJob, block: Any) -> None:
        if block is not None:
            self.results[job.path].tiles += block.tiles
            if self.progress is not None:
                self.progress.advance(job.name, block.tiles)

    def finished(self, job: InputJob, prepared: Prepared, info: dict[str, Any]) -> None:
        result = self.results[job.path]
        final = self.out / job.name
        made = info.get("products") or {}
        before = (self.ledger.record(self._real(job.path)) or {}).get("products")

        def recorded() -> None:
            # after the image, before the record: a crash between leaves an image whose
            # products the record does not vouch for, and the next run makes them again
            files = publish_products(
                prepared.stage.dir, self.out, job.name, replace=not job.refresh
            )
            result.preview, result.geojson = files["preview"], files["geojson"]
            result.state, result.output = "done", str(final)
            if job.refresh:  # its image was skipped; the figures are those of its run
                now = [k for k in ("GeoJSON", "preview") if made.get(k.lower())]
                result.state, result.reason = "skipped", UP_TO_DATE
                result.message = (
                    f"{result.path}: its output {job.name} was made from the same input, model "
                    f"and settings; only its {' and '.join(now) or 'products'} "
                    f"{'were' if len(now) > 1 else 'was'} made now. Hint: --force recomputes it"
                )
            else:
                result.shape = info.get("shape", result.shape)
                result.blocks = info.get("blocks", result.blocks)
                result.pixels = int(info.get("pixels") or 0)
                if info.get("tissue_fraction") is not None:
                    result.tissue_fraction = info["tissue_fraction"]
                    result.skipped_tiles = info["tiles_all"] - info["tiles_run"]
            kept = products_record(job.key, made, before if job.refresh else None)
            self._end(job, result, published=True, products=kept)

        try:
            if job.refresh:
                recorded()
                self.area.remove(prepared.stage)
            else:
                self.area.publish(prepared.stage, final, recorded)
        except OSError as exc:
            if isinstance(exc, PipelineError):
                raise
            raise output_error(exc, self.out) from exc

    def failed(self, job: InputJob, exc: BaseException, what: str) -> None:
        result = self.results[job.path]
        result.state = "failed"
        if isinstance(exc, PipelineError):
            result.reason, result.message = exc.reason, exc.message
            if result.message.startswith(f"{job.path}: "):  # name it as the user did
                result.message = result.path + result.message[len(job.path) :]
            elif job.path not in result.message and result.path not in result.message:
                result.message = f"{result.path}: {result.message}"
        elif isinstance(exc, OSError):  # retried already: the file system keeps failing
            result.reason = IO_ERROR
            result.message = (
                f"{result.path}: I/O error while {what}: {exc} (tried {ATTEMPTS} times). Hint: "
                "check the disk or network file system, then rerun: written blocks are kept"
            )
        else:  # an unexpected bug must not stop the batch
            log.debug("unexpected error on %s (%s)", job.path, what, exc_info=exc)
            frames = traceback.extract_tb(exc.__traceback__)
            at = f" ({frames[-1].name})" if frames else ""
            result.reason = INTERNAL_ERROR
            result.message = f"{result.path}: {type(exc).__name__} while {what}: {exc}{at}"
        log.info("failed: %s", result.message)  # the report and the CLI's summary carry it
        if job.key is not None and job.path in self.started:  # else its stage is not ours
            keep = isinstance(exc, _KEEP_WORK) or (
                isinstance(exc, OSError) and not isinstance(exc, PipelineError)
            )
            self.area.stage(job.name, job.key).mark_discarded(keep=keep)
        if isinstance(exc, (DiskFullError, ReadOnlyOutputError)):
            self.halt = exc
        self._end(job, result, published=False)

    def settled(self, job: InputJob, prepared: Prepared | None) -> None:
        """The failed input's tasks have all ended: delete its staging, unless kept."""
        if job.key is None or job.path not in self.started:
            return
        stage = self.area.stage(job.name, job.key)
        if (stage.dir / "discarded").exists():
            try:
                self.area.remove(stage)
            except OSError as exc:
                log.warning("could not delete %s: %s", stage.dir, exc)

    def record_skipped(self, result: InputResult) -> None:
        """An input decided before running (up to date): into the ledger."""
        self._record(
            self.ledger.finish,
            self._real(result.path),
            result.to_dict(),
            result.run,
            result.key,
            False,
        )

    def interrupted(self, jobs: list[InputJob]) -> None:
        """The run stops (Ctrl-C): unfinished inputs stay staged for the next run."""
        for job in jobs:
            result = self.results[job.path]
            if result.state == "pending":
                result.reason = INTERRUPTED
                result.message = (
                    f"{result.path}: the run was interrupted. Hint: rerun the same command "
                    "to continue it (written blocks are kept)"
                )
                self._end(job, result, published=False)

    # --- records and reports ----------------------------------------------------------

    def _end(
        self, job: InputJob, result: InputResult, published: bool, products: Any = None
    ) -> None:
        t0 = self.started.get(job.path)
        if t0 is not None:
            result.seconds = round(time.perf_counter() - t0, 3)
        self._record(
            self.ledger.finish,
            self._real(job.path),
            result.to_dict(),
            job.run,
            job.key,
            published,
            products,
        )
        if self.progress is not None:
            self.progress.finish_input(job.name, result.state)
        self.write_reports()

    def write_reports(self, final: bool = False) -> None:
        """``OUT/report.json`` and this run's report, atomically. Between inputs, a
        rewrite is skipped when rewriting has taken more than a tenth of the time since
        the last one (an output of many thousand inputs); never at the end."""
        now = time.perf_counter()
        if not final and now - self._last_write < self._write_cost / _REPORT_SHARE:
            return
        this_run = {self._real(r.path) for r in self.report.inputs}
        ledger = Ledger(self.out).load() if final or self.merge_on_write else self.ledger
        try:
            faults.point("report", self.report.run)
            data = self.report.to_dict(ledger.entries(exclude=this_run))
            atomic.write_json(self.out / "report.json", data)
            self.report.write(self.ledger.root / "runs" / f"{self.report.run}.json")
            self.report_written(data)
        except OSError as exc:
            error = output_error(exc, self.out)
            note = f"{self.out / 'report.json'}: could not be written: {error.problem}"
            if note not in self.report.errors:
                self.report.errors.append(note)
                log.error("%s", note)
        self._last_write = time.perf_counter()
        self._write_cost = self._last_write - now
        if final:
            self._prune_runs()

    def _prune_runs(self) -> None:
        """Keep the reports of the last :data:`RUNS_KEPT` runs (run ids sort by time)."""
        runs = sorted((self.ledger.root / "runs").glob("*.json"))
        for old in runs[:-RUNS_KEPT]:
            with contextlib.suppress(OSError):
                old.unlink()

    def report_written(self, report: dict[str, Any]) -> None:
        """``report.json`` is written: the run page ``OUT/index.html`` from the same
        report (a page that cannot be written is logged; the report is what counts)."""
        from pipeline.outputs.page import write_index

        try:
            write_index(self.out, report)
        except OSError as exc:
            log.warning("%s", exc)

    def _record(self, fn: Any, *args: Any) -> None:
        """A ledger write; a full disk must not turn a failure into a crash."""
        try:
            fn(*args)
        except OSError as exc:
            log.warning("could not update the ledger in %s: %s", self.ledger.root, exc)
