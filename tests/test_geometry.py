import numpy as np
import pytest

from pipeline.core.geometry import Region, reflect_index


def test_region_ops():
    r = Region((2, 3), (4, 5))
    assert r.end == (6, 8)
    assert r.grow(1) == Region((1, 2), (6, 7))
    assert r.grow((1, 0), (0, 2)) == Region((1, 3), (5, 7))
    assert r.intersect(Region((4, 0), (10, 4))) == Region((4, 3), (2, 1))
    assert r.intersect(Region((10, 10), (1, 1))).empty
    assert not r.intersects(Region((6, 3), (1, 1)))
    assert r.snap_to_grid(4) == Region((0, 0), (8, 8))
    assert r.relative_to((2, 3)) == Region((0, 0), (4, 5))
    assert r.contains(Region((3, 4), (1, 1))) and not r.contains(Region((0, 0), (3, 3)))
    a = np.arange(100).reshape(10, 10)
    assert a[r.to_slices()].shape == (4, 5)


def test_region_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Region((0,), (-1,))
    with pytest.raises(ValueError):
        Region((0, 0), (1,))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("pad", [0, 1, 5, 40])
def test_reflect_index_matches_numpy_pad(size, pad):
    a = np.arange(size)
    mode = "reflect" if size > 1 else "edge"
    expected = np.pad(a, pad, mode=mode)
    assert np.array_equal(a[reflect_index(np.arange(-pad, size + pad), size)], expected)
