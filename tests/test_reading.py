"""The emoji model's prompt reader (model/data/reading.py): free wordings -> the training caption."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.data import captions, scenes
from model.data.reading import read

_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


def _meaning(caption: str | None, keep_background=True):
    """A caption up to the equivalence of "A left of B" and "B right of A" (the scene is the same)."""
    if caption is None:
        return None
    body, background = caption.rsplit(" on ", 1)
    for relation, inverse in _INVERSE.items():
        if f" {relation} " in body:
            a, b = body.split(f" {relation} ")
            body = min((a, relation, b), (b, inverse, a))
            break
    return (body, background) if keep_background else body


def test_training_captions_read_as_themselves():
    rng = np.random.default_rng(0)
    for split in scenes.SPLITS:
        for _ in range(300):
            caption = scenes.caption(scenes.sample_scene(rng, split))
            assert read(caption) == caption


@pytest.mark.parametrize("heldout", [False, True])
def test_paraphrases_read_as_their_scenes(heldout):
    rng = np.random.default_rng(1)
    wrong = []
    for _ in range(600):
        scene = scenes.sample_scene(rng, "train")
        text, names_background = captions.paraphrase(scene, rng, heldout=heldout)
        if _meaning(read(text), names_background) != _meaning(scenes.caption(scene), names_background):
            wrong.append((text, read(text)))
    assert len(wrong) <= 3, wrong[:5]


@pytest.mark.parametrize("text, caption", [
    ("A FOX IN THE CENTER ON A BLUE BACKGROUND", "a large fox in the center on a blue background"),
    ("blue picture with a fox in it", "a large fox in the center on a blue background"),
    ("Fox in the centre, background: blue", "a large fox in the center on a blue background"),
    ("cat", "a large cat in the center on a white background"),
    ("a cat-headed man selling popsicles on Mars", "a large cat in the center on a white background"),
    # The object's own colour is not a background.
    ("a red apple", "a large apple in the center on a white background"),
    ("white cat on a black background", "a large cat in the center on a black background"),
    ("Small penguin in the lower-right corner on a red bg", "a small penguin in the bottom right on a red background"),
    ("draw me a huge whale, lower right, on yellow", "a large whale in the bottom right on a yellow background"),
    # "top" of "top hat" is no position; "upper-left corner" is.
    ("tiny top hat in the upper-left corner", "a small top hat in the top left on a white background"),
    ("3 cats on grey", "three cats on a gray background"),
    ("exactly 4 big apples against a pink wall", "four apples on a pink background"),
    ("five kittens", "four cats on a white background"),
    ("three happy kittens hanging out on a pink background", "three cats on a pink background"),
    ("a happy dog", "a large dog in the center on a white background"),
    ("some puppies", "two dogs on a white background"),
    # Plurals equal to the singular say nothing about the count.
    ("a fish on the left, teal", "a large fish on the left on a teal background"),
    ("to the left of a dog, a cat on pink", "a cat to the left of a dog on a pink background"),
    ("a cat and a dog, the dog on the left", "a dog to the left of a cat on a white background"),
    ("horse on the right, cow on the left", "a cow to the left of a horse on a white background"),
    ("a cat with a dog on its left, teal backdrop", "a dog to the left of a cat on a teal background"),
    ("a deer next to a rose, the deer on the right", "a deer to the right of a rose on a white background"),
    ("A dog sitting on top of a car", "a dog above a car on a white background"),
    ("a cat on the left of a dog", "a cat to the left of a dog on a white background"),
    ("a bike beneath a tree", "a bicycle below a tree on a white background"),
    ("a ship with an anchor underneath it", "an anchor below a ship on a white background"),
    # "right" that stresses a place is no side; "curled up" places nothing.
    ("Generate a huge pizza right in the middle of a teal canvas.", "a large pizza in the center on a teal background"),
    ("A big hedgehog curled up dead centre on a green background",
     "a large hedgehog in the center on a green background"),
    ("big moon top right on a black background", "a large moon in the top right on a black background"),
    ("tulips, four of them, on a purple backdrop", "four tulips on a purple background"),
    ("I want a camera, moderately sized, on the left, pink wallpaper",
     "a medium camera on the left on a pink background"),
    # Everyday and British names; a "dice" with an article is one.
    ("a telly on a purple background", "a large television in the center on a purple background"),
    ("an aubergine, upper left, grey", "a large eggplant in the top left on a gray background"),
    ("a dice on blue", "a large die in the center on a blue background"),
    ("a four-leaf clover on green", "a large clover in the center on a green background"),
    ("a small gift box at the top, red bg", "a small gift at the top on a red background"),
    # Quality words and separators of keyword prompts; hashtags.
    ("guitar, bottom left, 4k, 1080p, yellow", "a large guitar in the bottom left on a yellow background"),
    ("bg: orange | kite | top | med", "a medium kite at the top on an orange background"),
    ("#owl #bottomright #teal", "a large owl in the bottom right on a teal background"),
    # Sides given as labels, and relations said of "it".
    ("top: moon / bottom: house, black", "a moon above a house on a black background"),
    ("pear right, lemon left", "a pear to the right of a lemon on a white background"),
    ("an owl and a tree: owl on top, tree underneath", "an owl above a tree on a white background"),
    ("From left to right: a pig, then a cow.", "a pig to the left of a cow on a white background"),
    ("a bus, and below it a car", "a car below a bus on a white background"),
    ("a cat to the left of that dog", "a cat to the left of a dog on a white background"),
    ("a drum, to its left a guitar", "a guitar to the left of a drum on a white background"),
])
def test_free_wordings(text, caption):
    assert read(text) == caption


@pytest.mark.parametrize("text", ["", "   ", "a man selling hats", "!!!", "12345"])
def test_nothing_known_is_read_as_written(text):
    assert read(text) is None


def test_unnamed_background_is_one_the_object_shows_on():
    for name in ("snowman", "cloud", "panda", "egg"):
        if name in scenes.VOCABULARY:
            background = read(name).rsplit(" on ", 1)[1].split()[-2]
            assert background in scenes.visible_backgrounds(name)


_WORDS = sorted({w for name in scenes.VOCABULARY for w in name.split()} | set(scenes.BACKGROUNDS)
                | {"on", "the", "a", "of", "left", "right", "top", "bottom", "above", "below", "under", "next", "to",
                   "two", "3", "four", "big", "tiny", "background", "its", "it", "and", "with", ",", ":", "middle"})


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.lists(st.sampled_from(_WORDS), max_size=14).map(" ".join)))
def test_any_text_reads_as_a_caption_that_reads_as_itself(text):
    caption = read(text)
    assert caption is None or read(caption) == caption
