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
