"""``pipeline demo``: synthetic slides, a small U-Net trained on the spot, one full run.

Everything the demo needs is made here, so it works offline on a laptop CPU:

1. a few synthetic brightfield "slides" (H&E-like: pink eosin background, dark purple
   elliptical nuclei) written as tiled, pyramidal, JPEG-compressed OME-TIFFs at
   0.5 µm/px, with their exact nucleus masks beside them;
2. a small 2D U-Net trained for a fixed wall-clock budget on freshly generated images
   of the same kind (every batch is new data, so there is no over-fitting to watch);
3. the network exported to ONNX with :func:`pipeline.model.export.export_model`;
4. :func:`pipeline.run.run` over the slides into ``masks.zarr``.

The images are made in optical density (Beer-Lambert): a pixel is
``255 * exp(-(c_h * H + c_e * E))`` for haematoxylin and eosin stain vectors ``H`` and
``E``, which gives the colours of real stains without hand-tuning RGB values.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import ConfigError, InternalError

if TYPE_CHECKING:
    from pipeline.backends.base import ModelSpec
    from pipeline.config import RunConfig
    from pipeline.run import RunReport

log = logging.getLogger(__name__)

PIXEL_SIZE_UM = 0.5
TILE = 256
CROP = 128
BATCH = 8
ARCH = {"in_channels": 3, "classes": 1, "base": 8, "depth": 3, "ndim": 2, "padding": "same"}

# Optical density per unit stain (RGB), Ruifrok & Johnston (2001).
_HAEMATOXYLIN = np.array([0.650, 0.704, 0.286], dtype=np.float32)
_EOSIN = np.array([0.072, 0.990, 0.105], dtype=np.float32)
_NUCLEI_PER_PX = 1 / 2000  # about 500 nuclei on 1024 x 1024

Echo = Callable[[str], Any]


def _smooth_noise(shape: tuple[int, int], cell: float, rng: np.random.Generator) -> np.ndarray:
    """Value noise in [0, 1]: a random grid of ``cell`` px spacing, bilinearly interpolated."""
    h, w = shape
    grid = rng.random((int(h / cell) + 2, int(w / cell) + 2), dtype=np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.intp), x.astype(np.intp)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _paint_nuclei(conc: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """Add random elliptical nuclei to the haematoxylin map ``conc`` and to ``mask``."""
    h, w = mask.shape
    n = rng.poisson(h * w * _NUCLEI_PER_PX)
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    a = rng.uniform(4.0, 15.0, n)  # semi-axes in px: 4-7.5 µm at 0.5 µm/px
    b = a * rng.uniform(0.45, 1.0, n)
    theta = rng.uniform(0, np.pi, n)
    stain = rng.uniform(0.9, 1.8, n)  # darker and paler nuclei
    for yc, xc, ai, bi, t, s in zip(cy, cx, a, b, theta, stain):
        r = int(np.ceil(ai)) + 1
        y0, y1 = max(0, int(yc) - r), min(h, int(yc) + r + 2)
        x0, x1 = max(0, int(xc) - r), min(w, int(xc) + r + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - yc
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - xc
        u = (dx * np.cos(t) + dy * np.sin(t)) / ai
        v = (dy * np.cos(t) - dx * np.sin(t)) / bi
        rr = u * u + v * v
        mask[y0:y1, x0:x1] |= rr <= 1.0
        # a rim of about one pixel fades out, like a slightly blurred edge
        edge = np.clip((1.0 - rr) * ai / 2.0, 0.0, 1.0)
        np.maximum(conc[y0:y1, x0:x1], s * edge, out=conc[y0:y1, x0:x1])


def synthetic_slide(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E-like brightfield image and its exact nucleus mask.

    Parameters
    ----------
    size
        Height and width in pixels (at 0.5 µm/px).
    rng
        Source of randomness; the same generator state gives the same image.

    Returns
    -------
    image : numpy.ndarray
        ``(size, size, 3)`` uint8 RGB: near-white pink background, denser pink stroma
        patches, dark purple textured nuclei, sensor noise.
    mask : numpy.ndarray
        ``(size, size)`` bool, True inside a nucleus.
    """
    shape = (size, size)
    mask = np.zeros(shape, dtype=bool)
    haem = np.zeros(shape, dtype=np.float32)
    _paint_nuclei(haem, mask, rng)
    chromatin = 0.75 + 0.5 * _smooth_noise(shape, 2.5, rng)
    haem = haem * chromatin + 0.03
    stroma = np.clip(_smooth_noise(shape, 96, rng) * 1.6 - 0.6, 0.0, 1.0)
    eosin = 0.08 + 0.5 * stroma + 0.1 * _smooth_noise(shape, 8, rng)
    density = haem[..., None] * _HAEMATOXYLIN + eosin[..., None] * _EOSIN
    image = 255.0 * np.exp(-density) + rng.normal(0.0, 3.0, (*shape, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _ome_metadata() -> dict[str, Any]:
    return {
        "axes": "YXS",
        "PhysicalSizeX": PIXEL_SIZE_UM,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": PIXEL_SIZE_UM,
        "PhysicalSizeYUnit": "µm",
    }


def write_slide(path: str | os.PathLike, image: np.ndarray, *, compression: str = "jpeg") -> None:
    """Write an RGB image as a tiled pyramidal OME-TIFF (levels in SubIFDs).

    Parameters
    ----------
    path
        The ``.ome.tif`` file to write.
    image
        ``(Y, X, 3)`` uint8.
    compression
        ``"jpeg"`` (as most brightfield scanners) or ``"zlib"`` (lossless).
    """
    import tifffile

    levels = [image]
    while max(levels[-1].shape[:2]) > TILE:
        prev = levels[-1][: levels[-1].shape[0] // 2 * 2, : levels[-1].shape[1] // 2 * 2]
        down = prev.reshape(prev.shape[0] // 2, 2, prev.shape[1] // 2, 2, 3).mean(axis=(1, 3))
        levels.append(np.rint(down).astype(np.uint8))
    args: dict[str, Any] = {
        "tile": (TILE, TILE),
        "photometric": "rgb",
        "compression": compression,
        "resolutionunit": "CENTIMETER",
    }
    if compression == "jpeg":
        args["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, ome=True) as tif:
        for i, level in enumerate(levels):
            px_per_cm = 1e4 / (PIXEL_SIZE_UM * 2**i)
            extra = (
                {"subifds": len(levels) - 1, "metadata": _ome_metadata()}
                if i == 0
                else {"subfiletype": 1}
            )
            tif.write(level, resolution=(px_per_cm, px_per_cm), **args, **extra)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(
        path,
        mask.astype(np.uint8) * 255,
        tile=(TILE, TILE),
        compression="zlib",
        resolution=(1e4 / PIXEL_SIZE_UM,) * 2,
        resolutionunit="CENTIMETER",
    )


def make_slides(folder: str | os.PathLike, n_slides: int, size: int, seed: int) -> list[Path]:
    """Write ``n_slides`` synthetic slides to ``folder/slides`` and masks to ``folder/truth``.

    Returns
    -------
    list of pathlib.Path
        The slide files, ``slide-1.ome.tif`` ... (masks: ``truth/slide-1.tif`` ...).
    """
    slides, truth = Path(folder) / "slides", Path(folder) / "truth"
    slides.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, n_slides + 1):
        image, mask = synthetic_slide(size, np.random.default_rng([seed, i]))
        path = slides / f"slide-{i}.ome.tif"
        write_slide(path, image)
        _write_mask(truth / f"slide-{i}.tif", mask)
        paths.append(path)
    return paths


def _batch(rng: np.random.Generator, batch: int, crop: int) -> tuple[Any, Any]:
    """``batch`` random, randomly flipped crops of one fresh synthetic image, as tensors."""
    import torch

    image, mask = synthetic_slide(2 * crop, rng)
    xs, ys = [], []
    for _ in range(batch):
        y0, x0 = rng.integers(0, crop + 1, 2)
        x = image[y0 : y0 + crop, x0 : x0 + crop]
        y = mask[y0 : y0 + crop, x0 : x0 + crop]
        if rng.random() < 0.5:
            x, y = x[::-1], y[::-1]
        if rng.random() < 0.5:
            x, y = x.swapaxes(0, 1), y.T
        xs.append(x.transpose(2, 0, 1))
        ys.append(y[None])
    # the pipeline's "dtype" normalisation: uint8 / 255
    x = torch.from_numpy(np.stack(xs).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.stack(ys).astype(np.float32))


def _recalibrate_batchnorm(net: Any, rng: np.random.Generator, batches: int = 8) -> None:
    """Recompute BatchNorm running statistics for the final weights.

    After a few seconds of training the running averages still mix in the statistics of
    early weights; averaging over fresh batches with the final weights fixes eval mode.
    """
    import torch

    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            net(_batch(rng, BATCH, CROP)[0])
    for m in norms:
        m.momentum = 0.1
    net.eval()


def _fastest_threads(net: Any, x: Any, limit: int) -> int:
    """Time a forward pass of ``x`` on ``limit`` threads and on one; the faster count wins.

    OpenMP threads spin-wait for each other: on a machine whose cores are busy with other
    work (a shared CI runner) two threads can be ten times slower than one.
    """
    import torch

    timings = {}
    with torch.no_grad():
        torch.set_num_threads(1)
        net(x)  # pays for the allocations
        for threads in sorted({1, limit}):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            net(x)
            timings[threads] = time.perf_counter() - t0
    fastest = min(timings, key=timings.__getitem__)
    log.debug("forward time by torch threads: %s; using %d", timings, fastest)
    return fastest


def train_unet(
    seconds: float,
    *,
    seed: int = 0,
    lr: float = 1e-2,
    threads: int = 2,
    max_steps: int | None = None,
) -> tuple[Any, float, int]:
    """Train the demo U-Net on synthetic nuclei for about ``seconds`` of wall time.

    Parameters
    ----------
    seconds
        Training budget; the loop stops at the first step that ends past it (at least
        one step is always taken).
    seed
        Seeds the data and the weights.
    lr
        Adam learning rate.
    threads
        Most torch CPU threads to use (one is used instead when it measures faster);
        the process-wide setting is restored afterwards.
    max_steps
        Stop after this many steps even if time is left (None: no limit).

    Returns
    -------
    model : pipeline.model.unet.UNet
        In eval mode, with its sigmoid output.
    loss : float
        Mean BCE of the last few steps.
    steps : int
        Optimiser steps taken.
    """
    import torch

    from pipeline.model.unet import UNet

    previous = torch.get_num_threads()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1000])
    net = UNet(**ARCH, activation="none")  # logits: BCE-with-logits is stable
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    deadline = time.monotonic() + seconds
    losses: list[float] = []
    net.train()
    try:
        torch.set_num_threads(_fastest_threads(net, _batch(rng, 2, CROP)[0], threads))
        while not losses or (time.monotonic() < deadline and len(losses) != max_steps):
            x, y = _batch(rng, BATCH, CROP)
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if len(losses) % 50 == 0:
                log.info("step %d: loss %.4f", len(losses), np.mean(losses[-10:]))
        _recalibrate_batchnorm(net, rng)
    finally:
        torch.set_num_threads(previous)
    model = UNet(**ARCH)  # same weights, sigmoid output for the pipeline
    model.load_state_dict(net.state_dict())
    model.eval()
    return model, float(np.mean(losses[-10:])), len(losses)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def evaluate(model: Any, *, size: int = 512, seed: int = 0) -> float:
    """Dice of ``model`` (probability > 0.5) on one held-out synthetic image."""
    import torch

    image, mask = synthetic_slide(size, np.random.default_rng([seed, 999]))
    x = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
    with torch.no_grad():
        prob = model(x)[0, 0].numpy()
    return dice(prob > 0.5, mask)


def export_demo_model(model: Any, path: Path) -> ModelSpec:
    """Export the trained network to ONNX (geometry and normalisation embedded)."""
    from pipeline.model.export import export_model

    return export_model(path, model=model, **ARCH, activation="auto", normalize="dtype", fmt="onnx")


def _train_and_export(
    path: Path, seconds: float, seed: int, echo: Echo
) -> tuple[Path, float, float]:
    """Train for ``seconds``, score on a held-out image, export; (path, loss, Dice)."""
    echo(f"Training a small U-Net for {seconds:g} s on synthetic nuclei...")
    model, loss, steps = train_unet(seconds, seed=seed)
    score = evaluate(model, seed=seed)
    echo(f"  {steps} steps, final loss {loss:.3f}, Dice on a held-out image {score:.3f}")
    export_demo_model(model, path)
    echo(f"Exported the model to {path}")
    return path, loss, score


def _progress(echo: Echo) -> Callable[[str, int, int], None]:
    """A progress callback that prints one line per slide, when it is finished."""

    def progress(name: str, done: int, total: int) -> None:
        if done == total:
            echo(f"  segmented {name} ({total} block{'s' if total != 1 else ''})")

    return progress


def _summarise(echo: Echo, report: RunReport, out: Path, folder: Path) -> None:
    """One line per slide, then where the results are and how to look at them."""
    echo("")
    for r in report.inputs:
        detail = r.output if r.state == "done" else f"{r.reason}: {r.message}"
        shape = "x".join(str(s) for s in r.shape or [])
        echo(f"  {r.state:6s} {r.name:12s} {shape:>12s} {r.seconds:6.1f} s  {detail}")
    ngff = (report.config or {}).get("ngff", "?")
    echo(
        f"\nMasks (NGFF {ngff} OME-Zarr, probability x 255, level 0 at {PIXEL_SIZE_UM} µm/px): {out}"
    )
    echo(f"Ground truth masks: {folder / 'truth'}; run report: {out / 'report.json'}")
    first = out / report.inputs[0].name
    echo("Look at them with:")
    echo(f"  pipeline inspect {out}")
    echo(f"  napari --plugin napari-ome-zarr {first}   # pip install napari napari-ome-zarr")
    echo(
        f"  pipeline run {folder / 'slides'} --out OTHER.zarr --model {folder / 'unet.onnx'}"
        "   # again, with your own options"
    )


def run_demo(
    folder: str | os.PathLike,
    *,
    train_seconds: float = 60.0,
    echo: Echo = print,
    size: int = 1024,
    n_slides: int = 3,
    seed: int = 0,
    config: RunConfig | None = None,
) -> dict[str, Any]:
    """Make synthetic slides, train and export a small U-Net, and segment the slides.

    Parameters
    ----------
    folder
        Where ``slides/``, ``truth/``, ``unet.onnx`` and ``masks.zarr`` are written
        (created if missing; earlier demo files there are replaced).
    train_seconds
        Wall-clock training budget.
    echo
        Prints user-facing text (``click.echo`` from the CLI).
    size
        Height and width of each slide in pixels.
    n_slides
        Number of slides.
    seed
        Seeds slides, training data and weights.
    config
        The :class:`~pipeline.config.RunConfig` of the run; default: a local Dask
        cluster with one worker process.

    Returns
    -------
    dict
        ``slides`` (paths), ``model`` (path), ``out`` (path), ``dice`` (held-out Dice
        after training), ``loss`` (final training loss), ``report``
        (:class:`~pipeline.run.RunReport`).

    Raises
    ------
    PipelineError
        When a slide failed in the pipeline (after the summary is shown).
    """
    from pipeline.config import RunConfig
    from pipeline.run import run

    if n_slides < 1 or size < 64:
        raise ConfigError(
            f"need n_slides >= 1 and size >= 64, got {n_slides} and {size}", where="run_demo"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slides = make_slides(folder, n_slides, size, seed)
    echo(
        f"Wrote {n_slides} synthetic slides ({size}x{size} RGB, {PIXEL_SIZE_UM} µm/px, "
        f"tiled pyramidal OME-TIFF) to {folder / 'slides'}"
    )
    model_path, loss, score = _train_and_export(folder / "unet.onnx", train_seconds, seed, echo)
    out = folder / "masks.zarr"
    echo(f"Running the pipeline into {out}...")
    cfg = config if config is not None else RunConfig(workers=1)
    report = run([str(p) for p in slides], out, str(model_path), cfg, progress=_progress(echo))
    _summarise(echo, report, out, folder)
    if not report.ok:
        failed = sum(r.state != "done" for r in report.inputs)
        raise InternalError(
            f"{failed} of {len(report.inputs)} demo slides failed",
            where=out / "report.json",
            hint="see the summary above",
        )
    return {
        "slides": slides,
        "model": model_path,
        "out": out,
        "dice": score,
        "loss": loss,
        "report": report,
    }
