"""Scenes drawn by worker processes are the serial ones, in order, however they are consumed."""

import numpy as np

from model.data import scenes
from model.data.parallel import BatchStream, ordered_map, render_chunk


def _same(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])


def test_render_chunk_is_sample_batch_with_that_seed():
    _same(render_chunk((3, 7), 5, "heldout_pairs"), scenes.sample_batch(np.random.default_rng([3, 7]), 5, "heldout_pairs"))


def test_workers_give_the_serial_results_in_order():
    jobs = [((0, i), 3, "train") for i in range(7)]
    serial = list(ordered_map(render_chunk, jobs))
    parallel = list(ordered_map(render_chunk, jobs, workers=2, ahead=3))
    assert len(parallel) == 7
    for a, b in zip(serial, parallel):
        _same(a, b)
    assert serial[0][0] != serial[1][0]  # distinct jobs, distinct scenes


def test_batch_stream_follows_the_steps_asked_for():
    stream = BatchStream(render_chunk, lambda step: ((1, step), 2, "train"), workers=2)
    try:
        for step in (0, 1, 2, 5, 6, 1):  # in order, then a jump ahead, then back (a resumed loop)
            _same(stream(step), render_chunk((1, step), 2, "train"))
    finally:
        stream.close()
