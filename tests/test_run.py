"""End to end through `pipeline run` (CLI and library) on real files and a real Dask cluster."""

from __future__ import annotations

import gc
import json
import shutil
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from conftest import cli, ngff_images, output_dirs

from pipeline.config import RunConfig
from pipeline.run import run

SVS = "wsi/CMU-1-Small-Region.svs"


def test_identity_run_on_svs_is_pixel_exact_and_valid_ngff(data_dir, tmp_path):
    out = tmp_path / "out.zarr"
    result = cli(
        "run",
        data_dir / SVS,
        "--out",
        out,
        "--backend",
        "identity",
        "--workers",
        "2",
        "--chunk",
        "512",
        "--block",
        "1024",
        "--no-skip-background",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["inputs"][0]["state"] == "done"
    name = report["inputs"][0]["name"]
    assert name == "CMU-1-Small-Region"
    level0 = zarr.open_array(str(out / name / "0"), mode="r")
    expected = tifffile.imread(data_dir / SVS)  # (y, x, 3)
    assert level0.shape == (3, 2967, 2220)
    np.testing.assert_array_equal(np.moveaxis(level0[:], 0, -1), expected)

    node = ngff_images(out)[name]
    shapes = [tuple(d.shape) for d in node.data]
    assert shapes[0] == (3, 2967, 2220) and shapes[1] == (3, 1483, 1110)
    assert max(shapes[-1][1:]) <= 256
    ms = node.metadata
    scales = [t[0]["scale"] for t in ms["coordinateTransformations"]]
    assert scales[0] == pytest.approx([1.0, 0.499, 0.499])
    assert scales[1] == pytest.approx([1.0, 0.998, 0.998])
    attrs = zarr.open_group(str(out / name), mode="r").attrs.asdict()
    prov = attrs["pipeline"]
    assert prov["backend"] == "identity" and prov["blend"] and prov["tile"]
    assert prov["config"]["chunk"] == 512


def test_background_chunks_are_not_stored(tmp_path):
    image = np.zeros((300, 300), np.uint8)
    image[:100, :100] = 200
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, image, tile=(128, 128))
    out = tmp_path / "o.zarr"
    report = run(
        [str(path)],
        out,
        None,
        RunConfig(backend="identity", chunk=100, block=100, scheduler="sync"),
    )
    assert report.ok
    chunk_files = [
        p
        for p in (out / "sparse" / "0").rglob("*")
        if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs")
    ]
    assert len(chunk_files) == 1  # only the chunk with signal, of 9
    arr = zarr.open_array(str(out / "sparse" / "0"), mode="r")
    np.testing.assert_array_equal(arr[0], image)


def test_a_run_keeps_long_lived_objects_out_of_the_cycle_collector(tmp_path):
    """While a run works, the objects that existed before it are frozen (the cycle
    collector does not walk them); when it ends they are collectable again, so a
    reference cycle that was garbage before the run is still freed."""

    class Node:
        pass

    cycle = Node()
    cycle.me = cycle
    gone = weakref.ref(cycle)
    del cycle  # garbage held only by its own cycle
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, np.arange(256 * 256, dtype=np.uint16).reshape(256, 256))
    during = []
    tracked = len(gc.get_objects())
    report = run(
        [str(path)],
        tmp_path / "o.zarr",
        None,
        RunConfig(backend="identity", block=128, chunk=128, scheduler="sync"),
        progress=lambda name, done, total: during.append(gc.get_freeze_count()),
    )
    assert report.ok and during
    assert min(during) > 0.9 * tracked  # what existed before (less what died since)
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None


def test_one_vs_two_workers_identical(data_dir, tmp_path, valid_model):
    image = data_dir / "isbi2012" / "train-volume.tif"
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.zarr"
        report = run(
            [str(image)],
            out,
            valid_model,
            RunConfig(workers=workers, chunk=256, block=256, dtype="float32"),
        )
        assert report.ok, report.inputs[0].message
        outs.append(zarr.open_array(str(out / "train-volume" / "0"), mode="r")[:])
    assert outs[0].shape[1:] == (30, 512, 512)
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.fixture(scope="module")
def valid_model(tmp_path_factory):
    from pipeline.model.export import export_model

    path = tmp_path_factory.mktemp("m") / "valid2d.onnx"
    export_model(path, in_channels=1, classes=2, base=4, depth=2, padding="valid")
    return str(path)


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    from pipeline.model.export import export_model

    path = tmp_path_factory.mktemp("m") / "same_rgb.onnx"
    export_model(path, in_channels=3, classes=1, base=4, depth=3, padding="same")
    return str(path)


def bad_files(folder: Path) -> dict[str, Path]:
    files = {
        "empty": folder / "empty.tif",
        "random": folder / "random.svs",
        "text": folder / "notes.tif",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["text"].write_text("this is not an image\n")
    return files


@pytest.mark.parametrize("kind", ["empty", "random", "text"])
def test_bad_input_refused_clearly_and_others_go_on(tmp_path, kind, data_dir):
    bad = bad_files(tmp_path)[kind]
    good = tmp_path / "good.tif"
    shutil.copy(
        data_dir
        / "nuclei2d"
        / "bbbc007"
        / "images"
        / sorted(p.name for p in (data_dir / "nuclei2d" / "bbbc007" / "images").iterdir())[0],
        good,
    )
    out = tmp_path / "out.zarr"
    result = cli("run", bad, good, "--out", out, "--backend", "identity", "--scheduler", "sync")
    assert result.exit_code == 1
    assert bad.name in result.output
    report = json.loads((out / "report.json").read_text())
    states = {Path(r["path"]).name: r for r in report["inputs"]}
    assert states[good.name]["state"] == "done"
    assert states[bad.name]["state"] == "failed" and states[bad.name]["reason"] != "internal-error"
    assert bad.name in states[bad.name]["message"]
    # nothing that looks like an output image for the bad file (no staging left either)
    assert output_dirs(out) == ["good"]


def test_model_file_that_is_not_a_model(tmp_path, data_dir):
    model = tmp_path / "model.onnx"
    model.write_text("not a model")
    result = cli("run", data_dir / SVS, "--out", tmp_path / "o.zarr", "--model", model)
    assert result.exit_code == 2
    assert "model.onnx" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.zarr").exists()  # exit 2: nothing was made


def test_rgb_image_given_to_one_channel_model(tmp_path, data_dir, valid_model):
    out = tmp_path / "o.zarr"
    result = cli("run", data_dir / SVS, "--out", out, "--model", valid_model, "--scheduler", "sync")
    assert result.exit_code == 1
    assert "got 3 channels, model expects 1" in result.output
    assert "CMU-1-Small-Region.svs" in result.output
    assert not output_dirs(out)


def test_tile_the_model_cannot_take(tmp_path, data_dir, rgb_model):
    """A usage error (exit 2) found before any work: no input ran and OUT was not made."""
    out = tmp_path / "o.zarr"
    result = cli("run", data_dir / SVS, "--out", out, "--model", rgb_model, "--tile", "100")
    assert result.exit_code == 2, result.output
    assert "tile 100" in result.output and "96" in result.output and "104" in result.output
    assert not out.exists()


def test_usage_errors_leave_an_existing_output_as_it_was(tmp_path, data_dir, rgb_model):
    out = tmp_path / "o.zarr"
    good = cli("run", data_dir / SVS, "--out", out, "--backend", "identity", "--level", "0")
    assert good.exit_code == 0, good.output
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for args in (
        ("--model", rgb_model, "--tile", "100"),  # a tile the model cannot take
        ("--model", rgb_model, "--overlap", "1000"),  # an overlap larger than the tile
        ("--model", tmp_path / "missing.onnx"),  # no model file
        ("--backend", "identity", "--ngff", "0.5"),  # OUT holds NGFF 0.4 images
    ):
        result = cli("run", data_dir / SVS, "--out", out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before, args
    assert "--ngff 0.4" in result.output and "NGFF 0.4" in result.output


def test_unknown_config_key_and_python_tag_refused(tmp_path, data_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tile: 256\nbogus: 1\n")
    args = ("run", data_dir / SVS, "--out", tmp_path / "o.zarr", "--backend", "identity")
    result = cli(*args, "--config", cfg)
    assert result.exit_code == 2 and "bogus" in result.output
    marker = tmp_path / "pwned"
    cfg.write_text(f"tile: !!python/object/apply:os.system ['touch {marker}']\n")
    result = cli(*args, "--config", cfg)
    assert result.exit_code == 2 and not marker.exists()


def test_local_cluster_listens_on_loopback_only():
    import psutil

    from pipeline.cluster.clients import dask_client

    with dask_client(RunConfig(workers=1)) as client:
        assert client is not None
        procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
        addrs = [
            c.laddr.ip
            for p in procs
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
    assert addrs and all(ip in ("127.0.0.1", "::1") for ip in addrs), addrs


def _imported(names: tuple[str, ...]) -> list[str]:
    import sys

    return [n for n in names if n in sys.modules]


def test_local_workers_import_what_blocks_need_before_their_first_task():
    """A fresh worker imports the stages and the model's runtime in the background from
    its start (1-2 s on this machine), while the driver plans: no task asks for them."""
    from pipeline.cluster.clients import dask_client

    wanted = ("pipeline.batch.tasks", "onnxruntime", "torch")
    with dask_client(RunConfig(workers=1), warm=wanted) as client:
        deadline = time.monotonic() + 60
        while True:
            (imported,) = client.run(_imported, wanted).values()
            if len(imported) == len(wanted) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert imported == list(wanted)
    with dask_client(RunConfig(workers=1)) as client:  # nothing asked: nothing imported
        (imported,) = client.run(_imported, ("onnxruntime", "torch")).values()
        assert imported == []


def _tornado_level() -> int:
    import logging

    return logging.getLogger("tornado.application").getEffectiveLevel()


def test_local_workers_keep_tornado_tracebacks_off_the_terminal():
    """A callback failing while a worker closes (Ctrl-C) made tornado print a traceback
    to the shared terminal; workers now log tornado only at CRITICAL, as the driver does."""
    import logging

    from pipeline.cluster.clients import dask_client

    with dask_client(RunConfig(workers=1)) as client:
        assert list(client.run(_tornado_level).values()) == [logging.CRITICAL]
        assert _tornado_level() == logging.CRITICAL


def test_tissue_skipping_changes_nothing_inside_tissue(data_dir, tmp_path):
    """The real slide with and without skipping: identical wherever there is tissue, zero
    elsewhere, fewer tiles run, no stored chunk wholly outside tissue, NGFF labels beside."""
    runs = {}
    for skip in (False, True):
        out = tmp_path / f"skip{skip}.zarr"
        report = run(
            [str(data_dir / SVS)],
            out,
            None,
            RunConfig(
                backend="identity", skip_background=skip, chunk=256, block=512, scheduler="sync"
            ),
        )
        assert report.ok, report.inputs[0].message
        runs[skip] = (report.inputs[0], zarr.open_array(str(out / "CMU-1-Small-Region" / "0"))[:])
    (plain, full), (skipped, masked) = runs[False], runs[True]
    assert 0.2 < skipped.tissue_fraction < 0.95
    assert skipped.skipped_tiles > 0 and skipped.tiles + skipped.skipped_tiles == plain.tiles
    from pipeline.core.geometry import Region
    from pipeline.engine.tissue import detect_tissue
    from pipeline.io.sources import open_image

    tissue = detect_tissue(open_image(data_dir / SVS), full.shape[1:])
    inside = tissue.upsample(Region.of_shape(full.shape[1:]))
    np.testing.assert_array_equal(masked[:, inside], full[:, inside])
    assert not masked[:, ~inside].any()
    chunk_dir = tmp_path / "skipTrue.zarr" / "CMU-1-Small-Region" / "0" / "c"
    stored = {
        tuple(int(v) for v in p.relative_to(chunk_dir).parts[1:])
        for p in chunk_dir.rglob("*")
        if p.is_file()
    }
    for cy, cx in stored:
        assert inside[cy * 256 : (cy + 1) * 256, cx * 256 : (cx + 1) * 256].any()
    assert len(stored) < full.shape[1] // 256 * (full.shape[2] // 256)
    labels = ngff_images(tmp_path / "skipTrue.zarr")
    assert labels  # the image still validates with the labels group beside it
    assert (tmp_path / "skipTrue.zarr" / "CMU-1-Small-Region" / "labels" / "tissue").is_dir()
