"""The evaluation's checks are right on the scenes themselves and wrong on mismatched ones."""

import numpy as np

from model import evaluate
from model.data import scenes


def _judged(split, n, image_of):
    rng = np.random.default_rng(1)
    drawn = [scenes.sample_scene(rng, split) for _ in range(n)]
    results = [evaluate.judge(s, image_of(i, drawn)) for i, s in enumerate(drawn)]
    return {key: np.mean([r[key] for r in results if key in r]) for key in results[0]}


def _truth(i, drawn):
    return np.asarray(scenes.render(drawn[i]))


def _other(i, drawn):
    return np.asarray(scenes.render(drawn[(i + 1) % len(drawn)]))


def test_checks_pass_on_the_rendered_scenes():
    assert _judged("heldout_backgrounds", 40, _truth) == {"background": 1.0, "identity": 1.0, "position": 1.0}
    assert _judged("heldout_pairs", 25, _truth) == {"background": 1.0, "relation": 1.0}
    assert _judged("heldout_counts", 40, _truth) == {"background": 1.0, "count": 1.0}


def test_checks_fail_on_other_scenes():
    single = _judged("heldout_backgrounds", 40, _other)
    assert single["identity"] < 0.1 and single["background"] < 0.5 and single["position"] < 0.5
    counts = _judged("heldout_counts", 40, _other)
    assert counts["count"] < 0.7


def test_blank_image_finds_no_object():
    blank = np.zeros((64, 64, 3), np.uint8)
    assert evaluate.count_blobs(evaluate.foreground(blank, np.zeros(3))) == 0
    assert evaluate.position_of(evaluate.foreground(blank, np.zeros(3))) is None


def test_psnr_and_table():
    a = np.zeros((4, 4, 3), np.uint8)
    assert evaluate.psnr(a, a) > 90 and abs(evaluate.psnr(a, a + 255) - 0.0) < 1e-6
    table = {"train": {"scenes": 2, "psnr": 30.0, "background": 1.0, "identity": 0.5, "position": None,
                       "relation": None, "count": None, "clip_top1": 0.25}}
    assert "| train | 2 | 30.0 | 100% | 50% | - | - | - | 25% |" in evaluate.markdown(table)


def test_caption_without_background_accepts_any_background():
    rng = np.random.default_rng(2)
    scene = scenes.sample_scene(rng, "heldout_backgrounds")
    other = next(b for b in scenes.BACKGROUNDS if b != scene.background)
    image = np.asarray(scenes.render(scenes.Scene(other, scene.objects, "single", size_name=scene.size_name,
                                                  position=scene.position)))
    assert evaluate.judge(scene, image)["background"] is False
    unnamed = evaluate.judge(scene, image, names_background=False)
    assert "background" not in unnamed and unnamed["position"]


def test_paraphrase_split_is_reported_after_the_template_splits():
    assert evaluate.SPLITS[:5] == scenes.SPLITS and evaluate.SPLITS[5] == "heldout_paraphrases"


def test_an_unknown_split_is_refused_before_any_model_loads(capsys):
    import pytest

    with pytest.raises(SystemExit):
        evaluate.main(["--splits", "heldout_paraphrases,heldout_typos", "--model", "/nonexistent"])
    assert "unknown split(s) heldout_typos" in capsys.readouterr().err
