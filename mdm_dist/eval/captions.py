"""Caption scoring for the demo: does a generated caption name the scene's colour and shape?

A word match on the corpus's vocabulary (``mdm_dist.data.shapes``): the caption is lower-cased
and split into words; a colour is named when its word occurs, a shape when its singular or plural
occurs ("cross" / "crosses"). A caption *names* the truth when it names the true colour and the
true shape and no other colour or shape: a caption that lists every colour does not count.
"""

from __future__ import annotations

import re

from mdm_dist.data.shapes import COLOURS, PLURALS, SHAPES

_WORD = re.compile(r"[a-z]+")
_SHAPE_OF_WORD = {s: s for s in SHAPES} | {PLURALS[s]: s for s in SHAPES}


def named_attributes(caption: str) -> tuple[set[str], set[str]]:
    """(colours, shapes) named in ``caption`` (shapes in their singular form)."""
    words = _WORD.findall(caption.lower())
    return {w for w in words if w in COLOURS}, {_SHAPE_OF_WORD[w] for w in words if w in _SHAPE_OF_WORD}


def caption_names(caption: str, colour: str, shape: str) -> bool:
    """True when ``caption`` names exactly the colour ``colour`` and exactly the shape ``shape``."""
    colours, shapes = named_attributes(caption)
    return colours == {colour} and shapes == {shape}
