"""After a real run: a preview per done input, named in report.json, and the run page
OUT/index.html listing every input, rendered in a real headless browser (chromium)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import unquote, urlparse

import imagecodecs
import numpy as np
import pytest
from conftest import cli, write_tiff
from test_page import parse, render

from pipeline.outputs.preview import MAX_SIDE

SVS = Path("wsi/CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory) -> tuple[Path, dict, str]:
    """A real slide, a synthetic one and a broken file, run with the identity backend."""
    folder = tmp_path_factory.mktemp("slides")
    (folder / "real.svs").symlink_to(data_dir / SVS)
    rng = np.random.default_rng(0)
    image = np.full((600, 500, 3), 240, np.uint8)
    yy, xx = np.mgrid[:600, :500]
    blob = (yy - 300) ** 2 / 200**2 + (xx - 250) ** 2 / 150**2 < 1
    image[blob] = (150, 60, 200) + rng.integers(-20, 20, (int(blob.sum()), 3))
    write_tiff(folder / "synthetic.tif", image, tile=(128, 128), um=0.5, photometric="rgb")
    (folder / "broken.tif").write_bytes(b"II*\x00 this is no TIFF")
    out = tmp_path_factory.mktemp("out") / "run out.zarr"  # a space: links are quoted URLs
    result = cli("run", folder, "--out", out, "--backend", "identity", "--scheduler", "sync")
    assert result.exit_code == 1, result.output  # the broken file fails, the others ran
    report = json.loads((out / "report.json").read_text())
    return out, {e["name"]: e for e in report["inputs"]}, result.output


def test_report_names_a_valid_nonblank_preview_for_each_done_input(run):
    out, entries, _ = run
    assert {n: e["state"] for n, e in entries.items()} == {
        "real": "done",
        "synthetic": "done",
        "broken": "failed",
    }
    for name in ("real", "synthetic"):
        assert entries[name]["preview"] == f"previews/{name}.png"
        png = imagecodecs.png_decode((out / entries[name]["preview"]).read_bytes())
        assert png.ndim == 3 and max(png.shape[:2]) <= MAX_SIDE and min(png.shape[:2]) > 100
        assert png.std() > 10 and len(np.unique(png.reshape(-1, png.shape[2]), axis=0)) > 50
    # the synthetic slide's preview keeps its proportions (600 x 500)
    png = imagecodecs.png_decode((out / "previews/synthetic.png").read_bytes())
    assert png.shape[0] * 500 == png.shape[1] * 600
    assert entries["broken"]["preview"] is None
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["real.png", "synthetic.png"]


def test_index_lists_every_input_with_states_reasons_and_existing_images(run):
    out, entries, _ = run
    page = parse((out / "index.html").read_text(encoding="utf-8"))
    assert not page.errors
    assert sorted(page.text("name")) == ["broken", "real", "synthetic"]
    states = {c["id"]: c["data-state"] for c in page.cards}
    assert sorted(states.values()) == ["done", "done", "failed"]
    assert entries["broken"]["message"] in page.text("message")
    assert entries["broken"]["reason"] in " ".join(page.texts.get("why", []))
    assert len(page.images) == 2
    for img in page.images:
        assert (out / unquote(img["src"])).is_file(), img["src"]
    shown = " ".join(page.texts.get("body", []))  # timings and tissue fractions
    for name in ("real", "synthetic"):
        assert f"{100 * entries[name]['tissue_fraction']:.0f} %" in shown
        assert f"{entries[name]['seconds']:.1f} s" in shown


def test_the_browser_renders_the_page_and_loads_every_preview(run, tmp_path):
    out, _, _ = run
    dom = parse(render(out / "index.html", tmp_path, "--dump-dom"))
    assert sorted(dom.text("name")) == ["broken", "real", "synthetic"]
    assert [i.get("data-loaded") for i in dom.images] == ["1", "1"]
    assert not [i for i in dom.images if i.get("data-broken")]


def test_the_end_of_the_run_says_how_to_open_the_result(run):
    out, _, text = run
    lines = text[text.index("open it with:") :].splitlines()[1:]
    napari = shlex.split(next(x for x in lines if "napari" in x).split(": ", 1)[1])
    assert napari[0] == "napari" and Path(napari[1]).is_dir() and Path(napari[1]).parent == out
    assert any("QuPath" in x and str(out) in x for x in lines)
    browser = next(x for x in lines if x.strip().startswith("browser:"))
    page = Path(unquote(urlparse(browser.split(": ", 1)[1].strip()).path))
    assert page == (out / "index.html").resolve() and page.is_file()
