"""The load-test client: concurrent gradio_client sessions against the app's /generate, each answer
checked against the pipeline, and the verdicts a load or overflow run must pass.

benchmarks/load_test.py runs it at full size from the command line; tests/test_app_load.py runs it
on the tiny model. A plan's requests all differ (prompt and seed), so an answer given to the wrong
request shows as a mismatch.
"""

import collections
import dataclasses
import threading
import time
from pathlib import Path

import gradio_client
import numpy as np
from gradio_client.utils import QueueError
from PIL import Image

from model.data.scenes import caption, sample_scene

MEMORY_MARKS = (50, 500)  # answers after which the server's RSS is read
MAX_MEMORY_GROWTH = 0.10  # RSS after the second mark over that after the first, minus one
BUSY_WITHIN_S = 5.0  # a request the queue has no room for must be told so this fast


@dataclasses.dataclass
class Request:
    """One /generate call and what became of it."""

    prompt: str
    seed: int
    status: str = "unsent"  # ok, busy (queue full), error, timeout (no answer by the deadline), unsent
    seconds: float | None = None  # from submit to the answer (files downloaded) or the error
    error: str = ""
    images: list = dataclasses.field(default_factory=list, repr=False)  # the answer's PNGs as pixel arrays
    record: dict = dataclasses.field(default_factory=dict, repr=False)
    check: str = ""  # set by check_answers: "match", or why the answer is not this request's


def plan_requests(count: int, first_seed: int = 0) -> list[Request]:
    """`count` requests with distinct scene captions (the embedded model's kind of prompt) and the seeds
    first_seed, first_seed + 1, ...: no two answers may be alike, so a mixed-up answer shows."""
    rng = np.random.default_rng(first_seed)
    prompts = {}  # a dict keeps the drawing order, so a plan is the same on every run
    while len(prompts) < count:
        prompts[caption(sample_scene(rng))] = None
    return [Request(prompt, first_seed + index) for index, prompt in enumerate(prompts)]


def rss_bytes(pid: int) -> int | None:
    """A process's resident memory (VmRSS in /proc/PID/status); None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class MemoryProbe:
    """The server's RSS before the first answer and as the count of answers passes each mark."""

    def __init__(self, pid: int | None, total: int):
        self.pid = pid
        self.marks = sorted({min(mark, total) for mark in MEMORY_MARKS})
        self.rss = {"start": rss_bytes(pid)} if pid else {}
        self._answers = 0
        self._lock = threading.Lock()

    def answered(self) -> None:
        with self._lock:
            self._answers += 1
            if self.pid and self._answers in self.marks:
                self.rss[str(self._answers)] = rss_bytes(self.pid)

    def growth(self) -> float | None:
        """RSS at the last mark over RSS at the first, minus one; None unless both were read apart."""
        first, last = (self.rss.get(str(mark)) for mark in (self.marks[0], self.marks[-1]))
        if len(self.marks) < 2 or not first or not last:
            return None
        return last / first - 1


def send(client, request: Request, num_images: int, deadline: float) -> None:
    """One /generate call, waited for until the deadline; its outcome goes into `request`."""
    start = time.monotonic()
    job = client.submit(prompt=request.prompt, num_images=num_images, seed=request.seed, api_name="/generate")
    try:
        files, request.record = job.result(timeout=max(0.0, deadline - start))
    except TimeoutError:
        job.cancel()  # frees the server's slot: the app's handlers stop between chunks
        request.status = "timeout"
    except QueueError as error:
        request.status, request.error = "busy", str(error)
    except Exception as error:  # an answer, but not images: this request failed
        request.status, request.error = "error", f"{type(error).__name__}: {error}"
    else:
        request.status = "ok"
    request.seconds = time.monotonic() - start
    if request.status == "ok":  # read after the clock stopped: reading is not the server's time
        request.images = [np.asarray(Image.open(path)) for path in files]


def run_clients(url: str, batches: list[list[Request]], num_images: int, deadline: float, downloads: Path,
                on_answer=lambda: None) -> float:
    """Each batch is one client's requests, sent one after another from a thread of its own through a
    gradio_client.Client of its own; the clients connect first and then start together. Returns the
    seconds from that start to the last answer. Requests not sent by the deadline stay "unsent"."""
    clients = [gradio_client.Client(url, verbose=False, download_files=str(downloads), analytics_enabled=False)
               for _ in batches]

    def session(client, batch):
        for request in batch:
            if time.monotonic() >= deadline:
                return
            send(client, request, num_images, deadline)
            on_answer()

    threads = [threading.Thread(target=session, args=pair) for pair in zip(clients, batches)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - start
    for client in clients:
        client.close()
    return seconds


def run_load(url: str, requests: list[Request], clients: int, num_images: int, deadline: float,
             downloads: Path, pid: int | None = None) -> dict:
    """The requests spread over `clients` concurrent clients; the phase's seconds and the server's
    RSS at the memory marks (when its pid is known) and their growth."""
    probe = MemoryProbe(pid, len(requests))
    batches = [requests[index::clients] for index in range(clients)]
    seconds = run_clients(url, batches, num_images, deadline, downloads, probe.answered)
    return {"seconds": seconds, "rss_bytes": probe.rss, "memory_marks": probe.marks, "memory_growth": probe.growth()}


def run_overflow(url: str, requests: list[Request], num_images: int, deadline: float, downloads: Path) -> dict:
    """All requests but the last at once, one client each; then the last alone, once they are done."""
    seconds = run_clients(url, [[request] for request in requests[:-1]], num_images, deadline, downloads)
    run_clients(url, [requests[-1:]], num_images, deadline, downloads)
    return {"seconds": seconds}


def check_answers(requests: list[Request], pipe, num_images: int, deadline: float) -> None:
    """Sets `check` of every request served: "match" when its record names its prompt and seed and its
    images are pixel-identical to the pipeline's own for them, else what differs. Served requests not
    reached by the deadline keep an empty `check`."""
    known = {}  # the same prompt and seed asked twice (e.g. batching off and on) is generated once
    for request in requests:
        if request.status != "ok" or time.monotonic() >= deadline:
            continue
        if (request.prompt, request.seed) not in known:
            known[request.prompt, request.seed] = [np.asarray(image) for image in pipe.generate(
                request.prompt, num_images=num_images, seed=request.seed).images]
        request.check = _difference(request, known[request.prompt, request.seed]) or "match"


def _difference(request: Request, expected: list) -> str:
    record = request.record
    if (record.get("prompt"), record.get("seed")) != (request.prompt, request.seed):
        return f"record for {record.get('prompt')!r} seed {record.get('seed')}"
    if len(request.images) != len(expected):
        return f"{len(request.images)} images, expected {len(expected)}"
    for index, (got, want) in enumerate(zip(request.images, expected)):
        if got.shape != want.shape or not np.array_equal(got, want):
            return f"image {index + 1} differs from generate(prompt, seed)"
    return ""


def summarize(requests: list[Request], seconds: float) -> dict:
    """Counts by outcome, throughput and latency of the served requests."""
    counts = collections.Counter(request.status for request in requests)
    served = [request for request in requests if request.status == "ok"]
    latencies = [request.seconds for request in served]
    busy = [request.seconds for request in requests if request.status == "busy"]
    return {
        "requests": len(requests), "ok": counts["ok"], "busy": counts["busy"], "errors": counts["error"],
        "lost": counts["timeout"] + counts["unsent"],
        "mismatched": sum(request.check not in ("match", "") for request in served),
        "unchecked": sum(request.check == "" for request in served),
        "seconds": seconds, "throughput_rps": len(served) / seconds if seconds else None,
        "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        "slowest_busy_s": max(busy) if busy else None,
    }


def load_verdicts(summary: dict, load: dict) -> dict:
    """What the load phase must show, by name: True when it does (`load`: what run_load returned)."""
    verdicts = {
        "load: every request served, none failed, lost or turned away": summary["ok"] == summary["requests"],
        "load: every answer is its own request's (pixel-identical to generate)":
            summary["ok"] > 0 and summary["mismatched"] == summary["unchecked"] == 0,
    }
    if load["memory_growth"] is not None:
        first, last = load["memory_marks"][0], load["memory_marks"][-1]
        verdicts[f"load: server RSS after {last} answers within {MAX_MEMORY_GROWTH:.0%} of after {first}"] = (
            load["memory_growth"] <= MAX_MEMORY_GROWTH)
    return verdicts


def overflow_verdicts(burst: dict, after: Request) -> dict:
    """What the overflow phase must show (`burst`: the summary of the simultaneous requests)."""
    return {
        "overflow: every request served or turned away as busy, none failed or hung":
            burst["ok"] + burst["busy"] == burst["requests"],
        "overflow: at least one request turned away as busy": burst["busy"] > 0,
        f"overflow: turned away within {BUSY_WITHIN_S:.0f} s":
            burst["busy"] > 0 and burst["slowest_busy_s"] <= BUSY_WITHIN_S,
        "overflow: the requests served got their own images": burst["mismatched"] == burst["unchecked"] == 0,
        "overflow: the server serves normally afterwards": after.status == "ok" and after.check == "match",
    }

def problems(requests: list[Request], limit: int = 5) -> list[str]:
    """A few requests that went wrong, for the log."""
    bad = [r for r in requests if r.status not in ("ok", "busy") or r.check not in ("match", "")]
    return [f"seed {r.seed} {r.prompt!r}: {r.status} {r.error or r.check}" for r in bad[:limit]]
