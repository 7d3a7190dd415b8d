"""A procedurally generated, captioned image set: coloured shapes at named places.

Every caption names a size, a colour, a shape and a place ("a big red circle at the top left"),
and its image draws exactly that on a dark background, with a little seeded jitter in position
and size so the model learns a distribution rather than 432 fixed pictures. It is what the
trained embedded model (`tiny-xl-shapes`) learns from, and what its prompts speak of: its images
can be judged by eye, and by checking the colour and place of the drawn shape.
"""
import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

SIZES = {"small": 0.22, "big": 0.38}  # shape radius as a fraction of the image side
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (235, 235, 235), "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {
    "at the top left": (0.28, 0.28), "at the top": (0.5, 0.28), "at the top right": (0.72, 0.28),
    "on the left": (0.28, 0.5), "in the centre": (0.5, 0.5), "on the right": (0.72, 0.5),
    "at the bottom left": (0.28, 0.72), "at the bottom": (0.5, 0.72), "at the bottom right": (0.72, 0.72),
}
BACKGROUND = (24, 24, 32)
JITTER = 0.04  # of the image side, for place and size


def caption(size, colour, shape, place):
    return f"a {size} {colour} {shape} {place}"


def all_captions():
    """Every caption of the set, in a fixed order (2 x 8 x 3 x 9 = 432)."""
    return [caption(*c) for c in itertools.product(SIZES, COLOURS, SHAPES, PLACES)]


def parse_caption(text):
    """(size, colour, shape, place) of a caption this module wrote; ValueError otherwise."""
    for size, colour, shape, place in itertools.product(SIZES, COLOURS, SHAPES, PLACES):
        if text == caption(size, colour, shape, place):
            return size, colour, shape, place
    raise ValueError(f"not a shapes caption: {text!r}")


def draw(text, resolution=64, rng=None):
    """The image of caption `text` as an RGB PIL image; `rng` (random.Random) adds jitter."""
    size, colour, shape, place = parse_caption(text)
    jitter = (lambda: rng.uniform(-JITTER, JITTER)) if rng else (lambda: 0.0)
    cx, cy = ((v + jitter()) * resolution for v in PLACES[place])
    r = (SIZES[size] / 2 + jitter() / 2) * resolution
    # Draw at 4x and downsample: smooth edges, as a photo of a shape would have.
    scale = 4
    image = Image.new("RGB", (resolution * scale, resolution * scale), BACKGROUND)
    pen = ImageDraw.Draw(image)
    cx, cy, r = cx * scale, cy * scale, r * scale
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        side = r * 0.89  # same area as the circle, roughly
        pen.rectangle([cx - side, cy - side, cx + side, cy + side], fill=fill)
    else:
        pen.polygon([(cx, cy - r * 1.1), (cx - r * 1.05, cy + r * 0.75), (cx + r * 1.05, cy + r * 0.75)], fill=fill)
    return image.resize((resolution, resolution), Image.LANCZOS)


def batch(captions, resolution=64, seed=0):
    """Images of `captions` as a float array (n, 3, res, res) in [-1, 1], jittered from `seed`."""
    rng = random.Random(seed)
    arrays = [np.asarray(draw(c, resolution, rng), dtype=np.float32) for c in captions]
    return np.stack(arrays).transpose(0, 3, 1, 2) / 127.5 - 1.0


def shape_colour_at(image, place):
    """Median RGB of a small patch at a place's centre: what colour the shape drawn there has."""
    array = np.asarray(image, dtype=np.float32)
    res = array.shape[0]
    x, y = (int(v * res) for v in PLACES[place])
    half = max(1, res // 32)
    return np.median(array[y - half:y + half, x - half:x + half].reshape(-1, 3), axis=0)


def nearest_colour(rgb):
    """The name in COLOURS (or 'background') closest to an RGB triple."""
    palette = dict(COLOURS, background=BACKGROUND)
    return min(palette, key=lambda name: sum((a - b) ** 2 for a, b in zip(palette[name], rgb)))


def follows_prompt(image, text):
    """True when the image shows the caption's colour at the caption's place."""
    _, colour, _, place = parse_caption(text)
    return nearest_colour(shape_colour_at(image, place)) == colour


def prompt_accuracy(images, captions):
    """Fraction of images that show their caption's colour at its place (0..1)."""
    hits = [follows_prompt(image, text) for image, text in zip(images, captions, strict=True)]
    return sum(hits) / len(hits)
