"""Serving many visitors at once: concurrent requests for a model share its sampler steps.

    scheduler = Scheduler(pipe, max_rows=128, max_requests=16)
    for item in scheduler.submit(pipe.request("a fox", seed=1), preview_every=64):
        ...                       # Progress after every chunk, then the result, as Pipeline.run

One worker thread per model owns the decoding loop. `submit` puts a checked Request in line and returns
that request's own stream. Admission is at image boundaries: the worker takes the waiting requests
(first come, first served, up to `max_rows` decoder rows and `max_requests` requests; a request larger
than the budget runs alone) into one batch (model/batching.py) whose rows all start at position 0
together; requests arriving meanwhile wait for the next batch. Joining a running batch mid-image would
need a position per row in the cached decoder (bart_decode writes and masks one position for the
whole batch), and on a CPU, where a step's cost grows with its rows, it would cut latency, not raise
throughput; see docs/serving.md.

When the batch's last chunk is sampled, each request gets its codes and turns them into images,
scores and its result in its own (the caller's) thread, while the worker already samples the next
batch. Every row is sampled as it would be alone (model/batching.py), so an answer does not depend on
its batch-mates.

Faults and cancellation: a request's inputs are checked before it is submitted. If building a shared
batch or one of its chunks fails, its requests go back to the front of the line to run alone, so a
request that breaks fails by itself. A consumer that closes its stream (a cancelled or disconnected
caller) leaves at the next chunk: a waiting request is dropped, its rows leave a batch others still
use (the rest continue in a smaller bucket, `batching.keep_only`), and a batch whose requests have all
left stops there.
"""

import collections
import queue
import sys
import threading
from collections.abc import Iterator

from model import batching
from model import pipeline as pipeline_lib
from model.pipeline import Progress, Request, return_freed_memory


class _Ticket:
    """A submitted request: what the worker sends its consumer goes through `items`."""

    def __init__(self, request: Request, wants_codes: bool):
        self.request = request
        self.rows = batching.row_count(request)
        self.wants_codes = wants_codes  # previews: the codes so far after every chunk
        self.items = queue.SimpleQueue()  # ("chunk", (done, codes or None)), ("codes", codes), ("error", exc)
        self.left = threading.Event()  # the consumer closed its stream
        self.alone = False  # run in a batch of its own (after a shared batch failed)


class Scheduler:
    """Continuous batching of one model's requests (see the module docstring)."""

    def __init__(self, pipe, max_rows: int = pipeline_lib.MAX_ROWS, max_requests: int = 16):
        self.pipe = pipe
        self.max_rows = max_rows
        self.max_requests = max_requests
        self.batches = collections.deque(maxlen=1000)  # (requests, rows) of recent batches, for tests and logs
        self.shrunk = collections.deque(maxlen=1000)  # (rows before, rows after) when leavers' rows left
        self._compiled = set()  # batch sizes (buckets) this worker has sampled
        self._waiting = collections.deque()
        self._ready = threading.Condition()
        self._worker = threading.Thread(target=self._loop, name=f"scheduler-{pipe.name}", daemon=True)
        self._worker.start()

    def submit(self, request: Request, preview_every: int | None = None, previews_after_s: float = 0.0) -> Iterator:
        """Puts `request` in line now; returns its stream: a `Progress` after every chunk (previews every
        `preview_every` tokens once sampling has taken `previews_after_s` s), then the result as
        `Pipeline.run` gives it. Closing the stream withdraws the request."""
        ticket = _Ticket(request, bool(preview_every))
        with self._ready:
            self._waiting.append(ticket)
            self._ready.notify()
        return self._stream(ticket, preview_every, previews_after_s)

    def waiting(self) -> int:
        """Requests in line for the next batch."""
        with self._ready:
            return len(self._waiting)

    def _stream(self, ticket: _Ticket, preview_every, previews_after_s):
        pipe, previews = self.pipe, None
        try:
            while True:
                kind, value = ticket.items.get()
                if kind == "error":
                    raise value
                if kind == "codes":
                    break
                done, codes = value
                previews = previews or pipeline_lib.Previews(preview_every, previews_after_s)
                total = pipe.bart_config.image_length
                due = codes is not None and previews.due(done, total)
                yield Progress(step=done, total=total, images=pipe.preview(ticket.request, codes, done) if due else None)
            results = pipe.finish(ticket.request, value)
            yield pipeline_lib.answer(ticket.request, results)
        finally:
            ticket.left.set()

    # The worker ---------------------------------------------------------------------------------

    def _take(self) -> list[_Ticket]:
        """Waits for requests; takes the next batch's, first come first served, within the budget."""
        with self._ready:
            while True:
                while self._waiting and self._waiting[0].left.is_set():
                    self._waiting.popleft()
                if self._waiting:
                    break
                self._ready.wait()
            taken = [self._waiting.popleft()]
            rows = taken[0].rows
            if not taken[0].alone:
                kept = collections.deque()
                while self._waiting and len(taken) < self.max_requests:
                    ticket = self._waiting.popleft()
                    if ticket.left.is_set():
                        continue
                    if ticket.alone or rows + ticket.rows > self.max_rows:
                        kept.append(ticket)  # keeps its place in line for the next batch
                        break
                    taken.append(ticket)
                    rows += ticket.rows
                self._waiting.extendleft(reversed(kept))
            return taken

    def _loop(self) -> None:
        while True:
            tickets = self._take()
            try:
                self._run(tickets)
            except Exception as error:  # noqa: BLE001 - a request's failure goes to its consumer
                if len(tickets) > 1:
                    print(f"A batch of {len(tickets)} requests failed ({type(error).__name__}); "
                          "running them one by one.", file=sys.stderr, flush=True)
                    for ticket in tickets:
                        ticket.alone = True
                    with self._ready:
                        self._waiting.extendleft(reversed(tickets))
                else:
                    tickets[0].items.put(("error", error))
            return_freed_memory()

    def _run(self, tickets: list[_Ticket]) -> None:
        pipe = self.pipe
        batch = batching.start(pipe, [t.request for t in tickets])
        self.batches.append((len(tickets), batch.rows))
        self._compiled.add(batch.rows)
        while batch.done < batch.image_length:
            present = [not t.left.is_set() for t in tickets]
            if not any(present):  # everyone left: the rows are free for the next batch now
                return
            if not all(present):  # some left: their rows leave the batch before the next chunk
                kept, before = [i for i, here in enumerate(present) if here], batch.rows
                # Only into a bucket this worker has compiled, so those who stay never wait for a compile.
                if batching.keep_only(pipe, batch, kept, buckets=self._compiled):
                    self.shrunk.append((before, batch.rows))
                    tickets, present = [tickets[i] for i in kept], [True] * len(kept)
            batching.step(pipe, batch, pipeline_lib.CHUNK_STEPS)  # read per chunk: tests shorten it
            codes = batch.host_codes() if any(t.wants_codes for t in tickets) else None
            if batch.done < batch.image_length:
                for ticket, span, here in zip(tickets, batch.spans, present):
                    if here:
                        ticket.items.put(("chunk", (batch.done, None if codes is None else codes[span])))
        codes = batch.host_codes()
        batch.close()
        for ticket, span in zip(tickets, batch.spans):
            ticket.items.put(("chunk", (batch.done, None)))
            ticket.items.put(("codes", codes[span]))
