"""The run page OUT/index.html: parsed, then rendered in a real headless browser (chromium)."""

from __future__ import annotations

import html
import os
import shutil
import subprocess
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import imagecodecs
import numpy as np
import pytest

from pipeline.core.report import InputResult, RunReport
from pipeline.outputs.page import render_index, write_index
from pipeline.outputs.preview import MAX_SIDE, PALETTE, compose_preview, write_png

BAD_NAME = "bad <slide> & \"co\" '1'.svs"
BAD_REASON = "corrupt-input"
BAD_MESSAGE = '/data/bad <slide> & "co".svs: is damaged: tile 7 <missing> — Hint: re-export ✓ µm'
UNICODE_NAME = "Schnitt µ-Ärzte 2 (δ).tif"
NOW = datetime(2025, 6, 1, 12, 30, tzinfo=timezone.utc)
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "wbr", "area", "base"}


def synthetic_preview(path: Path, seed: int) -> np.ndarray:
    """A preview made by preview.py: a pinkish tissue-like thumbnail with blobs over it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:600, 0:900]
    thumb = np.empty((600, 900, 3), np.uint8)
    thumb[:] = (236, 226, 236)
    tissue = (yy - 300) ** 2 / 250**2 + (xx - 450) ** 2 / 380**2 < 1
    thumb[tissue] = (200, 120, 180)
    thumb[tissue & (rng.random((600, 900)) < 0.05)] = (110, 60, 140)
    labels = np.zeros((300, 450), np.uint8)
    for _ in range(12):
        cy, cx, r = rng.integers(60, 240), rng.integers(80, 370), rng.integers(12, 35)
        labels[(yy[::2, ::2] / 2 - cy) ** 2 + (xx[::2, ::2] / 2 - cx) ** 2 < r**2] = 1
    labels[140:170, 300:380] = 2
    rgb = compose_preview(thumb, labels)
    write_png(path, rgb)
    return rgb


def finished(file: str, output: Path, shape: list[int], **figures) -> InputResult:
    """The report entry of an input that ran to the end; its pixels from its shape."""
    name = UNICODE_NAME if file == UNICODE_NAME else Path(file).stem
    return InputResult(
        path=f"/data/{file}",
        name=name,
        state="done",
        output=str(output),
        shape=shape,
        pixels=shape[1] * shape[2],
        **figures,
    )


@pytest.fixture
def run_output(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "run out.zarr"  # a space: previews are linked by quoted URLs
    synthetic_preview(out / "previews" / "slide-one.png", 1)
    synthetic_preview(out / "previews" / "Schnitt_2.png", 2)
    report = RunReport(
        inputs=[
            finished(
                "slide-one.svs",
                out / "slide-one",
                [1, 2967, 2220],
                tiles=42,
                blocks=4,
                seconds=12.5,
                skipped_tiles=18,
                tissue_fraction=0.61,
            ),
            finished(
                UNICODE_NAME, out / "Schnitt_2", [2, 1024, 1536], tiles=6, blocks=1, seconds=75.0
            ),
            InputResult(
                path=f"/data/{BAD_NAME}",
                name=BAD_NAME,
                state="failed",
                reason=BAD_REASON,
                message=BAD_MESSAGE,
            ),
            InputResult(
                path="/data/notes.txt",
                name="notes",
                state="skipped",
                reason="not-an-image",
                message="/data/notes.txt: not an image suffix",
            ),
        ],
        seconds=90.0,
        model={"path": "/models/unet.pt", "sha256": "ab" * 32, "classes": 2},
        config={"tile": [512, 512], "overlap": 32},
    ).to_dict()
    report["inputs"][0]["preview"] = "previews/slide-one.png"
    # absolute and inside the output root: linked relative to it
    report["inputs"][1]["preview"] = str(out / "previews" / "Schnitt_2.png")
    report["inputs"][1]["history"] = [{"run": 1}]  # fields the page does not know are ignored
    return out, report


class _Page(HTMLParser):
    """What a test needs from a page: images, texts by class, and tag balance."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict] = []
        self.texts: dict[str, list[str]] = {}
        self.cards: list[dict] = []
        self.stack: list[tuple[str, str | None]] = []
        self.errors: list[str] = []
        self.doctype = False

    def handle_decl(self, decl: str) -> None:
        self.doctype |= decl.lower() == "doctype html"

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "article":
            self.cards.append(a)
        if tag not in VOID:
            self.stack.append((tag, a.get("class")))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        for cls in {c for _, k in self.stack if k for c in k.split()}:
            self.texts.setdefault(cls, []).append(data)

    def text(self, cls: str) -> list[str]:
        return [t.strip() for t in self.texts.get(cls, []) if t.strip()]


def parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_page_lists_every_input_with_existing_previews(run_output: tuple[Path, dict]) -> None:
    out, report = run_output
    index = write_index(out, report, now=NOW)
    assert index == out / "index.html"
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary
    text = index.read_text(encoding="utf-8")
    page = parse(text)
    assert page.doctype and not page.errors and not page.stack
    assert '<meta charset="utf-8">' in text and '<html lang="en">' in text
    assert page.text("name") == ["slide-one", UNICODE_NAME, BAD_NAME, "notes"]
    assert [c["data-state"] for c in page.cards] == ["done", "done", "failed", "skipped"]
    assert len(page.images) == 2
    for img in page.images:
        assert "://" not in img["src"] and not img["src"].startswith("/")
        png = out / unquote(img["src"])
        assert png.is_file(), img["src"]
        image = imagecodecs.png_decode(png.read_bytes())
        assert max(image.shape[:2]) <= MAX_SIDE and np.ptp(image) > 0
    # the failed input's reason and message, escaped in the source and intact when parsed
    assert html.escape(BAD_MESSAGE) in text and BAD_MESSAGE not in text
    assert html.escape(BAD_NAME) in text and BAD_NAME not in text
    assert page.text("message") == [BAD_MESSAGE, "/data/notes.txt: not an image suffix"]
    assert f"<code>{BAD_REASON}</code>" in text
    # totals from the report
    assert "2 done" in text and "1 failed" in text and "1 skipped" in text
    assert "unet.pt" in text and "2025-06-01" in text
    # offline: nothing is fetched from elsewhere
    assert "http://" not in text and "https://" not in text and "@import" not in text
    assert "<script src" not in text and "<link" not in text


def test_page_tolerates_a_sparse_report(tmp_path: Path) -> None:
    report = {"inputs": [{"path": "/x/a.tif", "state": "done"}, {"name": "b", "state": "odd"}]}
    page = parse(render_index(report, out_root=tmp_path, now=NOW))
    assert not page.errors and page.text("name") == ["a.tif", "b"]
    assert [c["data-state"] for c in page.cards] == ["done", "odd"]
    assert "no preview" in page.text("thumb")
    assert not parse(render_index({}, now=NOW)).errors


# --- in a real browser ----------------------------------------------------------------


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI installs it (.ci/run) to test the run page")
    pytest.skip("chromium is not installed (apt-get install chromium) to render the run page")


def render(page: Path, tmp_path: Path, *args: str) -> str:
    """Run headless chromium on ``page``; virtual time lets images load and onerror run."""
    profile = tmp_path / "chromium-profile"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_browser_renders_every_input_and_loads_every_image(
    run_output: tuple[Path, dict], tmp_path: Path
) -> None:
    out, report = run_output
    dom = parse(render(write_index(out, report, now=NOW), tmp_path, "--dump-dom"))
    assert dom.text("name") == ["slide-one", UNICODE_NAME, BAD_NAME, "notes"]
    assert BAD_MESSAGE in dom.text("message")
    assert len(dom.images) == 2
    assert [i.get("data-loaded") for i in dom.images] == ["1", "1"]
    assert not [i for i in dom.images if "broken" in (i.get("class") or "") or "data-broken" in i]


def test_browser_marks_a_missing_preview_broken(
    run_output: tuple[Path, dict], tmp_path: Path
) -> None:
    out, report = run_output
    (out / "previews" / "slide-one.png").unlink()  # the check above can fail
    dom = parse(render(write_index(out, report, now=NOW), tmp_path, "--dump-dom"))
    broken = [i["src"] for i in dom.images if i.get("data-broken") == "1"]
    assert broken == ["previews/slide-one.png"]
    assert [i.get("data-loaded") for i in dom.images] == [None, "1"]
    assert "broken" in dom.images[0]["class"]


def test_browser_screenshot_shows_the_page_and_its_previews(
    run_output: tuple[Path, dict], tmp_path: Path
) -> None:
    out, report = run_output
    shot = tmp_path / "page.png"
    render(
        write_index(out, report, now=NOW),
        tmp_path,
        f"--screenshot={shot}",
        "--window-size=1280,900",
    )
    image = imagecodecs.png_decode(shot.read_bytes())[..., :3].astype(int)
    assert image.shape[:2] == (900, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 100, "the screenshot is blank"
    # the previews were drawn: their class-1 fill over the tissue colour is on screen
    fill = np.rint(0.6 * np.array([200, 120, 180]) + 0.4 * np.array(PALETTE[0]))
    near = np.abs(image - fill).max(axis=2) <= 6
    assert near.sum() > 500, "no preview pixels in the screenshot"
