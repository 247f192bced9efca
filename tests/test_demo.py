"""``pipeline demo``: synthetic slides, a few seconds of training, one full run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from pipeline.demo import dice, run_demo, synthetic_slide, write_slide

SIZE = 512


def test_synthetic_slide_is_deterministic_and_nuclei_are_dark() -> None:
    image, mask = synthetic_slide(256, np.random.default_rng(7))
    again, mask2 = synthetic_slide(256, np.random.default_rng(7))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert mask.shape == (256, 256) and mask.dtype == bool
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, mask2)
    assert 0.03 < mask.mean() < 0.4
    gray = image.mean(axis=2)
    # the oracle the network has to learn: nuclei are much darker than the background
    assert gray[mask].mean() < gray[~mask].mean() - 60
    assert image[~mask].mean(axis=0)[1] < image[~mask].mean(axis=0)[0]  # pink, not grey


def test_write_slide_is_a_tiled_pyramid_with_pixel_size(tmp_path: Path) -> None:
    image, _ = synthetic_slide(600, np.random.default_rng(1))
    path = tmp_path / "s.ome.tif"
    write_slide(path, image, compression="zlib")
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert [level.shape[:2] for level in series.levels] == [(600, 600), (300, 300), (150, 150)]
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
        np.testing.assert_array_equal(series.asarray(), image)  # zlib is lossless


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, list[str]]:
    folder = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(folder, train_seconds=5, size=SIZE, n_slides=2, echo=lines.append)
    return result, folder, lines


def test_demo_writes_slides_model_and_masks(demo: tuple[dict, Path, list[str]]) -> None:
    result, folder, lines = demo
    assert [p.name for p in result["slides"]] == ["slide-1.ome.tif", "slide-2.ome.tif"]
    for path in result["slides"]:
        assert path.parent == folder / "slides"
        assert tifffile.imread(path).shape == (SIZE, SIZE, 3)
    assert result["model"] == folder / "unet.onnx" and result["model"].stat().st_size > 0
    assert result["out"] == folder / "masks.zarr"
    report = result["report"]
    assert report.ok and [r.state for r in report.inputs] == ["done", "done"]
    saved = json.loads((folder / "masks.zarr" / "report.json").read_text())
    assert saved["ok"] and len(saved["inputs"]) == 2
    for name in ("slide-1", "slide-2"):
        group = zarr.open_group(str(folder / "masks.zarr" / name), mode="r")
        attrs = group.attrs.asdict()
        multiscales = attrs.get("ome", attrs)["multiscales"]  # NGFF 0.5 or 0.4
        assert multiscales[0]["datasets"][0]["path"] == "0"
        assert group["0"].shape == (1, SIZE, SIZE)
    assert any(str(folder / "masks.zarr") in line for line in lines)


def test_demo_masks_match_the_ground_truth(demo: tuple[dict, Path, list[str]]) -> None:
    result, folder, _ = demo
    assert result["dice"] > 0.5  # held-out image, in memory
    for name in ("slide-1", "slide-2"):
        truth = tifffile.imread(folder / "truth" / f"{name}.tif") > 0
        prob = zarr.open_array(str(folder / "masks.zarr" / name / "0"), mode="r")[0]
        # 5 s of training learns "dark purple = nucleus"; the bar is far above chance
        assert dice(prob > 127, truth) > 0.5, name


def test_cli_demo_passes_folder_seconds_and_echo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from pipeline import demo as demo_module
    from pipeline.cli import main

    calls: list[tuple] = []

    def fake(folder, *, train_seconds, echo):
        calls.append((folder, train_seconds))
        echo("hello from the demo")

    monkeypatch.setattr(demo_module, "run_demo", fake)
    result = CliRunner().invoke(main, ["demo", "--folder", str(tmp_path), "--seconds", "2.5"])
    assert result.exit_code == 0, result.output
    assert calls == [(str(tmp_path), 2.5)]
    assert "hello from the demo" in result.output
