"""The blending oracle: what tiled inference of a padded network must give, in plain
numpy from the tiles' own predictions (tests/test_engine.py on CPU, tests/test_gpu.py on
CUDA). Identity tiles, and a valid network's, agree wherever they overlap, so they cannot
show a wrong weight or a pixel taken from the wrong tile; a padded network's tiles
disagree near their borders."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch


def same_net(folder, ndim):
    """A padded ("same") U-Net: its predictions near a tile's border differ from tile to
    tile, so only a right blend gives the weighted mean of the tiles' predictions."""
    from pipeline.model.export import export_model
    from pipeline.model.unet import UNet

    torch.manual_seed(1)
    net = UNet(in_channels=1, classes=2, base=4, depth=2, ndim=ndim, padding="same").eval()
    spec = export_model(folder / "same.pt", model=net)
    return net, spec, str(folder / "same.pt")


def augmented(net, x, tta="none"):
    """The network's prediction of the batch ``x`` (numpy), averaged over ``tta``'s
    augmentations, each undone in numpy: ``flip`` every combination of spatial axis
    flips, ``d4`` the 8 rotations and reflections of the (y, x) plane."""
    space = list(range(2, x.ndim))
    if tta == "flip":
        ways = [(axes, 0) for r in range(len(space) + 1) for axes in combinations(space, r)]
    elif tta == "d4":
        ways = [(axes, k) for k in range(4) for axes in ((), (x.ndim - 1,))]
    else:
        ways = [((), 0)]
    total = 0.0
    for axes, k in ways:
        a = np.rot90(np.flip(x, axes), k, axes=(-2, -1)) if axes else np.rot90(x, k, (-2, -1))
        with torch.inference_mode():
            y = net(torch.from_numpy(np.ascontiguousarray(a))).numpy().astype(np.float64)
        y = np.rot90(y, -k, axes=(-2, -1))
        total = total + (np.flip(y, axes) if axes else y)
    return total / len(ways)


def blended(net, spec, image, cfg):
    """The blending oracle in plain numpy: every tile of the run's lattice through the
    network on its own (averaged over ``cfg.tta``'s augmentations). Weighted blends: each prediction times the blend's weight window,
    summed over its output region (clipped to the image), divided by the summed weights.
    Crop: each pixel from the one tile whose share it lies in, the shares cut in the
    middle of each overlap (computed here from the tile origins)."""
    from pipeline.engine.blend import BlendMode, tile_weights
    from pipeline.engine.plan import make_plan

    space = image.shape[1:]
    plan = make_plan(spec, space, image.shape[0], 2, cfg)
    lat = plan.lattice
    preds = {}
    for t in np.ndindex(*lat.counts):
        region = lat.in_region(t)
        index = [np.arange(o, o + n) for o, n in zip(region.offset, region.shape)]
        assert all(i.min() >= 0 and i.max() < n for i, n in zip(index, space))  # flush
        x = image[np.ix_([0], *index)].astype(np.float32) / 255.0
        extra = lat.ndim - spec.ndim  # a 2D network on a volume: one plane per tile
        plane = x.reshape(x.shape[:1] + x.shape[1 + extra :])
        pred = augmented(net, plane[None], cfg.tta)[0]
        preds[t] = pred.reshape(pred.shape[:1] + (1,) * extra + pred.shape[1:])
    origins = [[lat.origin(a, k) for k in range(c)] for a, c in enumerate(lat.counts)]
    if plan.blend is BlendMode.CROP:
        owner = []  # per axis, the tile each coordinate takes its value from
        for axis, (n, o) in enumerate(zip(space, lat.out_tile)):
            starts = origins[axis]
            cuts = [(a + o + b) // 2 for a, b in zip(starts, starts[1:])]
            owner.append(np.searchsorted(cuts, np.arange(n), side="right"))
        out = np.zeros((2, *space))
        for t, pred in preds.items():
            at = [np.flatnonzero(own == k) for own, k in zip(owner, t)]
            local = [i - origins[a][k] for a, (i, k) in enumerate(zip(at, t))]
            out[np.ix_([0, 1], *at)] = pred[np.ix_([0, 1], *local)]
        return out
    w = tile_weights(plan.blend, lat.out_tile, lat.overlap).astype(np.float64)
    acc, wsum = np.zeros((2, *space)), np.zeros(space)
    for t, pred in preds.items():
        out = lat.out_region(t)
        at = tuple(slice(o, min(o + n, m)) for o, n, m in zip(out.offset, out.shape, space))
        part = tuple(slice(0, a.stop - a.start) for a in at)
        acc[(slice(None), *at)] += pred[(slice(None), *part)] * w[part]
        wsum[at] += w[part]
    return acc / wsum
