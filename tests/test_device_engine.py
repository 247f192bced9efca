"""The device-side pieces of a block: scaling, quantisation, mirrored reads, tile
cutting, blending and test-time augmentation, against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.devices import quantize, scale_into, scale_of, to_device, to_host
from pipeline.core.geometry import Region, reflect_index
from pipeline.engine.blend import BlendMode, tile_weights
from pipeline.engine.device_section import (
    box_to_device,
    device_lock,
    finish_block,
    merge_tiles,
    read_box,
    stream_predictions,
)
from pipeline.engine.merge import TensorMerger, weights_on
from pipeline.engine.tiling import BlockGrid, Lattice
from pipeline.engine.tta import check_tta, predict_tta, transforms
from pipeline.errors import ConfigError, PipelineError

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int8", "int16", "uint32", "bool", "float32"])
def test_scaling_matches_numpy_division(dtype):
    rng = np.random.default_rng(0)
    if dtype == "bool":
        raw = rng.random(5000) > 0.5
    elif dtype == "float32":
        raw = rng.normal(size=5000).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        raw = rng.integers(info.min, info.max, 5000, endpoint=True, dtype=dtype)
        raw[:2] = info.min, info.max
    want = (
        np.divide(raw, np.float32(np.iinfo(raw.dtype).max), dtype=np.float32)
        if raw.dtype.kind in "iu"
        else raw.astype(np.float32)
    )
    for mode, expected in (("dtype", want), ("none", raw.astype("f4"))):
        got = torch.empty(raw.shape, dtype=torch.float32)
        scale_into(got, torch.from_numpy(raw), scale_of(raw.dtype, mode))
        np.testing.assert_array_equal(got.numpy(), expected)


def test_quantize_is_numpy_rint_of_clipped_probabilities():
    rng = np.random.default_rng(1)
    p = rng.random(200_000, dtype=np.float32) * 1.4 - 0.2
    p[:512] = (np.arange(512, dtype=np.float32) + 0.5) / 255  # ties, before clipping
    p[512:520] = [0.0, -0.0, 1.0, 2.0, -1.0, 0.5 / 255, 1.5 / 255, 254.5 / 255]
    want = np.rint(np.clip(p, 0.0, 1.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(to_host(quantize(torch.from_numpy(p.copy()), "uint8")), want)
    for dtype in ("float16", "float32"):
        got = to_host(quantize(torch.from_numpy(p.copy()), dtype))
        np.testing.assert_array_equal(got, p.astype(dtype))


@pytest.mark.parametrize(
    "region", [Region((-5, -7), (30, 40)), Region((10, 20), (8, 8)), Region((-40, 15), (70, 9))]
)
def test_mirrored_box_equals_numpy_reflect(region):
    image = np.arange(2 * 23 * 31, dtype=np.uint16).reshape(2, 23, 31)
    box = read_box(image, region)
    got = box_to_device(box, CPU).numpy()
    idx = [
        reflect_index(np.arange(o, e), n) for o, e, n in zip(region.offset, region.end, (23, 31))
    ]
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, image[np.ix_([0, 1], *idx)])
    assert box.data.shape[1:] == tuple(int(i.max()) - int(i.min()) + 1 for i in idx)


def _identity_blocks(image, lattice, blend, block, model_ndim=None):
    """Every block of ``image`` through the device pieces with an identity "model"."""
    model_ndim = model_ndim or lattice.ndim
    grid = BlockGrid(lattice, block, owned=blend is BlendMode.CROP)
    out = np.zeros(image.shape, np.uint8)
    for index, (tiles, _, _) in grid.layout().items():
        write = grid.region(index)
        box_region = Region.from_bounds(
            [min(lattice.in_region(t).offset[a] for t in tiles) for a in range(lattice.ndim)],
            [max(lattice.in_region(t).end[a] for t in tiles) for a in range(lattice.ndim)],
        )
        box = read_box(image, box_region)
        x = box_to_device(box, CPU)
        preds = stream_predictions(
            lambda b: b,
            x,
            box_region,
            tiles,
            lattice=lattice,
            model_ndim=model_ndim,
            batch_size=3,
            source_dtype=image.dtype,
            normalize="dtype",
        )
        merged = merge_tiles(write, lattice, blend, image.shape[0], tiles, preds, device=CPU)
        out[(slice(None), *write.to_slices())] = finish_block(merged.result(), "uint8")
    return out


@pytest.mark.parametrize("blend", list(BlendMode))
@pytest.mark.parametrize("flush", [False, True])
def test_identity_through_the_device_pieces_is_exact(blend, flush):
    image = np.random.default_rng(2).integers(0, 256, (3, 97, 61), dtype=np.uint8)
    lattice = Lattice((97, 61), (32, 32), (0, 0), (24, 24), flush=flush)
    for block in ((32, 32), (64, 32), (128, 128)):
        np.testing.assert_array_equal(_identity_blocks(image, lattice, blend, block), image)


def test_2d_model_on_a_volume_sees_planes():
    image = np.random.default_rng(3).integers(0, 256, (1, 4, 37, 29), dtype=np.uint8)
    lattice = Lattice((4, 37, 29), (1, 16, 16), (0, 0, 0), (1, 12, 12))
    got = _identity_blocks(image, lattice, BlendMode.GAUSSIAN, (2, 32, 16), model_ndim=2)
    np.testing.assert_array_equal(got, image)


def test_tensor_merger_matches_weighted_mean():
    rng = np.random.default_rng(4)
    region, out_tile, overlap = Region((5, 3), (40, 30)), (16, 16), (6, 6)
    w = tile_weights(BlendMode.GAUSSIAN, out_tile, overlap)
    merger = TensorMerger(
        region, 2, BlendMode.GAUSSIAN, CPU, weights_on(BlendMode.GAUSSIAN, out_tile, overlap, CPU)
    )
    acc = np.zeros((2, 40, 30)), np.zeros((40, 30))
    for y in range(-5, 45, 10):
        for x in range(-8, 33, 10):
            tile = Region((y, x), out_tile)
            pred = rng.random((2, *out_tile), dtype=np.float32)
            merger.add_at(torch.from_numpy(pred), tile.offset)
            t = tile.intersect(region)
            dst, src = t.relative_to(region).to_slices(), t.relative_to(tile).to_slices()
            acc[0][(slice(None), *dst)] += pred[(slice(None), *src)] * w[src]
            acc[1][dst] += w[src]
    np.testing.assert_allclose(merger.result().numpy(), acc[0] / acc[1], rtol=1e-6)


def test_nonfinite_output_fails_the_block():
    prob = torch.full((1, 4, 4), 0.5)
    prob[0, 1, 2] = float("nan")
    with pytest.raises(PipelineError, match="NaN or Inf") as info:
        finish_block(prob, "uint8", where="model.onnx", block=Region((0, 0), (4, 4)))
    assert info.value.reason == "model-output-nonfinite"
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0] = True
    got = finish_block(torch.full((1, 4, 4), 0.6), "uint8", mask=mask)
    assert got.sum() == 153 and got[0, 0, 0] == 153


def test_to_device_and_back_on_cpu_keep_dtype_and_values():
    a = np.arange(24, dtype=np.uint16).reshape(2, 3, 4)[:, ::2]
    t = to_device(a, CPU)
    assert t.dtype == torch.uint16 and t.shape == (2, 2, 4)
    np.testing.assert_array_equal(to_host(t), a)


def test_device_lock_is_one_per_device():
    assert device_lock("cpu") is device_lock("cpu")
    assert device_lock("cpu") is not device_lock("cuda:1")


# ----------------------------------------------------------------- test-time augmentation


def test_transform_counts_and_round_trips():
    assert [len(transforms("flip", n)) for n in (2, 3)] == [4, 8]
    assert len(transforms("d4", 2)) == 8 and len(transforms("none", 3)) == 1
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    seen = set()
    for t in transforms("d4", 2):
        y = t.apply(x)
        seen.add(tuple(y[0, 0].flatten().tolist()))
        assert torch.equal(t.invert(y), x)
    assert len(seen) == 8  # all eight symmetries of the square differ
    v = torch.rand(1, 1, 3, 4, 5)
    for t in transforms("flip", 3):
        assert torch.equal(t.invert(t.apply(v)), v)


def test_predict_tta_averages_the_turned_back_predictions():
    x = torch.rand(2, 1, 6, 6)
    ramp = torch.linspace(0, 1, 6).reshape(1, 1, 1, 6)

    def model(b):  # not flip-equivariant: the mean differs from one pass
        return b * ramp

    want = sum(t.invert(model(t.apply(x))) for t in transforms("flip", 2)) / 4
    got = predict_tta(model, x, "flip")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert not torch.allclose(got, model(x))
    assert torch.equal(predict_tta(lambda b: b, x, "d4"), x)  # equivariant: unchanged


def test_d4_needs_square_tiles():
    check_tta("d4", (64, 64))
    check_tta("flip", (32, 64))
    with pytest.raises(ConfigError, match="square"):
        check_tta("d4", (32, 64))
    with pytest.raises(ConfigError, match="tta must be one of"):
        check_tta("rot", (64, 64))


# ----------------------------------------------------------------- model speed habits


def test_batchnorm_folds_into_the_convolutions():
    from pipeline.model.fold import fold_batchnorm
    from pipeline.model.unet import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=3, classes=2, base=4, depth=2, padding="same").eval()
    for m in net.modules():  # trained-looking statistics, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folded, count = fold_batchnorm(net)
    assert count == 2 * (2 * 2 + 1)  # 2 per double conv: 2 levels x (encode, decode) + bottleneck
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # a copy
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=0, atol=1e-5)


def test_frozen_torchscript_has_no_parameters_and_same_output():
    from pipeline.backends.tuning import auto_batch_size, freeze_for_inference, is_frozen
    from pipeline.model.unet import UNet

    net = UNet(in_channels=1, classes=1, base=4, depth=2, padding="same").eval()
    from pipeline.core._compat import quiet_torch

    with quiet_torch():
        scripted = torch.jit.script(net)
    assert not is_frozen(scripted)
    frozen = freeze_for_inference(scripted, "cpu")
    assert is_frozen(frozen)
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), net(x), rtol=0, atol=1e-5)
    assert freeze_for_inference(frozen, "cpu") is frozen
    assert auto_batch_size(frozen, (1, 16, 16), "cpu") == 8


def test_tensorrt_provider_options_and_cache_folder(tmp_path, monkeypatch):
    from pipeline.backends.ort_gpu import gpu_providers, user_cache_dir
    from pipeline.errors import DeviceError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("PIPELINE_CACHE_DIR", raising=False)
    assert user_cache_dir("trt") == tmp_path / "pipeline" / "trt"
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    trt, cuda, cpu = gpu_providers("cuda:1", "tensorrt", "fp16", every, stream=1234)
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["device_id"] == 1
    assert trt[1]["trt_fp16_enable"] and trt[1]["trt_engine_cache_enable"]
    assert trt[1]["trt_engine_cache_path"] == str(tmp_path / "pipeline" / "trt")
    assert cuda[1]["user_compute_stream"] == "1234" and cpu == "CPUExecutionProvider"
    assert gpu_providers("cuda", "auto", "fp32", every)[0][0] == "CUDAExecutionProvider"
    with pytest.raises(DeviceError, match="TensorrtExecutionProvider"):
        gpu_providers("cuda", "tensorrt", "fp32", every[1:])
