"""pipe.vary: the kept rows are the upload's codes, the rest is sampled (copied with probability strength: 0 = plain
sampling, 1 = the upload's codes); bad uploads and bad strengths get a clear message."""

import io

import numpy as np
import pytest
from PIL import Image

from model import sampling
from model.errors import InvalidInputError
from model.loading import load_pipeline
from support.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(write_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def upload():
    rng = np.random.default_rng(0)
    top = np.tile(np.array([200, 40, 40], np.uint8), (20, 40, 1))
    bottom = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)
    return Image.fromarray(np.concatenate([top, bottom]))  # 40x40, not square-resized yet


def test_kept_rows_are_the_uploads_codes(pipe, upload):
    side = pipe.vqgan_config.latent_size
    codes = pipe.encode_image(upload)
    result = pipe.vary(upload, keep_rows=2, num_images=4, candidates=6, seed=1)
    assert result.codes.shape == (4, side * side)
    np.testing.assert_array_equal(result.codes[:, : 2 * side], np.broadcast_to(codes[: 2 * side], (4, 2 * side)))
    assert any(not np.array_equal(c[2 * side:], codes[2 * side:]) for c in result.codes)
    # No prompt: ranked by image similarity to the upload (cosines, descending).
    assert result.scores == sorted(result.scores, reverse=True) and all(-1 <= s <= 1 for s in result.scores)
    assert result.parameters["keep_rows"] == 2


def test_keep_rows_zero_with_a_prompt_is_text_to_image(pipe, upload):
    varied = pipe.vary(upload, prompt="three snails", keep_rows=0, num_images=2, seed=5)
    plain = pipe.generate("three snails", num_images=2, seed=5)
    np.testing.assert_array_equal(varied.codes, plain.codes)


def test_a_prompt_changes_the_completed_part(pipe, upload):
    a = pipe.vary(upload, prompt="a fox", keep_rows=2, num_images=4, seed=3, condition_scale=20.0, top_k=1)
    b = pipe.vary(upload, prompt="two rockets", keep_rows=2, num_images=4, seed=3, condition_scale=20.0, top_k=1)
    side = pipe.vqgan_config.latent_size
    np.testing.assert_array_equal(a.codes[:, : 2 * side], b.codes[:, : 2 * side])
    assert not np.array_equal(a.codes[:, 2 * side:], b.codes[:, 2 * side:])


def _png(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("upload, message", [
    (b"this is not an image", "not an image that can be read"),
    (_png(Image.new("L", (5000, 4000)), format="PNG"), "too large"),
    (Image.new("RGB", (8, 40)), "too small"),
    (Image.new("CMYK", (64, 64)), "CMYK"),
    (_png(Image.new("RGB", (32, 32)), format="GIF", save_all=True,
          append_images=[Image.new("RGB", (32, 32), "red")]), "Animated"),
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    ("not/a/file.png", "image file was not found"),
])
def test_bad_uploads_get_a_clear_message(pipe, upload, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe.vary(upload, num_images=1)


def test_keep_rows_is_checked(pipe, upload):
    with pytest.raises(InvalidInputError, match="keep_rows must be a whole number between 0 and 4"):
        pipe.vary(upload, keep_rows=5)


def test_transparent_and_grey_uploads_work(pipe):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    assert len(pipe.vary(rgba, num_images=1, seed=0).images) == 1
    assert len(pipe.vary(Image.new("L", (32, 48), 128), num_images=1, seed=0).images) == 1


# Strength: the share of codes copied from the upload (model.sampling.guide_copies).


def test_strength_one_reproduces_the_uploads_codes(pipe, upload):
    codes = pipe.encode_image(upload)
    for prompt in (None, "two rockets"):
        result = pipe.vary(upload, prompt=prompt, strength=1.0, num_images=3, candidates=5, seed=2)
        np.testing.assert_array_equal(result.codes, np.broadcast_to(codes, result.codes.shape))
    assert result.parameters["strength"] == 1.0 and result.parameters["keep_rows"] == 0


def test_strength_zero_with_a_prompt_is_text_to_image(pipe, upload):
    for scale in (1.0, 5.0):  # unguided and guided sampling
        varied = pipe.vary(upload, prompt="three snails", strength=0, num_images=3, seed=5, condition_scale=scale)
        plain = pipe.generate("three snails", num_images=3, seed=5, condition_scale=scale)
        np.testing.assert_array_equal(varied.codes, plain.codes)


def test_strength_zero_without_a_prompt_ignores_the_upload(pipe, upload):
    # Unconditional generation: any upload gives the same candidates (CLIP may order them differently).
    other = Image.new("RGB", (32, 32), (10, 200, 30))
    a = pipe.vary(upload, strength=0.0, num_images=6, candidates=6, seed=7).codes
    b = pipe.vary(other, strength=0.0, num_images=6, candidates=6, seed=7).codes
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_strength_between_pulls_toward_the_upload(pipe, upload):
    codes = pipe.encode_image(upload)
    agreement = [np.mean(pipe.vary(upload, strength=s, num_images=8, seed=3).codes == codes) for s in (0.0, 0.2, 0.6)]
    assert agreement[0] < agreement[1] < agreement[2], agreement


def test_defaults_and_keep_rows_with_strength(pipe, upload):
    from model.pipeline import DEFAULT_EDIT_STRENGTH, DEFAULT_STRENGTH

    side = pipe.vqgan_config.latent_size
    parameters = pipe.vary(upload, num_images=1, seed=0).parameters
    assert parameters["keep_rows"] == 0 and parameters["strength"] == DEFAULT_STRENGTH
    assert pipe.vary(upload, prompt="a fox", num_images=1, seed=0).parameters["strength"] == DEFAULT_EDIT_STRENGTH
    # keep_rows alone keeps its meaning (the rest sampled freely); with strength both apply.
    assert pipe.vary(upload, keep_rows=2, num_images=1, seed=0).parameters["strength"] == 0.0
    both = pipe.vary(upload, keep_rows=2, strength=0.5, num_images=4, seed=0)
    np.testing.assert_array_equal(both.codes[:, : 2 * side], np.broadcast_to(pipe.encode_image(upload)[: 2 * side],
                                                                               (4, 2 * side)))


def test_changing_strength_never_recompiles(pipe, upload):
    pipe.vary(upload, strength=0.5, num_images=4, seed=0)
    before = sampling.trace_count()
    for strength in (0.0, 0.3, 0.99, 1.0):
        pipe.vary(upload, strength=strength, num_images=4, seed=1)
    pipe.vary(upload, keep_rows=1, num_images=4, seed=1)
    assert sampling.trace_count() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"strength": 1.5}, r"strength must be between 0.0 and 1.0; got 1.5"),
    ({"strength": -0.1}, r"strength must be between 0.0 and 1.0"),
    ({"strength": "strong"}, r"strength must be a number, not 'strong'"),
    ({"strength": float("nan")}, r"strength must be a finite number"),
    ({"strength": True}, r"strength must be a number, not bool"),
])
def test_bad_strength_is_a_clear_error(pipe, upload, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe.vary(upload, **kwargs)


def test_strength_needs_an_image(pipe):
    with pytest.raises(InvalidInputError, match="strength applies to variations of an image"):
        pipe.generate("a fox", strength=0.5)
