"""The pieces of ``bench_gpu.py`` that make inputs and models and time the network
alone and the MONAI peer (one model per call; ``args`` is bench_gpu's namespace)."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import cached, same_stride, tile_starts, write_slide_tiff

DEPTH, CLASSES = 4, 1


# ---------------------------------------------------------------------------- inputs


def write_volume(path: Path, shape: tuple[int, ...], seed: int = 0) -> Path:
    """A uint8 Zarr volume with smooth, cell-like structure and noise (compresses like EM)."""
    import zarr
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = rng.random(tuple(max(2, s // 12) for s in shape), dtype=np.float32)
    smooth = ndimage.zoom(coarse, [s / c for s, c in zip(shape, coarse.shape)], order=1)
    smooth = smooth[tuple(slice(0, s) for s in shape)]
    vol = np.clip(200 * smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    chunks = tuple(min(s, c) for s, c in zip(shape, (64, 256, 256)))
    arr = zarr.create_array(str(path), shape=vol.shape, chunks=chunks, dtype="uint8")
    arr[...] = vol
    return path


def make_input(mp: dict, shape: tuple[int, ...], work: Path) -> Path:
    """The input of ``shape`` for a model (kept in ``work``): a slide-like RGB JPEG TIFF
    for 2D, a uint8 Zarr volume for 3D."""
    if mp["ndim"] == 2:
        height, width = shape
        path, _ = cached(
            work / f"gpu_slide_{height}x{width}_t256_jpeg90.tif",
            lambda part: write_slide_tiff(part, (height, width), tile=256),
        )
        return path
    path = work / ("gpu_volume_" + "x".join(map(str, shape)) + ".zarr")
    if not (path / "zarr.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        write_volume(path, shape)
    return path


def warmup_shape(mp: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A quarter of each side (at least a tile): the first input of the end-to-end run,
    which pays for the cluster's start, the model's load and cuDNN's tuning."""
    return tuple(min(n, max(mp["tile"], n // 4)) for n in shape)


def copies(sources: list[Path], folder: Path) -> list[Path]:
    """The sources copied under distinct names, in order (a run refuses one file twice)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, src in enumerate(sources):
        dst = folder / f"in{i}{''.join(src.suffixes)}"
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        out.append(dst)
    return out


def build_model(mp: dict, work: Path) -> tuple[Path, Path, float]:
    """Seeded U-Net weights and their TorchScript export; returns (model, weights, seconds)."""
    from pipeline.model import export_model
    from pipeline.testing import seeded_weights

    t0 = time.perf_counter()
    arch = dict(in_channels=mp["channels"], classes=CLASSES, base=mp["base"], depth=DEPTH)
    stem = f"unet{mp['ndim']}d_b{mp['base']}"
    weights = seeded_weights(work / f"{stem}.weights.pt", **arch, ndim=mp["ndim"], padding="same")
    model = work / f"{stem}.pt"
    export_model(str(model), weights=str(weights), **arch, ndim=mp["ndim"], padding="same")
    return model, weights, time.perf_counter() - t0


def lattice_tiles(shape: tuple[int, ...], mp: dict) -> int:
    stride = same_stride(mp["tile"], mp["overlap"], 2**DEPTH)
    return math.prod(len(tile_starts(n, mp["tile"], stride)) for n in shape)


# ---------------------------------------------------------------------------- figures


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def _timed_loop(run, batches: list, n: int, device: str, warm: int = 3) -> float:
    for b in batches[:warm]:  # cuDNN picks its algorithms on the first calls
        run(b)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        run(batches[i % len(batches)])
    _sync(device)
    return time.perf_counter() - t0


def network_only(args, mp: dict, model: Path, tiles: int, batch: int) -> dict[str, Any]:
    """The network alone on ``tiles`` tiles in batches of ``batch`` made beforehand."""
    import torch

    from pipeline.backends import load_backend

    rng = np.random.default_rng(1)
    shape = (batch, mp["channels"], *(mp["tile"],) * mp["ndim"])
    host = [(rng.integers(0, 256, shape, dtype=np.uint8) / np.float32(255)) for _ in range(4)]
    host = [h.astype(np.float32) for h in host]
    dev = [torch.from_numpy(h).to(args.device) for h in host]
    n = math.ceil(tiles / batch)
    warm = 1 if args.tiny else 3  # cuDNN's algorithm search needs a few calls per shape
    out: dict[str, Any] = {"batches": n, "batch": batch, "tiles": tiles}
    backend = load_backend(
        str(model), backend="torchscript", device=args.device, precision=args.precision
    )
    try:
        try:  # a backend that takes device tensors keeps the batch on the device
            backend.predict(dev[0])
            out["net_backend_s"] = _timed_loop(backend.predict, dev, n, args.device, warm)
        except Exception as exc:
            out["net_backend_device"] = f"not supported: {type(exc).__name__}: {exc}"[:300]
        out["net_backend_host_s"] = _timed_loop(backend.predict, host, n, args.device, warm)
    finally:
        backend.close()
    module = torch.jit.load(str(model), map_location=args.device).eval()

    def run_module(x):
        # as the backend runs it: the profiling executor only re-optimises per shape
        with (
            torch.inference_mode(),
            torch.jit.optimized_execution(False),
            _autocast(args.device, args.precision),
        ):
            return module(x)

    out["net_module_s"] = _timed_loop(run_module, dev, n, args.device, warm)
    return out


def monai_peer(args, mp: dict, src: Path, weights: Path, work: Path, batch: int) -> dict:
    """What a MONAI user writes: read, ``sliding_window_inference`` with AMP, Zarr."""
    import tifffile
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from pipeline.model import UNet

    torch.backends.cudnn.benchmark = True
    net = UNet(mp["channels"], CLASSES, mp["base"], DEPTH, ndim=mp["ndim"], padding="same")
    net.load_state_dict(torch.load(weights, weights_only=True))
    net = net.eval().to(args.device)
    times = []
    for rnd in range(2):  # cold (cuDNN tuning), warm
        out_path = work / f"monai{rnd}.zarr"
        shutil.rmtree(out_path, ignore_errors=True)
        _sync(args.device)
        t0 = time.perf_counter()
        if mp["ndim"] == 2:
            img = np.moveaxis(tifffile.imread(src), -1, 0)  # (C, Y, X) uint8
        else:
            img = zarr.open_array(str(src), mode="r")[...][None]  # (1, Z, Y, X)
        x = torch.from_numpy(np.ascontiguousarray(img)).to(args.device)[None].float() / 255
        with torch.inference_mode(), _autocast(args.device, args.precision):
            y = sliding_window_inference(
                x,
                roi_size=(mp["tile"],) * mp["ndim"],
                sw_batch_size=batch,
                predictor=net,
                overlap=mp["overlap"] / mp["tile"],
                mode="gaussian",
            )
        u8 = (y[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        chunks = (1, *((1024, 1024) if mp["ndim"] == 2 else (128, 128, 128)))
        chunks = tuple(min(c, s) for c, s in zip(chunks, u8.shape))
        arr = zarr.create_array(str(out_path), shape=u8.shape, chunks=chunks, dtype="uint8")
        arr[...] = u8
        times.append(time.perf_counter() - t0)
        del x, y, u8
        shutil.rmtree(out_path, ignore_errors=True)
    del net
    return {"cold_s": times[0], "warm_s": times[1]}
