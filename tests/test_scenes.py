"""Emoji scene generator: vocabulary art, held-out splits, captions, geometry and rendering."""

import os
import re
import subprocess
import sys
from pathlib import Path

import emoji
import numpy as np
import pytest
from PIL import Image

from model.data import scenes
from model.data.scenes import (
    BACKGROUNDS, COUNTS, PLURALS, POSITIONS, RELATIONS, SIZES, SPLITS, VOCABULARY,
    PlacedObject, Scene, caption, heldout, render, sample_batch, sample_scene,
)

SCENES_PER_SPLIT = 3000
HELDOUT_SPLITS = SPLITS[1:]


@pytest.fixture(scope="module")
def drawn():
    """split -> scenes, drawn once for the tests that only inspect scene fields."""
    def draw(seed, split, n):
        rng = np.random.default_rng(seed)
        return [sample_scene(rng, split) for _ in range(n)]

    drawn = {split: draw(seed, split, SCENES_PER_SPLIT) for seed, split in enumerate(SPLITS)}
    return drawn | {"many_train": draw(99, "train", 20000)}


def test_vocabulary_is_distinct_clean_and_every_png_loads():
    assert 100 <= len(VOCABULARY) <= 200
    paths = set()
    for name, character in VOCABULARY.items():
        assert re.fullmatch(r"[a-z]+( [a-z]+)?", name), name
        assert character in emoji.EMOJI_DATA, name
        assert "\u200d" not in character, name  # no joined sequences
        assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for c in character), name  # no skin tones
        path = scenes.emoji_path(character)
        paths.add(path.name)
        with Image.open(path) as image:
            assert image.size == (72, 72)
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
        assert (alpha > 128).mean() > 0.1, name
        assert PLURALS[name] != name or name in ("fish", "sheep", "deer", "jellyfish")
    assert len(paths) == len(VOCABULARY), "two names share one picture"


def test_backgrounds_are_named_rgb_colours():
    assert 10 <= len(BACKGROUNDS) <= 14
    for name, rgb in BACKGROUNDS.items():
        assert re.fullmatch(r"[a-z]+", name) and len(rgb) == 3
        assert all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)
    assert len(set(BACKGROUNDS.values())) == len(BACKGROUNDS)


def _own_heldout_kinds(scene):
    """Which held-out combinations a scene shows, checked against the held-out sets directly."""
    held = heldout()
    names = [placed.name for placed in scene.objects]
    kinds = set()
    if scene.kind == "pair" and frozenset(names) in held.pairs:
        kinds.add("heldout_pairs")
    if any((name, scene.background) in held.backgrounds.items() for name in names):
        kinds.add("heldout_backgrounds")
    if scene.kind == "single" and (names[0], scene.position) in held.positions.items():
        kinds.add("heldout_positions")
    if scene.kind == "count" and (names[0], scene.count) in held.counts.items():
        kinds.add("heldout_counts")
    return kinds


def test_splits_show_only_their_own_heldout_combinations(drawn):
    for split in SPLITS:
        expected = set() if split == "train" else {split}
        for scene in drawn[split]:
            assert _own_heldout_kinds(scene) == expected, (split, scene)
            assert scenes.heldout_kinds(scene) == expected
            for placed in scene.objects:
                assert scene.background in scenes.visible_backgrounds(placed.name)
    assert {s.kind for s in drawn["heldout_pairs"]} == {"pair"}
    assert {s.kind for s in drawn["heldout_backgrounds"]} == {"single"}
    assert {s.kind for s in drawn["heldout_positions"]} == {"single"}
    assert {s.kind for s in drawn["heldout_counts"]} == {"count"}


def test_train_mixes_kinds_in_the_stated_proportions(drawn):
    kinds = [scene.kind for scene in drawn["many_train"]]
    shares = {kind: kinds.count(kind) / len(kinds) for kind in ("single", "pair", "count")}
    assert shares == pytest.approx({"single": 0.5, "pair": 0.3, "count": 0.2}, abs=0.02)


def test_kind_mix_reweights_the_train_kinds_and_keeps_the_heldout_ones_out():
    def kinds(mix, n=600):
        rng = np.random.default_rng(5)
        drawn = [sample_scene(rng, "train", mix) for _ in range(n)]
        assert all(scenes.heldout_kinds(scene) == set() for scene in drawn)
        return [scene.kind for scene in drawn]

    assert set(kinds((0, 0, 1))) == {"count"}
    assert set(kinds((1, 0, 0))) == {"single"}
    mixed = kinds((0, 2, 2))
    assert set(mixed) == {"pair", "count"} and 0.4 < mixed.count("pair") / len(mixed) < 0.6
    for bad in ((1, 1), (1, -1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="kind_mix"):
            sample_scene(np.random.default_rng(0), "train", bad)


def test_every_heldout_part_occurs_in_training(drawn):
    held = heldout()
    train = drawn["many_train"]
    in_pairs = {p.name for s in train if s.kind == "pair" for p in s.objects}
    in_counts = {s.objects[0].name for s in train if s.kind == "count"}
    backgrounds_of = {}
    positions_of = {}
    for scene in train:
        for placed in scene.objects:
            backgrounds_of.setdefault(placed.name, set()).add(scene.background)
        if scene.kind == "single":
            positions_of.setdefault(scene.objects[0].name, set()).add(scene.position)
    assert set(backgrounds_of) == set(VOCABULARY)
    assert {s.background for s in train} == set(BACKGROUNDS)
    assert {s.position for s in train if s.kind == "single"} == set(POSITIONS)
    assert {s.count for s in train if s.kind == "count"} == set(COUNTS)
    assert {s.relation for s in train if s.kind == "pair"} == set(RELATIONS)
    assert len(held.pairs) > 100 and len(held.counts) > 20
    assert all(len(pair) == 2 and pair <= in_pairs for pair in held.pairs)
    for name in VOCABULARY:
        assert backgrounds_of[name] and held.backgrounds[name] not in backgrounds_of[name]
        assert positions_of[name] and held.positions[name] not in positions_of[name]
    assert set(held.counts) <= in_counts


def test_heldout_sets_do_not_depend_on_the_process():
    code = ("from model.data.scenes import heldout; h = heldout(); "
            "print(sorted(map(sorted, h.pairs))[:50], sorted(h.backgrounds.items()), "
            "sorted(h.positions.items()), sorted(h.counts.items()))")
    held = heldout()
    expected = (f"{sorted(map(sorted, held.pairs))[:50]} {sorted(held.backgrounds.items())} "
                f"{sorted(held.positions.items())} {sorted(held.counts.items())}")
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        cwd=Path(__file__).parents[1], env=os.environ | {"PYTHONHASHSEED": "123"},
    )
    assert result.stdout.strip() == expected


def test_same_seed_same_scenes_and_pixels():
    for split in SPLITS:
        captions_a, images_a = sample_batch(np.random.default_rng(7), 40, split)
        captions_b, images_b = sample_batch(np.random.default_rng(7), 40, split)
        captions_c, _ = sample_batch(np.random.default_rng(8), 40, split)
        assert captions_a == captions_b and np.array_equal(images_a, images_b)
        assert captions_a != captions_c
        assert images_a.shape == (40, 64, 64, 3) and images_a.dtype == np.uint8
    first = [sample_scene(np.random.default_rng(3)) for _ in range(2)]
    assert first[0] == first[1]


def _name_pattern():
    return "|".join(re.escape(name) for name in sorted(VOCABULARY, key=len, reverse=True))


def test_captions_follow_the_templates(drawn):
    names = _name_pattern()
    plurals = "|".join(re.escape(p) for p in sorted(PLURALS.values(), key=len, reverse=True))
    background = r"on an? (?P<bg>[a-z]+) background"
    single = re.compile(rf"a (?P<size>small|medium|large) (?P<name>{names}) "
                        r"(?P<where>in the top left|at the top|in the top right|on the left|"
                        r"in the center|on the right|in the bottom left|at the bottom|"
                        rf"in the bottom right) {background}")
    relations = "|".join(RELATIONS)
    pair = re.compile(
        rf"an? (?P<first>{names}) (?P<rel>{relations}) an? (?P<second>{names}) {background}"
    )
    count = re.compile(rf"(?P<number>two|three|four) (?P<plural>{plurals}) {background}")
    for scene in [s for split in SPLITS for s in drawn[split][:500]]:
        text = caption(scene)
        match = {"single": single, "pair": pair, "count": count}[scene.kind].fullmatch(text)
        assert match, text
        assert match["bg"] == scene.background
        if scene.kind == "single":
            assert (match["size"], match["name"]) == (scene.size_name, scene.objects[0].name)
            assert match["where"].split(" ", 2)[-1] == scene.position
        elif scene.kind == "pair":
            assert (match["first"], match["rel"], match["second"]) == (
                scene.objects[0].name, scene.relation, scene.objects[1].name)
        else:
            assert match["plural"] == PLURALS[scene.objects[0].name]
            assert ["two", "three", "four"].index(match["number"]) + 2 == scene.count


def test_articles_and_plurals():
    def placed(name):
        return PlacedObject(name, VOCABULARY[name], 0, 0, 16)

    assert caption(Scene("orange", (placed("unicorn"), placed("elephant")), "pair",
                         relation="above")) == "a unicorn above an elephant on an orange background"
    assert caption(Scene("blue", (placed("hourglass"), placed("fox")), "pair",
                         relation="below")) == "an hourglass below a fox on a blue background"
    apple = Scene("teal", (placed("apple"),), "single", size_name="small", position="top left")
    assert caption(apple) == "a small apple in the top left on a teal background"
    assert caption(Scene("red", (placed("fox"),), "single", size_name="large",
                         position="center")) == "a large fox in the center on a red background"
    expected = {"mouse": "mice", "die": "dice", "tooth": "teeth", "fox": "foxes",
                "butterfly": "butterflies", "sheep": "sheep", "snowman": "snowmen", "bus": "buses",
                "maple leaf": "maple leaves", "key": "keys", "cherry blossom": "cherry blossoms"}
    for name, plural in expected.items():
        if name in VOCABULARY:
            assert PLURALS[name] == plural
    assert caption(Scene("white", (placed("mouse"),) * 3, "count", count=3)) == \
        "three mice on a white background"


def _overlap(a, b):
    return (a.x < b.x + b.size and b.x < a.x + a.size and
            a.y < b.y + b.size and b.y < a.y + a.size)


def _centre(placed):
    return placed.x + placed.size / 2, placed.y + placed.size / 2


def test_geometry_matches_the_caption(drawn):
    for scene in [s for split in SPLITS for s in drawn[split]]:
        objects = scene.objects
        for i, placed in enumerate(objects):
            assert 0 <= placed.x and placed.x + placed.size <= 64
            assert 0 <= placed.y and placed.y + placed.size <= 64
            assert placed.emoji == VOCABULARY[placed.name]
            assert not any(_overlap(placed, other) for other in objects[i + 1:]), scene
        if scene.kind == "single":
            assert len(objects) == 1 and objects[0].size == SIZES[scene.size_name]
            cx, cy = _centre(objects[0])
            row, column = divmod(POSITIONS.index(scene.position), 3)
            for offset, index in ((cx - 32, column), (cy - 32, row)):
                assert [offset <= -8, abs(offset) <= 3, offset >= 8][index], scene
        elif scene.kind == "pair":
            assert len(objects) == 2 and all(22 <= p.size <= 26 for p in objects)
            (x0, y0), (x1, y1) = _centre(objects[0]), _centre(objects[1])
            along, across = {
                "to the left of": (x1 - x0, y1 - y0), "to the right of": (x0 - x1, y0 - y1),
                "above": (y1 - y0, x1 - x0), "below": (y0 - y1, x0 - x1),
            }[scene.relation]
            assert along > 2 * abs(across) and along >= 20, scene
        else:
            assert len(objects) == scene.count and scene.count in COUNTS
            assert len({(p.name, p.size) for p in objects}) == 1
            assert all(18 <= p.size <= 22 for p in objects)


def test_render_draws_objects_in_their_boxes_on_the_background():
    rng = np.random.default_rng(5)
    for split in SPLITS:
        for _ in range(60):
            scene = sample_scene(rng, split)
            image = render(scene)
            assert image.size == (64, 64) and image.mode == "RGB"
            pixels = np.asarray(image).astype(int)
            covered = np.zeros((64, 64), bool)
            background = np.asarray(BACKGROUNDS[scene.background])
            for placed in scene.objects:
                box = np.s_[placed.y:placed.y + placed.size, placed.x:placed.x + placed.size]
                covered[box] = True
                changed = np.abs(pixels[box] - background).sum(-1) > 30
                assert changed.mean() > 0.15, (scene, placed)
            assert (pixels[~covered] == background).all()
            for corner in ((0, 0), (0, 63), (63, 0), (63, 63)):
                if not covered[corner]:
                    assert tuple(pixels[corner]) == BACKGROUNDS[scene.background]


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="heldout_pairs"):
        sample_scene(np.random.default_rng(0), "test")
