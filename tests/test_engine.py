"""The tiling engine against its oracles: identity reproduces the input; a valid U-Net
tiled equals the same network run once on the whole mirror-padded image; the output
does not depend on block size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blend_oracle import blended, same_net

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.predict import predict_array


def identity(array, **cfg):
    return predict_array(array, None, RunConfig(backend="identity", device="cpu", **cfg))


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "constant", "crop"])
@pytest.mark.parametrize(
    "shape,tile,overlap,block",
    [
        ((1, 97, 131), 32, 8, 32),
        ((3, 200, 61), 64, 16, 64),
        ((2, 45, 45), 64, 0, 128),  # image smaller than one tile
        ((1, 7, 1), 16, 4, 16),  # degenerate axis
    ],
)
def test_identity_reproduces_input_2d(rng, blend, shape, tile, overlap, block):
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = identity(
        image, tile=(tile,), overlap=overlap, blend=blend, block=block, chunk=block // 2 or 1
    )
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("blend", ["gaussian", "cosine", "constant", "crop"])
def test_identity_reproduces_input_3d(rng, blend):
    image = rng.integers(0, 65535, size=(1, 19, 37, 29), dtype=np.uint16)
    out = identity(image, tile=(8, 16, 16), overlap=4, blend=blend, dtype="float32", chunk=16)
    np.testing.assert_allclose(out, image / 65535.0, rtol=0, atol=1e-6)


def test_identity_2d_model_on_volume_runs_slice_by_slice(rng):
    image = rng.integers(0, 256, size=(1, 5, 40, 33), dtype=np.uint8)
    out = identity(image, tile=(16,), overlap=4, chunk=16)
    np.testing.assert_array_equal(out, image)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def valid_net(tmp_path_factory):
    from pipeline.model.export import export_model
    from pipeline.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=2, base=4, depth=3, ndim=2, padding="valid").eval()
    folder = tmp_path_factory.mktemp("valid")
    spec = export_model(folder / "valid.pt", model=net)
    export_model(folder / "valid.onnx", model=net)
    return net, spec, str(folder / "valid.pt")


def whole_image(net, image, spec):
    """The oracle: one forward pass over the whole image, mirror-padded by the margin
    (and on the far side up to an accepted size), cropped to the image."""
    m = spec.margin
    padded_shape = []
    for n in image.shape[1:]:
        below, above = spec.nearest_tiles(n + 2 * m)
        padded_shape.append(below if below == n + 2 * m else above)
    pad = [(0, 0)] + [(m, p - n - m) for n, p in zip(image.shape[1:], padded_shape)]
    x = np.pad(image.astype(np.float32) / 255.0, pad, mode="reflect")
    with torch.inference_mode():
        y = net(torch.from_numpy(x[None]))[0].numpy()
    return y[(slice(None), *(slice(0, n) for n in image.shape[1:]))]


@pytest.mark.parametrize(
    "shape,tile,block",
    [((1, 150, 131), (32,), 64), ((1, 37, 45, 41), (16,), 32)],
    ids=["2d", "3d"],
)
@pytest.mark.parametrize("blend", ["gaussian", "cosine", "constant", "crop"])
def test_a_padded_network_tiled_is_the_blend_of_its_tiles(tmp_path, rng, blend, shape, tile, block):
    """Catches a blend that drops part of a tile's overlap (a seam), or a crop that takes
    a pixel from the wrong tile: the tiles of a padded network disagree near their
    borders, where identity tiles (and a valid network's) never do."""
    net, spec, path = same_net(tmp_path, len(shape) - 1)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    cfg = RunConfig(tile=tile, overlap=tile[0] // 3, blend=blend, dtype="float32", block=block,
                    chunk=block // 2)  # fmt: skip
    want = blended(net, spec, image, cfg)
    got = predict_array(image, path, cfg)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_a_2d_padded_network_on_a_volume_blends_each_plane_as_an_image(tmp_path, rng):
    """A 2D network on a volume runs plane by plane: each plane is the blend of its own
    tiles, nothing mixes between planes."""
    net, spec, path = same_net(tmp_path, 2)
    image = rng.integers(0, 256, size=(1, 3, 70, 61), dtype=np.uint8)
    cfg = RunConfig(tile=(32,), overlap=12, dtype="float32", block=64, chunk=32)
    want = blended(net, spec, image, cfg)
    got = predict_array(image, path, cfg)
    assert got.shape == (2, 3, 70, 61)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    for z in range(3):  # and each plane is the blend of that plane alone
        plane = blended(net, spec, image[:, z], cfg)
        np.testing.assert_allclose(got[:, z], plane, atol=2e-6, rtol=0)


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_a_padded_network_with_tta_is_the_blend_of_its_averaged_tiles(tmp_path, rng, tta, blend):
    """TTA on a padded network: a flipped or turned tile's border effects land elsewhere,
    so only averaging the right augmentations, each turned back, matches the oracle."""
    net, spec, path = same_net(tmp_path, 2)
    image = rng.integers(0, 256, size=(1, 90, 77), dtype=np.uint8)
    cfg = RunConfig(
        tile=(32,), overlap=12, tta=tta, blend=blend, dtype="float32", block=64, chunk=32
    )
    want = blended(net, spec, image, cfg)
    got = predict_array(image, path, cfg)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 150, 97), (1, 61, 203), (1, 30, 30)])
def test_valid_network_tiled_equals_whole_image(valid_net, rng, shape):
    net, spec, path = valid_net
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    want = whole_image(net, image, spec)
    tile = spec.nearest_tiles(64 + 2 * spec.margin)[1]
    got = predict_array(image, path, RunConfig(tile=(tile,), dtype="float32", block=64, chunk=32))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_block_invariance(valid_net, rng):
    """Bit-identical with ONNX Runtime, whose CPU kernels do not depend on batch size
    (TorchScript's do, by an ulp: see test_torchscript_matches_onnx_end_to_end)."""
    _, spec, path = valid_net
    path = path.replace(".pt", ".onnx")
    image = rng.integers(0, 256, size=(1, 170, 150), dtype=np.uint8)
    tile = spec.nearest_tiles(48 + 2 * spec.margin)[1]
    outs = [
        predict_array(
            image,
            path,
            RunConfig(tile=(tile,), dtype="float32", chunk=16, block=b, blend=blend, overlap=16),
        )
        for blend in ("gaussian", "crop")
        for b in (tile, 2 * tile, 4 * tile)
    ]
    for blend_outs in (outs[:3], outs[3:]):
        for other in blend_outs[1:]:
            np.testing.assert_array_equal(other, blend_outs[0])


def test_bad_tile_is_refused_with_nearest_sizes(valid_net):
    _, spec, path = valid_net
    bad = spec.min_tile + 1
    with pytest.raises(ConfigError) as info:
        predict_array(np.zeros((1, 64, 64), np.uint8), path, RunConfig(tile=(bad,)))
    assert str(bad) in str(info.value) and str(spec.min_tile) in str(info.value)


def test_torchscript_matches_onnx_end_to_end(valid_net, rng):
    _, spec, path = valid_net
    image = rng.integers(0, 256, size=(1, 120, 90), dtype=np.uint8)
    cfg = RunConfig(dtype="float32", chunk=32, block=64, blend="gaussian", overlap=16)
    ts = predict_array(image, path, cfg)
    ox = predict_array(image, path.replace(".pt", ".onnx"), cfg)
    assert np.abs(ts - ox).max() <= 1e-4


@pytest.mark.parametrize("block", [16, 48, 96, 400])
@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_every_tile_runs_exactly_once(block, blend):
    """Shared tiles are computed by one owner block and reused by the others."""
    from pipeline.backends.base import ModelSpec
    from pipeline.engine.blocks import make_tasks
    from pipeline.engine.plan import make_plan
    from pipeline.engine.stages import BackendRef
    from pipeline.predict import run_local

    spec = ModelSpec(format="identity", ndim=2, in_channels=0, classes=0)
    cfg = RunConfig(backend="identity", tile=(32,), overlap=8, blend=blend, block=block, chunk=16)
    image = np.random.default_rng(3).integers(0, 256, (1, 150, 77), dtype=np.uint8)
    plan = make_plan(spec, image.shape[1:], 1, 1, cfg)
    tasks = make_tasks(
        plan, image, BackendRef(None, "identity", overrides=(("ndim", 2),)), spec, 1, cfg, None
    )
    results = list(run_local(tasks))
    assert sum(r.tiles for r in results) == plan.lattice.n_tiles
    out = np.zeros_like(image)
    for r in results:
        out[(slice(None), *r.region.to_slices())] = r.data
    np.testing.assert_array_equal(out, image)
