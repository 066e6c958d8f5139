"""Paraphrased captions: deterministic, held-out wordings kept out of training, nothing dropped."""

import re

import numpy as np
import pytest

from model.data import captions, scenes
from model.data.vocabulary import PLURALS, VOCABULARY

_COUNT_FORMS = {2: ("two", "2", "pair"), 3: ("three", "3", "trio"), 4: ("four", "4")}
_RELATION_FORMS = ("left", "right", "above", "below", "over", "under", "beneath", "underneath", "top", "bottom", "higher")


def _drawn(seed, n, heldout=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = scenes.sample_scene(rng, "train")
        out.append((scene, captions.paraphrase(scene, rng, heldout)))
    return out


def _has(phrase, text):
    return re.search(rf"(?<![a-z]){re.escape(phrase)}(?![a-z])", text.lower()) is not None


def test_deterministic_per_rng():
    assert _drawn(3, 50) == _drawn(3, 50)
    assert _drawn(3, 50, True) == _drawn(3, 50, True)
    assert [p.text for _, p in _drawn(3, 50)] != [p.text for _, p in _drawn(4, 50)]


def test_heldout_phrasings_never_appear_in_training_captions():
    texts = [p.text for _, p in _drawn(0, 3000)]
    assert len(set(texts)) > 2500  # many wordings
    leaks = {phrase for phrase in captions.HELDOUT_PHRASES for text in texts if _has(phrase, text)}
    assert not leaks


@pytest.mark.parametrize("heldout", [False, True])
def test_paraphrases_mention_objects_counts_and_relations(heldout):
    for scene, worded in _drawn(1, 1500, heldout):
        text = worded.text.lower()
        for placed in scene.objects:
            assert _has(placed.name, text) or _has(PLURALS[placed.name], text), text
        if scene.kind == "count":
            assert any(_has(form, text) for form in _COUNT_FORMS[scene.count]), text
        if scene.kind == "pair":
            assert any(_has(form, text) for form in _RELATION_FORMS), text
        if heldout:
            assert any(_has(phrase, text) for phrase in captions.HELDOUT_PHRASES), text
        named = _has(scene.background, text) or (scene.background == "gray" and _has("grey", text))
        if worded.names_background:
            assert named, text


def test_paraphrases_vary_background_naming_and_form():
    drawn = _drawn(2, 600)
    unnamed = sum(not p.names_background for _, p in drawn)
    assert 0.05 < unnamed / len(drawn) < 0.4
    texts = [p.text for _, p in drawn]
    assert any("3 " in t for t in texts) and any(t[:1].isupper() for t in texts)
    assert any(" of " not in t and "," in t for t in texts)
    # A relation said from the other object's side.
    assert any(s.kind == "pair" and p.text.lower().find(s.objects[1].name) < p.text.lower().find(s.objects[0].name)
               for s, p in drawn)


def test_unknown_captions_name_no_vocabulary_object():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text, background = captions.unknown_caption(rng)
        assert background in scenes.BACKGROUNDS and background in text.lower()
        assert not any(_has(name, text) for name in VOCABULARY ), text
