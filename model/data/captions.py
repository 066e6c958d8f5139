"""Paraphrased captions: the same scene said the many ways people would, with a held-out set.

`scenes.caption(scene)` is the one training template per kind; `paraphrase(scene, rng)` says the same
scene with synonyms and numerals ("big", "upper left", "3 apples"), other ways to name the background
("blue picture with a fox in it", "fox, background: blue") or none at all, other word orders
(including a relation said from the other object's side: "a dog to the right of a cat" == "a cat to
the left of a dog"), fragments, capitals, punctuation and filler words.

Some phrasings and whole templates never appear in training captions (`HELDOUT_PHRASES`): with
`heldout=True` each caption uses at least one of them, which is what the evaluation's
"heldout_paraphrases" split measures (scenes of the train distribution, unseen wordings). Every
paraphrase names the object(s) by their vocabulary name (or plural) and, for counts and pairs, the
count (word or numeral) and the relation (or both sides of it).

`unknown_caption(rng)` describes something outside the vocabulary ("a robot on a blue background"):
trained with the background alone, so prompts the model cannot draw still give a sensible picture.
"""

from typing import NamedTuple

import numpy as np

from model.data import scenes
from model.data.vocabulary import PLURALS, VOCABULARY


class Paraphrase(NamedTuple):
    text: str
    names_background: bool  # False: the caption leaves the background open (any counts)


# Options are (phrase, held out?). Held-out phrases must never occur inside a training caption.
SIZE_WORDS = {
    "small": (("small", False), ("little", False), ("tiny", False), ("teeny", True)),
    "medium": (("medium", False), ("medium-sized", False), ("mid-sized", False), ("normal-sized", True)),
    "large": (("large", False), ("big", False), ("giant", False), ("huge", True)),
}
POSITION_WORDS = {
    "top left": ("top left", "upper left", "top-left", "top left corner"),
    "top": ("top", "top middle", "top centre", "upper middle"),
    "top right": ("top right", "upper right", "top-right", "top right corner"),
    "left": ("left", "left side", "middle left", "left edge"),
    "center": ("center", "centre", "middle", "very middle"),
    "right": ("right", "right side", "middle right", "right edge"),
    "bottom left": ("bottom left", "lower left", "bottom-left", "bottom left corner"),
    "bottom": ("bottom", "bottom middle", "bottom centre", "lower middle"),
    "bottom right": ("bottom right", "lower right", "bottom-right", "bottom right corner"),
}
_HELDOUT_POSITION_WORDS = frozenset({"upper right", "lower left", "very middle"})
RELATION_WORDS = {
    "to the left of": (("to the left of", False), ("left of", False), ("on the left of", False),
                       ("on the left side of", True)),
    "to the right of": (("to the right of", False), ("right of", False), ("on the right of", True),
                        ("on the right side of", False)),
    "above": (("above", False), ("over", False), ("on top of", False), ("higher than", True)),
    "below": (("below", False), ("under", False), ("beneath", False), ("underneath", True)),
}
_INVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
_SIDE = {"to the left of": "left", "to the right of": "right", "above": "top", "below": "bottom"}
COUNT_WORDS = {2: ("two", "2", "a pair of"), 3: ("three", "3", "a trio of"), 4: ("four", "4", "a group of four")}
_HELDOUT_COUNT_FORMS = ("exactly {n} {plural}",)  # {n}: word or numeral
_TRAIN_COUNT_FORMS = ("{n} {plural}", "{n} {plural}", "{n} {plural} in total", "{n} little {plural}")
_BACKGROUND_NAMES = {"gray": ("gray", "grey")}
# Background forms: {obj} the objects' phrase, {bg} the colour. None: no background named.
_TRAIN_FORMS = (
    "{obj} on {a_bg} background", "{obj} on {bg}", "{obj} on a {bg} backdrop", "{obj}, {bg} background",
    "{bg} background, {obj}", "{obj} with a {bg} background", "{obj}, background: {bg}",
    "{obj} in front of {a_bg} background", "{a_bg} image of {obj}", None, None,
)
_HELDOUT_FORMS = ("{a_bg} picture with {obj} in it", "{obj} against {a_bg} wall")
_TRAIN_FILLERS = ("", "", "", "", "a picture of ", "draw ", "please draw ", "an image of ", "show me ",
                  "i want ", "emoji of ", "")
_HELDOUT_FILLERS = ("could you paint ",)
HELDOUT_PHRASES = tuple(sorted(
    {w for options in SIZE_WORDS.values() for w, held in options if held}
    | {w for options in RELATION_WORDS.values() for w, held in options if held}
    | _HELDOUT_POSITION_WORDS | {"exactly"} | {"picture with", "in it", "wall"} | {"could you paint"}))


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase):
    return scenes._with_article(phrase)


def _choose(rng, options, heldout):
    """A phrase from (phrase, held) options: training ones, or with heldout any (held ones favoured)."""
    pool = [w for w, held in options if held] if heldout else [w for w, held in options if not held]
    return _pick(rng, pool)


def _position(rng, position, heldout):
    pool = [w for w in POSITION_WORDS[position] if (w in _HELDOUT_POSITION_WORDS) == heldout] or \
        [w for w in POSITION_WORDS[position] if w not in _HELDOUT_POSITION_WORDS]
    word = _pick(rng, pool)
    preposition = "at the" if position in ("top", "bottom") and rng.random() < 0.5 else \
        _pick(rng, ("in the", "on the", "at the")) if position != "center" else _pick(rng, ("in the", "at the"))
    return f"{preposition} {word}"


def _single(rng, scene, held):
    name = scene.objects[0].name
    size = _choose(rng, SIZE_WORDS[scene.size_name], "size" in held)
    where = _position(rng, scene.position, "position" in held)
    if rng.random() < 0.5:
        return f"{_article(size + ' ' + name)} {where}"
    return f"{where}, {_article(size + ' ' + name)}" if rng.random() < 0.5 else f"{name}, {size}, {where}"


def _pair(rng, scene, held):
    first, second = (placed.name for placed in scene.objects)
    relation = scene.relation
    form = int(rng.integers(4))
    if form == 3:  # "a cat and a dog, the cat on the left"
        side = _SIDE[relation]
        return f"{_article(first)} and {_article(second)}, the {first} on the {side}"
    if form == 2:  # said from the other object's side
        first, second, relation = second, first, _INVERSE[relation]
    words = _choose(rng, RELATION_WORDS[relation], "relation" in held)
    if form == 1 and relation in ("to the left of", "to the right of"):
        return f"{_article(first)} next to {_article(second)}, the {first} on the {_SIDE[relation]}" \
            if rng.random() < 0.3 else f"{first} {words} {second}"
    return f"{_article(first)} {words} {_article(second)}"


def _count(rng, scene, held):
    name = scene.objects[0].name
    n = _pick(rng, COUNT_WORDS[scene.count][:2] if "count" in held else COUNT_WORDS[scene.count])
    forms = _HELDOUT_COUNT_FORMS if "count" in held else _TRAIN_COUNT_FORMS
    return _pick(rng, forms).format(n=n, plural=PLURALS[name])


_HELD_CATEGORIES = {"single": ("size", "position", "form", "filler"), "pair": ("relation", "form", "filler"),
                    "count": ("count", "form", "filler")}


def _style(rng, text):
    draw = rng.random()
    if draw < 0.15:
        text = text[:1].upper() + text[1:]
    elif draw < 0.2:
        text = text.title()
    elif draw < 0.23:
        text = text.upper()
    return text + _pick(rng, ("", "", "", ".", "!", " ."))


def paraphrase(scene: scenes.Scene, rng: np.random.Generator, heldout: bool = False) -> Paraphrase:
    """The scene in one of many wordings; heldout: one using at least one held-out phrasing."""
    held = {_pick(rng, _HELD_CATEGORIES[scene.kind])} if heldout else set()
    build = {"single": _single, "pair": _pair, "count": _count}[scene.kind]
    obj = build(rng, scene, held)
    if "relation" in held and not any(p in obj for p in HELDOUT_PHRASES):
        obj = f"{_article(scene.objects[0].name)} {_choose(rng, RELATION_WORDS[scene.relation], True)} " \
              f"{_article(scene.objects[1].name)}"
    if "position" in held and not any(p in obj for p in HELDOUT_PHRASES):
        held.add("size")  # positions without a held-out word (top, bottom...): hold out the size instead
        obj = _single(rng, scene, held)
    form = _pick(rng, _HELDOUT_FORMS if "form" in held else _TRAIN_FORMS)
    filler = _pick(rng, _HELDOUT_FILLERS if "filler" in held else _TRAIN_FILLERS)
    if "filler" not in held and ((form and "image of" in form) or len((filler + obj).split()) > 9):
        filler = ""  # keeps captions within the text encoder's 24 tokens (and avoids "an image of a .. image of")
    if form is None:
        text = obj
    else:
        bg = _pick(rng, _BACKGROUND_NAMES.get(scene.background, (scene.background,)))
        text = form.format(obj=obj, bg=bg, a_bg=_article(bg))
    return Paraphrase(_style(rng, filler + text), form is not None)


UNKNOWN_THINGS = ("man", "woman", "child", "dragon", "city", "tower", "tent", "pirate", "sofa", "kettle",
                  "sword", "chair", "table", "lamp", "shoe", "hat", "clock", "garden", "planet", "astronaut",
                  "woman selling hats", "wizard", "bridge", "forest", "river", "violin")
assert not set(UNKNOWN_THINGS) & set(VOCABULARY)


def unknown_caption(rng: np.random.Generator) -> tuple[str, str]:
    """(caption of something outside the vocabulary, the background colour its picture shows)."""
    thing = _pick(rng, UNKNOWN_THINGS)
    background = _pick(rng, tuple(scenes.BACKGROUNDS))
    text = _pick(rng, (f"{_article(thing)} on {_article(background)} background", f"{_article(thing)} on {background}",
                       f"{background} background, {_article(thing)}"))
    return _style(rng, text), background
