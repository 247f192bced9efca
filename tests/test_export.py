"""Model files: export, metadata round trip, foreign models, weights, refusals."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pipeline.backends import load_backend, read_model_spec
from pipeline.errors import ConfigError, ModelError
from pipeline.model import UNet, export_model

# (padding, ndim, depth): small networks whose min_tile stays below 100 px.
VARIANTS = [("same", 2, 3), ("valid", 2, 3), ("same", 3, 2), ("valid", 3, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(
    padding: str = "valid",
    ndim: int = 2,
    depth: int = 3,
    cin: int = 1,
    classes: int = 2,
    seed: int = 0,
    **kw,
) -> UNet:
    """A small U-Net with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    net = UNet(cin, classes, base=4, depth=depth, ndim=ndim, padding=padding, **kw)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def eager(net: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def other_shape(net: UNet, batch: int = 3) -> tuple[int, ...]:
    """A batch and spatial size different from the export example (batch 1, min_tile cube)."""
    sizes = [net.min_tile + 2 * net.step] + [net.min_tile + net.step] * (net.ndim - 1)
    return (batch, net.in_channels, *sizes)


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
@pytest.mark.parametrize("padding,ndim,depth", VARIANTS)
def test_export_runs_at_other_batch_and_size(
    tmp_path: Path, suffix: str, padding: str, ndim: int, depth: int
) -> None:
    net = make_net(padding, ndim, depth)
    spec = export_model(tmp_path / f"m{suffix}", model=net, extra={"trained_on": "nothing"})
    assert spec.format == ("onnx" if suffix == ".onnx" else "torchscript")
    assert (spec.ndim, spec.in_channels, spec.classes) == (ndim, 1, 2)
    assert (spec.margin, spec.step, spec.min_tile) == (net.margin, net.step, net.min_tile)
    assert spec.activation == "softmax" and spec.normalize == "dtype"
    assert spec.extra["padding"] == padding and spec.extra["depth"] == depth
    assert spec.extra["axes"] == ("bcyx" if ndim == 2 else "bczyx")
    assert spec.extra["extra"] == {"trained_on": "nothing"}
    assert len(spec.sha256) == 64 and spec.path == str(tmp_path / f"m{suffix}")

    x = np.random.default_rng(1).random(other_shape(net), dtype=np.float32)
    with load_backend(spec.path, device="cpu") as backend:
        got = backend.predict(x)
    ref = eager(net, x)
    assert got.shape == ref.shape == (3, 2, *(s - 2 * net.margin for s in x.shape[2:]))
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_metadata_readable_by_plain_tools(tmp_path: Path) -> None:
    export_model(tmp_path / "m.onnx", model=make_net(), check=False)
    export_model(tmp_path / "m.pt", model=make_net(), check=False)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    meta = json.loads(props["pipeline"])
    assert meta["format_version"] == 1 and meta["margin"] == 44 and meta["step"] == 8
    assert meta["exporter"] == "torch.onnx.export(dynamo=False)" and meta["opset"] >= 17
    files = {"pipeline.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(tmp_path / "m.pt"), _extra_files=files)
    ts_meta = json.loads(files["pipeline.json"])
    assert (ts_meta["min_tile"], ts_meta["classes"], ts_meta["padding"]) == (92, 2, "valid")


def test_default_export_is_the_paper_layout_with_sigmoid(tmp_path: Path) -> None:
    spec = export_model(tmp_path / "m.onnx", base=4, depth=2, in_channels=3)
    assert (spec.in_channels, spec.classes, spec.activation) == (3, 1, "sigmoid")
    assert (spec.margin, spec.step, spec.min_tile) == (0, 4, 8)


def test_overrides_win_over_metadata(tmp_path: Path) -> None:
    export_model(tmp_path / "m.onnx", model=make_net(), check=False)
    spec = read_model_spec(
        tmp_path / "m.onnx", overrides={"normalize": "none", "activation": "none"}
    )
    assert (spec.normalize, spec.activation, spec.margin) == ("none", "none", 44)
    with pytest.raises(ConfigError, match="bogus"):
        read_model_spec(tmp_path / "m.onnx", overrides={"bogus": 1})


def _foreign_files(tmp_path: Path) -> tuple[UNet, Path, Path]:
    net = make_net("valid", 2, 3, cin=3, classes=2, activation="none")
    x = torch.rand(1, 3, 92, 92)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, x).save(str(tmp_path / "foreign.pt"))
        axes = {0: "b", 2: "h", 3: "w"}
        torch.onnx.export(
            net,
            (x,),
            str(tmp_path / "foreign.onnx"),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": axes, "y": axes},
        )
    return net, tmp_path / "foreign.pt", tmp_path / "foreign.onnx"


def test_foreign_models_are_probed(tmp_path: Path) -> None:
    net, ts, ox = _foreign_files(tmp_path)
    for path in (ts, ox):
        spec = read_model_spec(path)
        assert (spec.ndim, spec.in_channels, spec.classes) == (2, 3, 2)
        assert (spec.margin, spec.step, spec.min_tile) == (44, 8, 92)
        assert (spec.activation, spec.normalize, spec.extra["metadata"]) == ("none", "dtype", False)
        x = np.random.default_rng(0).random((2, 3, 100, 108), dtype=np.float32)
        with load_backend(path, device="cpu") as backend:
            np.testing.assert_allclose(backend.predict(x), eager(net, x), atol=1e-4)


def test_foreign_3d_torchscript_is_probed(tmp_path: Path) -> None:
    net = make_net("valid", 3, 2, classes=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.rand(1, 1, 44, 44, 44)).save(str(tmp_path / "f3.pt"))
    spec = read_model_spec(tmp_path / "f3.pt")
    assert (spec.ndim, spec.classes, spec.margin, spec.step, spec.min_tile) == (3, 1, 20, 4, 44)


def test_full_geometry_overrides_skip_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ts, _ = _foreign_files(tmp_path)

    def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("probed although the geometry was given")

    monkeypatch.setattr("pipeline.backends.probe.probe_geometry", no_probe)
    geometry = {"ndim": 2, "in_channels": 3, "classes": 2, "margin": 44, "step": 8, "min_tile": 92}
    spec = read_model_spec(ts, overrides={**geometry, "activation": "sigmoid"})
    assert (spec.margin, spec.activation, spec.format) == (44, "sigmoid", "torchscript")


def test_non_unet_module_is_probed_at_export(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 1, 3), nn.Sigmoid())
    spec = export_model(tmp_path / "seq.onnx", model=net, in_channels=2, activation="sigmoid")
    assert (spec.in_channels, spec.classes, spec.margin, spec.step, spec.min_tile) == (
        2,
        1,
        2,
        1,
        5,
    )
    assert spec.activation == "sigmoid" and spec.extra["architecture"] == "Sequential"


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_weights_round_trip(tmp_path: Path, wrap: str) -> None:
    trained = make_net("same", 2, 3, seed=7)
    state = trained.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    spec = export_model(
        tmp_path / "m.pt", weights=tmp_path / "w.pth", base=4, depth=3, classes=2, padding="same"
    )
    x = np.random.default_rng(0).random((2, 1, 24, 32), dtype=np.float32)
    with load_backend(spec.path, device="cpu") as backend:
        np.testing.assert_allclose(backend.predict(x), eager(trained, x), atol=1e-4)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.save(make_net("same", 2, 3).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ModelError, match="do not fit") as err:
        export_model(tmp_path / "m.pt", weights=tmp_path / "w.pth", base=8, depth=3, classes=2)
    assert str(tmp_path / "w.pth") in str(err.value)


class Payload:
    """Pickles to a call that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickled_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, bad)
    with pytest.raises(ModelError) as err:
        export_model(tmp_path / "m.pt", weights=bad, base=4, depth=2)
    assert str(bad) in str(err.value) and "Hint:" in str(err.value)
    for fn in (read_model_spec, lambda p: load_backend(p, device="cpu")):
        with pytest.raises(ModelError, match="checkpoint"):
            fn(bad)
    assert not marker.exists()
    assert not (tmp_path / "m.pt").exists()


def _not_models(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty": b"",
        "random": np.random.default_rng(0).bytes(4096),
        "text": b"this is not a model\n" * 20,
        "json": b'{"ndim": 2}',
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.onnx"
        out[name].write_bytes(data)
    out["state_dict"] = tmp_path / "sd.pt"
    torch.save(make_net().state_dict(), out["state_dict"])
    out["zip"] = tmp_path / "other.pt"
    with zipfile.ZipFile(out["zip"], "w") as zf:
        zf.writestr("readme.txt", "hello")
    out["missing"] = tmp_path / "missing.pt"
    out["folder"] = tmp_path / "folder.onnx"
    out["folder"].mkdir()
    return out


def test_not_a_model_raises_model_error_naming_the_file(tmp_path: Path) -> None:
    for name, path in _not_models(tmp_path).items():
        with pytest.raises(ModelError) as err:
            read_model_spec(path)
        assert str(path) in str(err.value), name
        assert "Hint:" in str(err.value), name


def test_backend_that_contradicts_the_content(tmp_path: Path) -> None:
    export_model(tmp_path / "m.onnx", model=make_net(), check=False)
    with pytest.raises(ModelError, match="not a TorchScript"):
        read_model_spec(tmp_path / "m.onnx", backend="torchscript")


def _external_model(folder: Path, location: str) -> Path:
    weight = onnx.helper.make_tensor(
        "w", onnx.TensorProto.FLOAT, [1, 1, 1, 1], np.float32(1).tobytes(), raw=True
    )
    onnx.external_data_helper.set_external_data(weight, location=location)
    weight.ClearField("raw_data")
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 1, "h", "w"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 1, "h", "w"])],
        [weight],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd"])
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "outside.bin").write_bytes(np.float32(1).tobytes())
    path = _external_model(tmp_path / "models", location)
    with pytest.raises(ModelError, match="outside the model's folder") as err:
        read_model_spec(path)
    assert str(path) in str(err.value)


def test_onnx_external_data_beside_the_model_is_accepted(tmp_path: Path) -> None:
    net = make_net()
    export_model(tmp_path / "m.onnx", model=net, check=False)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    folder = tmp_path / "ext"
    folder.mkdir()
    onnx.save_model(
        proto,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.weights",
        size_threshold=0,
    )
    assert (folder / "m.weights").stat().st_size > 0
    x = np.random.default_rng(0).random((1, 1, 92, 100), dtype=np.float32)
    with load_backend(folder / "m.onnx", device="cpu") as backend:
        np.testing.assert_allclose(backend.predict(x), eager(net, x), atol=1e-4)


def test_failed_check_removes_the_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="differs"):
        export_model(tmp_path / "m.onnx", model=make_net(), tolerance=-1.0)
    assert not (tmp_path / "m.onnx").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize(
    "kwargs",
    [{"fmt": "tflite"}, {"normalize": "zscore"}, {"padding": "full"}, {"extra": {"f": object()}}],
)
def test_bad_export_options(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        export_model(tmp_path / "m.onnx", base=4, depth=2, **kwargs)


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="suffix"):
        export_model(tmp_path / "m.bin", base=4, depth=2)


def test_options_may_not_contradict_embedded_metadata(tmp_path: Path) -> None:
    export_model(tmp_path / "m.onnx", model=make_net(), check=False)
    spec = read_model_spec(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=f"in_channels=7 \\(the file says {spec.in_channels}\\)"):
        read_model_spec(tmp_path / "m.onnx", overrides={"in_channels": 7})


def test_foreign_model_runs_end_to_end_on_a_dask_cluster(tmp_path: Path) -> None:
    """The driver probes once; workers get the geometry and produce the eager result."""
    import numpy as np
    import tifffile
    import zarr

    from pipeline.config import RunConfig
    from pipeline.run import run

    net, _, onnx_path = _foreign_files(tmp_path)
    image = np.random.default_rng(1).integers(0, 256, (3, 90, 70), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="rgb", planarconfig="separate")
    report = run(
        [str(tmp_path / "img.tif")],
        tmp_path / "o.zarr",
        str(onnx_path),
        RunConfig(dtype="float32", workers=1, tile=(92 + 16,)),
    )
    assert report.ok, report.inputs[0].message
    got = zarr.open_array(str(tmp_path / "o.zarr" / "img" / "0"), mode="r")[:]
    spec = read_model_spec(onnx_path)
    m = spec.margin
    size = [spec.nearest_tiles(n + 2 * m)[1] for n in image.shape[1:]]  # accepted sizes
    pad = [(0, 0)] + [(m, s - n - m) for n, s in zip(image.shape[1:], size)]
    padded = np.pad(image / np.float32(255), pad, mode="reflect")
    with torch.inference_mode():
        want = net(torch.from_numpy(padded[None].astype(np.float32)))[0].numpy()[:, :90, :70]
    assert got.shape == (2, 90, 70)
    np.testing.assert_allclose(got, want, atol=1e-4)
