"""GeoJSON polygons: traced per block, merged across seams, read back pixel for pixel.

The oracle is the mask itself: polygons burnt back into an image must give the traced
pixels, and :func:`scipy.ndimage.label` (4-connectivity, its default) must count the
same objects as there are features.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import shapely
from scipy import ndimage
from shapely.geometry import Point, shape

from pipeline.errors import ConfigError, InputError, OutputError
from pipeline.outputs import geojson as gj

SIZE, BLOCK = 2048, 512
# objects placed on purpose; (y, x, outer radius, hole radius, y stretch, x stretch)
CORNER_DISC = (1024, 1024, 60, 0, 1.0, 1.0)  # over the corner where four blocks meet
SEAM_RING = (1300, 512, 110, 50, 1.0, 1.0)  # its hole straddles the seam x = 512
CORNER_RING = (512, 1536, 100, 45, 1.0, 1.0)  # its hole straddles a four-block corner
SEAM_RIBBON = (1536, 1000, 400, 0, 0.08, 1.0)  # thin, along the seam y = 1536, across x = 1024
PLACED = (CORNER_DISC, SEAM_RING, CORNER_RING, SEAM_RIBBON)


def _blob_mask(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """A one-class 'model output' thresholded at 0.5: ellipses, rings, rough outlines."""
    rng = np.random.default_rng(seed)
    # signed distance-like score: > 0 inside an object
    score = np.full((size, size), -1e6, dtype=np.float32)

    def add(cy, cx, r_out, r_in=0.0, ay=1.0, ax=1.0):
        y0, y1 = max(int(cy - r_out * ay - 8), 0), min(int(cy + r_out * ay + 9), size)
        x0, x1 = max(int(cx - r_out * ax - 8), 0), min(int(cx + r_out * ax + 9), size)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        d = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)
        local = r_out - d if not r_in else np.minimum(r_out - d, d - r_in)
        np.maximum(score[y0:y1, x0:x1], local, out=score[y0:y1, x0:x1])

    for placed in PLACED:
        add(*placed)
    added = 0
    while added < 70:  # random blobs, a third with holes, kept clear of the placed ones
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(12, 70)
        if any(
            abs(cy - p[0]) < p[2] * p[4] + r + 40 and abs(cx - p[1]) < p[2] * p[5] + r + 40
            for p in PLACED
        ):
            continue
        hole = r * 0.45 if rng.random() < 0.35 else 0.0
        add(cy, cx, r, hole, rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4))
        added += 1
    # smooth noise makes the outlines ragged, as a real model's are
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), 3)
    probability = 0.5 * (1 + np.tanh((score + noise * (2.0 / noise.std())) / 4))
    return probability >= 0.5


def _trace(mask: np.ndarray, block: int) -> gj.Polygons:
    """Per-block tracing as workers do it, through pickle, then the merge."""
    results = []
    for y in range(0, mask.shape[0], block):
        for x in range(0, mask.shape[1], block):
            result = gj.trace_block(
                mask[y : y + block, x : x + block], (y, x), image_shape=mask.shape
            )
            results.append(pickle.loads(pickle.dumps(result)))
    return gj.merge_blocks(results)


@pytest.fixture(scope="module")
def blobs():
    mask = _blob_mask()
    polygons = _trace(mask, BLOCK)
    return mask, polygons, gj.feature_collection(polygons)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _containing(polygons: gj.Polygons, x: float, y: float) -> list[shapely.Polygon]:
    return [g for g in polygons.geoms if g.contains(Point(x, y))]


def test_blocks_merge_back_to_the_exact_mask(blobs):
    mask, _, collection = blobs
    burnt = gj.rasterize(collection, mask.shape) > 0
    assert np.array_equal(burnt, mask)


def test_one_feature_per_connected_object(blobs):
    mask, polygons, collection = blobs
    labels, count = ndimage.label(mask)
    assert len(collection["features"]) == count == len(polygons)
    # and each feature is exactly one object: feature numbers and labels pair one to one
    numbers = gj.rasterize(collection, mask.shape, values=range(1, count + 1))
    pairs = np.unique(np.stack([numbers[mask], labels[mask]]), axis=1)
    assert pairs.shape[1] == count
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == count
    # the image really tests seams: several objects span more than one block
    spans = ndimage.find_objects(labels)
    crossing = [s for s in spans if any(a.start // BLOCK != (a.stop - 1) // BLOCK for a in s)]
    assert len(crossing) >= 8


def test_object_over_a_four_block_corner_is_one_feature(blobs):
    _, polygons, _ = blobs
    cy, cx = CORNER_DISC[:2]
    found = {
        id(g)
        for dy in (-20, 20)
        for dx in (-20, 20)
        for g in _containing(polygons, cx + dx, cy + dy)
    }
    assert len(found) == 1


@pytest.mark.parametrize("ring", [SEAM_RING, CORNER_RING], ids=["seam", "corner"])
def test_hole_across_seams_stays_a_hole(blobs, ring):
    _, polygons, _ = blobs
    cy, cx, r_out, r_in = ring[:4]
    band = _containing(polygons, cx + (r_out + r_in) / 2, cy)
    assert len(band) == 1
    holes = [shapely.Polygon(h) for h in band[0].interiors]
    # the hole covers both sides of the seam (and all four blocks at a corner)
    inside = [
        (cx + dx, cy + dy) for dx in (-12, 12) for dy in ((-12, 12) if cy % BLOCK == 0 else (0,))
    ]
    assert any(all(h.contains(Point(p)) for p in inside) for h in holes)
    assert not _containing(polygons, cx, cy)  # and it is not filled by another polygon


def test_same_polygons_for_any_block_size(blobs):
    mask, polygons, _ = blobs
    for other in (gj.trace_image(mask), _trace(mask, 300)):
        assert np.array_equal(other.classes, polygons.classes)
        assert all(shapely.equals_exact(other.geoms, polygons.geoms, tolerance=0))


def test_simplify_keeps_the_shapes(blobs):
    mask, polygons, exact = blobs
    simple = gj.feature_collection(polygons, simplify=1.0)
    assert len(simple["features"]) == len(exact["features"])
    assert _iou(gj.rasterize(simple, mask.shape) > 0, mask) >= 0.97
    geoms = [shape(f["geometry"]) for f in simple["features"]]
    assert all(g.is_valid and g.geom_type == "Polygon" for g in geoms)

    def vertices(c):
        return sum(len(r) for f in c["features"] for r in f["geometry"]["coordinates"])

    assert vertices(simple) < vertices(exact) / 2


def test_features_carry_qupath_properties(blobs):
    mask, polygons, collection = blobs
    for feature in collection["features"]:
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "class 1", "color": list(gj.PALETTE[0])}
        assert "isLocked" not in props
    areas = sorted(
        f["properties"]["measurements"][gj.AREA_MEASUREMENT] for f in collection["features"]
    )
    assert areas == sorted(np.bincount(ndimage.label(mask)[0].ravel())[1:].tolist())

    named = gj.feature_collection(
        polygons,
        class_names=["Tumor"],
        class_colors={1: (200, 0, 100)},
        object_type="detection",
        locked=True,
    )
    props = named["features"][0]["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "Tumor", "color": [200, 0, 100]}
    assert props["isLocked"] is True


def _classes_image(shape=(700, 900), seed=3) -> np.ndarray:
    """Three classes that touch each other (shared edges and corners) and background."""
    rng = np.random.default_rng(seed)
    fields = ndimage.gaussian_filter(rng.standard_normal((4, *shape)), (0, 6, 6))
    return np.argmax(fields, axis=0).astype(np.uint8)  # 0 = background, 1..3 classes


def test_several_classes():
    labels = _classes_image()
    polygons = _trace(labels, 256)  # 700 x 900 is no multiple of 256
    names = {1: "Tumor", 2: "Stroma", 3: "Immune cells"}
    collection = gj.feature_collection(polygons, class_names=names)
    by_name = {v: k for k, v in names.items()}
    values = [by_name[f["properties"]["classification"]["name"]] for f in collection["features"]]
    assert np.array_equal(gj.rasterize(collection, labels.shape, values=values), labels)
    for cls, name in names.items():
        count = ndimage.label(labels == cls)[1]
        assert values.count(cls) == count > 10, name
    colors = {tuple(f["properties"]["classification"]["color"]) for f in collection["features"]}
    assert colors == set(gj.PALETTE[:3])


def test_coarser_run_maps_to_level0_coordinates(blobs):
    mask, _, _ = blobs
    run = mask[:1024, :768]
    level0 = np.repeat(np.repeat(run, 2, axis=0), 2, axis=1)  # the run was at half size
    collection = gj.feature_collection(_trace(run, BLOCK), scale=(2, 2))
    assert np.array_equal(gj.rasterize(collection, level0.shape) > 0, level0)
    coords = [c for f in collection["features"] for r in f["geometry"]["coordinates"] for c in r]
    assert all(isinstance(v, int) for c in coords for v in c)

    box = np.zeros((40, 60), dtype=bool)
    box[10:20, 30:50] = True
    collection = gj.feature_collection(gj.trace_image(box), scale=(2.5, 1.5), offset=(100, 7))
    geom = shape(collection["features"][0]["geometry"])
    assert geom.bounds == (52.0, 125.0, 82.0, 150.0)  # x from 30*1.5+7, y from 10*2.5+100
    area = collection["features"][0]["properties"]["measurements"][gj.AREA_MEASUREMENT]
    assert area == geom.area == 200 * 2.5 * 1.5


def test_written_file_is_geojson_that_shapely_reads(blobs, tmp_path):
    _, polygons, collection = blobs
    path = gj.write_geojson(collection, tmp_path / "slide.geojson")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.geojson"]  # no temp left
    data = json.loads(path.read_text())
    assert data == gj.read_geojson(path) == collection
    assert data["type"] == "FeatureCollection"
    holes = 0
    for feature in data["features"]:
        assert feature["type"] == "Feature"
        geom = shape(feature["geometry"])
        assert geom.geom_type == "Polygon" and geom.is_valid and not geom.is_empty
        rings = feature["geometry"]["coordinates"]
        assert all(r[0] == r[-1] and len(r) >= 4 for r in rings)
        # RFC 7946: exterior counter-clockwise, holes clockwise (in x, y)
        assert geom.exterior.is_ccw and not any(h.is_ccw for h in geom.interiors)
        holes += len(rings) - 1
    assert holes >= 10


def test_all_background_gives_an_empty_collection(tmp_path):
    empty = np.zeros((1000, 1000), dtype=np.uint8)
    block = gj.trace_block(empty[:512, :512])
    assert len(block.interior) == len(block.edge) == 0
    polygons = gj.trace_image(empty, (512, 512))
    collection = gj.feature_collection(polygons, class_names=["Tumor"])
    assert collection == {"type": "FeatureCollection", "features": []}
    path = gj.write_geojson(collection, tmp_path / "blank.geojson")
    assert gj.read_geojson(path)["features"] == []
    assert not gj.rasterize(collection, empty.shape).any()


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "slide.geojson"
    gj.write_geojson({"type": "FeatureCollection", "features": []}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError):  # NaN is not JSON: refused, not written
        gj.write_geojson({"type": "FeatureCollection", "features": [float("nan")]}, path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputError, match="taken"):
        gj.write_geojson({"type": "FeatureCollection", "features": []}, tmp_path / "taken")
    with pytest.raises(OutputError, match="missing"):
        gj.write_geojson({"type": "FeatureCollection", "features": []}, tmp_path / "missing" / "a")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.geojson", "taken"]


def test_block_splits_seam_pieces_from_interior_ones():
    block = np.zeros((100, 100), dtype=bool)
    block[10:20, 10:20] = True  # inside
    block[40:60, 90:100] = True  # reaches the right side
    block[0:5, 40:50] = True  # reaches the top side
    block[95:100, 0:5] = True  # reaches the bottom-left corner
    inner = gj.trace_block(block, (0, 0), class_index=2)
    assert len(inner.interior) == 2 and len(inner.edge) == 2  # sides at 0 are no seams
    assert set(inner.interior.classes.tolist() + inner.edge.classes.tolist()) == {2}
    # the same block in the middle of an image: every side is a seam
    middle = gj.trace_block(block, (100, 200), image_shape=(300, 400))
    assert len(middle.interior) == 1 and len(middle.edge) == 3
    assert middle.interior.geoms[0].bounds == (210.0, 110.0, 220.0, 120.0)
    # the last block of the image: its right and bottom sides are the image border
    last = gj.trace_block(block, (200, 300), image_shape=(300, 400))
    assert len(last.interior) == 2 and len(last.edge) == 2


def test_corner_touching_pixels_stay_separate_across_seams():
    image = np.zeros((8, 12), dtype=np.uint8)
    image[3, 3] = image[4, 4] = 1  # diagonal neighbours across a four-block corner
    image[5:8, 7:10] = 1  # a ring across the seam x = 8 whose hole (6, 8) ...
    image[6, 8] = image[7, 9] = 0  # ... meets the outside at a corner: one object, pinched
    polygons = gj.trace_image(image, (4, 4))
    assert len(polygons) == ndimage.label(image)[1] == 3
    assert all(g.is_valid for g in polygons.geoms)
    collection = gj.feature_collection(polygons)
    assert np.array_equal(gj.rasterize(collection, image.shape), image)


def test_label_dtypes():
    labels = np.zeros((30, 30), dtype=np.int64)
    labels[2:8, 2:8] = 300  # class index above uint8
    labels[10:20, 10:20] = 2
    polygons = gj.trace_image(labels, (16, 16))
    assert sorted(polygons.classes.tolist()) == [2, 300]
    assert sorted(shapely.area(polygons.geoms).tolist()) == [36.0, 100.0]
    with pytest.raises(TypeError):
        gj.trace_block(labels.astype(np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        gj.trace_block(-labels)
    with pytest.raises(ValueError, match="2D"):
        gj.trace_block(labels[None])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"object_type": "cell"}, "object type"),
        ({"simplify": -1.0}, "simplify"),
        ({"simplify": float("nan")}, "simplify"),
        ({"scale": (0, 1)}, "scale"),
        ({"offset": (1, float("inf"))}, "offset"),
        ({"class_names": ["Tumor"]}, "class 2 .* no name"),
        ({"class_colors": [(1, 2, 3), (0, 0, 300)]}, "colour"),
    ],
)
def test_bad_options_are_config_errors(options, match):
    labels = np.zeros((10, 10), dtype=np.uint8)
    labels[1:3, 1:3], labels[5:8, 5:8] = 1, 2
    with pytest.raises(ConfigError, match=match):
        gj.feature_collection(gj.trace_image(labels), **options)


def test_read_rejects_what_is_not_a_feature_collection(tmp_path):
    cut = tmp_path / "cut.geojson"
    cut.write_text('{"type": "FeatureCollection", "features": [')
    with pytest.raises(InputError, match="cut.geojson.*not valid JSON"):
        gj.read_geojson(cut)
    other = tmp_path / "point.geojson"
    other.write_text('{"type": "Point", "coordinates": [0, 0]}')
    with pytest.raises(InputError, match="not a GeoJSON FeatureCollection"):
        gj.read_geojson(other)
