"""The live app under concurrent clients and with a full queue: the short version of
benchmarks/load_test.py (the same client, support/load_client.py, on the tiny model: 8 clients x 3
requests, then 12 requests at once against a queue of 2). The long run on the embedded model is in
that script's docstring."""

import time

import pytest

from model.loading import load_pipeline
from support import load_client
from support.app_server import AppServer, tiny_app_model

CLIENTS, REQUESTS, NUM_IMAGES = 8, 3, 2
# More at once than the small queue (2) and the running slots (3: the app's concurrency, 1, for each model
# it offers, the tiny one and the published two) hold.
BURST = 12
TIME_LIMIT_S = 120  # per test; on two busy cores each takes 5-10 s


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_app_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def servers(model, tmp_path_factory):
    """The app with its default queue and with a queue of 2, started side by side to save time (ready
    once `pipe` is)."""
    # Batching on (auto leaves it off on a CPU) so the shared-batch path is served live here too.
    started = {"default": AppServer(model, tmp_path_factory.mktemp("app-load"), "--batching", "on"),
               "small queue": AppServer(model, tmp_path_factory.mktemp("app-queue"), "--queue-size", "2",
                                        "--batching", "on")}
    try:
        yield started
    finally:
        for server in started.values():
            server.process.terminate()  # both shut down at once
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def pipe(model, servers):
    """The pipeline for the reference images, loaded while the servers start up; then waits for them."""
    reference = load_pipeline(model)
    for server in servers.values():
        server.wait_ready()
    return reference


def test_concurrent_clients_each_get_their_own_images(servers, pipe, tmp_path):
    server = servers["default"]
    deadline = time.monotonic() + TIME_LIMIT_S
    requests = load_client.plan_requests(CLIENTS * REQUESTS)
    start = time.monotonic()
    load = load_client.run_load(server.url, requests, CLIENTS, NUM_IMAGES, deadline, tmp_path, server.process.pid)
    wall = time.monotonic() - start
    load_client.check_answers(requests, pipe, NUM_IMAGES, deadline)
    summary = load_client.summarize(requests, load["seconds"])
    verdicts = load_client.load_verdicts(summary, load)
    assert all(verdicts.values()), (verdicts, load_client.problems(requests))
    # The phase time (which requests/s divides by) spans each client's requests, sent one after
    # another (client i sends requests[i::CLIENTS]), and no more than this test waited for run_load.
    longest_client = max(sum(r.seconds for r in requests[i::CLIENTS]) for i in range(CLIENTS))
    assert longest_client <= load["seconds"] <= wall
    # The clients really overlapped: requests were in flight together (one at a time, their
    # latencies would add up to the phase time).
    assert sum(r.seconds for r in requests) > 2 * load["seconds"]
    assert set(load["rss_bytes"]) == {"start", str(CLIENTS * REQUESTS)} and all(load["rss_bytes"].values())
    assert server.alive()


def test_an_overfull_queue_turns_requests_away_quickly_and_recovers(servers, pipe, tmp_path):
    server = servers["small queue"]
    deadline = time.monotonic() + TIME_LIMIT_S
    requests = load_client.plan_requests(BURST + 1, first_seed=1000)  # the burst, then one more alone
    overflow = load_client.run_overflow(server.url, requests, NUM_IMAGES, deadline, tmp_path)
    load_client.check_answers(requests, pipe, NUM_IMAGES, deadline)
    burst = load_client.summarize(requests[:-1], overflow["seconds"])
    verdicts = load_client.overflow_verdicts(burst, requests[-1])
    assert all(verdicts.values()), (verdicts, load_client.problems(requests))
    assert {r.error for r in requests if r.status == "busy"} == {"Queue is full! Please try again."}
    assert server.alive()
