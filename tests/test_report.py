"""The run report: states, the exit policy, the atomic report.json and the terminal summary."""

from __future__ import annotations

import json
import os
import unicodedata

import pytest

from pipeline import cli
from pipeline.core.report import InputResult, RunReport


def result(path, state, **kw) -> InputResult:
    return InputResult(path, os.path.basename(path).split(".")[0], state=state, **kw)


def sample() -> RunReport:
    return RunReport(
        inputs=[
            result(
                "/d/a.svs",
                "done",
                output="/o.zarr/a",
                pixels=2_000_000,
                tiles=30,
                skipped_tiles=10,
                tissue_fraction=0.42,
                seconds=3.25,
            ),
            result(
                "/d/b.tif",
                "failed",
                reason="bad-input",
                message="/d/b.tif: is empty (0 bytes). Hint: the copy or export did not finish",
            ),
            result("/d/notes.txt", "skipped", reason="not-an-image", message="/d/notes.txt: ..."),
        ],
        seconds=4.0,
    )


@pytest.mark.parametrize(
    "states, ok",
    [
        ([], True),
        (["done"], True),
        (["done", "skipped"], True),
        (["skipped"], True),
        (["done", "failed"], False),
        (["pending"], False),
    ],
)
def test_ok_means_nothing_failed(states, ok):
    assert RunReport(inputs=[result(f"/{i}.tif", s) for i, s in enumerate(states)]).ok is ok


def test_report_fields():
    d = sample().to_dict()
    assert d["ok"] is False
    assert d["counts"] == {"pending": 0, "done": 1, "failed": 1, "skipped": 1}
    assert d["pixels"] == 2_000_000 and d["mpix_per_s"] == 0.5
    a, b, _ = d["inputs"]
    assert a["tissue_fraction"] == 0.42 and a["skipped_tiles"] == 10
    assert a["skipped_fraction"] == 0.25 and a["output"] == "/o.zarr/a" and a["seconds"] == 3.25
    assert b["tissue_fraction"] is None and b["skipped_fraction"] == 0.0
    assert {
        "path",
        "name",
        "state",
        "reason",
        "message",
        "shape",
        "pixels",
        "tiles",
        "blocks",
    } <= set(a)


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    sample().write(path)
    first = path.read_text()
    assert json.loads(first)["counts"]["done"] == 1
    old_umask = os.umask(0o022)
    try:
        RunReport().write(path)
    finally:
        os.umask(old_umask)
    assert json.loads(path.read_text())["inputs"] == []
    assert path.stat().st_mode & 0o777 == 0o644  # as readable as any file the user writes
    assert os.listdir(tmp_path) == ["report.json"]

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        sample().write(path)
    assert json.loads(path.read_text())["inputs"] == []  # the old report, whole
    assert os.listdir(tmp_path) == ["report.json"]


def cells(line: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in line)


def summary(report, capsys) -> list[str]:
    cli._summary(report, "/o.zarr")
    return capsys.readouterr().out.splitlines()


def test_summary_table(capsys):
    lines = summary(sample(), capsys)
    assert lines[0].split() == ["state", "input", "s", "Mpix", "tissue", "output", "/", "reason"]
    assert lines[1].split() == ["done", "a.svs", "3.2", "2.0", "42%", "/o.zarr/a"]
    assert lines[2].split()[:6] == ["failed", "b.tif", "0.0", "-", "-", "bad-input:"]
    assert "/d/b.tif" not in lines[2]  # the input column names the file already
    assert lines[3].split()[:3] == ["skipped", "notes.txt", "-"]
    assert lines[4] == "failed:"
    assert lines[5] == "  /d/b.tif: is empty (0 bytes). Hint: the copy or export did not finish"
    assert lines[6].startswith("1 done, 1 failed, 1 skipped; 2.0 Mpix in 4.0 s (0.50 Mpix/s)")
    assert lines[6].endswith("report: /o.zarr/report.json")


def test_summary_fits_100_columns_whatever_the_names(capsys):
    long = "/slides/" + "very long slide name with many words " * 4 + "[final].svs"
    report = RunReport(
        inputs=[
            result(long, "done", output="/data/projects/x/" + "deep/" * 30 + "out.zarr/name"),
            result(
                "/s/日本語のスライド名前はとても長いです日本語のスライド.svs",
                "failed",
                reason="bad-input",
                message="x" * 300,
            ),
            result(
                "/s/evil\x1b[2J\nname.tif",
                "failed",
                reason="not-found",
                message="/s/evil\x1b[2J\nname.tif: does not exist",
            ),
        ],
        seconds=1.0,
    )
    lines = summary(report, capsys)
    table = lines[: lines.index("failed:")]
    assert all(cells(line) <= 100 for line in table), [cells(line) for line in table]
    assert "very long slid…s [final].svs " in table[1]  # a long name loses its middle
    assert table[1].rstrip().endswith("out.zarr/name")  # output path: start cut
    assert "\x1b" not in "".join(lines) and "evil?[2J?name.tif" in table[3]


def test_many_skipped_inputs_are_counted_per_reason(capsys):
    report = RunReport(
        inputs=[result("/s/a.svs", "done", output="/o.zarr/a")]
        + [result(f"/s/n{i}.txt", "skipped", reason="not-an-image") for i in range(20)]
        + [result("/s/b.svs", "skipped", reason="duplicate")]
    )
    lines = summary(report, capsys)
    # header, done, one line per skip reason, totals, then how to open the result
    assert len(lines) == 8 and lines[5] == "open it with:"
    assert lines[2].split()[:4] == ["skipped", "20", "inputs", "-"]
    assert "not-an-image: n0.txt, n1.txt" in lines[2]
    assert lines[4].startswith("1 done, 21 skipped;")
    assert lines[6] == "  napari: napari /o.zarr/a   (each image with its labels)"


def _realpath_calls(tmp_path, monkeypatch, count: int) -> dict[str, int]:
    """How often a run of ``count`` inputs resolves each input's path."""
    import numpy as np
    import tifffile

    from pipeline.config import RunConfig
    from pipeline.run import run

    folder = tmp_path / str(count)
    folder.mkdir()
    inputs = []
    for i in range(count):
        path = folder / f"in{i}.tif"
        tifffile.imwrite(path, np.full((32, 32), i, np.uint8))
        inputs.append(str(path))
    calls: dict[str, int] = {}
    realpath = os.path.realpath

    def counting(path, *args, **kwargs):
        key = os.fspath(path)
        if key in inputs:
            calls[key] = calls.get(key, 0) + 1
        return realpath(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os.path, "realpath", counting)
        report = run(inputs, folder / "out", None, RunConfig(backend="identity", scheduler="sync"))
    assert report.ok and set(calls) == set(inputs)
    return calls


def test_a_run_resolves_each_input_path_as_often_whatever_the_batch_size(tmp_path, monkeypatch):
    """Reports are rewritten after every input and name them all: resolving every
    input's real path on each rewrite made a batch of N inputs cost O(N²) lookups."""
    small = _realpath_calls(tmp_path, monkeypatch, 2)
    large = _realpath_calls(tmp_path, monkeypatch, 6)
    assert max(large.values()) == max(small.values())
