"""The shapes data set and the trained embedded model (tiny-xl-shapes) that learned it."""
import random

import numpy as np
import pytest

from quantdiff.models import shapes

from conftest import ROOT


def test_captions_cover_the_set_and_parse_back():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 2 * 8 * 3 * 9
    assert captions[0] == "a small red circle at the top left"
    assert all(shapes.caption(*shapes.parse_caption(c)) == c for c in captions)
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a big red dragon at the top left")


def test_draw_is_seeded_and_draws_the_caption():
    text = "a big blue square at the bottom right"
    a, b = shapes.draw(text, 64, random.Random(3)), shapes.draw(text, 64, random.Random(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    array = np.asarray(shapes.draw(text))
    assert array.shape == (64, 64, 3)
    assert tuple(array[2, 2]) == shapes.BACKGROUND  # far corner: background
    assert shapes.nearest_colour(shapes.shape_colour_at(array, "at the bottom right")) == "blue"
    assert shapes.nearest_colour(shapes.shape_colour_at(array, "at the top left")) == "background"


def test_prompt_accuracy_on_drawn_images():
    captions = shapes.all_captions()
    images = [shapes.draw(c, 64, random.Random(i)) for i, c in enumerate(captions)]
    assert shapes.prompt_accuracy(images, captions) == 1.0
    shifted = captions[1:] + captions[:1]  # every image paired with another caption
    assert shapes.prompt_accuracy(images, shifted) < 0.2


def test_batch_is_scaled_to_unit_range():
    x = shapes.batch(shapes.all_captions()[:3], 64, seed=0)
    assert x.shape == (3, 3, 64, 64) and x.dtype == np.float32
    assert -1.0 <= x.min() < -0.7 and 0.5 < x.max() <= 1.0
