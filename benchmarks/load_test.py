"""Load test of the live app on loopback: concurrent API clients whose every answer is checked against
the pipeline run here, a full queue that must turn requests away quickly, and the server's memory.

    python -m benchmarks.load_test                  # 32 clients x 16 requests on the embedded model (the
                                                    # long run: ~20 min on two cores, checking included)
    python -m benchmarks.load_test --model FOLDER --clients 8 --requests 3
    python -m benchmarks.load_test --url http://127.0.0.1:7860 --pid 4242
                                                    # a server already running (the same model as --model,
                                                    # on the CPU); no overflow phase; --pid for its memory

Load: `python app.py` is started on a free loopback port (tests/app_server.py) with --queue-size and
--concurrency. --clients threads, each with a gradio_client.Client of its own, send --requests /generate
calls one after another; every call has a scene caption and a seed of its own and asks for --num-images
images (the model's default candidates, so the server samples and reranks as the page does). Reported:
requests/s, p50/p95 latency (submit to files downloaded), and the server's RSS (VmRSS) after the
first 50 answers and after 500 (or the last answer).

Overflow: a second server whose queue holds --overflow-queue-size requests gets --overflow-clients
requests at once, more than its queue and running slots hold. Each must be served, or turned away
with Gradio's queue-full error (HTTP 503 "Queue is full. Max size is N ...", gradio_client's QueueError)
within BUSY_WITHIN_S; at least one must be turned away; then one more request must be served.

Check: once the servers are stopped (so it takes no CPU from them), the pipeline is loaded here and
every answer's PNGs must be pixel-identical to `generate(prompt, num_images=k, seed=s)` of its own
request, and its record must name that prompt and seed.

Passes (exit 0) with every request served and right, none turned away under load, the overflow as
above, and the server's RSS after 500 answers within 10% of that after 50. Everything stops at
--time-limit, counted from the start with the servers' start-up; whatever is unfinished then fails.
Prints a table and writes everything to benchmarks/results/load_test-<time>.json.
"""

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import gradio_client
import jax
import numpy as np
from gradio_client.utils import QueueError
from PIL import Image

from model.data.scenes import caption, sample_scene
from model.pipeline import load_pipeline
from tests.app_server import AppServer

ROOT = Path(__file__).resolve().parent.parent
MEMORY_MARKS = (50, 500)  # answers after which the server's RSS is read
MAX_MEMORY_GROWTH = 0.10  # RSS after the second mark over that after the first, minus one
BUSY_WITHIN_S = 5.0  # a request the queue has no room for must be told so this fast
MIB = 2 ** 20


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
    for request in requests:
        if request.status != "ok" or time.monotonic() >= deadline:
            continue
        expected = [np.asarray(image) for image in
                    pipe.generate(request.prompt, num_images=num_images, seed=request.seed).images]
        request.check = _difference(request, expected) or "match"


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


def _cell(value, digits=0, scale=1.0):
    return "-" if value is None else f"{value * scale:.{digits}f}"


def format_table(settings: dict, load: dict, overflow: dict | None, verdicts: dict) -> str:
    summary, rss = load["summary"], load["rss_bytes"]
    burst = overflow["summary"] if overflow else {}
    server = settings["url"] or f"app.py --queue-size {settings['queue_size']} --concurrency {settings['concurrency']}"
    lines = [
        f"/generate, {settings['num_images']} images per request, model {settings['model'] or 'embedded'}, "
        f"server {server}" + (f"; overflow server --queue-size {settings['overflow_queue_size']}" if overflow else ""),
        f"{'':36s}{'load':>18s}{'overflow':>18s}",
    ]
    rows = [
        ("clients x requests", f"{settings['clients']} x {settings['requests']}",
         f"{burst['requests']} x 1, +1 after" if burst else "-"),
        ("served", summary["ok"], burst.get("ok", "-")),
        ("turned away (queue full)", summary["busy"], burst.get("busy", "-")),
        ("failed / lost", f"{summary['errors']} / {summary['lost']}",
         f"{burst['errors']} / {burst['lost']}" if burst else "-"),
        ("wrong / unchecked answers", f"{summary['mismatched']} / {summary['unchecked']}",
         f"{burst['mismatched']} / {burst['unchecked']}" if burst else "-"),
        ("throughput (requests/s)", _cell(summary["throughput_rps"], 2), "-"),
        ("latency p50 / p95 (s)", f"{_cell(summary['p50_s'], 2)} / {_cell(summary['p95_s'], 2)}",
         f"{_cell(burst['p50_s'], 2)} / {_cell(burst['p95_s'], 2)}" if burst else "-"),
        ("slowest turn-away (s)", "-", _cell(burst.get("slowest_busy_s"), 2)),
        ("phase time (s)", _cell(summary["seconds"], 1), _cell(burst.get("seconds"), 1)),
    ]
    lines += [f"{label:36s}{str(first):>18s}{str(second):>18s}" for label, first, second in rows]
    marks = ", ".join(f"{mark}: {_cell(value, 0, 1 / MIB)}" for mark, value in rss.items())
    lines.append(f"server RSS (MiB) at start and after N answers: {marks or '-'}; growth "
                 f"{_cell(load['memory_growth'], 1, 100)}%")
    lines.append("")
    lines += [f"{'PASS' if passed else 'FAIL'}  {name}" for name, passed in verdicts.items()]
    return "\n".join(lines)


def problems(requests: list[Request], limit: int = 5) -> list[str]:
    """A few requests that went wrong, for the log."""
    bad = [r for r in requests if r.status not in ("ok", "busy") or r.check not in ("match", "")]
    return [f"seed {r.seed} {r.prompt!r}: {r.status} {r.error or r.check}" for r in bad[:limit]]


def _as_json(request: Request) -> dict:
    """A request for the results file: everything but the pixels."""
    return {key: value for key, value in dataclasses.asdict(request).items() if key != "images"}


@contextlib.contextmanager
def app_server(model, workdir: Path, deadline: float, queue_size: int, concurrency: int):
    """`app.py` on a free loopback port until the block ends; its log tail is printed on failure."""
    server = AppServer(model, workdir, "--queue-size", str(queue_size), "--concurrency", str(concurrency))
    try:
        yield server.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        print(f"server log (tail):\n{server.log()}", file=sys.stderr)
        raise
    finally:
        server.stop()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=16, help="requests per client, one after another")
    parser.add_argument("--num-images", type=int, default=2, help="images per request")
    parser.add_argument("--model", default=os.environ.get("DALLE_MODEL"),
                        help="model folder the server runs and the answers are checked with; default: the "
                             "app's (the embedded model) [env DALLE_MODEL, as app.py]")
    parser.add_argument("--url", help="test this running server instead of starting one (no overflow phase)")
    parser.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    parser.add_argument("--queue-size", type=int, default=64, help="app.py --queue-size for the load phase")
    parser.add_argument("--concurrency", type=int, default=1, help="app.py --concurrency (both phases)")
    parser.add_argument("--overflow-clients", type=int, default=12,
                        help="simultaneous requests in the overflow phase (0: no overflow phase)")
    parser.add_argument("--overflow-queue-size", type=int, default=2, help="app.py --queue-size there")
    parser.add_argument("--seed", type=int, default=0, help="the first request's seed; the others count up")
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds for everything, start-up included")
    parser.add_argument("--out", help="JSON file (default benchmarks/results/load_test-<time>.json)")
    args = parser.parse_args(argv)
    if args.url:
        args.overflow_clients = 0  # it needs a server with a small queue, started here
    return args


def run_phases(args, load_requests: list[Request], overflow_requests: list[Request], deadline: float):
    """The load phase, then the overflow phase (when asked for and time is left), each on a server of
    its own unless --url; (load, overflow or None)."""
    overflow = None
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        work = Path(tmp)
        print(f"load: {args.clients} clients x {args.requests} requests ...", flush=True)
        if args.url:
            load = run_load(args.url, load_requests, args.clients, args.num_images, deadline, work, args.pid)
        else:
            with app_server(args.model, work, deadline, args.queue_size, args.concurrency) as server:
                load = run_load(server.url, load_requests, args.clients, args.num_images, deadline, work,
                                server.process.pid)
        if overflow_requests and time.monotonic() < deadline:
            print(f"overflow: {args.overflow_clients} requests at once, queue size {args.overflow_queue_size} ...",
                  flush=True)
            with app_server(args.model, work, deadline, args.overflow_queue_size, args.concurrency) as server:
                overflow = run_overflow(server.url, overflow_requests, args.num_images, deadline, work)
    return load, overflow


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    deadline = time.monotonic() + args.time_limit
    # The servers started here run on the CPU (tests/app_server.py); the reference images must come
    # from the same backend to be pixel-identical.
    jax.config.update("jax_platforms", "cpu")
    # Loopback only: gradio_client reports usage to Gradio unless this is off (its analytics_enabled=False
    # alone does not turn it off).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

    load_count = args.clients * args.requests
    planned = plan_requests(load_count + (args.overflow_clients + 1 if args.overflow_clients else 0), args.seed)
    load_requests, overflow_requests = planned[:load_count], planned[load_count:]
    load, overflow = run_phases(args, load_requests, overflow_requests, deadline)

    if time.monotonic() < deadline:
        print("checking every answer against the pipeline run here ...", flush=True)
        check_answers(planned, load_pipeline(args.model), args.num_images, deadline)
    load["summary"] = summarize(load_requests, load["seconds"])
    load["verdicts"] = load_verdicts(load["summary"], load)
    verdicts = dict(load["verdicts"])
    if overflow:
        overflow["summary"] = summarize(overflow_requests[:-1], overflow["seconds"])
        overflow["verdicts"] = overflow_verdicts(overflow["summary"], overflow_requests[-1])
        overflow["busy_messages"] = sorted({r.error for r in overflow_requests if r.status == "busy"})
        verdicts.update(overflow["verdicts"])
    elif overflow_requests:
        verdicts["overflow: run before the time limit"] = False
    table = format_table(vars(args), load, overflow, verdicts)
    print("\n" + table)
    for line in problems(planned):
        print("  " + line)

    results = {"started": started, "argv": sys.argv[1:] if argv is None else argv, "settings": vars(args),
               "table": table, "verdicts": verdicts,
               "load": {**load, "requests": [_as_json(r) for r in load_requests]},
               "overflow": overflow and {**overflow, "requests": [_as_json(r) for r in overflow_requests]}}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"load_test-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
