"""Per-image planning: tile, overlap, blend, lattice, output chunks and blocks.

Pure: derives everything from the model geometry, the image's spatial shape and the
config. No I/O. :func:`summary_line` says in one line what will run on an input (the
terminal prints it before the input's progress).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.backends.base import ModelSpec, check_tile
from pipeline.config import RunConfig
from pipeline.engine.blend import BlendMode
from pipeline.engine.tiling import BlockGrid, Lattice, choose_stride
from pipeline.engine.tta import check_tta
from pipeline.errors import ConfigError

DEFAULT_TILE = {2: 256, 3: 64}
DEFAULT_CHUNK = {2: 1024, 3: 128}
#: Default blocks hold whole chunks of this many pyramid levels when the budget allows.
ALIGN_LEVELS = 2


@dataclass(frozen=True)
class Plan:
    lattice: Lattice
    blend: BlendMode
    chunks: tuple[int, ...]  # spatial output chunk
    block: tuple[int, ...]  # spatial block (a multiple of chunks)
    model_ndim: int

    def grid(self) -> BlockGrid:
        return BlockGrid(self.lattice, self.block, owned=self.blend is BlendMode.CROP)


def default_tile(spec: ModelSpec) -> int:
    want = DEFAULT_TILE[spec.ndim] + 2 * spec.margin
    below, above = spec.nearest_tiles(max(want, spec.min_tile))
    return above if below < want else below


def model_tile(spec: ModelSpec, cfg: RunConfig) -> tuple[int, ...]:
    """Network input size per model axis, checked against what the model accepts."""
    tile = cfg.tile or (default_tile(spec),)
    if len(tile) == 1:
        tile = tile * spec.ndim
    check_tile(spec, tile, where="option --tile")
    return tile


def resolve_blend(spec: ModelSpec, cfg: RunConfig) -> BlendMode:
    if cfg.blend != "auto":
        return BlendMode(cfg.blend)
    return BlendMode.CROP if spec.margin > 0 else BlendMode.GAUSSIAN


def resolve_overlap(spec: ModelSpec, cfg: RunConfig, out_tile: int, blend: BlendMode) -> int:
    if cfg.overlap is not None:
        return cfg.overlap
    if blend is BlendMode.CROP and spec.margin > 0:
        return 0  # valid models: the margin already supplies the context (overlap-tile)
    return out_tile // 4


def check_options(spec: ModelSpec, cfg: RunConfig) -> None:
    """Refuse a ``--tile``, ``--overlap`` or ``--tta`` the model cannot take, before any
    work: what :func:`make_plan` checks that does not depend on the image.

    Raises
    ------
    ConfigError
        ``TileError`` for a tile the model does not accept, an overlap too large, or
        ``--tta d4`` with tiles that are not square.
    """
    tile = model_tile(spec, cfg)
    check_tta(cfg.tta, tile)
    blend = resolve_blend(spec, cfg)
    for t in tile:
        _stride(spec, cfg, t - 2 * spec.margin, blend)


def _stride(spec: ModelSpec, cfg: RunConfig, out_tile: int, blend: BlendMode) -> int:
    overlap = resolve_overlap(spec, cfg, out_tile, blend)
    try:
        return choose_stride(out_tile, overlap, spec.step)
    except ValueError as exc:
        raise ConfigError(
            str(exc), where="option --overlap", hint=f"use an overlap below {out_tile - spec.step}"
        ) from None


def make_plan(
    spec: ModelSpec,
    shape: tuple[int, ...],
    channels: int,
    classes: int,
    cfg: RunConfig,
    itemsize: int = 1,
) -> Plan:
    """Plan one image of spatial ``shape`` (len ``spec.ndim`` or ``spec.ndim + 1``);
    ``itemsize``: bytes per stored input value."""
    extra = len(shape) - spec.ndim  # 1: a 2D model running slice by slice on a volume
    tile = model_tile(spec, cfg)
    check_tta(cfg.tta, tile)
    blend = resolve_blend(spec, cfg)
    out_tile = [t - 2 * spec.margin for t in tile]
    strides = [_stride(spec, cfg, o, blend) for o in out_tile]
    lattice = Lattice(
        shape,
        (1,) * extra + tuple(tile),
        (0,) * extra + (spec.margin,) * spec.ndim,
        (1,) * extra + tuple(strides),
        # padded networks: the last tile ends at the image border, where a whole-image
        # pass sees the network's own padding, rather than on mirrored pixels; valid
        # networks keep every tile on the size-step grid (that is what makes them exact)
        flush=spec.margin == 0,
    )
    chunk = cfg.chunk or DEFAULT_CHUNK[spec.ndim]
    chunks = tuple(min(chunk, n) for n in shape[extra:])
    chunks = (1,) * extra + chunks
    block = block_shape(shape, chunks, lattice, channels, classes, cfg, itemsize)
    return Plan(lattice, blend, chunks, block, spec.ndim)


def block_shape(
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    lattice: Lattice,
    channels: int,
    classes: int,
    cfg: RunConfig,
    itemsize: int = 1,
) -> tuple[int, ...]:
    """Block = whole chunks, as large as the per-worker memory budget allows.

    On y and x a block grows in steps of ``2**ALIGN_LEVELS`` chunks when the budget
    allows it (else 2, else 1), so that it also holds whole chunks of the first pyramid
    levels, which it then writes from memory (:func:`pipeline.core.pyramid.block_levels`).

    Bytes counted: the computing block's float32 accumulators (classes + weight) and
    the output of two blocks (the one computing, the one being written) per block pixel;
    the stored input (``itemsize`` per channel) of two blocks (the one computing, the
    one being read) per input pixel, the halo included.
    """
    if cfg.block is not None:
        side = [max(c, (cfg.block // c) * c) for c in chunks]
        side = [
            1 if c == 1 and i < len(shape) - 2 else s for i, (c, s) in enumerate(zip(chunks, side))
        ]
        return tuple(min(s, -(-n // c) * c) for s, n, c in zip(side, shape, chunks))
    out_bytes = 4 if cfg.dtype == "float32" else 2 if cfg.dtype == "float16" else 1
    per_block_px = 4 * (classes + 1) + 2 * classes * out_bytes
    per_input_px = 2 * channels * itemsize

    def fits(block: list[int]) -> bool:
        box = math.prod(b + t for b, t in zip(block, lattice.tile))
        need = math.prod(block) * per_block_px + box * per_input_px
        return need <= cfg.memory_budget_mb * 2**20

    yx = {len(shape) - 2, len(shape) - 1}
    for level in range(ALIGN_LEVELS, -1, -1):
        step = [c * 2**level if a in yx else c for a, c in enumerate(chunks)]
        block = [min(s, -(-n // c) * c) for s, n, c in zip(step, shape, chunks)]
        if level == 0 or fits(block):
            return _grow(block, step, shape, fits)
    raise AssertionError("unreachable")


def _grow(block: list[int], step: list[int], shape: tuple[int, ...], fits) -> tuple[int, ...]:
    """Grow the axis with the smallest block by its step while the budget holds."""
    while True:
        grown = None
        for axis in sorted(range(len(shape)), key=lambda a: block[a]):
            if block[axis] >= shape[axis]:
                continue
            trial = block.copy()
            trial[axis] += step[axis]
            if fits(trial):
                grown = trial
                break
        if grown is None:
            return tuple(block)
        block = grown


def summary_line(
    name: str,
    *,
    model: str,
    backend: str,
    device: str,
    tile: Sequence[int],
    overlap: Sequence[int],
    blend: str,
    pixel_size: dict[str, float] | None,
    blocks: int,
    tiles: int,
    shape: Sequence[int] | None = None,
) -> str:
    """One line saying what will run on an input, e.g.

    ``slide: 46000x32914 px at 0.5 µm/px | unet.onnx on onnx/cpu | tile 256, overlap 64,
    gaussian | 12 blocks, 5,430 tiles``.
    """
    parts = [name + ":"]
    if shape:
        parts.append("x".join(str(int(n)) for n in reversed(shape)) + " px")
    if pixel_size:
        sizes = sorted({round(float(v), 4) for v in pixel_size.values()})
        parts.append("at " + "/".join(f"{s:g}" for s in sizes) + " µm/px")
    else:
        parts.append("(no pixel size)")
    where = f"{model} on {backend}/{device}"
    how = f"tile {_size(tile)}, overlap {_size(overlap)}, {blend}"
    count = (
        f"{blocks:,} block{'s' if blocks != 1 else ''}, {tiles:,} tile{'s' if tiles != 1 else ''}"
    )
    return " ".join(parts) + " | " + " | ".join((where, how, count))


def _size(values: Sequence[int]) -> str:
    values = [int(v) for v in values]
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))
