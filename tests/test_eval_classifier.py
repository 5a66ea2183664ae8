"""The demo's quality scorers: the pixel classifier on real demo images, and caption word matching."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from mdm_dist.data.raw import decode_image
from mdm_dist.data.shapes import (
    BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SCENE_TEMPLATES, SHAPES, SIZES, SceneSpec, random_scene, render_scene,
)
from mdm_dist.eval import caption_names, classify, classify_batch, named_attributes


def corpus_image(spec: SceneSpec, rng: np.random.Generator, render_size: int = 64, size: int = 32) -> np.ndarray:
    """A demo image as the model's pipeline sees it: rendered like data_prep/make_demo_data.py
    (64 px, jittered), PNG round trip, resized to the VAE's 32 px by the training decoder."""
    buf = io.BytesIO()
    Image.fromarray(render_scene(spec, render_size, jitter=rng)).save(buf, format="PNG")
    return decode_image(buf.getvalue(), size)[0]


def test_classifier_is_at_least_95_percent_right_on_real_demo_images():
    """Every colour x shape, 6 images each, with sizes, positions, backgrounds and counts drawn at
    random from fresh random streams (not the corpus's seeds)."""
    rng = np.random.default_rng(12345)
    wrong, n = [], 0
    for colour, shape in itertools.product(COLOURS, SHAPES):
        for _ in range(6):
            spec = SceneSpec(colour, shape, str(rng.choice(SIZES)), str(rng.choice(POSITIONS)),
                             str(rng.choice(list(BACKGROUNDS))), int(rng.choice(COUNTS)))
            p = classify(corpus_image(spec, rng))
            n += 1
            if not p.matches(colour, shape):
                wrong.append((spec, p.colour, p.shape))
    accuracy = 1 - len(wrong) / n
    assert accuracy >= 0.95, f"accuracy {accuracy:.1%} on {n} images; wrong: {wrong[:10]}"


@pytest.mark.parametrize("size,count", list(itertools.product(SIZES, COUNTS)))
def test_classifier_covers_every_size_and_count(size, count):
    """The hardest cases (three small shapes: ~5 pixels each at 32 px) included; the shape must be
    right on all 4 shapes x 3 backgrounds, the colour on all of them too."""
    rng = np.random.default_rng([7, SIZES.index(size), count])
    wrong = []
    for shape, background in itertools.product(SHAPES, BACKGROUNDS):
        colour = str(rng.choice(list(COLOURS)))
        spec = SceneSpec(colour, shape, size, str(rng.choice(POSITIONS)), background, count)
        p = classify(corpus_image(spec, rng))
        if not p.matches(colour, shape):
            wrong.append((spec, p))
    assert len(wrong) <= 1, wrong


def test_classifier_reads_size_count_position_and_background_of_clean_images():
    rng = np.random.default_rng(3)
    hits = {"size": 0, "count": 0, "position": 0, "background": 0}
    n = 48
    for _ in range(n):
        spec = random_scene(rng)
        p = classify(corpus_image(spec, rng))
        for k in hits:
            hits[k] += getattr(p, k) == getattr(spec, k)
    assert hits["background"] == n
    assert min(hits.values()) >= 0.85 * n, hits


def test_classifier_accepts_model_tensors_and_reports_no_foreground():
    rng = np.random.default_rng(0)
    spec = SceneSpec("purple", "cross", "large", "right", "gray", 1)
    img = corpus_image(spec, rng)
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1.0  # the model's (3, H, W) in [-1, 1]
    a, b = classify(img), classify(x)
    assert a.matches("purple", "cross") and (a.colour, a.shape, a.count) == (b.colour, b.shape, b.count)
    assert [p.shape for p in classify_batch(x[None].repeat(2, 1, 1, 1))] == ["cross", "cross"]
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    p = classify(blank)
    assert p.colour is None and p.shape is None and p.background == "gray"
    assert not p.matches("red", "circle")
    with pytest.raises(ValueError, match="RGB image"):
        classify(np.zeros((32, 32)))


def test_classifier_tolerates_blur_like_a_vae_decoder():
    """Generated images are smooth: a 3x3 box blur of a real image keeps its class."""
    rng = np.random.default_rng(5)
    ok, n = 0, 0
    for colour, shape in itertools.product(COLOURS, SHAPES):
        spec = SceneSpec(colour, shape, "large", str(rng.choice(POSITIONS)), str(rng.choice(list(BACKGROUNDS))), 1)
        img = corpus_image(spec, rng).astype(np.float64)
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blur = sum(pad[i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9
        ok += classify(blur.round().astype(np.uint8)).matches(colour, shape)
        n += 1
    assert ok / n >= 0.9, f"{ok}/{n}"


def test_caption_scoring_word_match():
    assert caption_names("a large red circle on the left", "red", "circle")
    assert caption_names("three purple crosses, small, right", "purple", "cross")
    assert caption_names("There is one ORANGE square on a gray background", "orange", "square")
    assert not caption_names("a large red circle on the left", "red", "square")  # wrong shape
    assert not caption_names("a large blue circle", "red", "circle")  # wrong colour
    assert not caption_names("a red blue green circle", "red", "circle")  # naming every colour is no hit
    assert not caption_names("a red circle square", "red", "circle")
    assert not caption_names("", "red", "circle")
    assert not caption_names("a reddish circles", "red", "circle")  # whole words only
    assert named_attributes("two yellow triangles and a cross") == ({"yellow"}, {"triangle", "cross"})


def test_every_corpus_caption_names_its_own_colour_and_shape():
    rng = np.random.default_rng(1)
    for template in range(len(SCENE_TEMPLATES)):
        for _ in range(20):
            spec = random_scene(rng)
            assert caption_names(spec.caption(template), spec.colour, spec.shape), spec.caption(template)
