"""The U-Net of Ronneberger et al. (2015), in 2D or 3D, with ``valid`` or ``same`` convolutions.

``valid`` is the paper's network: unpadded 3x3 convolutions with bias, ReLU, skip
features centre-cropped before concatenation, and an output smaller than the input by a
fixed margin (572² → 388² at depth 4). Tiling it with that margin as halo reproduces the
whole-image result exactly.

``same`` keeps the size: reflect-padded, bias-free 3x3 convolutions followed by
BatchNorm and ReLU. Reflect padding needs at least two pixels, so the bottleneck must be
at least 2 px wide and the smallest tile is ``2 * 2**depth``.

The size arithmetic lives in pure functions (:func:`valid_output_size`,
:func:`min_tile_size`, :func:`margin_of`) so the rest of the pipeline can reason about
tiles without building a network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ACTIVATIONS, PADDINGS

_ACTIVATIONS = ("auto", *ACTIVATIONS)


def _check_arch(depth: int, padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")


def valid_output_size(size: int, depth: int, padding: str) -> int | None:
    """Output size along one axis for an input of ``size`` pixels, or None if not accepted.

    Parameters
    ----------
    size
        Input size along one spatial axis.
    depth
        Number of pooling steps.
    padding
        ``"valid"`` or ``"same"``.

    Returns
    -------
    int or None
        The output size; None when the network cannot take ``size`` (a pooling input
        would be odd, a feature map would vanish, or for ``same`` a size that is not a
        multiple of ``2**depth`` at least ``2 * 2**depth``).
    """
    _check_arch(depth, padding)
    step = 2**depth
    if padding == "same":
        # The bottleneck must be >= 2 px because reflect padding needs pad < size.
        return size if size >= 2 * step and size % step == 0 else None
    s = size
    for _ in range(depth):
        s -= 4
        if s < 2 or s % 2:
            return None
        s //= 2
    s -= 4
    if s < 1:
        return None
    for _ in range(depth):
        s = 2 * s - 4
        if s < 1:
            return None
    return s


def min_tile_size(depth: int, padding: str) -> int:
    """Smallest input size :func:`valid_output_size` accepts.

    For ``valid`` this is larger than "bottleneck >= 1 px": the expanding path loses
    4 px per level after doubling, so the bottleneck must keep at least 4 px for every
    decoder map to stay positive (188 px at depth 4).
    """
    _check_arch(depth, padding)
    size = 1
    while valid_output_size(size, depth, padding) is None:
        size += 1
    return size


def margin_of(depth: int, padding: str) -> int:
    """Pixels lost on each side (the same for every accepted size)."""
    tile = min_tile_size(depth, padding)
    out = valid_output_size(tile, depth, padding)
    assert out is not None  # min_tile_size guarantees an accepted size
    return (tile - out) // 2


def _layers(ndim: int) -> tuple[type, type, type, type]:
    if ndim == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d
    if ndim == 3:
        return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def _double_conv(cin: int, cout: int, ndim: int, padding: str) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by ReLU (and BatchNorm first for ``same``)."""
    conv, _, _, norm = _layers(ndim)
    layers: list[nn.Module] = []
    for c in (cin, cout):
        if padding == "same":
            layers += [
                conv(c, cout, 3, padding=1, padding_mode="reflect", bias=False),
                norm(cout),
                nn.ReLU(inplace=True),
            ]
        else:
            layers += [conv(c, cout, 3), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _crop_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Centre-crop ``x`` to the spatial size of ``ref``."""
    for d in range(2, x.dim()):
        n = ref.size(d)
        x = x.narrow(d, (x.size(d) - n) // 2, n)
    return x


def _pad_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x`` to the spatial size of ``ref`` (only differs for odd sizes)."""
    pads: list[int] = []
    for d in range(x.dim() - 1, 1, -1):  # F.pad lists the last axis first
        diff = ref.size(d) - x.size(d)
        pads += [diff // 2, diff - diff // 2]
    return F.pad(x, pads)


def _init_weights(module: nn.Module) -> None:
    """The paper's initialisation: Gaussian with std sqrt(2 / fan_in), zero bias.

    torch's default (uniform, gain 1/sqrt(3)) shrinks the signal at every layer, so an
    untrained network of 18+ convolutions outputs a near-constant map; He init keeps the
    variance through the ReLUs, which also makes random networks useful in tests.
    """
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        fan_in = module.in_channels
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            # An up-convolution with kernel = stride feeds each output from one position.
            fan_in *= math.prod(module.kernel_size)
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class _Level(nn.Module):
    """One resolution level: encode, recurse into the coarser level, upsample, merge, decode.

    Nesting levels (instead of lists indexed in a loop) keeps the forward pass a straight
    line that both ``torch.jit.script`` and the ONNX exporters handle without unrolling.
    """

    def __init__(self, cin: int, width: int, inner: nn.Module, ndim: int, padding: str) -> None:
        super().__init__()
        _, up, pool, _ = _layers(ndim)
        self.crop = padding == "valid"
        self.encode = _double_conv(cin, width, ndim, padding)
        self.pool = pool(2)
        self.inner = inner
        self.up = up(2 * width, width, kernel_size=2, stride=2)
        self.decode = _double_conv(2 * width, width, ndim, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.encode(x)
        y = self.up(self.inner(self.pool(skip)))
        if self.crop:
            skip = _crop_to(skip, y)
        else:
            y = _pad_to(y, skip)
        return self.decode(torch.cat([skip, y], dim=1))


class UNet(nn.Module):
    """U-Net for 2D or 3D segmentation.

    Parameters
    ----------
    in_channels
        Channels of the input image.
    classes
        Output channels (1 for a binary foreground map).
    base
        Channels of the first level; doubled at each pooling step (64 in the paper).
    depth
        Number of pooling steps (4 in the paper).
    ndim
        Spatial dimensions, 2 or 3.
    padding
        ``"same"`` (output size = input size) or ``"valid"`` (unpadded, output smaller by
        ``2 * margin``).
    activation
        ``"auto"`` (sigmoid for one class, softmax over channels otherwise),
        ``"sigmoid"``, ``"softmax"`` or ``"none"`` (logits).

    Examples
    --------
    >>> net = UNet(base=4, padding="valid")
    >>> net(torch.zeros(1, 1, 572, 572)).shape
    torch.Size([1, 1, 388, 388])
    """

    # Python-side geometry; torch.jit.script must not try to compile these.
    __jit_unused_properties__ = ["step", "min_tile", "margin"]

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        base: int = 64,
        depth: int = 4,
        ndim: int = 2,
        padding: str = "same",
        activation: str = "auto",
    ) -> None:
        super().__init__()
        _check_arch(depth, padding)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        conv = _layers(ndim)[0]
        if activation == "auto":
            activation = "sigmoid" if classes == 1 else "softmax"
        self.in_channels, self.classes, self.base = in_channels, classes, base
        self.depth, self.ndim, self.padding = depth, ndim, padding
        self.activation = activation

        width = base * 2**depth
        body: nn.Module = _double_conv(width // 2, width, ndim, padding)  # bottleneck
        for level in reversed(range(depth)):
            width = base * 2**level
            cin = in_channels if level == 0 else width // 2
            body = _Level(cin, width, body, ndim, padding)
        self.body = body
        self.head = conv(base, classes, kernel_size=1)
        self.act: nn.Module = {
            "sigmoid": nn.Sigmoid(),
            "softmax": nn.Softmax(dim=1),
            "none": nn.Identity(),
        }[activation]
        self.apply(_init_weights)

    @property
    def step(self) -> int:
        """Accepted sizes grow in steps of ``2**depth``."""
        return 2**self.depth

    @property
    def min_tile(self) -> int:
        """Smallest input size the network accepts."""
        return min_tile_size(self.depth, self.padding)

    @property
    def margin(self) -> int:
        """Pixels lost on each side of every spatial axis (0 for ``same``)."""
        return margin_of(self.depth, self.padding)

    def output_size(self, size: int) -> int | None:
        """Output size for an input of ``size`` pixels, None if not accepted."""
        return valid_output_size(size, self.depth, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.head(self.body(x)))
