"""Test-time augmentation end to end: a valid network with ``--tta flip`` equals the mean
of whole-image passes over the flipped, mirror-padded image, flipped back; identity stays
exact; ``d4`` refuses tiles that are not square."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import RunConfig
from pipeline.core._compat import quiet_torch
from pipeline.errors import ConfigError
from pipeline.predict import predict_array
from pipeline.run import resolve_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def paper_net(tmp_path_factory):
    """The paper's valid U-Net (depth 4), saved as plain TorchScript: no pipeline
    metadata, so the pipeline probes its geometry."""
    from pipeline.model.unet import UNet

    torch.manual_seed(4)
    net = UNet(in_channels=1, classes=2, base=4, depth=4, padding="valid").eval()
    path = tmp_path_factory.mktemp("tta") / "paper_unet.pt"
    with quiet_torch():
        torch.jit.save(torch.jit.script(net), str(path))
    return net, str(path)


def flipped_whole_image_mean(net, image, spec, lattice):
    """The oracle. The image is mirror-padded by the margin in front and, behind, out to
    where the lattice's last tile ends: that padded size P = (count - 1) * stride + tile
    is one the network accepts, so a tile that sits on the pooling grid of the padded
    image also sits on it in the flipped one. One pass per flip, flipped back, averaged."""
    m = spec.margin
    padded = [(k - 1) * s + t for k, s, t in zip(lattice.counts, lattice.stride, lattice.tile)]
    assert all(spec.accepts_tile(p) for p in padded)
    pad = [(0, 0)] + [(m, p - n - m) for n, p in zip(image.shape[1:], padded)]
    x = torch.from_numpy(np.pad(image.astype(np.float32) / 255.0, pad, mode="reflect")[None])
    total = 0.0
    with torch.inference_mode():
        for dims in ([], [2], [3], [2, 3]):
            y = net(torch.flip(x, dims) if dims else x)
            total = total + (torch.flip(y, dims) if dims else y)
    mean = (total / 4)[0].numpy()
    return mean[(slice(None), *(slice(0, n) for n in image.shape[1:]))]


@pytest.mark.parametrize("block", [None, 256])
def test_flip_tta_of_a_valid_net_equals_flipped_whole_image_passes(paper_net, block):
    from pipeline.engine.plan import make_plan

    net, path = paper_net
    image = np.random.default_rng(5).integers(0, 256, (1, 701, 899), dtype=np.uint8)
    cfg = RunConfig(tta="flip", dtype="float32", block=block, chunk=128 if block else None)
    spec = resolve_model(path, cfg)
    assert spec.extra.get("probed") and (spec.margin, spec.step) == (92, 16)
    lattice = make_plan(spec, image.shape[1:], 1, 2, cfg).lattice
    got = predict_array(image, path, cfg, spec=spec)
    want = flipped_whole_image_mean(net, image, spec, lattice)
    assert got.shape == want.shape == (2, 701, 899)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    plain = predict_array(image, path, RunConfig(dtype="float32"), spec=spec)
    assert np.abs(plain - got).max() > 1e-3  # the flips do change a random network's output


@pytest.mark.parametrize("tta", ["flip", "d4"])
def test_identity_with_tta_is_exact(tta):
    image = np.random.default_rng(6).integers(0, 256, (3, 97, 70), dtype=np.uint8)
    cfg = RunConfig(backend="identity", tile=(32,), overlap=8, tta=tta, block=64, chunk=32)
    np.testing.assert_array_equal(predict_array(image, None, cfg), image)


def test_d4_refuses_tiles_that_are_not_square(paper_net):
    _, path = paper_net
    with pytest.raises(ConfigError, match="square"):
        predict_array(np.zeros((1, 300, 300), np.uint8), path, RunConfig(tta="d4", tile="188,204"))
