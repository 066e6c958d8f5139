"""Typing slips mended for the prompt reader (model/data/spelling.py, used by model/data/reading.py)."""

import itertools

import pytest

from model.data import spelling
from model.data.reading import mend, read


def _reference_distance(a, b):
    """Edits by brute force over the edit graph (breadth first), to check the dynamic programme."""
    alphabet = set(a) | set(b) | {"#"}
    seen, frontier = {a}, {a}
    for steps in itertools.count():
        if b in frontier:
            return steps
        following = set()
        for w in frontier:
            following |= {w[:i] + w[i + 1:] for i in range(len(w))}
            following |= {w[:i] + c + w[i:] for i in range(len(w) + 1) for c in alphabet}
            following |= {w[:i] + c + w[i + 1:] for i in range(len(w)) for c in alphabet}
            following |= {w[:i] + w[i + 1] + w[i] + w[i + 2:] for i in range(len(w) - 1)}
        frontier = following - seen
        seen |= frontier


@pytest.mark.parametrize("a, b", [("fuor", "four"), ("rihgt", "right"), ("elefant", "elephant"), ("cat", "act"),
                                  ("", "ab"), ("smal", "small"), ("abc", "abc"), ("kitten", "sitting")])
def test_distance_counts_edits_with_swaps(a, b):
    assert spelling.distance(a, b) == _reference_distance(a, b)


def test_slips_are_read_as_the_word_meant():
    for slip, meant in [("girafe", "giraffe"), ("bannana", "banana"), ("elefant", "elephant"), ("rigth", "right"),
                        ("backgound", "background"), ("umbrela", "umbrella"), ("elephnats", "elephants"),
                        ("fuor", "four"), ("midle", "middle"), ("smal", "small"), ("ghots", "ghosts"),
                        ("potatos", "potatoes")]:
        assert mend(slip) == meant


def test_common_and_short_words_and_ties_stay():
    for word in ["near", "spells", "mars", "hat", "dgo", "could", "popsicles", "wizard"]:
        assert mend(word) == word
    tied = spelling.Corrector(["bark", "park"])
    assert tied("zark") == "zark" and tied("barck") == "bark"
    assert spelling.Corrector(["bark", "park"], forms={"bark": "x", "park": "x"})("zark") in ("bark", "park")


def test_prompts_with_slips_read_as_meant():
    assert read("a girafe in the top rigth corner, purple backgound") == \
        "a large giraffe in the top right on a purple background"
    assert read("three tiny turtels, yellow") == "three turtles on a yellow background"
    assert read("could you draw a cat near the top") == "a large cat at the top on a white background"
    assert read("a wizard casting spells") is None
    assert read("a ghots on black") == "a large ghost in the center on a black background"
