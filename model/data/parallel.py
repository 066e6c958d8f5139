"""Render scenes in worker processes, ahead of whoever consumes them (training batches, code datasets).

A 64x64 scene takes ~0.3 ms of one core to draw: nothing beside a training step on a 2-core CPU, but
the 256 scenes of one VQGAN step on an accelerator take longer to draw than the step takes to run.
Every job is a pure function of its arguments (scenes are a pure function of their seed), so the
results are the serial ones whatever the number of workers; `workers=0` draws in this process.

Workers are spawned, not forked: the parent usually runs JAX, whose threads make fork unsafe. They
import this module and `model.data.scenes` only (numpy and Pillow, no JAX).
"""

import collections
import concurrent.futures
import itertools
import multiprocessing
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from model.data import scenes


def render_chunk(seed_parts: tuple, count: int, split: str = "train", kind_mix=None) -> tuple[list[str], np.ndarray]:
    """scenes.sample_batch with the generator np.random.default_rng(seed_parts): (captions, uint8 images)."""
    return scenes.sample_batch(np.random.default_rng(list(seed_parts)), count, split, kind_mix)


def ordered_map(fn: Callable, jobs: Iterable[tuple], workers: int = 0, ahead: int | None = None) -> Iterator:
    """Yields fn(*job) for every job, in order; with workers > 0, computed by that many processes at
    most `ahead` jobs (default 2 per worker) in front of the consumer. `fn` must be a module-level
    function (it is pickled by name)."""
    if workers <= 0:
        for job in jobs:
            yield fn(*job)
        return
    jobs = iter(jobs)
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        pending = collections.deque(pool.submit(fn, *job) for job in itertools.islice(jobs, ahead or 2 * workers))
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, *job) for job in itertools.islice(jobs, 1))
            yield result
    finally:
        # Also when the consumer stops early: queued jobs are dropped, running ones finish.
        pool.shutdown(wait=True, cancel_futures=True)


class BatchStream:
    """batch(step) for a training loop, drawn by `workers` processes ahead of the step asked for.

    `job(step)` gives the arguments of `fn` for a step. Steps are expected in order (a loop asks for
    start, start + 1, ...); asking for another step restarts the stream there, so any order works,
    only slower.
    """

    def __init__(self, fn: Callable, job: Callable[[int], tuple], workers: int = 0):
        self.fn, self.job, self.workers = fn, job, workers
        self._stream, self._next = None, None

    def __call__(self, step: int):
        if self.workers <= 0:
            return self.fn(*self.job(step))
        if self._stream is None or step != self._next:
            self.close()
            self._stream = ordered_map(self.fn, (self.job(s) for s in itertools.count(step)), self.workers)
        self._next = step + 1
        return next(self._stream)

    def close(self):
        if self._stream is not None:
            self._stream.close()
            self._stream = None
