"""Tissue skipping: a synthetic brightfield slide with about a quarter tissue, run with
and without ``--skip-background`` through the same model.

Reports both wall times and their ratio (target ≥ 2×), the tissue fraction, tiles run,
chunks stored, and whether the prediction inside tissue is identical (it must be).

    python benchmarks/bench_tissue.py [--size 4096] [--base 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_history, machine_info  # noqa: E402

HISTORY = Path(__file__).with_name("results") / "history.jsonl"


def make_slide(path: Path, size: int, seed: int = 0) -> np.ndarray:
    """Glass (near white, noisy) with one H&E-like tissue disc covering ~25 % of the slide."""
    import tifffile

    from pipeline.demo import synthetic_slide

    rng = np.random.default_rng(seed)
    tissue, _ = synthetic_slide(size, rng)
    # denser eosin than the demo's pale stroma, as in a real H&E section
    tissue = (tissue * np.array([0.85, 0.55, 0.78])).astype(np.uint8)
    yy, xx = np.ogrid[:size, :size]
    r = size * np.sqrt(0.25 / np.pi)
    inside = (yy - size * 0.4) ** 2 + (xx - size * 0.55) ** 2 < r**2
    glass = np.clip(rng.normal(238, 4, (size, size, 3)), 0, 255).astype(np.uint8)
    image = np.where(inside[..., None], tissue, glass)
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        compression="zlib",
        photometric="rgb",
        resolution=(1e4 / 0.5, 1e4 / 0.5),
        resolutionunit="CENTIMETER",
    )
    return inside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--out", default=str(HISTORY))
    args = ap.parse_args()

    import zarr

    from pipeline.config import RunConfig
    from pipeline.core.geometry import Region
    from pipeline.model.export import export_model
    from pipeline.run import run

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inside = make_slide(tmp / "slide.tif", args.size)
        model = tmp / "m.onnx"
        export_model(model, in_channels=3, classes=1, base=args.base, depth=4)
        rows, outputs = {}, {}
        for skip in (False, True):
            out = tmp / f"out{skip}.zarr"
            t0 = time.perf_counter()
            report = run(
                [str(tmp / "slide.tif")],
                out,
                str(model),
                RunConfig(skip_background=skip, workers=1),
            )
            wall = time.perf_counter() - t0
            r = report.inputs[0]
            assert r.state == "done", r.message
            chunks = sum(1 for p in (out / "slide" / "0" / "c").rglob("*") if p.is_file())
            outputs[skip] = zarr.open_array(str(out / "slide" / "0"))[:]
            rows[skip] = {
                "seconds": round(wall, 2),
                "tiles": r.tiles,
                "skipped_tiles": r.skipped_tiles,
                "tissue_fraction": r.tissue_fraction,
                "chunks_stored": chunks,
            }
        from pipeline.engine.tissue import detect_tissue
        from pipeline.io.sources import open_image

        mask = detect_tissue(open_image(tmp / "slide.tif"), outputs[True].shape[1:])
        detected = mask.upsample(Region.of_shape(outputs[True].shape[1:]))
        same = bool(np.array_equal(outputs[True][:, detected], outputs[False][:, detected]))
    speedup = rows[False]["seconds"] / rows[True]["seconds"]
    print(f"true tissue fraction {inside.mean():.3f}; detected {rows[True]['tissue_fraction']}")
    for skip in (False, True):
        print(f"skip={skip!s:5s}: {rows[skip]}")
    print(f"speed-up {speedup:.2f}x (target >= 2); identical inside tissue: {same}")
    append_history(
        args.out,
        {
            "benchmark": "tissue",
            "machine": machine_info(),
            "params": vars(args),
            "true_fraction": float(inside.mean()),
            "runs": {str(k): v for k, v in rows.items()},
            "speedup": round(speedup, 3),
            "identical_inside_tissue": same,
        },
    )


if __name__ == "__main__":
    main()
