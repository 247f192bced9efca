"""Finding inputs (files, list files, folders) and naming their outputs."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.io.discover import find_inputs
from pipeline.io.sink import sanitize_name, unique_names

SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def zarr_folder(path: Path) -> Path:
    touch(path / "zarr.json", "{}")
    touch(path / "0" / "c" / "0" / "0")
    return path


def by_reason(found) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in found.results:
        out.setdefault(r.reason, set()).add(os.path.basename(r.path))
    return out


def test_folder_search_is_recursive_sorted_and_notes_what_it_leaves(tmp_path):
    root = tmp_path / "slides"
    for rel in [
        "b.svs",
        "a/c.TIF",
        "a/z/d.ndpi",
        "..x.tif",
        "notes.txt",
        "a/readme.md",
        ".DS_Store",
        ".git/e.tif",
        "._b.svs",
    ]:
        touch(root / rel)
    zarr_folder(root / "e.ome.zarr")
    found = find_inputs([root])
    assert found.paths == [
        str(root / p) for p in ["..x.tif", "a/c.TIF", "a/z/d.ndpi", "b.svs", "e.ome.zarr"]
    ]
    assert by_reason(found) == {"not-an-image": {"notes.txt", "readme.md", "._b.svs"}}
    for r in found.results:
        assert r.state == "skipped" and r.message.startswith(r.path) and "Hint" in r.message
    assert "--extensions" in next(r.message for r in found.results if r.path.endswith(".txt"))


def test_extensions_choose_what_a_search_takes_not_what_is_named(tmp_path):
    for name in ["a.svs", "b.tif", "c.png"]:
        touch(tmp_path / name)
    zarr_folder(tmp_path / "d.zarr")
    found = find_inputs([tmp_path, tmp_path / "c.png"], extensions=(".SVS",))
    assert found.paths == [str(tmp_path / "a.svs"), str(tmp_path / "c.png")]
    assert by_reason(found) == {"not-an-image": {"b.tif", "d.zarr"}}  # a Zarr is not entered


def test_list_file_comments_relative_paths_and_folders(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    touch(tmp_path / "s" / "a b (1).svs")
    touch(tmp_path / "s" / "deep" / "c.tif")
    absolute = touch(tmp_path / "elsewhere" / "d.tif")
    touch(lists / "inner.txt", "ignored")
    touch(
        lists / "batch.TXT",
        "\ufeff# slides for batch 7\n\n  ../s/a b (1).svs  \n"
        f"{absolute}\n../s/deep\n   # indented comment\n../missing.svs\ninner.txt\n",
    )
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative entries follow the list, not the cwd
    found = find_inputs([lists / "batch.TXT"])
    assert [os.path.normpath(p) for p in found.paths] == [
        str(tmp_path / "s" / "a b (1).svs"),
        str(absolute),
        str(tmp_path / "s" / "deep" / "c.tif"),
    ]
    assert by_reason(found) == {"not-an-image": {"inner.txt"}, "not-found": {"missing.svs"}}
    missing = next(r for r in found.results if r.reason == "not-found")
    assert (
        missing.state == "failed" and f"listed in {lists / 'batch.TXT'} line 7" in missing.message
    )


@pytest.mark.parametrize(
    "case, problem",
    [("missing", "does not exist"), ("binary", "not UTF-8"), ("unreadable", "cannot read")],
)
def test_a_list_that_cannot_be_read_is_a_usage_error(tmp_path, case, problem):
    path = tmp_path / "inputs.list"
    if case == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif case == "unreadable":
        if AS_ROOT:
            pytest.skip("running as root: a chmod 000 file is still readable")
        path.write_text("a.tif\n")
        path.chmod(0)
    with pytest.raises(InputError, match=problem) as err:
        find_inputs([path])
    assert str(path) in str(err.value)


def test_each_real_file_runs_once(tmp_path):
    a = touch(tmp_path / "s" / "a.tif")
    (tmp_path / "s" / "link.tif").symlink_to(a)
    found = find_inputs([tmp_path / "s", a, tmp_path / "s"])
    assert found.paths == [str(a)]
    assert by_reason(found) == {"duplicate": {"a.tif", "link.tif"}}
    assert all(str(a) in r.message for r in found.results)


def test_linked_folders_are_followed_once_and_loops_end(tmp_path):
    touch(tmp_path / "store" / "x.svs")
    root = tmp_path / "slides"
    touch(root / "y.svs")
    (root / "linked").symlink_to(tmp_path / "store")
    (root / "loop").symlink_to(root)
    (tmp_path / "store" / "back").symlink_to(root)
    found = find_inputs([root])
    assert found.paths == [str(root / "linked" / "x.svs"), str(root / "y.svs")]
    assert found.results == []


def test_broken_links_with_image_suffixes_are_run_and_fail_there(tmp_path):
    (tmp_path / "dangling.svs").symlink_to(tmp_path / "gone.svs")
    (tmp_path / "loop.tif").symlink_to(tmp_path / "loop.tif")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    found = find_inputs([tmp_path])
    assert found.paths == [str(tmp_path / "dangling.svs"), str(tmp_path / "loop.tif")]
    assert by_reason(found) == {"not-an-image": {"dangling.txt"}}


def test_the_output_root_is_never_an_input(tmp_path):
    touch(tmp_path / "a.tif")
    out = zarr_folder(tmp_path / "out.zarr")
    touch(out / "a" / "b.tif")
    found = find_inputs([tmp_path], exclude=[out])
    assert found.paths == [str(tmp_path / "a.tif")] and found.results == []


@pytest.mark.skipif(AS_ROOT, reason="running as root: a chmod 000 folder is still readable")
def test_a_folder_that_cannot_be_listed_fails(tmp_path):
    touch(tmp_path / "ok.svs")
    locked = tmp_path / "locked"
    touch(locked / "hidden.svs")
    locked.chmod(0)
    try:
        found = find_inputs([tmp_path])
    finally:
        locked.chmod(0o755)
    assert found.paths == [str(tmp_path / "ok.svs")]
    [r] = found.results
    assert (r.state, r.reason) == ("failed", "unreadable-folder") and str(locked) in r.message


@pytest.mark.parametrize(
    "path, name",
    [
        ("-x.svs", "x"),
        ("a b (1).tif", "a_b_1"),
        ("ü.tif", "u"),
        ("a.b.c.tif", "a.b.c"),
        ("..x.tif", "x"),
        ("../../x.svs", "x"),
        ("x.ome.tiff", "x"),
        ("dir/slide.ome.zarr/", "slide"),
        ("CON.tif", "CON_"),
        ("lpt1.b.tif", "lpt1_.b"),
        ("report.json.tif", "report_json"),
        ("zarr.json.tif", "zarr_json"),
        ("a\\b.tif", "a_b"),
        ("__x__.tif", "x"),
        ("...tif", "image"),
        ("x\n\x1b[31m.svs", "x_31m"),
    ],
)
def test_sanitize_name(path, name):
    assert sanitize_name(path) == name


def test_names_without_ascii_stay_apart():
    a, b = sanitize_name("日本.tif"), sanitize_name("中文.tif")
    assert a != b and a.startswith("image-") and SAFE.fullmatch(a)


def test_any_name_is_one_safe_entry_inside_the_root(tmp_path):
    rnd = random.Random(0)
    alphabet = "aZ09 ._-/\\()[]{}~$#%&!'\"`ü日\u0301\x00\n\t:*?<>|" + "." * 6
    for _ in range(2000):
        name = sanitize_name("".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 12))))
        assert SAFE.fullmatch(name) and not name.endswith(".") and len(name) <= 120, name
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_unique_names_tell_clashes_apart_by_folder_then_number():
    paths = [
        "case1/HE.svs",
        "case2/HE.svs",
        "x.tif",
        "x.tiff",
        "a/b/c.tif",
        "d/b/c.tif",
        "X-2.tif",
        "ü.tif",
        "u.tif",
    ]
    names = unique_names(paths)
    assert names == ["case1_HE", "case2_HE", "x", "x-2", "a_b_c", "d_b_c", "X-2-2", "u", "u-2"]
    assert len({n.lower() for n in names}) == len(names)
    assert unique_names(paths) == names  # the same inputs, the same names
