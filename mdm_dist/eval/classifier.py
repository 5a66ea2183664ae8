"""A pixel-statistics classifier of the demo corpus's images: colour and shape (and size, count).

It scores text-to-image samples against their prompts, so it must be right on real demo images
(tests/test_eval_classifier.py checks >= 95% on freshly rendered ones of every colour x shape over
sizes, counts, positions and backgrounds) and must not need training. Three steps, on an RGB image
of any square size (the demo's images are 32 x 32; generated ones come out of the VAE decoder):

1. **Background** = the per-channel median of the 1-pixel border. Shapes may touch the left or
   right edge (large shapes at the sides), but never most of the border.
2. **Colour.** ``d`` = each pixel's RGB distance from the background. No pixel farther than
   ``MIN_CONTRAST`` -> no foreground (``colour = shape = None``). The *core* pixels are those with
   ``d >= CORE_FRACTION * max d`` (robust max: the 99.5th percentile). The colour is the palette
   colour ``p`` (``mdm_dist.data.shapes.COLOURS``) whose segment ``[background, p]`` in RGB
   space lies closest, on average, to the core pixels: an edge pixel that blends the shape with
   the background lies on that segment, so blur (the VAE's, or antialiasing) does not shift the
   decision the way a plain mean colour would (a blurred orange on white is not yellow).
3. **Shape.** A coverage map ``alpha`` in [0, 1]: each pixel's projection on the segment from
   the background to the chosen colour, scaled so that the core's 90th percentile is 1. It is
   compared with the silhouettes of every (shape, size, count) the corpus can draw (24), drawn by
   the corpus's own renderer (``render_scene``) at 4x resolution and box-averaged to the image
   size, so their edges are antialiased like the corpus's (rendered at 64, resized to 32). Each
   silhouette is moved so that its centroid lands on ``alpha``'s centroid (the renderer's jitter
   moves all copies together), then refined by shifts of up to +-1 pixel in quarter pixels; the
   score is the soft intersection over union ``sum min(alpha, t) / sum max(alpha, t)``. The best
   silhouette gives shape, size and count; the centroid's column gives the position.

Everything is numpy on the CPU: about 10 ms per 32 x 32 image.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mdm_dist.data.shapes import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, SceneSpec, render_scene

MIN_CONTRAST = 40.0  # RGB distance (0-255 scale) below which nothing is foreground
CORE_FRACTION = 0.6  # core pixels: distance from background >= this x the robust maximum
SUPERSAMPLE = 4  # silhouettes are drawn at this multiple of the image size, then box-averaged
SHIFTS = np.arange(-4, 5)  # refinement shifts, in 1/SUPERSAMPLE pixels: +-1 pixel

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class Prediction:
    """What the classifier sees in one image. ``colour``/``shape``/``size``/``count``/``position``
    are None when the image has no foreground. ``iou`` is the best silhouette's soft IoU (how much
    the image looks like any corpus shape at all), ``background`` the nearest background name."""

    colour: str | None
    shape: str | None
    size: str | None = None
    count: int | None = None
    position: str | None = None
    background: str | None = None
    iou: float = 0.0

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def as_rgb(image) -> np.ndarray:
    """One image as float64 RGB ``(H, W, 3)`` on the 0-255 scale, from uint8 ``(H, W, 3)``, or a
    float array / tensor ``(3, H, W)`` or ``(H, W, 3)`` in [-1, 1] (the model's pixel range)."""
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise ValueError(f"expected one RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    if a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    return (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5


# ----------------------------------------------------------------------------------------------
# Silhouettes
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _silhouettes(size: int) -> tuple[list[tuple[str, str, int]], np.ndarray, np.ndarray]:
    """(labels, hi-res masks (K, S*ss, S*ss) float, their centroids (K, 2) in hi-res pixels (y, x)),
    for every (shape, size, count) at the centre position without jitter."""
    hi = size * SUPERSAMPLE
    labels, masks = [], []
    for shape in SHAPES:
        for sz in SIZES:
            for count in COUNTS:
                spec = SceneSpec(colour="red", shape=shape, size=sz, position="center", background="black",
                                 count=count)
                img = render_scene(spec, hi)
                masks.append((np.abs(img.astype(np.int16) - BACKGROUNDS["black"]).sum(-1) > 0).astype(np.float64))
                labels.append((shape, sz, count))
    masks = np.stack(masks)
    yy, xx = np.mgrid[0:hi, 0:hi] + 0.5
    mass = masks.sum((1, 2))
    cents = np.stack([(masks * yy).sum((1, 2)) / mass, (masks * xx).sum((1, 2)) / mass], axis=1)
    return labels, masks, cents


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, zero-filled (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if ys.start < ys.stop and xs.start < xs.stop:
        out[yd, xd] = mask[ys, xs]
    return out


def _downsample(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean((1, 3))


def _soft_iou(a: np.ndarray, t: np.ndarray) -> float:
    return float(np.minimum(a, t).sum() / max(np.maximum(a, t).sum(), 1e-9))


def match_silhouette(alpha: np.ndarray, keep: int = 4) -> tuple[tuple[str, str, int], float]:
    """The (shape, size, count) whose centroid-aligned silhouette best matches the coverage map
    ``alpha`` (S, S), and its soft IoU. Coarse to fine: every silhouette at shifts of 0 and
    +-1 pixel, then the ``keep`` best ones over the full grid of quarter-pixel shifts."""
    size = alpha.shape[0]
    labels, masks, cents = _silhouettes(size)
    ss = SUPERSAMPLE
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    mass = alpha.sum()
    target = np.array([(alpha * yy).sum() / mass, (alpha * xx).sum() / mass]) * ss
    bases = np.round(target - cents).astype(int)

    def best_over(i: int, shifts) -> float:
        return max(_soft_iou(alpha, _downsample(_shift(masks[i], int(bases[i, 0] + dy), int(bases[i, 1] + dx)), ss))
                   for dy in shifts for dx in shifts)

    coarse = SHIFTS[:: len(SHIFTS) // 2]  # -1, 0, +1 pixel
    first = sorted(range(len(labels)), key=lambda i: -best_over(i, coarse))[:keep]
    scores = {i: best_over(i, SHIFTS) for i in first}
    i = max(scores, key=scores.get)
    return labels[i], scores[i]


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------


def _segment_distance(pixels: np.ndarray, bg: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Mean distance of ``pixels`` (n, 3) to each segment [bg, colour] -> (K,)."""
    v = colours - bg  # (K, 3)
    rel = pixels - bg  # (n, 3)
    a = np.clip(rel @ v.T / (v * v).sum(-1), 0.0, 1.0)  # (n, K)
    closest = bg + a[..., None] * v[None]  # (n, K, 3)
    return np.linalg.norm(pixels[:, None, :] - closest, axis=-1).mean(0)


def classify(image) -> Prediction:
    """Colour, shape, size, count and position of one demo image (see the module docstring).

    ``image``: uint8 (H, W, 3), or float (3, H, W) / (H, W, 3) in [-1, 1]; H == W."""
    img = as_rgb(image)
    if img.shape[0] != img.shape[1]:
        raise ValueError(f"expected a square image, got {img.shape[0]} x {img.shape[1]}")
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    bg_name = min(BACKGROUNDS, key=lambda k: float(np.linalg.norm(bg - BACKGROUNDS[k])))
    d = np.linalg.norm(img - bg, axis=-1)
    dmax = float(np.percentile(d, 99.5))
    if dmax < MIN_CONTRAST:
        return Prediction(None, None, background=bg_name)
    core = img[d >= CORE_FRACTION * dmax]
    k = int(np.argmin(_segment_distance(core, bg, _PALETTE)))
    colour = _PALETTE_NAMES[k]
    v = _PALETTE[k] - bg
    proj = (img - bg) @ v / float(v @ v)
    full = float(np.percentile(proj[d >= CORE_FRACTION * dmax], 90))
    alpha = np.clip(proj / max(full, 1e-6), 0.0, 1.0)
    if alpha.sum() < 1.0:
        return Prediction(colour, None, background=bg_name)
    (shape, sz, count), iou = match_silhouette(alpha)
    cx = float((alpha * (np.arange(img.shape[1]) + 0.5)).sum() / alpha.sum()) / img.shape[1]
    position = POSITIONS[0] if cx < 0.385 else POSITIONS[2] if cx > 0.615 else POSITIONS[1]
    return Prediction(colour, shape, sz, count, position, bg_name, iou)


def classify_batch(images) -> list[Prediction]:
    """:func:`classify` over a batch: a tensor (B, 3, H, W) in [-1, 1], a uint8 array
    (B, H, W, 3), or any sequence of single images."""
    return [classify(im) for im in images]
