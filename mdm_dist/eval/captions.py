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


def swap_attribute(caption: str, attribute: str, new: str) -> str:
    """``caption`` with every colour word (``attribute="colour"``) or every shape word (``"shape"``,
    singular and plural kept as they were) replaced by ``new``; other words untouched. Raises
    ValueError for an unknown attribute or value."""
    if attribute == "colour":
        if new not in COLOURS:
            raise ValueError(f"unknown colour {new!r}; allowed: {', '.join(COLOURS)}")
        table = {c: new for c in COLOURS}
    elif attribute == "shape":
        if new not in SHAPES:
            raise ValueError(f"unknown shape {new!r}; allowed: {', '.join(SHAPES)}")
        table = {s: new for s in SHAPES} | {PLURALS[s]: PLURALS[new] for s in SHAPES}
    else:
        raise ValueError(f"unknown attribute {attribute!r}; allowed: colour, shape")
    return re.sub(r"[A-Za-z]+", lambda m: table.get(m.group(0).lower(), m.group(0)), caption)
