"""How far tiled inference of a `same` (padded) U-Net is from one whole-image pass.

For each blend mode and overlap, runs the pipeline's in-process path
(:func:`pipeline.predict.predict_array`, the same lattice and blending as `pipeline run`) and
compares with the same model run once on the whole image. A padded network sees the
tile border as an image border, so tiled output differs from whole-image output near
tile edges; blending over an overlap hides that. The figures chose the default overlap
(tile/4) and blend (gaussian).

    python benchmarks/bench_blend_accuracy.py [--size 1024] [--tile 256] [--train 30]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.predict import predict_array

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_history  # noqa: E402

HISTORY = Path(__file__).with_name("results") / "history.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument(
        "--train", type=float, default=30.0, help="seconds of demo training (0: random weights)"
    )
    ap.add_argument("--overlaps", default="0,16,32,64,96")
    ap.add_argument("--out", default=str(HISTORY))
    args = ap.parse_args()

    import torch

    from pipeline.demo import synthetic_slide, train_unet
    from pipeline.model.export import export_model
    from pipeline.model.unet import UNet

    if args.train > 0:
        net, loss, steps = train_unet(args.train)
    else:
        torch.manual_seed(0)
        net = UNet(in_channels=3, classes=1, base=8, depth=3, padding="same")
    net.eval()
    image, _ = synthetic_slide(args.size, np.random.default_rng(123))
    chw = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "m.onnx")
        export_model(model, model=net)
        with torch.inference_mode():
            whole = net(torch.from_numpy(chw[None].astype(np.float32) / 255))[0].numpy()
        rows = []
        for blend in ("gaussian", "cosine", "constant", "crop"):
            for overlap in (int(o) for o in args.overlaps.split(",")):
                t0 = time.perf_counter()
                got = predict_array(
                    chw,
                    model,
                    RunConfig(tile=(args.tile,), overlap=overlap, blend=blend, dtype="float32"),
                )
                diff = np.abs(got - whole)
                # the far image border: a tile overhanging it sees mirrored pixels where the
                # whole-image pass sees the network's own padding
                inner = diff[:, 32:-32, 32:-32]
                rows.append(
                    {
                        "blend": blend,
                        "overlap": overlap,
                        "max_abs": float(diff.max()),
                        "mean_abs": float(diff.mean()),
                        "max_abs_interior": float(inner.max()),
                        "p99_abs": float(np.percentile(diff, 99)),
                        "mask_disagree": float(((got > 0.5) != (whole > 0.5)).mean()),
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                print(
                    f"{blend:9s} overlap {overlap:3d}: max {diff.max():.4f}  mean {diff.mean():.5f}  "
                    f"interior max {inner.max():.4f}  p99 {rows[-1]['p99_abs']:.4f}  mask disagreement {rows[-1]['mask_disagree']:.5f}"
                )
    record = {
        "benchmark": "blend_accuracy",
        "size": args.size,
        "tile": args.tile,
        "train_seconds": args.train,
        "rows": rows,
    }
    append_history(args.out, record)  # with timestamp, commit and machine, as the others


if __name__ == "__main__":
    main()
