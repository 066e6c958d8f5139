"""pipe.vary: the kept rows are the upload's codes, the rest is sampled; bad uploads get a clear message."""

import io

import numpy as np
import pytest
from PIL import Image

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
