"""Command line: each command is a thin wrapper over one library function.

Exit codes of ``pipeline run``:

0
    Every input is ``done`` or ``skipped``. Skipped is left out by design, not a failure:
    an output already made from the same input, model and settings (``up-to-date``), a
    file in a searched folder whose suffix is not searched (``not-an-image``), the same
    file reached twice (``duplicate``).
1
    At least one input ``failed``; the others were still run. The summary and
    ``OUT/report.json`` give each failure's reason and message.
2
    A usage or configuration error: a bad option or config file, an unreadable list
    file, no images found, a model that cannot be loaded; an output that cannot be
    written (read-only, full: then no input was finished); the output is locked by
    another run (the message names it). Nothing was finished.
130
    Interrupted (Ctrl-C): finished inputs stay published, unfinished ones stay staged
    and the same command continues them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from pipeline.cli.describe import inspect_path, open_hints, render
from pipeline.cli.options import RUN_EPILOG, given_options, run_options
from pipeline.cli.text import cell, cells, fit, printable
from pipeline.config import (
    ACTIVATIONS,
    MODEL_FORMATS,
    NORMALIZATIONS,
    PADDINGS,
)
from pipeline.errors import InputError, PipelineError

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _fail(exc: PipelineError, code: int = EXIT_USAGE) -> None:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(code)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Start here:
  pipeline demo --folder demo          synthetic slides, a small trained U-Net, a run
  pipeline inspect SLIDE.svs           what the pipeline sees in a file
  pipeline run SLIDES/ --out OUT.zarr --model MODEL.onnx
  pipeline inspect OUT.zarr            the images of an output, their states and shapes
""",
)
@click.version_option(package_name="unet-pipeline")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Segment very large biomedical images with a U-Net, tile by tile, into OME-Zarr."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command(epilog=RUN_EPILOG)
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out",
    "-o",
    required=True,
    help="Output folder, an OME-Zarr group ending in .zarr (created if missing); each input "
    "becomes one image in it, beside report.json.",
)
@click.option(
    "--model",
    "-m",
    help="Model file: TorchScript (.pt) or ONNX (.onnx), e.g. from `pipeline export`.",
    show_default="none; needed unless --backend identity",
)
@run_options
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of option values (the keys of configs/default.yaml); options given "
    "here override it.",
    show_default="none",
)
@click.option(
    "--force",
    is_flag=True,
    show_default="off",
    help="Recompute inputs whose output is up to date (made from the same file, model and "
    "settings, as the ledger in OUT/.pipeline records).",
)
@click.option(
    "--shard",
    help="Run share I of N of the inputs, e.g. 2/8: job-array tasks share one OUT.",
    show_default="inside a Slurm job array, its task of the array; else all inputs",
)
@click.pass_context
def run(ctx, inputs, out, model, config_file, force, shard, **options) -> None:
    """Segment INPUTS (image files, folders, .txt lists of paths) into OUT, one image each.

    Each input gets one line of what will run, then a progress bar; the end shows a
    table of the inputs and how to open the result. Inputs whose output in OUT was made
    from the same file, model and settings are skipped (up-to-date); an interrupted run
    is continued where it stopped by the same command.
    """
    from pipeline.batch.shard import parse_shard
    from pipeline.cli.progress import TerminalProgress
    from pipeline.config import resolve_config
    from pipeline.io.discover import find_inputs
    from pipeline.run import run as run_pipeline

    try:
        cfg = resolve_config(config_file, given_options(ctx, options))
        share = parse_shard(shard)
        found = find_inputs(inputs, cfg.extensions, exclude=[out])
        if not found.paths and all(r.state == "skipped" for r in found.results):
            others = f" ({len(found.results)} other files skipped)" if found.results else ""
            raise InputError(
                f"no images found{others}",
                where=", ".join(inputs),
                hint=f"give image files, list files (.txt) or folders with "
                f"{', '.join(cfg.extensions)} files (see --extensions)",
            )
        with TerminalProgress() as progress:
            report = run_pipeline(
                found.paths,
                out,
                model,
                cfg,
                progress=progress,
                decided=found.results,
                force=force,
                shard=share,
            )
    except PipelineError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        # finished inputs stay published; unfinished ones stay staged for the next run
        click.echo("\ninterrupted: rerun the same command to continue", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _summary(report, out)
    sys.exit(exit_code(report))


def exit_code(report) -> int:
    """0, 1 or 2 (see the module docstring): 2 when the output could not be written and
    no input was finished."""
    from pipeline.errors import DISK_FULL, OUTPUT_READ_ONLY

    if report.ok and not report.errors:
        return EXIT_OK
    unwritable = report.errors or any(
        r.reason in (DISK_FULL, OUTPUT_READ_ONLY) for r in report.inputs if r.state == "failed"
    )
    if unwritable and not any(r.state == "done" for r in report.inputs):
        return EXIT_USAGE
    return EXIT_FAILED_INPUTS


WIDTH = 100  # the summary table fits this many columns
_LISTED_SKIPS = 8  # more skipped inputs than this are counted per reason, not listed


def _summary(report, out) -> None:
    """A table of the inputs in :data:`WIDTH` columns (long names and reasons cut with
    ``…``), then each failure's full message and the totals. Control characters in names
    and messages are shown as ``?``."""
    click.echo("", err=True)
    rows = [r for r in report.inputs if r.state != "skipped"]
    skipped = [r for r in report.inputs if r.state == "skipped"]
    click.echo(_row("state", "input", "s", "Mpix", "tissue", "output / reason"))
    for r in rows:
        click.echo(
            _row(
                r.state,
                _display(r.path),
                f"{r.seconds:.1f}",
                f"{r.pixels / 1e6:.1f}" if r.state == "done" else "-",
                "-" if r.tissue_fraction is None else f"{100 * r.tissue_fraction:.0f}%",
                _detail(r),
            )
        )
    if len(skipped) <= _LISTED_SKIPS:
        for r in skipped:
            click.echo(_row("skipped", _display(r.path), "-", "-", "-", _detail(r)))
    else:
        by_reason: dict[str, list[str]] = {}
        for r in skipped:
            by_reason.setdefault(r.reason or "", []).append(_display(r.path))
        for reason, names in by_reason.items():
            click.echo(
                _row(
                    "skipped",
                    f"{len(names)} inputs",
                    "-",
                    "-",
                    "-",
                    f"{reason}: {', '.join(names)}",
                )
            )
    failed = [r for r in report.inputs if r.state in ("failed", "pending")]
    if failed:
        click.echo("failed:")
        for r in failed:
            click.echo(f"  {printable(r.message or r.reason or '')}")
    for error in report.errors:
        click.echo(f"error: {printable(error)}", err=True)
    counts = ", ".join(f"{n} {state}" for state, n in report.counts.items() if n)
    click.echo(
        f"{counts or 'no inputs'}; {report.pixels / 1e6:.1f} Mpix in "
        f"{report.seconds:.1f} s ({report.mpix_per_s:.2f} Mpix/s); "
        f"report: {printable(str(out))}/report.json"
    )
    done = [Path(r.output).name for r in report.inputs if r.state == "done" and r.output]
    hints = open_hints(out, done, (report.config or {}).get("ngff"))
    if hints:
        click.echo("open it with:")
        for hint in hints:
            click.echo(f"  {printable(hint)}")


def _row(state: str, name: str, seconds: str, mpix: str, tissue: str, detail: str) -> str:
    head = f"  {state:7s} {cell(name, 28)} {seconds:>6s} {mpix:>6s} {tissue:>6s}  "
    return head + fit(detail, WIDTH - cells(head), cut="start" if state == "done" else "end")


def _detail(r) -> str:
    """The output path of a done input, else ``reason: problem`` (the path left out)."""
    if r.state == "done":
        return printable(r.output or "")
    message = r.message or ""
    if message.startswith(f"{r.path}: "):
        message = message[len(r.path) + 2 :]  # the input column names it already
    if message.startswith(f"{r.reason}: "):
        message = message[len(r.reason) + 2 :]  # some messages lead with their reason
    return printable(f"{r.reason}: {message}" if message else str(r.reason))


def _display(path: str) -> str:
    return printable(os.path.basename(os.path.normpath(path)) or path)


def _choice(flag: str, choices, default: str, text: str):
    return click.option(
        flag, type=click.Choice(choices), default=default, show_default=True, help=text
    )


@main.command(
    epilog="""\b
Examples:
  pipeline export unet.onnx --in-channels 3 --classes 1 --weights trained.pth --mpp 0.5
  pipeline export tissue.pt --in-channels 3 --classes 3 --class-names tumor,stroma
  pipeline export unet_valid.pt --padding valid --in-channels 1 --classes 2 --weights w.pth
  pipeline export unet3d.onnx --ndim 3 --in-channels 1 --classes 1 --base 16 --depth 3
"""
)
@click.argument("out")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="Trained weights: a state dict saved with torch.save (read with weights_only=True).",
    show_default="none: random weights, for testing the pipeline only",
)
@click.option("--in-channels", type=int, default=1, show_default=True, help="Input channels.")
@click.option(
    "--classes", type=int, default=1, show_default=True, help="Output channels (classes)."
)
@click.option("--base", type=int, default=64, show_default=True, help="Filters of the first level.")
@click.option(
    "--depth",
    type=int,
    default=4,
    show_default=True,
    help="Down-sampling steps; tile sizes are multiples of 2^depth.",
)
@_choice("--ndim", ("2", "3"), "2", "2D or 3D convolutions.")
@_choice(
    "--padding",
    PADDINGS,
    "same",
    "same: output as large as the input; valid: the original U-Net, output smaller by a "
    "margin (blended with crop).",
)
@_choice(
    "--activation",
    ("auto", *ACTIVATIONS),
    "auto",
    "Output activation built into the file; auto: sigmoid for one class, softmax for several.",
)
@_choice(
    "--normalize",
    NORMALIZATIONS,
    "dtype",
    "How `pipeline run` scales integer input for this model: dtype (divided by the type's "
    "maximum) or none.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(MODEL_FORMATS),
    help="Model file format.",
    show_default="from OUT's suffix: .pt/.ts TorchScript, .onnx ONNX",
)
@click.option(
    "--mpp",
    type=float,
    help="Training resolution in µm per pixel: `pipeline run` runs at it unless given "
    "--mpp or --level.",
    show_default="none declared",
)
@click.option(
    "--class-names",
    help="Class names stored in the file, comma-separated: the foreground classes, or all "
    "with background first; `pipeline run` names labels and channels with them.",
    show_default="none: class 1, class 2...",
)
def export(
    out,
    weights,
    in_channels,
    classes,
    base,
    depth,
    ndim,
    padding,
    activation,
    normalize,
    fmt,
    mpp,
    class_names,
) -> None:
    """Export a U-Net (fresh, or with --weights) to a TorchScript or ONNX model file OUT.

    The file carries what running it needs (axes, channels, classes, margin, size step,
    activation, normalisation, and optionally resolution and class names).
    """
    from pipeline.core.classes import label_names, parse_class_names
    from pipeline.model.export import export_model

    try:
        names = parse_class_names(class_names)
        if names is not None:
            label_names(classes, names)  # the count must fit the classes
        extra: dict = {"trained": weights is not None}
        if mpp is not None:
            extra["mpp"] = mpp
        if names is not None:
            extra["class_names"] = list(names)
        export_model(
            out,
            weights=weights,
            in_channels=in_channels,
            classes=classes,
            base=base,
            depth=depth,
            ndim=int(ndim),
            padding=padding,
            activation=activation,
            normalize=normalize,
            fmt=fmt,
            extra=extra,
        )
        info = inspect_path(out)
    except PipelineError as exc:
        _fail(exc)
    if weights is None:
        click.echo(
            "warning: no --weights given: the model's weights are random (untrained). It runs "
            "and tests the pipeline; its segmentations mean nothing.",
            err=True,
        )
    click.echo(render(info))


@main.command(
    epilog="""\b
Examples:
  pipeline inspect slide.svs            series, levels, shapes, chunks, pixel size
  pipeline inspect unet.onnx            a model's geometry, classes and resolution
  pipeline inspect masks.zarr           an output's images with their states and shapes
  pipeline inspect slide.svs --json     the same facts as JSON
"""
)
@click.argument("path")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    default=False,
    show_default="off",
    help="Print JSON (floats to 6 significant digits) instead of a table.",
)
def inspect(path, as_json) -> None:
    """Show what the pipeline sees in PATH: an image, a model or an output."""
    try:
        info = inspect_path(path)
    except PipelineError as exc:
        _fail(exc, EXIT_FAILED_INPUTS)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))


@main.command(
    epilog="""\b
Examples:
  pipeline demo --folder demo
  pipeline demo --folder /tmp/demo --seconds 20
"""
)
@click.option(
    "--folder",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the demo slides, model and output.",
)
@click.option(
    "--seconds",
    default=60.0,
    show_default=True,
    help="Training time budget in seconds (less: a weaker model).",
)
def demo(folder, seconds) -> None:
    """Make small synthetic slides and a small trained U-Net, then run the pipeline."""
    from pipeline.demo import run_demo

    try:
        run_demo(folder, train_seconds=seconds, echo=click.echo)
    except PipelineError as exc:
        _fail(exc, EXIT_FAILED_INPUTS)
