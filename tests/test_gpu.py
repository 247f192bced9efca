"""GPU checks (marker ``gpu``): run where a CUDA device is, skipped everywhere else.

    python -m pytest -q -m gpu          (benchmarks/gpu_check.sh runs them first)

Tiny networks and images, so they take seconds on a GPU: the CUDA paths agree with the
CPU ones within what the arithmetic allows (TF32 convolutions in fp32, bf16 autocast).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

ARCH = {"in_channels": 3, "classes": 1, "base": 8, "depth": 2, "padding": "same"}
# sigmoid outputs in 0..1: TF32 convolutions (cuDNN's default for fp32) stay near 1e-3,
# bf16 keeps 8 bits of mantissa
TOL = {"fp32": 5e-3, "bf16": 5e-2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A seeded U-Net's weights, with non-trivial BatchNorm statistics."""
    from pipeline.testing import seeded_weights

    return seeded_weights(tmp_path_factory.mktemp("gpu_models") / "weights.pt", spread=0.2, **ARCH)


def _export(weights, suffix: str) -> str:
    from pipeline.model import export_model

    path = weights.with_name("model" + suffix)
    if not path.exists():
        export_model(str(path), weights=str(weights), **ARCH)
    return str(path)


@pytest.fixture(scope="module")
def torchscript(weights) -> str:
    return _export(weights, ".pt")


def _batch(n: int = 4, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n, ARCH["in_channels"], size, size), dtype=np.float32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torchscript_on_cuda_matches_cpu_fp32(torchscript, precision):
    from pipeline.backends import load_backend

    batch = _batch()
    with load_backend(torchscript, device="cpu") as cpu:
        ref = cpu.predict(batch)
    with load_backend(torchscript, device="cuda", precision=precision) as gpu:
        got = gpu.predict(batch)
    assert got.dtype == np.float32 and got.shape == ref.shape == (4, 1, 64, 64)
    diff = np.abs(got - ref)
    assert diff.max() < TOL[precision], (precision, float(diff.max()))
    # a wrong network (or channels in the wrong order) differs everywhere, not at a few px
    assert diff.mean() < TOL[precision] / 5
    assert ref.std() > 0.01  # the outputs vary: agreement is not between two constants


def _onnx_and_cpu_output(weights, provider: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The ONNX export, a batch and what onnxruntime's CPU provider makes of it; the test
    is skipped where onnxruntime lacks ``provider``."""
    ort = pytest.importorskip("onnxruntime")
    if provider not in ort.get_available_providers():
        pytest.skip(f"onnxruntime has no {provider} ({ort.get_available_providers()})")
    from pipeline.backends import load_backend

    onnx = _export(weights, ".onnx")
    batch = _batch()
    with load_backend(onnx, backend="onnx", device="cpu") as cpu:
        return onnx, batch, cpu.predict(batch)


def test_onnxruntime_cuda_provider_matches_cpu(weights):
    from pipeline.backends import load_backend

    onnx, batch, ref = _onnx_and_cpu_output(weights, "CUDAExecutionProvider")
    with load_backend(onnx, backend="onnx", device="cuda") as gpu:
        got = gpu.predict(batch)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < TOL["fp32"]


def _slide(path, height: int = 128, width: int = 256) -> str:
    import tifffile

    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (height // 16, width // 16, 3)).astype(np.float32)
    image = np.kron(coarse, np.ones((16, 16, 1), np.float32))
    image += rng.normal(0, 20, image.shape)
    tifffile.imwrite(
        path, np.clip(image, 0, 255).astype(np.uint8), photometric="rgb", tile=(64, 64)
    )
    return str(path)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_block_run_on_cuda_equals_cpu(torchscript, tmp_path, precision):
    import zarr

    from pipeline.config import RunConfig
    from pipeline.run import run

    slide = _slide(tmp_path / "slide.tif")
    outputs = {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig(
            tile=(64,),
            overlap=16,
            chunk=128,
            block=128,
            backend="torchscript",
            device=device,
            precision=precision if device == "cuda" else "fp32",
            scheduler="sync",
            skip_background=False,
        )
        report = run([slide], tmp_path / f"out_{device}", torchscript, cfg)
        assert report.ok, report.inputs[0].message
        assert report.inputs[0].blocks == 2
        outputs[device] = zarr.open_array(str(tmp_path / f"out_{device}" / "slide" / "0"))[...]
    cpu, gpu = outputs["cpu"].astype(int), outputs["cuda"].astype(int)
    assert cpu.shape == gpu.shape == (1, 128, 256)
    assert cpu.std() > 2  # the output is not flat
    levels = np.abs(gpu - cpu)  # uint8 levels: 1/255 of a probability each
    assert levels.max() <= round(TOL[precision] * 255), (precision, int(levels.max()))
    assert levels.mean() < 1


# ------------------------------------------------- blocks on the device (issue 6)


def test_identity_blocks_on_cuda_are_exact():
    """Pinned transfers, tiles cut and blended on the GPU, quantised there: bit for bit."""
    from pipeline.config import RunConfig
    from pipeline.predict import predict_array

    image = np.random.default_rng(2).integers(0, 256, (3, 301, 257), dtype=np.uint8)
    for blend in ("gaussian", "crop"):
        for tta in ("none", "d4"):
            cfg = RunConfig(
                backend="identity", device="cuda", tile=(64,), overlap=16, blend=blend,
                block=128, chunk=64, tta=tta,
            )  # fmt: skip
            np.testing.assert_array_equal(predict_array(image, None, cfg), image)


def test_onnx_io_binding_keeps_tensors_on_the_device(weights):
    from pipeline.backends import load_backend

    onnx, batch, ref = _onnx_and_cpu_output(weights, "CUDAExecutionProvider")
    with load_backend(onnx, backend="onnx", device="cuda") as gpu:
        got = gpu.predict_tensor(torch.from_numpy(batch).cuda())
    assert got.is_cuda and got.dtype == torch.float32
    assert np.abs(got.cpu().numpy() - ref).max() < TOL["fp32"]


def test_tensorrt_provider_when_available(weights, tmp_path, monkeypatch):
    from pipeline.backends import load_backend
    from pipeline.errors import DeviceError

    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    onnx, batch, ref = _onnx_and_cpu_output(weights, "TensorrtExecutionProvider")
    try:
        gpu = load_backend(onnx, device="cuda", ort_provider="tensorrt", precision="fp16")
    except DeviceError as exc:  # TensorRT's libraries missing on this machine
        pytest.skip(str(exc))
    with gpu:
        got = gpu.predict_tensor(torch.from_numpy(batch).cuda()).cpu().numpy()
    assert np.abs(got - ref).max() < TOL["bf16"]
    assert any((tmp_path / "trt").iterdir())  # the engine was cached


def test_cuda_graphs_replay_the_same_network(torchscript):
    from pipeline.backends import load_backend

    batch = torch.from_numpy(_batch(4)).cuda()
    with load_backend(torchscript, device="cuda") as plain:
        ref = plain.predict_tensor(batch)
    with load_backend(torchscript, device="cuda", cuda_graphs=True) as graphed:
        first = graphed.predict_tensor(batch)
        again = graphed.predict_tensor(batch[:3])  # a smaller batch: padded, same graph
    torch.testing.assert_close(first, ref, rtol=0, atol=TOL["fp32"])
    torch.testing.assert_close(again, ref[:3], rtol=0, atol=TOL["fp32"])


def test_auto_batch_size_fills_the_device(torchscript):
    from pipeline.backends import load_backend
    from pipeline.backends.tuning import MAX_BATCH, auto_batch_size

    with load_backend(torchscript, device="cuda") as gpu:
        size = auto_batch_size(gpu.predict_tensor, (3, 512, 512), "cuda")
    assert 8 <= size <= MAX_BATCH  # an H200 fits far more than the CPU's 8 tiles of 512²


@pytest.mark.parametrize("blend", ["gaussian", "crop"])
def test_blocks_blended_on_cuda_equal_the_numpy_blend_of_the_tiles(tmp_path, blend):
    """The merger on the GPU against the numpy oracle (tests/blend_oracle.py), not only
    against the same merger on the CPU: a padded network's tiles disagree at borders."""
    from blend_oracle import blended, same_net

    from pipeline.config import RunConfig
    from pipeline.predict import predict_array

    net, spec, path = same_net(tmp_path, 2)
    image = np.random.default_rng(3).integers(0, 256, (1, 150, 131), dtype=np.uint8)
    cfg = RunConfig(tile=(32,), overlap=12, blend=blend, dtype="float32", block=64, chunk=32,
                    device="cuda", precision="fp32")  # fmt: skip
    want = blended(net, spec, image, cfg)
    got = predict_array(image, path, cfg)
    np.testing.assert_allclose(got, want, atol=TOL["fp32"], rtol=0)
