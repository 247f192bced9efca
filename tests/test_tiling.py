import numpy as np
import pytest

from pipeline.core.geometry import Region
from pipeline.engine.blend import BlendMode, tile_weights
from pipeline.engine.tiling import Lattice, choose_stride


def coverage(lat, owned):
    cov = np.zeros(lat.shape, int)
    image = Region.of_shape(lat.shape)
    for idx in np.ndindex(*lat.counts):
        r = lat.owned_region(idx) if owned else lat.out_region(idx)
        cov[r.intersect(image).to_slices()] += 1
    return cov


@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("shape", [(1,), (5,), (64,), (65,), (1000,), (37, 91)])
def test_lattice_covers_and_owned_partitions(shape, flush):
    nd = len(shape)
    lat = Lattice(shape, (40,) * nd, (4,) * nd, (16,) * nd, flush=flush)
    assert coverage(lat, owned=False).min() >= 1
    assert (coverage(lat, owned=True) == 1).all()


def test_tile_positions_are_multiples_of_stride():
    lat = Lattice((300, 300), (92, 92), (20, 20), (48, 48))
    for idx in np.ndindex(*lat.counts):
        assert all(o % 48 == 0 for o in lat.out_region(idx).offset)
        assert lat.in_region(idx).shape == (92, 92)


@pytest.mark.parametrize("owned", [False, True])
def test_tiles_touching_is_exact(owned):
    lat = Lattice((500, 300), (64, 64), (0, 0), (48, 48))
    block = Region((96, 50), (128, 77))
    got = set(lat.tiles_touching(block, owned=owned))
    want = {
        idx
        for idx in np.ndindex(*lat.counts)
        if (lat.owned_region(idx) if owned else lat.out_region(idx)).intersects(block)
    }
    assert got == want


def test_choose_stride():
    assert choose_stride(256, 64, 16) == 192
    assert choose_stride(388, 0, 16) == 384
    with pytest.raises(ValueError):
        choose_stride(32, 32, 16)


@pytest.mark.parametrize("mode", list(BlendMode))
def test_weights_positive_and_normalised(mode):
    w = tile_weights(mode, (64, 48), (16, 16))
    assert w.shape == (64, 48) and w.dtype == np.float32
    assert w.min() > 0 and np.isclose(w.max(), 1.0)
    if mode is BlendMode.GAUSSIAN:
        assert w[32, 24] > 0.9 and w[0, 0] < 0.01
    if mode is BlendMode.COSINE:
        assert (w[16:48, 16:32] == 1).all() and w[0, 0] < 0.01


def test_flush_lattice_ends_at_the_image_border():
    lat = Lattice((1000,), (256,), (0,), (192,), flush=True)
    assert lat.counts == (5,)
    assert lat.out_region((4,)).end == (1000,) and lat.out_region((3,)).offset == (576,)
    small = Lattice((100,), (256,), (0,), (192,), flush=True)
    assert small.out_region((0,)).offset == (0,)  # smaller than a tile: mirrored as before
