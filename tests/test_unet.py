"""The U-Net: layer and parameter counts, size arithmetic, shapes, activations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.model.unet import UNet, margin_of, min_tile_size, valid_output_size

CONV_TYPES = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)


pytestmark = pytest.mark.usefixtures("one_thread")


def analytic_params(cin: int, classes: int, base: int, depth: int, ndim: int, padding: str) -> int:
    """Parameter count from the paper's description, independent of the module code."""
    k3, k2 = 3**ndim, 2**ndim
    same = padding == "same"

    def conv3(a: int, b: int) -> int:  # 3x3 conv, then BatchNorm (same) or bias (valid)
        return k3 * a * b + (2 * b if same else b)

    total, prev = 0, cin
    for level in range(depth + 1):  # contracting path and bottleneck
        width = base * 2**level
        total += conv3(prev, width) + conv3(width, width)
        prev = width
    for level in reversed(range(depth)):  # expanding path
        width = base * 2**level
        total += k2 * 2 * width * width + width  # up-convolution with bias
        total += conv3(2 * width, width) + conv3(width, width)
    return total + base * classes + classes  # 1x1 output conv


def count_convs(net: nn.Module) -> int:
    return sum(isinstance(m, CONV_TYPES) for m in net.modules())


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_paper_network_has_23_conv_layers_and_31m_parameters(padding: str) -> None:
    with torch.device("meta"):  # counts only: skip initialising 31 M weights
        net = UNet(in_channels=3, classes=1, base=64, depth=4, padding=padding)
    n_params = sum(p.numel() for p in net.parameters())
    assert count_convs(net) == 23
    assert n_params == analytic_params(3, 1, 64, 4, 2, padding)
    assert n_params == pytest.approx(31.0e6, abs=0.1e6)
    convs3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 18
    assert isinstance(net.head, nn.Conv2d) and net.head.kernel_size == (1, 1)
    # same: the count widely quoted for this layout; valid: biases instead of BatchNorm.
    assert n_params == {"same": 31_037_633, "valid": 31_031_745}[padding]


def test_3d_parameter_count_matches_analytic() -> None:
    net = UNet(in_channels=2, classes=3, base=8, depth=3, ndim=3, padding="valid")
    assert sum(p.numel() for p in net.parameters()) == analytic_params(2, 3, 8, 3, 3, "valid")
    assert count_convs(net) == 2 * 4 + 2 * 3 + 3 + 1


def test_same_uses_reflect_padding_bias_free_convs_and_batchnorm() -> None:
    net = UNet(base=4, depth=2)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.padding_mode == "reflect" and c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == len(convs)


def test_valid_maps_572_to_388() -> None:
    net = UNet(base=4, depth=4, padding="valid").eval()
    with torch.no_grad():
        y = net(torch.rand(1, 1, 572, 572))
    assert y.shape == (1, 1, 388, 388)
    assert (net.margin, net.step, net.min_tile) == (92, 16, 188)
    assert valid_output_size(572, 4, "valid") == 388


def test_geometry_of_same_network() -> None:
    net = UNet(base=4, depth=4)
    assert (net.margin, net.step, net.min_tile) == (0, 16, 32)


def test_accepted_sizes_are_min_tile_plus_k_step() -> None:
    for padding in ("same", "valid"):
        for depth in (2, 3, 4):
            low, step = min_tile_size(depth, padding), 2**depth
            accepted = {
                s for s in range(1, 700) if valid_output_size(s, depth, padding) is not None
            }
            assert accepted == set(range(low, 700, step))


def test_margin_formula() -> None:
    for depth in (1, 2, 3, 4, 5):
        assert margin_of(depth, "valid") == 6 * 2**depth - 4
        assert margin_of(depth, "same") == 0


@pytest.mark.parametrize("padding,depth", [("valid", 3), ("valid", 2), ("same", 3)])
def test_valid_output_size_agrees_with_forward(padding: str, depth: int) -> None:
    net = UNet(base=4, depth=depth, padding=padding).eval()
    low, step = net.min_tile, net.step
    sizes = [low, low + step, low + 3 * step]
    with torch.no_grad():
        for h, w in zip(sizes, reversed(sizes)):
            y = net(torch.rand(2, 1, h, w))
            assert y.shape[2:] == (
                valid_output_size(h, depth, padding),
                valid_output_size(w, depth, padding),
            )
            assert y.shape[2] == h - 2 * net.margin


def test_rejected_sizes() -> None:
    assert valid_output_size(187, 4, "valid") is None
    assert valid_output_size(190, 4, "valid") is None
    assert valid_output_size(172, 4, "valid") is None  # bottleneck too small
    assert valid_output_size(16, 4, "same") is None  # reflect padding needs a 2 px bottleneck
    assert valid_output_size(40, 4, "same") is None


def test_same_below_min_tile_fails_in_torch_too() -> None:
    net = UNet(base=4, depth=2).eval()
    with pytest.raises(RuntimeError):
        net(torch.rand(1, 1, net.step, net.step))


def test_same_keeps_shape_and_pads_odd_sizes() -> None:
    net = UNet(in_channels=2, classes=3, base=4, depth=3).eval()
    with torch.no_grad():
        for shape in [(16, 16), (24, 40), (37, 45)]:
            assert net(torch.rand(1, 2, *shape)).shape == (1, 3, *shape)


def test_3d_small_shapes() -> None:
    with torch.no_grad():
        same = UNet(classes=2, base=4, depth=2, ndim=3).eval()
        assert same(torch.rand(1, 1, 8, 12, 16)).shape == (1, 2, 8, 12, 16)
        valid = UNet(base=4, depth=2, ndim=3, padding="valid").eval()
        assert valid.min_tile == 44
        assert valid(torch.rand(1, 1, 44, 44, 48)).shape == (1, 1, 4, 4, 8)


def test_valid_output_is_translation_consistent() -> None:
    # The property tiling relies on: a crop of the input (offset a multiple of step)
    # gives exactly the matching crop of the output.
    torch.manual_seed(0)
    net = UNet(base=4, depth=3, padding="valid").eval()
    x = torch.rand(1, 1, 108, 116)
    with torch.no_grad():
        whole = net(x)
        part = net(x[..., 8:, 16:])
    assert torch.allclose(part, whole[..., 8:, 16:], atol=1e-6)


def test_activations() -> None:
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        soft = UNet(classes=3, base=4, depth=3).eval()(x)
        sig = UNet(classes=1, base=4, depth=3).eval()(x)
        logits = UNet(classes=2, base=4, depth=3, activation="none").eval()
        forced = UNet(classes=2, base=4, depth=3, activation="sigmoid").eval()(x)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    assert sig.min() >= 0 and sig.max() <= 1
    assert (
        forced.min() >= 0 and forced.max() <= 1 and not torch.allclose(forced.sum(1), torch.ones(1))
    )
    assert isinstance(logits.act, nn.Identity) and logits.activation == "none"


@pytest.mark.parametrize(
    "kwargs", [{"padding": "full"}, {"ndim": 4}, {"activation": "tanh"}, {"depth": 0}]
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UNet(base=4, **kwargs)
