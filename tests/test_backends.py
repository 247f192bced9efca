"""Backends: identity oracle, devices, ONNX vs TorchScript, channel and tile checks."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import (
    check_batch,
    check_channels,
    check_tile,
    load_backend,
    read_model_spec,
    resolve_device,
)
from pipeline.backends.base import ModelSpec
from pipeline.backends.onnx import make_session
from pipeline.errors import ConfigError, DeviceError, ModelError
from pipeline.model import UNet, export_model

VALID = ModelSpec(format="onnx", ndim=2, in_channels=1, classes=2, margin=92, step=16, min_tile=188)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same small valid U-Net as TorchScript and ONNX."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(3)
    net = UNet(in_channels=2, classes=3, base=4, depth=3, padding="valid").eval()
    export_model(folder / "m.pt", model=net, check=False)
    export_model(folder / "m.onnx", model=net, check=False)
    return {"torchscript": folder / "m.pt", "onnx": folder / "m.onnx"}


def test_identity_returns_a_float32_copy_of_its_input() -> None:
    backend = load_backend(None, backend="identity")
    x = np.arange(2 * 3 * 5 * 7, dtype=np.uint16).reshape(2, 3, 5, 7)
    y = backend.predict(x)
    assert y.dtype == np.float32 and y is not x
    np.testing.assert_array_equal(y, x)
    spec = backend.spec
    assert (spec.format, spec.ndim, spec.in_channels, spec.classes) == ("identity", 2, 0, 0)
    assert (spec.margin, spec.step, spec.min_tile, spec.activation) == (0, 1, 1, "none")
    backend.close()


def test_identity_overrides() -> None:
    backend = load_backend(None, backend="identity", overrides={"ndim": 3, "normalize": "none"})
    assert (backend.spec.ndim, backend.spec.normalize) == (3, "none")
    assert backend.predict(np.ones((1, 2, 3, 4, 5), np.float32)).shape == (1, 2, 3, 4, 5)
    with pytest.raises(ConfigError):
        backend.predict(np.ones((1, 2, 3, 4), np.float32))
    with pytest.raises(ConfigError, match="margin"):
        load_backend(None, backend="identity", overrides={"margin": 3})
    pinned = load_backend(None, backend="identity", overrides={"in_channels": 3})
    assert (pinned.spec.in_channels, pinned.spec.classes) == (3, 3)
    with pytest.raises(ModelError, match="got 2 channels, model expects 3"):
        pinned.predict(np.ones((1, 2, 4, 4), np.float32))
    with pytest.raises(ConfigError, match="cannot differ"):
        load_backend(None, backend="identity", overrides={"in_channels": 3, "classes": 2})
    with pytest.raises(ConfigError):
        load_backend("model.onnx", backend="identity")


def test_resolve_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(DeviceError, match=f"requested {device} but"):
            resolve_device(device)


def test_resolve_device_with_too_few_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr("pipeline.backends._may_have_cuda", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(DeviceError, match="requested cuda:2 but only 2"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("device", ["gpu", "mps", "", "cuda:x", "cuda1"])
def test_resolve_device_rejects_other_spellings(device: str) -> None:
    with pytest.raises(ConfigError):
        resolve_device(device)


def test_onnx_cuda_without_provider_is_an_error(models: dict[str, Path]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA")
    with pytest.raises(DeviceError, match="CUDAExecutionProvider"):
        make_session(models["onnx"], "cuda:0")


def test_onnx_and_torchscript_agree(models: dict[str, Path]) -> None:
    x = np.random.default_rng(0).random((3, 2, 108, 92), dtype=np.float32)
    outs = {}
    for name, path in models.items():
        with load_backend(path, device="cpu", threads=1) as backend:
            assert backend.spec.format == name and backend.device == "cpu"
            outs[name] = backend.predict(x)
    assert outs["onnx"].shape == (3, 3, 20, 4)
    np.testing.assert_allclose(outs["onnx"], outs["torchscript"], atol=1e-5)
    np.testing.assert_allclose(outs["onnx"].sum(axis=1), 1.0, atol=1e-5)


def test_backend_checks_its_input(models: dict[str, Path]) -> None:
    with load_backend(models["onnx"], device="cpu") as backend:
        with pytest.raises(ModelError, match="got 1 channels, model expects 2"):
            backend.predict(np.zeros((1, 1, 92, 92), np.float32))
        with pytest.raises(ConfigError, match="nearest accepted sizes: 92 or 100"):
            backend.predict(np.zeros((1, 2, 92, 95), np.float32))


def test_override_contradicting_metadata_is_refused_at_load(models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="margin=40 \\(the file says 44\\)"):
        load_backend(models["torchscript"], device="cpu", overrides={"margin": 40})


def test_wrong_geometry_for_a_foreign_model_is_caught_at_predict(tmp_path: Path) -> None:
    """A model without metadata takes the user's geometry; a wrong one fails clearly."""
    torch.manual_seed(3)
    net = UNet(in_channels=2, classes=3, base=4, depth=3, padding="valid").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.rand(1, 2, 92, 92)).save(str(tmp_path / "plain.pt"))
    wrong = {"ndim": 2, "in_channels": 2, "classes": 3, "margin": 40, "step": 8, "min_tile": 92}
    with load_backend(tmp_path / "plain.pt", device="cpu", overrides=wrong) as backend:
        with pytest.raises(ModelError, match="expected"):
            backend.predict(np.zeros((1, 2, 92, 92), np.float32))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_cpu_is_a_config_error(models: dict[str, Path], precision: str) -> None:
    for path in models.values():
        with pytest.raises(ConfigError, match=precision):
            load_backend(path, device="cpu", precision=precision)


@pytest.mark.parametrize(
    "kwargs", [{"precision": "int8"}, {"threads": 0}, {"backend": "tensorrt"}, {"device": "tpu"}]
)
def test_bad_load_options(models: dict[str, Path], kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        load_backend(models["onnx"], **kwargs)


def test_no_model_without_identity() -> None:
    with pytest.raises(ConfigError, match="identity"):
        load_backend(None)


def test_check_channels_names_both_numbers() -> None:
    check_channels(VALID, 1, "slide.tif")
    with pytest.raises(ModelError) as err:
        check_channels(VALID.with_(in_channels=1), 3, "slide.tif")
    assert err.value.reason == "channel-mismatch"
    assert "got 3 channels, model expects 1" in str(err.value) and "slide.tif" in str(err.value)
    check_channels(VALID.with_(in_channels=0), 5, "any")  # 0 = any channel count


def test_check_tile_names_tile_and_nearest_sizes() -> None:
    check_tile(VALID, (188, 508))
    with pytest.raises(ConfigError) as err:
        check_tile(VALID, (188, 200))
    assert "(188, 200)" in str(err.value) and "188 or 204" in str(err.value)
    with pytest.raises(ConfigError, match="below its minimum 188.*smallest accepted size is 188"):
        check_tile(VALID, (100, 188))
    with pytest.raises(ConfigError, match="3 axes"):
        check_tile(VALID, (188, 188, 188))


def test_check_batch_wants_b_c_spatial() -> None:
    check_batch(VALID, np.zeros((2, 1, 188, 204), np.float32))
    with pytest.raises(ConfigError, match="spatial"):
        check_batch(VALID, np.zeros((1, 188, 188), np.float32))


def test_onnx_with_static_batch_runs_any_multiple(tmp_path: Path) -> None:
    net = UNet(base=4, depth=2, classes=1).eval()
    axes = {2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.rand(1, 1, 16, 16),),
            str(tmp_path / "b1.onnx"),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes, "y": axes},
        )
    x = np.random.default_rng(0).random((3, 1, 16, 24), dtype=np.float32)
    with load_backend(tmp_path / "b1.onnx", device="cpu") as backend:
        assert backend.spec.in_channels == 1 and backend.spec.margin == 0
        with torch.no_grad():
            np.testing.assert_allclose(
                backend.predict(x), net(torch.from_numpy(x)).numpy(), atol=1e-5
            )


def test_fixed_size_onnx_is_refused(tmp_path: Path) -> None:
    net = UNet(base=4, depth=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (torch.rand(1, 1, 16, 16),), str(tmp_path / "fixed.onnx"), dynamo=False
        )
    with pytest.raises(ModelError, match="fixed spatial sizes"):
        read_model_spec(tmp_path / "fixed.onnx")


def test_spec_cache_follows_file_content(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    first = export_model(path, base=4, depth=2, check=False)
    assert read_model_spec(path) is read_model_spec(path)
    second = export_model(path, base=4, depth=2, classes=3, check=False)
    assert second.sha256 != first.sha256 and read_model_spec(path).classes == 3


def test_importing_backends_loads_no_runtime() -> None:
    code = (
        "import sys, pipeline.backends\n"
        "loaded = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_auto_device_without_nvidia_devices_does_not_import_torch() -> None:
    """`auto` on a machine with no NVIDIA device node is decided without torch (slow import)."""
    import os

    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"):
        pytest.skip("this machine has an NVIDIA device")
    code = (
        "import sys; from pipeline.backends import resolve_device; "
        "assert resolve_device('auto') == 'cpu'; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
