"""End-to-end throughput against the bare backend and a MONAI user's script.

    python benchmarks/bench_throughput.py [--size 2048] [--base 16] [--tile 256]
        [--overlap 64] [--repeat 1] [--device cpu|cuda] [--out benchmarks/results/history.jsonl]

Figures (Mpix/s of *image* pixels, best of ``--repeat``):

a. ``pipeline.run.run`` on a tiled TIFF with the ONNX backend:
   ``a_total``   wall time of ``run`` (LocalCluster start, model load, blocks, pyramid,
                 metadata); the ratios use this one.
   ``a_blocks``  the report's per-input seconds (the cluster starts inside the first
                 input when the image is several blocks: then close to a_total).
   ``a_warm``    ``run`` on an already started cluster whose worker has the model loaded.
   ``a_sync``    ``run`` in-process (``scheduler="sync"``), with the per-block
                 read / predict / write seconds and the model's own share of predict.
b. the bare backend (``load_backend(..., backend="onnx", threads=2)``) on exactly the
   lattice tiles of (a), pre-loaded and normalised, in batches of the same size.
   ``b_full``: issue 6's bare loop, all of it timed: decode the TIFF (tifffile), cut the
   same lattice tiles, normalise, batches of ``--batch-size``, the backend; nothing else.
c. a MONAI user: tifffile whole image → torch eager U-Net (same weights) in
   ``sliding_window_inference`` (gaussian, same stride) → Zarr (uint8, chunks 1024).

Ratios: a/b (target ≥ 0.9), a/b_full (issue 6's definition, target ≥ 0.9; run it with
``--shape 4096,8192`` so the pipeline runs several blocks) and a/c (target ≥ 1.5).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_standard_options,
    append_history,
    fmt,
    same_stride,
    tile_starts,
    use_source_tree,
    work_folder,
    write_tiled_tiff,
)

use_source_tree()
log = logging.getLogger("bench_throughput")

DEPTH, IN_CHANNELS, CLASSES = 4, 3, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="image side in pixels")
    p.add_argument("--shape", help="image height,width (overrides --size), e.g. 4096,8192")
    p.add_argument("--block", type=int, help="pipeline block side (default: its own choice)")
    p.add_argument("--base", type=int, default=16, help="U-Net base width")
    p.add_argument("--tile", type=int, default=256, help="network input tile")
    p.add_argument("--overlap", type=int, default=64, help="overlap between tiles (px)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed rounds (figures interleaved; each figure's best kept)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="model threads (b, c and the worker)")
    p.add_argument("--compression", choices=("jpeg", "zlib", "none"), default="jpeg")
    p.add_argument("--skip", default="", help="comma list of figures to skip: warm,sync,full,peer")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    add_standard_options(
        p,
        workdir="keep the model, TIFF and outputs here (default: temp)",
        quick="a 256² image (one tile), no warm-ups, no warm-cluster run",
    )
    args = p.parse_args(argv)
    if args.shape:
        try:
            args.shape = tuple(int(v) for v in args.shape.replace("x", ",").split(","))
        except ValueError:
            p.error(f"--shape must be HEIGHT,WIDTH, got {args.shape!r}")
        if len(args.shape) != 2 or min(args.shape) < 1:
            p.error(f"--shape must be two positive sizes, got {args.shape}")
    else:
        args.shape = (args.size, args.size)
    if args.quick:
        args.shape = tuple(min(n, args.tile) for n in args.shape)
        args.repeat, args.no_warmup = 1, True
        args.skip = ",".join(filter(None, [args.skip, "warm"]))
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


# ---------------------------------------------------------------------------- setup


def build_models(work: Path, base: int) -> tuple[Path, Path, Path]:
    """One set of U-Net weights, exported to ONNX and TorchScript; returns (onnx, ts, weights)."""
    from pipeline.model import export_model
    from pipeline.testing import seeded_weights

    arch = dict(in_channels=IN_CHANNELS, classes=CLASSES, base=base, depth=DEPTH)
    weights = seeded_weights(work / "weights.pt", **arch, padding="same")
    paths = []
    for name in ("model.onnx", "model.pt"):
        export_model(str(work / name), weights=str(weights), **arch, padding="same")
        paths.append(work / name)
    return paths[0], paths[1], weights


def run_config(args: argparse.Namespace, **extra: Any):
    from pipeline.config import RunConfig

    return RunConfig(
        tile=(args.tile,),
        overlap=args.overlap,
        blend="gaussian",
        backend="onnx",
        device=args.device,
        batch_size=args.batch_size,
        threads_per_worker=args.threads,
        block=args.block,
        **extra,
    )


def mpix(pixels: int, seconds: float | None) -> float | None:
    return pixels / 1e6 / seconds if seconds and seconds > 0 else None


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------- figures
#
# Each figure is a context manager (its setup and teardown) yielding ``once()``, which
# times one run and returns a record with ``total_s``. ``main`` runs the figures in
# interleaved rounds (a, a_warm, a_sync, b, c, a, ...) so that a change in the load of a
# shared machine hits every figure alike, and keeps each figure's fastest round.


def check_report(report) -> None:
    if not report.ok:
        bad = [f"{r.name}: {r.reason}: {r.message}" for r in report.inputs if r.state != "done"]
        raise RuntimeError("pipeline run failed: " + "; ".join(bad))


def _timed_run(tiff: Path, onnx: Path, out: Path, cfg) -> tuple[float, Any]:
    from pipeline.run import run

    fresh(out)
    t0 = time.perf_counter()
    report = run([str(tiff)], out, str(onnx), cfg)
    wall = time.perf_counter() - t0
    check_report(report)
    return wall, report


@contextlib.contextmanager
def end_to_end(args, tiff: Path, onnx: Path, work: Path):
    """(a) ``run`` with its own LocalCluster: total wall time and the per-input seconds."""
    cfg = run_config(args)

    def once() -> dict[str, Any]:
        wall, report = _timed_run(tiff, onnx, work / "out_a.zarr", cfg)
        r0 = report.inputs[0]
        return {
            "total_s": wall,
            "blocks_s": r0.seconds,
            "tiles": r0.tiles,
            "blocks": r0.blocks,
            "pixels": r0.pixels,
        }

    yield once


@contextlib.contextmanager
def warm_cluster(args, tiff: Path, onnx: Path, work: Path):
    """(a_warm) ``run`` on a cluster that is already up and whose worker has the model."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            silence_logs=logging.ERROR,
            memory_limit=0,
            env={"OMP_NUM_THREADS": str(args.threads)},
        ) as cluster,
        Client(cluster),
    ):
        cfg = run_config(args, scheduler=cluster.scheduler_address, workers=1)
        _timed_run(tiff, onnx, work / "out_warm.zarr", cfg)  # loads the model on the worker

        def once() -> dict[str, Any]:
            wall, report = _timed_run(tiff, onnx, work / "out_warm.zarr", cfg)
            return {"total_s": wall, "blocks_s": report.inputs[0].seconds}

        yield once


class _TimedBackend:
    """Wraps a backend to add up the seconds spent inside ``predict`` and
    ``predict_tensor`` (what the pipeline's blocks call)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _timed(self, fn, batch):
        t0 = time.perf_counter()
        out = fn(batch)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._timed(self.inner.predict, batch)

    def predict_tensor(self, batch):
        return self._timed(self.inner.predict_tensor, batch)


@contextlib.contextmanager
def _profiled(blocks: list, timed: dict):
    """Record every in-process block's ``BlockResult.seconds`` and the model's share.

    The in-process path looks ``process_block`` (and ``predict_shared``, the first phase
    of blocks that own tiles shared with their neighbours) up in ``pipeline.batch.tasks`` and
    ``get_backend`` in ``pipeline.engine.stages``, so wrapping them there sees every block.
    """
    import pipeline.batch.tasks as prun
    import pipeline.engine.stages as stages

    saved = {
        (prun, n): getattr(prun, n) for n in ("process_block", "predict_shared") if hasattr(prun, n)
    }
    saved[(stages, "get_backend")] = stages.get_backend
    orig_process = saved[(prun, "process_block")]
    orig_shared = saved.get((prun, "predict_shared"))
    orig_get = stages.get_backend

    def process_block(job, *args):
        res = orig_process(job, *args)
        blocks.append(dict(res.seconds, tiles=res.tiles))
        return res

    def predict_shared(job, *args):
        t0 = time.perf_counter()
        out = orig_shared(job, *args)
        blocks.append({"shared": time.perf_counter() - t0, "tiles": 0})
        return out

    def get_backend(ref):
        if ref not in timed:
            timed[ref] = _TimedBackend(orig_get(ref))
        return timed[ref]

    prun.process_block, stages.get_backend = process_block, get_backend
    if orig_shared is not None:
        prun.predict_shared = predict_shared
    try:
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)


@contextlib.contextmanager
def in_process(args, tiff: Path, onnx: Path, work: Path):
    """(a_sync) ``run`` in-process, with the stage breakdown of every block."""
    cfg = run_config(args, scheduler="sync")

    def once() -> dict[str, Any]:
        blocks: list[dict] = []
        timed: dict = {}
        with _profiled(blocks, timed):
            wall, report = _timed_run(tiff, onnx, work / "out_sync.zarr", cfg)
        keys = sorted({k for b in blocks for k in b if k != "tiles"})
        stage = {k: sum(b.get(k, 0.0) for b in blocks) for k in keys}
        model = sum(t.seconds for t in timed.values())
        per_input = report.inputs[0].seconds
        writing = stage.get("write", 0.0)
        return {
            "total_s": wall,
            "blocks_s": per_input,
            "stage_s": {k: round(v, 3) for k, v in stage.items()},
            "model_s": round(model, 3),
            # block time minus the model and the write: reading, decoding, normalising,
            # tile stacking, output checks, blending, dtype conversion
            "tile_merge_s": round(sum(stage.values()) - writing - model, 3),
            # per-input seconds outside the blocks: open, plan, pyramid, metadata
            "other_s": round(per_input - sum(stage.values()), 3),
            "per_block": blocks[:200],
        }

    yield once


def lattice_tiles(args, spec, shape: tuple[int, int]):
    """The lattice (a) uses and its tiles: unique ones, and those its blocks run."""
    from pipeline.engine.plan import make_plan

    plan = make_plan(spec, shape, IN_CHANNELS, CLASSES, run_config(args))
    lat = plan.lattice
    unique = list(itertools.product(*(range(c) for c in lat.counts)))
    if hasattr(plan, "grid"):  # two-phase blocks: a shared tile runs once, in its owner
        layout = plan.grid().layout().values()
        shared = {t for _, own, _ in layout for t in own}
        per_block = len(shared) + sum(
            t not in shared for touching, _, _ in layout for t in touching
        )
    else:
        per_block = sum(len(lat.tiles_touching(b)) for b in plan.blocks())
    return lat, unique, per_block


def load_normalised(tiff: Path) -> np.ndarray:
    import tifffile

    img = tifffile.imread(tiff)
    return np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.float32) / np.float32(255)


@contextlib.contextmanager
def onnx_backend(args, onnx: Path):
    """The bare ONNX backend of (b) and (b_full), closed when the figure is done."""
    from pipeline.backends import load_backend

    backend = load_backend(str(onnx), backend="onnx", threads=args.threads, device=args.device)
    try:
        yield backend
    finally:
        with contextlib.suppress(Exception):
            backend.close()


@contextlib.contextmanager
def bare(args, tiff: Path, onnx: Path):
    """(b) the backend alone on the lattice tiles, pre-read, normalised and batched."""
    image = load_normalised(tiff)
    with onnx_backend(args, onnx) as backend:
        lat, tiles, per_block = lattice_tiles(args, backend.spec, image.shape[1:])
        pad = [(0, 0)] + [(m + lat.tile[a], m + lat.tile[a]) for a, m in enumerate(lat.margin)]
        padded = np.pad(image, pad, mode="reflect")  # same mirroring as the pipeline
        shift = [p[0] for p in pad[1:]]

        def tile_at(t):
            r = lat.in_region(t)
            box = (slice(o + s, o + s + n) for o, s, n in zip(r.offset, shift, r.shape))
            return padded[(slice(None), *box)]

        batches = [
            np.ascontiguousarray(np.stack([tile_at(t) for t in tiles[i : i + args.batch_size]]))
            for i in range(0, len(tiles), args.batch_size)
        ]
        image = padded = None  # the batches hold what the loop needs
        backend.predict(batches[0])  # session initialisation, allocator

        def once() -> dict[str, Any]:
            t0 = time.perf_counter()
            for b in batches:
                backend.predict(b)
            return {
                "total_s": time.perf_counter() - t0,
                "tiles": len(tiles),
                "tiles_in_blocks": per_block,
                "stride": list(lat.stride),
                "overlap": list(lat.overlap),
                "computed_pixels": len(tiles) * int(np.prod(lat.tile)),
            }

        yield once


@contextlib.contextmanager
def bare_full(args, tiff: Path, onnx: Path):
    """(b_full) issue 6's bare loop, all timed: decode, cut, normalise, batch, backend.

    The tiles are the pipeline's lattice for this model (``same`` padding: stride the
    largest multiple of ``2**depth`` that leaves ``--overlap``, the last tile flush),
    computed here from the public geometry, so the loop needs nothing but the backend.
    """
    import tifffile

    with onnx_backend(args, onnx) as backend:
        stride = same_stride(args.tile, args.overlap, 2**DEPTH)
        starts = [tile_starts(n, args.tile, stride) for n in args.shape]
        tiles = list(itertools.product(*starts))
        pad = [(0, max(0, args.tile - n)) for n in args.shape]
        backend.predict(np.zeros((args.batch_size, IN_CHANNELS, args.tile, args.tile), np.float32))

        def once() -> dict[str, Any]:
            t0 = time.perf_counter()
            image = tifffile.imread(tiff)  # (H, W, C) uint8
            if any(p[1] for p in pad):  # smaller than a tile: mirrored, like the pipeline
                image = np.pad(image, [*pad, (0, 0)], mode="reflect")
            decoded = time.perf_counter() - t0
            scale = np.float32(1 / 255)
            for i in range(0, len(tiles), args.batch_size):
                cut = np.stack(
                    [
                        image[y : y + args.tile, x : x + args.tile]
                        for y, x in tiles[i : i + args.batch_size]
                    ]
                )
                batch = np.ascontiguousarray(cut.transpose(0, 3, 1, 2), dtype=np.float32)
                batch *= scale
                backend.predict(batch)
            return {
                "total_s": time.perf_counter() - t0,
                "decode_s": round(decoded, 3),
                "tiles": len(tiles),
                "stride": stride,
            }

        yield once


@contextlib.contextmanager
def monai_peer(args, tiff: Path, weights: Path, work: Path):
    """(c) what a MONAI user writes: whole image, sliding window, Zarr."""
    import tifffile
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from pipeline.model import UNet

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = UNet(
        in_channels=IN_CHANNELS, classes=CLASSES, base=args.base, depth=DEPTH, padding="same"
    )
    net.load_state_dict(torch.load(weights, weights_only=True))
    net = net.eval().to(device)
    with torch.inference_mode():  # warm-up: one batch of tiles (one tile when quick)
        warm = 1 if args.quick else args.batch_size
        net(torch.zeros(warm, IN_CHANNELS, args.tile, args.tile, device=device))

    def once() -> dict[str, Any]:
        out = fresh(work / "out_monai.zarr")
        t0 = time.perf_counter()
        img = tifffile.imread(tiff)
        x = torch.from_numpy(np.moveaxis(img, -1, 0)[None].astype(np.float32) / 255.0).to(device)
        with torch.inference_mode():
            y = sliding_window_inference(
                x,
                roi_size=(args.tile, args.tile),
                sw_batch_size=args.batch_size,
                predictor=net,
                overlap=args.overlap / args.tile,
                mode="gaussian",
            )
        prob = y[0].float().cpu().numpy()
        u8 = np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)
        arr = zarr.create_array(str(out), shape=u8.shape, chunks=(1, 1024, 1024), dtype="uint8")
        arr[...] = u8
        return {"total_s": time.perf_counter() - t0}

    yield once


# ---------------------------------------------------------------------------- main


def measure(
    figures_setup: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: bool,
    figures: dict,
    errors: dict,
) -> None:
    """Set every figure up, then run them in interleaved rounds; keep each one's best."""
    with contextlib.ExitStack() as stack:
        runners: dict[str, Callable[[], dict]] = {}
        for name, setup in figures_setup.items():
            try:
                runners[name] = stack.enter_context(setup())
            except Exception as exc:  # one failing figure must not hide the others
                errors[name] = f"setup: {type(exc).__name__}: {exc}"
                traceback.print_exc()
        for rnd in range(rounds + (1 if warmup else 0)):
            counted = rnd > 0 or not warmup
            for name, once in list(runners.items()):
                t0 = time.perf_counter()
                try:
                    rec = once()
                except Exception as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    del runners[name]
                    continue
                print(
                    f"[{time.strftime('%H:%M:%S')}] round {rnd}{'' if counted else ' (warm-up)'} "
                    f"{name}: {time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                if not counted:
                    continue
                rec["rounds_s"] = figures.get(name, {}).get("rounds_s", []) + [
                    round(rec["total_s"], 3)
                ]
                if name not in figures or rec["total_s"] < figures[name]["total_s"]:
                    figures[name] = rec
                else:
                    figures[name]["rounds_s"] = rec["rounds_s"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # distributed sets its own loggers to INFO; they would propagate to the root handler
    logging.getLogger("distributed").setLevel(logging.ERROR)
    load_start = [round(v, 2) for v in os.getloadavg()]
    work, tmp = work_folder(args.workdir, "bench_throughput_")
    pixels = args.shape[0] * args.shape[1]
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}
    try:
        t0 = time.perf_counter()
        tiff = write_tiled_tiff(
            work / "slide.tif",
            args.shape,
            channels=IN_CHANNELS,
            tile=256,
            compression=args.compression,
        )
        print(
            f"TIFF {args.shape[0]} × {args.shape[1]} written in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        onnx, ts, weights = build_models(work, args.base)
        setups: dict[str, Callable[[], Any]] = {"a": lambda: end_to_end(args, tiff, onnx, work)}
        if "warm" not in args.skip:
            setups["a_warm"] = lambda: warm_cluster(args, tiff, onnx, work)
        if "sync" not in args.skip:
            setups["a_sync"] = lambda: in_process(args, tiff, onnx, work)
        setups["b"] = lambda: bare(args, tiff, onnx)
        if "full" not in args.skip:
            setups["b_full"] = lambda: bare_full(args, tiff, onnx)
        if "peer" not in args.skip:
            setups["c"] = lambda: monai_peer(args, tiff, weights, work)
        measure(setups, args.repeat, not args.no_warmup, figures, errors)
    finally:
        if tmp is not None:
            tmp.cleanup()

    rates = summarise(figures, pixels)
    params = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    params["skip"] = sorted(args.skip)
    params["shape"] = list(args.shape)
    params.update(
        depth=DEPTH,
        in_channels=IN_CHANNELS,
        classes=CLASSES,
        padding="same",
        blend="gaussian",
        backend="onnx",
    )
    record = append_history(
        args.out,
        {
            "benchmark": "throughput",
            "params": params,
            "loadavg_start": load_start,
            "pixels": pixels,
            "mpix_per_s": rates,
            "figures": figures,
            "errors": errors,
        },
    )
    report(record)
    return 1 if errors else 0


def summarise(figures: dict, pixels: int) -> dict[str, float | None]:
    def rate(name: str, key: str = "total_s") -> float | None:
        return mpix(pixels, figures.get(name, {}).get(key))

    rates = {
        "a_total": rate("a"),
        "a_blocks": rate("a", "blocks_s"),
        "a_warm": rate("a_warm"),
        "a_sync": rate("a_sync"),
        "b_bare": rate("b"),
        "b_full": rate("b_full"),
        "c_monai": rate("c"),
    }

    def ratio(x: str, y: str) -> float | None:
        return rates[x] / rates[y] if rates[x] and rates[y] else None

    rates.update(
        {
            "ratio_a_b": ratio("a_total", "b_bare"),
            "ratio_a_bfull": ratio("a_total", "b_full"),
            "ratio_a_blocks_bfull": ratio("a_blocks", "b_full"),
            "ratio_a_c": ratio("a_total", "c_monai"),
            "ratio_a_blocks_b": ratio("a_blocks", "b_bare"),
            "ratio_a_warm_b": ratio("a_warm", "b_bare"),
            "ratio_a_blocks_c": ratio("a_blocks", "c_monai"),
        }
    )
    return {k: (round(v, 4) if v is not None else None) for k, v in rates.items()}


def report(record: dict) -> None:
    r, f = record["mpix_per_s"], record["figures"]
    print()
    shape = record["params"]["shape"]
    print(
        f"image {shape[0]} × {shape[1]} ({f.get('a', {}).get('blocks')} blocks), base {record['params']['base']}, tile "
        f"{record['params']['tile']}, overlap {record['params']['overlap']}, "
        f"device {record['params']['device']} ({record['machine']['cpu']}, "
        f"{record['machine']['cores']} cores)"
    )
    print(f"  a  pipeline run, total      {fmt(r['a_total'])} Mpix/s   (ratios use this one)")
    print(f"     pipeline run, blocks     {fmt(r['a_blocks'])} Mpix/s   (per-input seconds)")
    print(f"     pipeline run, warm       {fmt(r['a_warm'])} Mpix/s   (cluster up, model loaded)")
    print(f"     pipeline run, in-process {fmt(r['a_sync'])} Mpix/s   (scheduler=sync)")
    print(
        f"  b  bare ONNX backend        {fmt(r['b_bare'])} Mpix/s   ({f.get('b', {}).get('tiles')} tiles)"
    )
    print(
        f"     bare loop, all timed     {fmt(r['b_full'])} Mpix/s   (decode, cut, normalise, "
        f"batches, backend: issue 6's definition)"
    )
    print(f"  c  MONAI sliding window     {fmt(r['c_monai'])} Mpix/s")
    print(
        f"  a/b = {fmt(r['ratio_a_b'])} (target >= 0.9)   blocks/b = {fmt(r['ratio_a_blocks_b'])}"
        f"   warm/b = {fmt(r['ratio_a_warm_b'])}"
    )
    print(
        f"  a/b_full = {fmt(r['ratio_a_bfull'])} (issue 6: target >= 0.9)   "
        f"blocks/b_full = {fmt(r['ratio_a_blocks_bfull'])}"
    )
    print(
        f"  a/c = {fmt(r['ratio_a_c'])} (target >= 1.5)   blocks/c = {fmt(r['ratio_a_blocks_c'])}"
    )
    s = f.get("a_sync")
    if s:
        print(
            f"  in-process breakdown (s): stages {json.dumps(s['stage_s'])}, model {s['model_s']}, "
            f"read/tile/blend {s['tile_merge_s']}, outside blocks {s['other_s']}"
        )
    if f.get("a", {}).get("blocks") == 1 and not record["params"]["quick"]:
        print("  note: the pipeline ran one block (issue 6 asks for several: --shape 4096,8192)")
    if record["errors"]:
        print("  errors: " + json.dumps(record["errors"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
