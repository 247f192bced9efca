"""A folder of slides as labs have them: good ones finish, broken ones are refused clearly.

Runs ``pipeline run FOLDER --out OUT --backend identity`` through click's CliRunner; the
identity model reproduces its input, so every good slide's output is checked pixel by pixel.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import cli, output_dirs, write_tiff

from pipeline.io.collection import read_collection

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NUCLEI = "nuclei2d/bbbc007/images"


def write_slide(path: Path, seed: int, shape=(70, 90)) -> np.ndarray:
    """A small tiled, compressed grayscale TIFF; returns its pixels."""
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    write_tiff(path, image, tile=(32, 32), compression="zlib")
    return image


def write_broken(folder: Path) -> dict[str, tuple[str, ...]]:
    """Broken inputs (RELIABILITY B1, B2, B4, B14) → words their message must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.tif").write_bytes(b"")
    (folder / "random.svs").write_bytes(np.random.default_rng(1).bytes(4096))
    (folder / "text.tif").write_text("Slide 7: re-scan, the first one was blurred\n")
    whole = folder / "whole.tif"
    write_slide(whole, 2, (256, 256))
    data = whole.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "header-only.tif").write_bytes(data[:8])
    with tifffile.TiffFile(whole) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    patched = bytearray(data)
    struct.pack_into("<H", patched, offset, 34999)
    (folder / "codec 34999.tif").write_bytes(bytes(patched))
    whole.unlink()
    (folder / "dangling.svs").symlink_to(folder / "moved-away.svs")
    (folder / "loop.tif").symlink_to(folder / "loop.tif")
    return {
        "empty.tif": ("empty",),
        "random.svs": ("TIFF",),
        "text.tif": ("TIFF",),
        "truncated.tif": ("truncated",),
        "header-only.tif": ("damaged",),
        "codec 34999.tif": ("34999",),
        "dangling.svs": ("symbolic link",),
        "loop.tif": ("symbolic link",),
    }


def report_of(out: Path) -> dict[str, dict]:
    report = json.loads((out / "report.json").read_text())
    return {os.path.basename(r["path"]): r for r in report["inputs"]}


def assert_identity(entry: dict, expected: np.ndarray, out: Path) -> None:
    """``entry`` is done (or up to date) and its output holds ``expected``."""
    state = (entry["state"], entry["reason"])
    assert state in (("done", None), ("skipped", "up-to-date")), entry["message"]
    output = Path(entry["output"])
    assert output.parent.resolve() == out.resolve() and output.name == entry["name"]
    level0 = zarr.open_array(str(output / "0"), mode="r")
    np.testing.assert_array_equal(level0[0], expected)


def test_folder_with_good_and_broken_slides(tmp_path, data_dir):
    folder = tmp_path / "slides"
    expected = {
        name: write_slide(folder / rel, seed)
        for seed, (name, rel) in enumerate([("s1.tif", "s1.tif"), ("s2.svs", "case 2/s2.svs")])
    }
    for name in sorted(os.listdir(data_dir / NUCLEI))[:2]:
        shutil.copy(data_dir / NUCLEI / name, folder / name)
        expected[name] = tifffile.imread(folder / name)
    broken = write_broken(folder / "broken")
    out = tmp_path / "out.zarr"

    result = cli("run", folder, "--out", out, "--backend", "identity")

    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    report = report_of(out)
    assert set(report) == set(expected) | set(broken)
    for name, image in expected.items():
        assert_identity(report[name], image, out)
    for name, words in broken.items():
        entry = report[name]
        assert entry["state"] == "failed", (name, entry)
        assert entry["reason"] in ("bad-input", "not-found", "unsupported-format"), entry
        assert name in entry["message"] and "Hint:" in entry["message"], entry["message"]
        assert all(w in entry["message"] for w in words), entry["message"]
        assert name in result.output
    assert report["codec 34999.tif"]["reason"] == "unsupported-format"
    assert report["dangling.svs"]["reason"] == "not-found"
    # one published group per good slide, nothing for the broken ones, no staging left
    assert output_dirs(out) == sorted(report[n]["name"] for n in expected)
    assert read_collection(out) == output_dirs(out)  # the root lists exactly those
    root_files = sorted(p.name for p in out.iterdir() if not p.is_dir())
    assert root_files == [".zattrs", ".zgroup", ".zmetadata", "index.html", "report.json"]
    previews = sorted(p.name for p in (out / "previews").iterdir())
    assert previews == sorted(f"{report[n]['name']}.png" for n in expected)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_real_world_names_get_distinct_safe_outputs_inside_out(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    names = [
        "-x.tif",
        "..x.tif",
        "a b (1).tif",
        "sub/a b (1).tif",
        "ü.tif",
        "日本.tif",
        "a.b.c.tif",
        "CON.tif",
        "report.json.tif",
        "zarr.json.tif",
        "several..dots..tif",
    ]
    expected = {n: write_slide(folder / n, seed, (40, 50)) for seed, n in enumerate(names)}
    up = "../../../up.svs"  # RELIABILITY S4: an input named through ..
    deep = folder / "sub" / "deeper"
    deep.mkdir()
    expected[up] = write_slide(tmp_path / "up.svs", 99, (40, 50))
    out = tmp_path / "out.zarr"
    before = tree(tmp_path)
    monkeypatch.chdir(deep)

    result = cli("run", up, folder, "--out", out, "--backend", "identity", "--scheduler", "sync")

    assert result.exit_code == 0, result.output
    entries = json.loads((out / "report.json").read_text())["inputs"]
    by_path = {
        e["path"] if e["path"] == up else os.path.relpath(e["path"], folder): e for e in entries
    }
    assert set(by_path) == set(expected)
    for rel, image in expected.items():
        assert_identity(by_path[rel], image, out)
    groups = [e["name"] for e in entries]
    assert len({g.lower() for g in groups}) == len(groups), groups
    assert {"report_json", "zarr_json", "CON_", "a.b.c"} <= set(groups)
    assert json.loads((out / ".zgroup").read_text())["zarr_format"] == 2  # intact
    # everything new is inside OUT
    assert {p for p in tree(tmp_path) - before if not p.startswith("out.zarr")} == set()


def test_rerun_keeps_names_and_skips_up_to_date_outputs(tmp_path):
    folder = tmp_path / "in"
    write_slide(folder / "a b.tif", 0)
    write_slide(folder / "c" / "a b.tif", 1)
    out = tmp_path / "out.zarr"
    for run, extra in enumerate([(), (), ("--force",)]):
        result = cli(
            "run", folder, "--out", out, "--backend", "identity", "--scheduler", "sync", *extra
        )
        assert result.exit_code == 0, result.output
        assert output_dirs(out) == read_collection(out) == ["c_a_b", "in_a_b"]
        states = {(e["state"], e["reason"]) for e in report_of(out).values()}
        assert states == {("skipped", "up-to-date") if run == 1 else ("done", None)}


@pytest.mark.skipif(AS_ROOT, reason="running as root: a chmod 000 file is still readable")
def test_unreadable_slide_fails_and_the_rest_go_on(tmp_path):
    folder = tmp_path / "in"
    good = write_slide(folder / "good.tif", 0)
    write_slide(folder / "locked.tif", 1)
    (folder / "locked.tif").chmod(0)
    out = tmp_path / "out.zarr"
    result = cli("run", folder, "--out", out, "--backend", "identity", "--scheduler", "sync")
    assert result.exit_code == 1
    report = report_of(out)
    assert_identity(report["good.tif"], good, out)
    locked = report["locked.tif"]
    assert locked["state"] == "failed" and "permission" in locked["message"]


def test_other_files_are_skipped_and_the_run_still_succeeds(tmp_path):
    folder = tmp_path / "in"
    good = write_slide(folder / "a.tif", 0)
    (folder / "notes.txt").write_text("scanned 2024-03-01\n")
    (folder / "a.tif.xml").write_text("<annotations/>")
    out = folder / "out.zarr"  # inside the searched folder: never an input itself
    for _ in range(2):
        result = cli("run", folder, "--out", out, "--backend", "identity", "--scheduler", "sync")
        assert result.exit_code == 0, result.output
    report = report_of(out)
    assert set(report) == {"a.tif", "notes.txt", "a.tif.xml"}
    assert_identity(report["a.tif"], good, out)
    for name in ("notes.txt", "a.tif.xml"):
        assert report[name]["state"] == "skipped" and report[name]["reason"] == "not-an-image"
    assert "notes.txt" in result.output and "not-an-image" in result.output
    assert json.loads((out / "report.json").read_text())["ok"] is True


def test_list_file_and_extensions(tmp_path):
    folder = tmp_path / "in"
    a = write_slide(folder / "a.svs", 0)
    write_slide(folder / "b.tif", 1)
    c = write_slide(tmp_path / "other" / "c.tif", 2)
    listing = tmp_path / "batch.txt"
    listing.write_text("# batch 7\nin\n\nother/c.tif\n")
    out = tmp_path / "out.zarr"
    result = cli(
        "run",
        listing,
        "--out",
        out,
        "--backend",
        "identity",
        "--scheduler",
        "sync",
        "--extensions",
        ".svs",
    )
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert_identity(report["a.svs"], a, out)
    assert_identity(report["c.tif"], c, out)  # named in the list: taken whatever its suffix
    assert report["b.tif"]["state"] == "skipped"


def test_a_folder_without_images_is_a_usage_error(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("nothing here")
    result = cli("run", tmp_path / "in", "--out", tmp_path / "o.zarr", "--backend", "identity")
    assert result.exit_code == 2
    assert "no images found (1 other files skipped)" in result.output
