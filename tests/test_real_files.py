"""Every file in ../shared/data through `pipeline run`, validated with the ome-zarr reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from conftest import cli, ngff_images

from pipeline.config import RunConfig
from pipeline.run import run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch

    from pipeline.model.export import export_model

    torch.manual_seed(0)  # a random tiny net can be constant (dead ReLUs); fix the draw
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, kw in {
        "rgb": dict(in_channels=3, classes=2, ndim=2),
        "gray": dict(in_channels=1, classes=1, ndim=2),
        "gray3d": dict(in_channels=1, classes=1, ndim=3),
    }.items():
        paths[name] = str(folder / f"{name}.onnx")
        export_model(paths[name], base=4, depth=2, padding="same", **kw)
    return paths


CASES = [
    # file, model, tile, expected level-0 shape (c, ...), expected scale of level 0
    ("wsi/CMU-1-Small-Region.svs", "rgb", None, (2, 2967, 2220), [1, 0.499, 0.499]),
    ("wsi/tcga-cr-7395-01a-01-ts1.svs", "rgb", None, (2, 3567, 4443), None),
    ("wsi/CMU-1-Small-Region.pyramid.ome.tif", "rgb", None, (2, 2967, 2220), [1, 0.499, 0.499]),
    ("omezarr/CMU-1-Small-Region.ome.zarr", "rgb", None, (2, 2967, 2220), None),
    ("isbi2012/train-volume.tif", "gray", None, (1, 30, 512, 512), None),
    ("isbi2012/train-volume.tif", "gray3d", (16, 128, 128), (1, 30, 512, 512), None),
    ("volume3d/ovule_raw.tif", "gray3d", (16, 64, 64), (1, 32, 128, 128), [1, 0.235, 0.15, 0.15]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "relpath,model,tile,shape,scale", CASES, ids=[f"{c[0].split('/')[-1]}-{c[1]}" for c in CASES]
)
def test_real_file_end_to_end(data_dir, tmp_path, models, relpath, model, tile, shape, scale):
    out = tmp_path / "out.zarr"
    cfg = RunConfig(tile=tile, workers=1, batch_size=4)
    report = run([str(data_dir / relpath)], out, models[model], cfg)
    result = report.inputs[0]
    assert result.state == "done", result.message
    node = next(iter(ngff_images(out).values()))
    level0 = node.data[0]
    assert tuple(level0.shape) == shape
    got_scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    if scale is not None:
        assert got_scale == pytest.approx(scale)
    assert len(node.data) >= 2 or max(shape[-2:]) <= 256
    # the model ran: the prediction is not constant, and within [0, 255]
    sample = np.asarray(level0)  # glass may be background (tissue skipping is on): look at it all
    assert sample.dtype == np.uint8 and sample.std() > 0
    prov = zarr.open_group(str(out / result.name), mode="r").attrs["pipeline"]
    assert prov["model"]["sha256"] and prov["input"]["path"].endswith(relpath.split("/")[-1])
    assert json.loads((out / "report.json").read_text())["ok"]


SLIDES = [
    # file, level-0 (y, x), level-0 µm/px (None: the file has none)
    ("wsi/CMU-1-Small-Region.svs", (2967, 2220), 0.499),
    ("wsi/CMU-1-Small-Region.pyramid.ome.tif", (2967, 2220), 0.499),
    ("omezarr/CMU-1-Small-Region.ome.zarr", (2967, 2220), 0.499),
    ("wsi/tcga-cr-7395-01a-01-ts1.svs", (3567, 4443), None),
]


@pytest.mark.slow
@pytest.mark.parametrize("relpath,shape,mpp0", SLIDES, ids=[s[0].split("/")[-1] for s in SLIDES])
def test_real_slide_at_a_coarser_mpp(data_dir, tmp_path, relpath, shape, mpp0):
    """--mpp 2.0: the output shape follows the physical size and the NGFF scale says 2.0;
    a slide without a pixel size is refused unless --mpp-input gives one."""
    out = tmp_path / "o.zarr"
    args = [
        "run",
        str(data_dir / relpath),
        "--out",
        str(out),
        "--backend",
        "identity",
        "--mpp",
        "2.0",
        "--no-skip-background",
    ]
    if mpp0 is None:
        refused = cli(*args)
        assert refused.exit_code == 1 and "missing-pixel-size" in json.dumps(
            json.loads((out / "report.json").read_text())
        )
        mpp0 = 0.25
        args += ["--mpp-input", str(mpp0)]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    node = next(iter(ngff_images(out).values()))
    want = tuple(round(n * mpp0 / 2.0) for n in shape)
    got = tuple(node.data[0].shape[1:])
    assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (got, want)
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    assert scale[-2:] == pytest.approx([2.0, 2.0], rel=0.02)
    # area resampling of the identity: the mean intensity of the slide is kept
    from pipeline.io.sources import open_image

    full = open_image(data_dir / relpath)
    level0_mean = float(full.array.mean().compute())
    assert float(np.asarray(node.data[0]).mean()) == pytest.approx(level0_mean, rel=0.02)


def test_model_declared_training_resolution_is_the_default(data_dir, tmp_path):
    model = tmp_path / "m.onnx"
    result = cli("export", model, "--in-channels", 3, "--base", 4, "--depth", 2, "--mpp", 2.0)
    assert result.exit_code == 0, result.output
    out = tmp_path / "o.zarr"
    result = cli("run", data_dir / "wsi/CMU-1-Small-Region.svs", "--out", out, "--model", model)
    assert result.exit_code == 0, result.output
    node = next(iter(ngff_images(out).values()))
    assert tuple(node.data[0].shape) == (1, 740, 554)
    assert node.metadata["coordinateTransformations"][0][0]["scale"][-1] == pytest.approx(2.0)
