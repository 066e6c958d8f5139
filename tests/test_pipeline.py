"""The Pipeline end to end on tiny random weights: images, ordering, seeds, batching, previews, compiles."""

import dataclasses

import numpy as np
import pytest

from model import sampling
from model.errors import InvalidInputError
from model.loading import load_pipeline
from model.pipeline import GenerationResult, Progress, check_inputs
from support.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(write_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


def _pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


def test_generate_returns_sorted_images_and_the_seed(pipe):
    result = pipe.generate("a fox to the left of a butterfly", num_images=3, candidates=6, seed=7)
    assert isinstance(result, GenerationResult)
    assert len(result.images) == 3 and len(result.scores) == 3
    assert all(image.size == (16, 16) and image.mode == "RGB" for image in result.images)
    assert result.scores == sorted(result.scores, reverse=True)
    assert result.seed == 7
    assert result.codes.shape == (3, 16) and result.codes.max() < pipe.vqgan_config.n_embed
    assert result.parameters["candidates"] == 6 and result.parameters["top_k"] == 8  # from pipeline.json


def test_kept_images_are_the_best_candidates(pipe):
    everything = pipe.generate("three snails", num_images=6, candidates=6, seed=3)
    best = pipe.generate("three snails", num_images=2, candidates=6, seed=3)
    np.testing.assert_allclose(best.scores, everything.scores[:2], rtol=1e-6)
    np.testing.assert_array_equal(best.codes, everything.codes[:2])


def test_seed_reproduces_and_changes(pipe):
    a = pipe.generate("a cat above a dog", num_images=4, seed=11)
    b = pipe.generate("a cat above a dog", num_images=4, seed=11)
    c = pipe.generate("a cat above a dog", num_images=4, seed=12)
    np.testing.assert_array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(a.codes, c.codes)


def test_random_seed_is_reported_and_reproduces(pipe):
    a = pipe.generate("two rockets", num_images=2)
    b = pipe.generate("two rockets", num_images=2, seed=a.seed)
    np.testing.assert_array_equal(a.codes, b.codes)


def test_list_of_prompts_is_one_batch_with_the_same_images(pipe):
    prompts = ["two rockets", "a large green frog"]
    batched = pipe.generate(prompts, num_images=2, seed=5)
    assert [r.prompt for r in batched] == prompts
    for prompt, result in zip(prompts, batched):
        alone = pipe.generate(prompt, num_images=2, seed=5)
        np.testing.assert_array_equal(result.codes, alone.codes)
        np.testing.assert_allclose(result.scores, alone.scores, rtol=1e-5)


def test_stream_yields_progress_with_previews_then_the_result(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 4)
    items = list(pipe.stream("a small red apple", num_images=2, seed=1, preview_every=8))
    progress, final = items[:-1], items[-1]
    assert all(isinstance(p, Progress) and p.total == 16 for p in progress) and isinstance(final, GenerationResult)
    assert [(p.step, p.images is not None) for p in progress] == [(4, False), (8, True), (12, False), (16, False)]
    # 8 of 16 codes: the top two of four token rows are decoded, the rest is blank.
    preview = progress[1].images
    assert len(preview) == 1 and len(preview[0]) == 2
    top = np.asarray(preview[0][0])
    assert (top[8:] == 255).all() and not (top[:8] == 255).all()
    np.testing.assert_array_equal(final.codes, pipe.generate("a small red apple", num_images=2, seed=1).codes)


def test_a_short_run_shows_no_previews(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 4)
    request = pipe.request("a small red apple", num_images=2, seed=1)
    assert all(p.images is None for p in list(pipe.run(request, preview_every=8, previews_after_s=600))[:-1])
    assert any(p.images is not None for p in list(pipe.run(request, preview_every=8, previews_after_s=0))[:-1])


def test_closing_the_stream_stops_sampling(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 4)
    chunks = []
    original = sampling.sample_codes_chunk
    monkeypatch.setattr(sampling, "sample_codes_chunk", lambda *a, **k: chunks.append(1) or original(*a, **k))
    stream = pipe.stream("a small red apple", num_images=2, seed=1)
    assert isinstance(next(stream), Progress)
    stream.close()  # what the app does when its client goes away
    assert len(chunks) == 1


def test_request_fills_defaults_and_draws_a_seed_once(pipe):
    request = pipe.request("a fox", num_images=3, top_k="5")
    assert request.options.num_images == 3 and request.options.top_k == 5  # checked and converted
    assert request.options.candidates == pipe.defaults.candidates and request.options.top_p == pipe.defaults.top_p
    assert isinstance(request.options.seed, int)
    *_, result = pipe.run(request)
    assert result.seed == request.options.seed and result.parameters == request.options.to_dict()


@pytest.mark.parametrize("inputs, message", [
    ({"prompt": "a fox", "top_k": -1}, "top_k must be between 0 and 16384"),
    ({"prompt": "a fox", "colour": "red"}, "Unknown option 'colour'"),
    ({"prompt": "a fox", "keep_rows": 2}, "keep_rows applies to variations"),
    ({"prompt": ["a fox"] * 17}, "At most 16 prompts"),
    ({"prompt": "   "}, "Please enter a prompt"),
])
def test_inputs_are_refused_before_any_model(inputs, message):
    with pytest.raises(InvalidInputError, match=message):
        check_inputs(**inputs)


def test_too_many_rows_for_the_model_are_refused(pipe):
    with pytest.raises(InvalidInputError, match="at most 128"):
        pipe.request(["a fox"] * 3, candidates=64)


def test_changing_knobs_and_seed_never_recompiles(pipe):
    pipe.generate("warm", num_images=4, seed=0)
    before = sampling.trace_count()
    for knobs in ({"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.5}, {"condition_scale": 7.5}, {"seed": 99}):
        pipe.generate("a fox", num_images=4, **{"seed": 1, **knobs})
    assert sampling.trace_count() == before


def test_warmup_of_an_unguided_default_also_compiles_the_guided_sampler(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "defaults", dataclasses.replace(pipe.defaults, condition_scale=1.0))
    pipe.warmup(num_images=13)  # a request shape no other test compiles
    before = sampling.trace_count()
    for scale in (1.0, 3.0, 1.0):
        pipe.generate("a fox", num_images=13, seed=2, condition_scale=scale)
    assert sampling.trace_count() == before


def test_condition_scale_one_skips_guidance_and_differs(pipe):
    guided = pipe.generate("a fox", num_images=2, seed=4, condition_scale=20.0, top_k=1)
    plain = pipe.generate("a fox", num_images=2, seed=4, condition_scale=1.0, top_k=1)
    assert not np.array_equal(guided.codes, plain.codes)


def test_missing_embedded_model_is_a_clear_error(monkeypatch, tmp_path):
    from model.errors import CheckpointError

    monkeypatch.setattr("model.loading.EMBEDDED_MODEL", tmp_path / "emoji")
    with pytest.raises(CheckpointError, match="embedded model is missing"):
        load_pipeline()
