"""Continuous batching (model/scheduler.py, model/batching.py) on tiny random weights: a request's
answer is the same alone and inside a mixed batch, per-row knobs compile nothing new, a failing or
cancelled request leaves its batch-mates intact (and its rows leave the batch), and the Space's
per-caller limit."""

import threading
import types

import gradio as gr
import numpy as np
import pytest

import space as space_lib
from model import batching, sampling, sharding
from model.loading import load_pipeline
from model.pipeline import GenerationResult, Progress
from model.scheduler import Scheduler
from support.tiny import write_tiny_pipeline


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(write_tiny_pipeline(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def upload():
    return np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def _mixed(pipe, upload):
    """Requests that differ in everything a row carries: seeds, knobs, guidance or not, prompt lists,
    a variation."""
    return [
        pipe.request("a fox to the left of a butterfly", seed=1, num_images=2, candidates=3),
        pipe.request("three snails", seed=2, num_images=1, candidates=2, temperature=0.5, top_k=3, top_p=0.8,
                     condition_scale=1.0),
        pipe.request(["two rockets", "a cat above a dog"], seed=3, num_images=2, top_k=0, condition_scale=7.5),
        pipe.request("a small red apple", image=upload, keep_rows=2, seed=4, num_images=2, candidates=2),
        pipe.request(None, image=upload, keep_rows=1, seed=5, num_images=1, candidates=2, temperature=2.0),
    ]


def _alone(pipe, request):
    results = list(pipe.run(request))[-1]
    return results if isinstance(results, list) else [results]


def _same(got, want):
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g.prompt, g.seed) == (w.prompt, w.seed)
        np.testing.assert_array_equal(g.codes, w.codes)
        np.testing.assert_array_equal(np.stack([np.asarray(i) for i in g.images]),
                                      np.stack([np.asarray(i) for i in w.images]))
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5)


def _held(scheduler, requests, **kwargs):
    """Submits every request before the worker may take any, so they share one batch."""
    with scheduler._ready:  # the worker takes requests under this (re-entrant) lock
        return [scheduler.submit(r, **kwargs) for r in requests]


def _leave_after_first_chunk(monkeypatch, scheduler, requests):
    """Submits `requests` as one batch and closes the first one's stream after its first chunk. The
    worker holds its second chunk until then, so it sees the leaver at its third, however fast it is."""
    left = threading.Event()
    step, calls = batching.step, []

    def held_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            assert left.wait(60), "the leaver never closed its stream"
        return step(*args, **kwargs)

    monkeypatch.setattr(batching, "step", held_step)
    leaving, *staying = _held(scheduler, requests)
    assert isinstance(next(leaving), Progress)
    leaving.close()
    left.set()
    return staying


def test_a_mixed_batch_samples_every_row_as_alone(pipe, upload):
    requests = _mixed(pipe, upload)
    batch = batching.start(pipe, requests)
    rows = sum(batching.row_count(r) for r in requests)
    assert batch.use_guidance and batch.rows == sharding.bucket_rows(rows) > rows  # padded to a bucket
    while batch.done < batch.image_length:
        batching.step(pipe, batch, 5)  # chunks of any size: the same codes
    codes = batch.host_codes()
    for request, span in zip(requests, batch.spans):
        _same(pipe.finish(request, codes[span]), _alone(pipe, request))


def test_the_scheduler_answers_each_request_as_alone(pipe, upload):
    requests = _mixed(pipe, upload)
    expected = [_alone(pipe, r) for r in requests]
    scheduler = Scheduler(pipe)
    streams = _held(scheduler, requests, preview_every=8)
    answers = [list(stream) for stream in streams]
    assert scheduler.batches[0] == (len(requests), sharding.bucket_rows(sum(map(batching.row_count, requests))))
    for items, want in zip(answers, expected):
        assert all(isinstance(i, Progress) for i in items[:-1]) and items[-2].step == 16
        _same(items[-1], want)
    assert isinstance(answers[0][-1], GenerationResult) and isinstance(answers[2][-1], list)


def test_knobs_per_row_compile_nothing_new(pipe, upload):
    scheduler = Scheduler(pipe)
    for stream in _held(scheduler, _mixed(pipe, upload)):
        list(stream)
    traces = sampling.trace_count()
    other = [pipe.request("a cat above a dog", seed=9, num_images=3, candidates=4, temperature=1.7, top_k=5,
                          top_p=0.5, condition_scale=2.0),
             pipe.request("three snails", seed=8, num_images=1, candidates=9, condition_scale=12.0),
             pipe.request("a small red apple", image=upload, strength=0.5, seed=7, candidates=6)]
    for stream in _held(scheduler, other):
        list(stream)
    assert scheduler.batches[-1][1] == scheduler.batches[0][1] and sampling.trace_count() == traces


def test_a_failing_request_fails_alone(pipe, monkeypatch):
    tokenize = pipe._tokenize

    def faulty(prompts):
        if any("explode" in p for p in prompts):
            raise RuntimeError("injected fault")
        return tokenize(prompts)

    requests = [pipe.request(p, seed=i, num_images=2) for i, p in enumerate(["two rockets", "explode", "three snails"])]
    expected = [_alone(pipe, requests[0]), None, _alone(pipe, requests[2])]
    monkeypatch.setattr(pipe, "_tokenize", faulty)
    scheduler = Scheduler(pipe)
    streams = _held(scheduler, requests)
    for stream, want in zip(streams, expected):
        if want is None:
            with pytest.raises(RuntimeError, match="injected fault"):
                list(stream)
        else:
            _same(list(stream)[-1], want)


def test_a_cancelled_request_leaves_its_batch_mates_intact(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    requests = [pipe.request("two rockets", seed=1, num_images=2), pipe.request("a large green frog", seed=2)]
    expected = _alone(pipe, requests[1])
    (staying,) = _leave_after_first_chunk(monkeypatch, Scheduler(pipe), requests)
    _same(list(staying)[-1], expected)


def test_rows_of_requests_that_left_leave_the_running_batch(pipe, upload):
    requests = _mixed(pipe, upload)
    batch = batching.start(pipe, requests)
    rows = batch.rows
    batching.step(pipe, batch, 5)
    batching.keep_only(pipe, batch, [1, 3])  # mid-image: a sampler-knob row and a variation stay
    kept = [requests[1], requests[3]]
    assert batch.rows == sharding.bucket_rows(sum(map(batching.row_count, kept))) < rows
    while batch.done < batch.image_length:
        batching.step(pipe, batch, 5)
    codes = batch.host_codes()
    for request, span in zip(kept, batch.spans):
        _same(pipe.finish(request, codes[span]), _alone(pipe, request))


def test_a_cancelled_request_frees_its_rows_at_the_next_chunk(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    requests = [pipe.request("two rockets", seed=1, num_images=2, candidates=6),
                pipe.request("a large green frog", seed=2, num_images=2, candidates=2)]
    expected = _alone(pipe, requests[1])
    scheduler = Scheduler(pipe)
    list(scheduler.submit(requests[1]))  # the worker compiles the 2-row bucket first
    (staying,) = _leave_after_first_chunk(monkeypatch, scheduler, requests)
    _same(list(staying)[-1], expected)
    assert list(scheduler.shrunk) == [(sharding.bucket_rows(8), sharding.bucket_rows(2))]
    # Into a bucket the worker has not compiled, rows stay (no one waits for a compile).
    monkeypatch.undo()
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    fresh = Scheduler(pipe)
    (staying,) = _leave_after_first_chunk(monkeypatch, fresh, requests)
    _same(list(staying)[-1], expected)
    assert not fresh.shrunk


def test_a_batch_everyone_left_stops_at_the_next_chunk(pipe, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    after = pipe.request("three snails", seed=3, num_images=1, candidates=1)
    want = _alone(pipe, after)
    chunks = []
    original = sampling.sample_codes_chunk
    monkeypatch.setattr(sampling, "sample_codes_chunk", lambda *a, **k: chunks.append(1) or original(*a, **k))
    scheduler = Scheduler(pipe)
    _leave_after_first_chunk(monkeypatch, scheduler, [pipe.request("two rockets", seed=1)])
    _same(list(scheduler.submit(after))[-1], want)
    assert len(chunks) == 2 + 8  # the first batch stopped when it saw no one left; the second ran its 8


def _space(pipe, tmp_path, per_caller):
    models = space_lib.Models(pipe, [], concurrency=1, batching=True)
    return space_lib.Space(models, max_batch_prompts=8, outputs=tmp_path, per_caller=per_caller)


def test_one_caller_beyond_its_share_is_refused_while_others_are_served(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    served = _space(pipe, tmp_path, per_caller=1)
    first = served.serve(None, caller="ip 1.2.3.4", prompt="two rockets", seed=1)
    assert isinstance(next(first), Progress)  # holds its place until its stream ends
    with pytest.raises(gr.Error, match="already have 1 request running"):
        next(served.serve(None, caller="ip 1.2.3.4", prompt="three snails", seed=2))
    other = list(served.serve(None, caller="ip 5.6.7.8", prompt="three snails", seed=2))[-1]
    _same(other.results, _alone(pipe, pipe.request("three snails", seed=2)))
    list(first)
    assert list(served.serve(None, caller="ip 1.2.3.4", prompt="three snails", seed=2))[-1].results


def test_callers_are_told_apart_by_proxy_address_then_session():
    def request(headers, session="abc"):
        return types.SimpleNamespace(headers=headers, session_hash=session, client=types.SimpleNamespace(host="10.0.0.1"))

    assert space_lib.caller_of(request({"x-forwarded-for": "203.0.113.7, 10.0.0.2"})) == "ip 203.0.113.7"
    assert space_lib.caller_of(request({})) == "session abc"
    assert space_lib.caller_of(request({}, session=None)) == "ip 10.0.0.1"
    assert space_lib.caller_of(None) is None


def test_concurrent_submissions_from_threads_all_get_their_own_answers(pipe):
    requests = [pipe.request("a cat above a dog", seed=s, num_images=1, candidates=2) for s in range(6)]
    expected = [_alone(pipe, r) for r in requests]
    scheduler = Scheduler(pipe, max_rows=8)  # at most 4 of these requests per batch
    answers = [None] * len(requests)

    def client(i):
        answers[i] = list(scheduler.submit(requests[i]))[-1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for got, want in zip(answers, expected):
        _same(got, want)
    assert all(rows <= 8 for _, rows in scheduler.batches)


def test_a_backdrop_prompt_shares_a_batch_and_leaves_its_mates_as_alone(pipe, monkeypatch):
    """A prompt the model's reader knows nothing of gets its backdrop (copied at strength 1), per prompt,
    inside a shared batch; the other prompts and requests are sampled as alone."""
    from PIL import Image

    plain = Image.new("RGB", (24, 24), (30, 80, 220))
    monkeypatch.setattr(pipe, "reader", lambda text: None if "wizard" in text else text)
    monkeypatch.setattr(pipe, "backdrop", lambda text: plain)
    requests = [pipe.request(["a wizard", "two rockets"], seed=1, num_images=2, candidates=3),
                pipe.request("three snails", seed=2, num_images=2)]
    expected = [_alone(pipe, r) for r in requests]
    answers = [list(stream)[-1] for stream in _held(Scheduler(pipe), requests)]
    wizard, rockets = answers[0]
    assert not wizard.understood and rockets.understood
    for codes, image in zip(wizard.codes, wizard.images):
        np.testing.assert_array_equal(codes, pipe.encode_image(plain))
        assert (np.asarray(image) == (30, 80, 220)).all()
    for got, want in zip(answers, expected):
        _same(got, want)
