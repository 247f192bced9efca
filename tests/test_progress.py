"""Terminal progress: what-will-run lines, tiles with elapsed time and ETA, the old callback."""

from __future__ import annotations

import io
import logging
import re

from pipeline.cli.progress import TerminalProgress, format_seconds, summary_line


def test_summary_line_says_what_will_run():
    line = summary_line(
        "CMU-1",
        model="unet.onnx",
        backend="onnx",
        device="cpu",
        tile=(256, 256),
        overlap=(64, 64),
        blend="gaussian",
        pixel_size={"y": 0.499, "x": 0.499},
        blocks=12,
        tiles=5430,
        shape=(32914, 46000),
    )
    assert line == (
        "CMU-1: 46000x32914 px at 0.499 µm/px | unet.onnx on onnx/cpu | "
        "tile 256, overlap 64, gaussian | 12 blocks, 5,430 tiles"
    )
    bare = summary_line(
        "x", model="m.pt", backend="torchscript", device="cuda:0", tile=(32, 64, 64),
        overlap=(8, 16, 16), blend="crop", pixel_size={}, blocks=1, tiles=1,
    )  # fmt: skip
    assert "(no pixel size)" in bare and "tile 32x64x64, overlap 8x16x16" in bare
    assert "1 block, 1 tile" in bare


def test_plain_lines_with_elapsed_and_eta_when_not_a_terminal():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=False, interval=0.0)
    progress.start_input("slide", "slide: what will run", total_tiles=100)
    progress.advance("slide", 25)
    progress.advance("slide", 25)
    progress.finish_input("slide", "done")
    lines = out.getvalue().splitlines()
    assert lines[0] == "slide: what will run"
    assert re.fullmatch(
        r"slide: 25/100 tiles \(25%\), \d:\d\d:\d\d elapsed, ETA \d:\d\d:\d\d", lines[1]
    )
    assert lines[2].startswith("slide: 50/100 tiles (50%)")
    assert re.fullmatch(r"slide: done, 50/100 tiles in \d:\d\d:\d\d", lines[3])


def test_plain_lines_are_rate_limited():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=False, interval=3600)
    progress.start_input("a", "a: summary", 1000)
    progress.inputs["a"].last_line = progress.inputs["a"].started  # as if a line was just shown
    for _ in range(100):
        progress.advance("a", 1)
    progress.finish_input("a", "failed")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the summary and the end: no update within the interval
    assert lines[-1].startswith("a: failed, 100/1,000 tiles")


def test_old_block_callback_still_works():
    out = io.StringIO()
    progress = TerminalProgress(out, tty=False, interval=0.0)
    for done in range(4):
        progress("img", done, 3)
    text = out.getvalue()
    assert "img: 1/3 blocks (33%)" in text and "img: done, 3/3 blocks" in text
    assert not progress.inputs


def test_bars_on_a_terminal_with_several_inputs_and_logs_above(monkeypatch):
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    handler = logging.StreamHandler(out)
    logging.getLogger().addHandler(handler)
    try:
        with TerminalProgress(out) as progress:
            assert progress.tty
            progress.start_input("first", "first: summary", 10)
            progress.start_input("second", "second: summary", 4)
            progress.advance("first", 10)
            logging.getLogger("pipeline.test").warning("a warning while drawing")
            progress.finish_input("first", "done")
            progress.advance("second", 2)
            progress.finish_input("second", "failed")
        assert progress._bars is None and handler.stream is out
    finally:
        logging.getLogger().removeHandler(handler)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "first: summary" in text and "second: summary" in text
    assert "10/10" in text and "tiles" in text and "ETA" in text
    assert "a warning while drawing" in text


def test_format_seconds():
    assert format_seconds(3725.4) == "1:02:05"
    assert format_seconds(None) == "-:--:--" and format_seconds(float("nan")) == "-:--:--"


def test_a_run_feeds_a_line_then_tiles_then_the_state_per_input(tmp_path):
    """Through :func:`pipeline.run.run`: every input's what-will-run line comes when it is
    planned, its tiles count up to what the line announced, and it ends with its state
    (a continued input: see test_products' killed runs)."""
    import numpy as np
    from conftest import write_tiff

    from pipeline.config import RunConfig
    from pipeline.run import run

    for name in ("a", "b"):
        write_tiff(tmp_path / f"{name}.tif", np.full((300, 200), 100, np.uint8), um=0.5)
    (tmp_path / "bad.tif").write_text("no image")
    cfg = RunConfig(backend="identity", scheduler="sync", tile=(64,), chunk=64, block=128)
    paths = [str(tmp_path / n) for n in ("a.tif", "bad.tif", "b.tif")]
    out = io.StringIO()
    with TerminalProgress(out, tty=False, interval=0.0) as progress:
        report = run(paths, tmp_path / "out.zarr", None, cfg, progress=progress)
    lines = out.getvalue().splitlines()
    assert [r.state for r in report.inputs] == ["done", "failed", "done"]
    for name, result in (("a", report.inputs[0]), ("b", report.inputs[2])):
        mine = [x for x in lines if x.startswith(f"{name}: ")]
        assert mine[0].startswith(f"{name}: 200x300 px at 0.5 µm/px | identity on identity/cpu")
        assert "tile 64" in mine[0] and f"{result.blocks} blocks, {result.tiles} tiles" in mine[0]
        assert re.fullmatch(rf"{name}: done, {result.tiles}/{result.tiles} tiles in .*", mine[-1])
        assert len(mine) > 2  # tiles counted in between
    assert not [x for x in lines if x.startswith("bad:")]  # failed before it was planned
