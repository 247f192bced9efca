"""Command line: each command is a thin wrapper over one library function.

Exit codes of ``pipeline run``:

0
    Every input is ``done`` or ``skipped``. Skipped is left out by design, not a failure:
    a file in a searched folder whose suffix is not searched (``not-an-image``), the same
    file reached twice (``duplicate``).
1
    At least one input ``failed``; the others were still run. The summary and
    ``OUT/report.json`` give each failure's reason and message.
2
    A usage or configuration error: a bad option or config file, an unreadable list
    file, no images found, a model that cannot be loaded, an output that cannot be
    written. Nothing was run.
130
    Interrupted (Ctrl-C): the input being written was discarded, finished ones stay.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import unicodedata

import click

from pipeline.config import (
    ACTIVATIONS,
    BACKENDS,
    BLENDS,
    DTYPES,
    MODEL_FORMATS,
    NORMALIZATIONS,
    NORMALIZE,
    ORT_PROVIDERS,
    PADDINGS,
    PRECISIONS,
    TTA,
)
from pipeline.errors import InputError, PipelineError

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _fail(exc: PipelineError, code: int = EXIT_USAGE) -> None:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(code)


class _Bar:
    """A one-line progress bar on stderr (redrawn at most 5 times a second)."""

    def __init__(self) -> None:
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done not in (0, total) and now - self.last < (0.2 if self.tty else 10):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(total, 1))
        line = f"{name[:30]:30s} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} blocks"
        click.echo(("\r" if self.tty else "") + line, err=True, nl=not self.tty or done == total)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="unet-pipeline")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Segment very large biomedical images with a U-Net, tile by tile, into OME-Zarr."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Output Zarr group (created if missing).")
@click.option("--model", "-m", help="Model file (.pt TorchScript or .onnx).")
@click.option("--tile", help="Network input size: N or Z,Y,X.")
@click.option("--overlap", type=int, help="Overlap between tiles in output pixels.")
@click.option("--blend", type=click.Choice(BLENDS))
@click.option(
    "--batch-size",
    type=int,
    help="Tiles per forward pass (default: 8 on CPU; on a GPU as many as fill it).",
)
@click.option("--backend", type=click.Choice(BACKENDS))
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    help="fp32 (default); fp16/bf16 on a GPU (TorchScript autocast, or TensorRT engines).",
)
@click.option(
    "--tta",
    type=click.Choice(TTA),
    help="Test-time augmentation: mean over the axis flips (flip) or the 8 rotations and "
    "flips of square tiles (d4). Default: none.",
)
@click.option(
    "--ort-provider",
    type=click.Choice(ORT_PROVIDERS),
    help="ONNX Runtime on a GPU: cuda (auto) or tensorrt (engines built on first use and "
    "cached in ~/.cache/pipeline/trt).",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="Replay the network as a CUDA graph (TorchScript on a GPU; default: off).",
)
@click.option("--dtype", type=click.Choice(DTYPES))
@click.option("--normalize", type=click.Choice(NORMALIZE))
@click.option("--workers", type=int, help="Local Dask worker processes.")
@click.option("--threads-per-worker", type=int)
@click.option("--scheduler", help="Address of an existing Dask scheduler ('sync': in-process).")
@click.option("--chunk", type=int, help="Output chunk size (y and x).")
@click.option("--block", type=int, help="Block side in pixels (a multiple of --chunk).")
@click.option("--in-channels", type=int, help="Input channels of a model without metadata.")
@click.option("--classes", type=int, help="Classes of a model without metadata.")
@click.option("--series", type=int, help="Image series to read (default: the main image).")
@click.option("--level", type=int, help="Input pyramid level to run on.")
@click.option("--mpp", type=float, help="Run at this resolution (micrometres per pixel).")
@click.option(
    "--mpp-input", type=float, help="Pixel size of the inputs, when files lack it or are wrong."
)
@click.option("--channels", help="Input channels to use, e.g. 0,1,2.")
@click.option(
    "--skip-background/--no-skip-background",
    default=None,
    help="Detect tissue and skip tiles with none (default: on).",
)
@click.option("--mask", type=click.Path(exists=True), help="A tissue mask image to use instead.")
@click.option("--extensions", help="File suffixes searched for in folders, e.g. .svs,.ndpi.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="YAML file of defaults (see configs/default.yaml).",
)
def run(inputs, out, model, config_file, **options) -> None:
    """Segment INPUTS (files, folders or .txt lists of paths) into OUT, one NGFF image per input."""
    from pipeline.config import resolve_config
    from pipeline.io.discover import find_inputs
    from pipeline.run import run as run_pipeline

    try:
        cfg = resolve_config(config_file, options)
        found = find_inputs(inputs, cfg.extensions, exclude=[out])
        if not found.paths and all(r.state == "skipped" for r in found.results):
            others = f" ({len(found.results)} other files skipped)" if found.results else ""
            raise InputError(
                f"no images found{others}",
                where=", ".join(inputs),
                hint=f"give image files, list files (.txt) or folders with "
                f"{', '.join(cfg.extensions)} files (see --extensions)",
            )
        report = run_pipeline(found.paths, out, model, cfg, progress=_Bar(), decided=found.results)
    except PipelineError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        # the input being written was discarded; finished ones stay published
        click.echo("\ninterrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _summary(report, out)
    sys.exit(EXIT_OK if report.ok else EXIT_FAILED_INPUTS)


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
    failed = [r for r in report.inputs if r.state == "failed"]
    if failed:
        click.echo("failed:")
        for r in failed:
            click.echo(f"  {_printable(r.message or r.reason or '')}")
    counts = ", ".join(f"{n} {state}" for state, n in report.counts.items() if n)
    click.echo(
        f"{counts or 'no inputs'}; {report.pixels / 1e6:.1f} Mpix in "
        f"{report.seconds:.1f} s ({report.mpix_per_s:.2f} Mpix/s); "
        f"report: {_printable(str(out))}/report.json"
    )


def _row(state: str, name: str, seconds: str, mpix: str, tissue: str, detail: str) -> str:
    head = f"  {state:7s} {_cell(name, 28)} {seconds:>6s} {mpix:>6s} {tissue:>6s}  "
    return head + _fit(detail, WIDTH - _cells(head), cut="start" if state == "done" else "end")


def _detail(r) -> str:
    """The output path of a done input, else ``reason: problem`` (the path left out)."""
    if r.state == "done":
        return _printable(r.output or "")
    message = r.message or ""
    if message.startswith(f"{r.path}: "):
        message = message[len(r.path) + 2 :]  # the input column names it already
    if message.startswith(f"{r.reason}: "):
        message = message[len(r.reason) + 2 :]  # some messages lead with their reason
    return _printable(f"{r.reason}: {message}" if message else str(r.reason))


def _display(path: str) -> str:
    return _printable(os.path.basename(os.path.normpath(path)) or path)


def _printable(text: str) -> str:
    """Control characters (a newline or escape sequence in a file name) shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _cells(text: str) -> int:
    """Terminal columns ``text`` takes (East Asian wide characters take two)."""
    return sum(
        2 if unicodedata.east_asian_width(c) in "WF" else 0 if unicodedata.combining(c) else 1
        for c in text
    )


def _cell(text: str, width: int) -> str:
    """``text`` fitted and padded to exactly ``width`` terminal columns."""
    text = _fit(text, width)
    return text + " " * (width - _cells(text))


def _fit(text: str, width: int, cut: str = "middle") -> str:
    """``text`` in ``width`` columns: too long, its ``middle``, ``end`` or ``start`` is
    replaced by one ``…`` (the middle keeps a name's suffix, the start a path's end)."""
    if _cells(text) <= width:
        return text
    room = max(width - 1, 0)
    if cut == "end":
        return _take(text, room) + "…"
    if cut == "start":
        return "…" + _take(text[::-1], room)[::-1]
    head = _take(text, room - room // 2)
    return head + "…" + _take(text[::-1], room // 2)[::-1]


def _take(text: str, width: int) -> str:
    out, used = [], 0
    for c in text:
        used += _cells(c)
        if used > width:
            break
        out.append(c)
    return "".join(out)


@main.command()
@click.argument("out")
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False),
    help="State dict to load (read with weights_only=True).",
)
@click.option("--in-channels", type=int, default=1, show_default=True)
@click.option("--classes", type=int, default=1, show_default=True)
@click.option("--base", type=int, default=64, show_default=True)
@click.option("--depth", type=int, default=4, show_default=True)
@click.option("--ndim", type=click.Choice(["2", "3"]), default="2", show_default=True)
@click.option("--padding", type=click.Choice(PADDINGS), default="same", show_default=True)
@click.option(
    "--activation",
    type=click.Choice(("auto", *ACTIVATIONS)),
    default="auto",
    show_default=True,
)
@click.option("--normalize", type=click.Choice(NORMALIZATIONS), default="dtype", show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(MODEL_FORMATS),
    help="Default: from OUT's suffix (.pt/.ts or .onnx).",
)
@click.option(
    "--mpp",
    type=float,
    help="Training resolution (µm/px): `pipeline run` uses it unless --mpp/--level.",
)
def export(
    out, weights, in_channels, classes, base, depth, ndim, padding, activation, normalize, fmt, mpp
) -> None:
    """Export a U-Net (fresh, or with --weights) to a TorchScript or ONNX model file OUT."""
    from pipeline.model.export import export_model

    try:
        spec = export_model(
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
            extra=None if mpp is None else {"mpp": mpp},
        )
    except PipelineError as exc:
        _fail(exc)
    click.echo(json.dumps(spec.to_dict(), indent=2))


@main.command()
@click.argument("path")
def inspect(path) -> None:
    """Show series, levels, shapes, dtypes, chunks and pixel size of an image or model."""
    try:
        if path.lower().endswith((".onnx", ".pt", ".ts", ".pth")):
            from pipeline.backends import read_model_spec

            info = read_model_spec(path).to_dict()
        else:
            from pipeline.io.sources import describe

            info = describe(path)
    except PipelineError as exc:
        _fail(exc, EXIT_FAILED_INPUTS)
    click.echo(json.dumps(info, indent=2, default=str))


@main.command()
@click.option(
    "--folder",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where to write the demo slides, model and output.",
)
@click.option("--seconds", default=60.0, show_default=True, help="Training time budget.")
def demo(folder, seconds) -> None:
    """Make small synthetic slides and a small trained U-Net, then run the pipeline."""
    from pipeline.demo import run_demo

    try:
        run_demo(folder, train_seconds=seconds, echo=click.echo)
    except PipelineError as exc:
        _fail(exc, EXIT_FAILED_INPUTS)


if __name__ == "__main__":  # pragma: no cover
    main()
