"""Tiny NGFF images for tests, written with the pipeline's format builders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from pipeline.core.classes import label_colors
from pipeline.io.ngff import get_format, omero_channels

CHUNK = 64


def write_image(path: Path, level0: np.ndarray, version: str, pixel_size=0.5) -> list[tuple]:
    """An NGFF image (c, y, x) with a 2x pyramid, written through the format's builders."""
    fmt = get_format(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    shapes, data = [], level0
    while True:
        shapes.append(data.shape)
        group.create_array(
            str(len(shapes) - 1),
            data=data,
            chunks=(data.shape[0], CHUNK, CHUNK),
            **fmt.array_options("cyx"),
        )
        if max(data.shape[1:]) <= CHUNK:
            break
        h, w = data.shape[1] // 2, data.shape[2] // 2
        data = data[:, : 2 * h : 2, : 2 * w : 2]
    names = [f"class {i}" for i in range(level0.shape[0])]
    colors = [c[:3] for c in label_colors(level0.shape[0] + 1)[1:]]
    content = {
        "multiscales": [
            fmt.multiscale(
                path.name, "cyx", {"y": pixel_size, "x": pixel_size}, len(shapes), "mean"
            )
        ],
        "omero": omero_channels(names, colors, (0, 255)),
    }
    group.attrs.put(fmt.wrap(content))
    return shapes


def blobs(classes: int, shape=(200, 150), seed=0) -> np.ndarray:
    """Smooth random probabilities (uint8, p x 255) with real regions of every class."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((classes, shape[0] // 25 + 1, shape[1] // 25 + 1))
    p = np.repeat(np.repeat(coarse, 25, axis=1), 25, axis=2)[:, : shape[0], : shape[1]]
    if classes > 1:
        p = p / p.sum(axis=0, keepdims=True)
    return np.rint(p * 255).astype(np.uint8)
