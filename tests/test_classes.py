"""Class names, colours and labels from probabilities (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.classes import (
    PALETTE,
    channel_names,
    class_labels,
    label_colors,
    label_count,
    label_dtype,
    label_names,
    parse_class_names,
)
from pipeline.errors import ConfigError


def test_several_classes_take_the_most_probable_channel_in_any_dimension():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 3, 5, 6)).astype(np.float32)  # (K, z, y, x)
    labels = class_labels(probs)
    assert labels.shape == (3, 5, 6) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probs.argmax(axis=0))


def test_one_class_is_thresholded_for_floats_and_uint8_alike():
    p = np.array([[[0.2, 0.49, 0.5, 0.9]]], dtype=np.float32)
    np.testing.assert_array_equal(class_labels(p), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(class_labels(p, threshold=0.85), [[0, 0, 0, 1]])
    stored = np.rint(p * 255).astype(np.uint8)  # what --dtype uint8 writes
    np.testing.assert_array_equal(class_labels(stored), class_labels(p))
    assert class_labels(np.array([[[127, 128]]], dtype=np.uint8)).tolist() == [[0, 1]]


def test_nan_counts_as_zero_probability():
    p = np.array([[[np.nan, 0.9]], [[0.1, np.nan]]], dtype=np.float32)
    assert class_labels(p).tolist() == [[1, 0]]
    assert class_labels(p[:1]).tolist() == [[0, 1]]


def test_background_everywhere_when_all_channels_are_zero():
    """Outside tissue the output is 0 in every channel: that is background."""
    assert not class_labels(np.zeros((3, 4, 4), dtype=np.uint8)).any()


def test_bad_probabilities_and_thresholds_are_refused():
    with pytest.raises(ValueError, match="K >= 1"):
        class_labels(np.zeros((0, 3, 3)))
    with pytest.raises(ValueError, match="threshold"):
        class_labels(np.zeros((1, 3, 3)), threshold=1.5)


def test_label_counts_and_dtypes():
    assert [label_count(k) for k in (1, 2, 5)] == [2, 2, 5]
    assert label_dtype(255) == np.uint8 and label_dtype(300) == np.uint16
    probs = np.zeros((300, 2, 2), dtype=np.float32)
    probs[299] = 1
    assert class_labels(probs).dtype == np.uint16 and (class_labels(probs) == 299).all()


def test_names_full_or_foreground_only():
    assert label_names(1) == ("background", "class 1")
    assert label_names(3, ["tumor", "stroma"]) == ("background", "tumor", "stroma")
    assert label_names(3, ["bg", "tumor", "stroma"]) == ("bg", "tumor", "stroma")
    assert label_names(1, ["nucleus"]) == ("background", "nucleus")
    assert channel_names(1, ["nucleus"]) == ("nucleus",)
    assert channel_names(3, ["tumor", "stroma"]) == ("background", "tumor", "stroma")


def test_wrong_number_of_names_says_what_fits():
    with pytest.raises(ConfigError, match="3 class names for a model with 1 channel") as info:
        label_names(1, ["a", "b", "c"])
    assert "give 1 name (the foreground class) or 2 (background first)" in str(info.value)
    with pytest.raises(ConfigError, match="model with 4 channels"):
        label_names(4, ["a", "b"])


def test_parsing_names_from_the_command_line():
    assert parse_class_names(" tumor, stroma ") == ("tumor", "stroma")
    assert parse_class_names(None) is None
    for bad in ("tumor,,stroma", "a,A", "x" * 101, "a\nb"):
        with pytest.raises(ConfigError, match="--class-names"):
            parse_class_names(bad)


def test_colours_background_transparent_then_the_palette_cycled():
    colors = label_colors(len(PALETTE) + 2)
    assert colors[0] == (0, 0, 0, 0)
    assert colors[1] == (*PALETTE[0], 255) and colors[-1] == (*PALETTE[0], 255)
    assert len({c[:3] for c in colors[1 : len(PALETTE) + 1]}) == len(PALETTE)
