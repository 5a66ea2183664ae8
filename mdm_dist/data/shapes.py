"""Procedural captioned images: coloured shapes on plain backgrounds, with known ground truth.

The embedded demo corpus is drawn from here (no download): every image's colour, shape, size and
position are known, so generated images and captions can be scored against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
TEMPLATES = (
    "a {size} {colour} {shape} on the {position}",
    "a {colour} {shape}, {size}, {position}",
    "{size} {colour} {shape} at the {position} of a {background} background",
    "there is a {colour} {shape} on a {background} background",
)


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str
    size: str
    position: str
    background: str

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template % len(TEMPLATES)].format(**self.__dict__)


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    return ShapeSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(list(BACKGROUNDS))),
    )


def render(spec: ShapeSpec, size: int = 32, jitter: np.random.Generator | None = None) -> np.ndarray:
    """An RGB uint8 image ``(size, size, 3)`` of the spec; ``jitter`` moves the shape slightly."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[spec.background]
    radius = size * (0.16 if spec.size == "small" else 0.3)
    cx = {"left": 0.27, "center": 0.5, "right": 0.73}[spec.position] * size
    cy = 0.5 * size
    if jitter is not None:
        cx += jitter.uniform(-0.04, 0.04) * size
        cy += jitter.uniform(-0.12, 0.12) * size
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    if spec.shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif spec.shape == "square":
        mask = (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    elif spec.shape == "triangle":  # apex up
        mask = (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    elif spec.shape == "cross":
        arm = radius * 0.35
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; allowed: {', '.join(SHAPES)}")
    img[mask] = COLOURS[spec.colour]
    return img


# ----------------------------------------------------------------------------------------------
# Scenes: one to three copies of a shape (the demo corpus of data_prep/make_demo_data.py)
# ----------------------------------------------------------------------------------------------
# ``ShapeSpec``/``random_spec``/``render`` above stay as they are (the overfit demo draws from
# them with a fixed random stream). Scenes add a count: ``count`` copies of one coloured shape,
# stacked vertically at the named horizontal position, smaller as the count grows so they fit.

COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SCENE_TEMPLATES = (
    "{article} {size} {colour} {shapes} on the {position}",
    "{count_word} {colour} {shapes}, {size}, {position}",
    "{article} {size} {colour} {shapes} at the {position} of a {background} background",
    "there {verb} {count_word} {colour} {shapes} on a {background} background",
    "a {background} image with {count_word} {size} {colour} {shapes} on the {position}",
    "{count_word} {shapes}, {colour}, on the {position}",
)


@dataclass(frozen=True)
class SceneSpec:
    """Ground truth of one demo image: ``count`` equal shapes of one colour and size."""

    colour: str
    shape: str
    size: str
    position: str
    background: str
    count: int = 1

    def caption(self, template: int = 0) -> str:
        """The caption from ``SCENE_TEMPLATES[template % len]``; every template names the colour,
        the shape and the count (``a``/``one``..``three``), most name size, position, background."""
        fields = dict(self.__dict__)
        fields.update(
            shapes=self.shape if self.count == 1 else PLURALS[self.shape],
            count_word=COUNT_WORDS[self.count],
            article="a" if self.count == 1 else COUNT_WORDS[self.count],
            verb="is" if self.count == 1 else "are",
        )
        return SCENE_TEMPLATES[template % len(SCENE_TEMPLATES)].format(**fields)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def random_scene(rng: np.random.Generator) -> SceneSpec:
    return SceneSpec(
        colour=str(rng.choice(list(COLOURS))),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(SIZES)),
        position=str(rng.choice(POSITIONS)),
        background=str(rng.choice(list(BACKGROUNDS))),
        count=int(rng.choice(COUNTS)),
    )


def render_scene(spec: SceneSpec, size: int = 32, jitter: np.random.Generator | None = None) -> np.ndarray:
    """An RGB uint8 image ``(size, size, 3)`` of the scene; ``jitter`` moves the column slightly."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[spec.background]
    shrink = {1: 1.0, 2: 0.7, 3: 0.5}[spec.count]
    radius = size * (0.16 if spec.size == "small" else 0.3) * shrink
    cx = {"left": 0.27, "center": 0.5, "right": 0.73}[spec.position] * size
    rows = {1: [0.5], 2: [0.3, 0.7], 3: [0.19, 0.5, 0.81]}[spec.count]
    dy_jit = 0.0
    if jitter is not None:
        cx += jitter.uniform(-0.04, 0.04) * size
        dy_jit = jitter.uniform(-0.12, 0.12) * size * (1.0 if spec.count == 1 else 0.25)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mask = np.zeros((size, size), dtype=bool)
    for r in rows:
        mask |= _shape_mask(spec.shape, xx - cx, yy - (r * size + dy_jit), radius)
    img[mask] = COLOURS[spec.colour]
    return img


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= radius * 0.85) & (np.abs(dy) <= radius * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= radius) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
    if shape == "cross":
        arm = radius * 0.35
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
