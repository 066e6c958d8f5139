"""Faults: broken weights stop the app at start-up with one clear message, the app starts with no
network, a request that fails inside the model fails alone, and a caller who disconnects or cancels
mid-generation frees its slot at the next chunk of sampled codes.

The in-request faults are injected into a real pipeline served by the real app on a loopback socket,
in this process (so the test can wrap the pipeline's steps); clients talk HTTP to it.
"""

import http.client
import json
import shutil
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

import app
from model import sampling
from model.loading import load_pipeline
from support.app_server import REPO, AppServer, free_port, server_env, tiny_app_model

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_app_model(tmp_path_factory.getbasetemp())


# -------------------------------------------------------------------------------------------------
# Start-up


@pytest.mark.parametrize("stage, file", [("bart", "flax_model.msgpack"), ("vqgan", "flax_model.msgpack"),
                                         ("clip", "model.safetensors")])
def test_corrupt_weights_are_one_startup_error_naming_the_file(model, tmp_path, stage, file):
    broken = shutil.copytree(model, tmp_path / "broken")
    weights = broken / stage / file
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    done = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(broken), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=server_env())
    assert done.returncode != 0
    assert str(weights) in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") <= 3, done.stderr


def test_the_app_starts_and_serves_with_no_network(model, tmp_path):
    # Every outside address is a closed local port; the hub is not told to stay offline.
    dead = "http://127.0.0.1:9"
    with AppServer(model, tmp_path, env={"HF_HUB_OFFLINE": "0", "HTTP_PROXY": dead, "HTTPS_PROXY": dead,
                                         "ALL_PROXY": dead, "NO_PROXY": "127.0.0.1,localhost"}) as server:
        client = gradio_client.Client(server.url, verbose=False, download_files=str(tmp_path / "d"))
        files, record = client.predict(prompt="a small red apple", num_images=1, seed=0, api_name="/generate")
        assert len(files) == 1 and record["seed"] == 0


# -------------------------------------------------------------------------------------------------
# In-request faults


@pytest.fixture(scope="module")
def pipe(model):
    return load_pipeline(model, compilation_cache=False)


@pytest.fixture(scope="module")
def served(pipe, tmp_path_factory, request):
    """The app over `pipe` on a loopback port, one request at a time per model (as deployed)."""
    workdir = tmp_path_factory.mktemp("app-faults")
    patch = pytest.MonkeyPatch()
    patch.setenv("GRADIO_EXAMPLES_CACHE", str(workdir / "examples"))
    patch.setenv("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    space = app.Space(app.Models(pipe, [], concurrency=1), max_batch_prompts=8, outputs=workdir / "outputs")
    demo = app.build_demo(space)
    demo.queue(max_size=16, default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield f"http://127.0.0.1:{port}", workdir
    demo.close()
    patch.undo()


def _client(served):
    url, workdir = served
    return gradio_client.Client(url, verbose=False, download_files=str(workdir / "downloads"))


def _pixels(files):
    return [np.asarray(Image.open(path)) for path in files]


def _expected(pipe, prompt, num_images, seed, candidates=None):
    result = pipe.generate(prompt, num_images=num_images, seed=seed, candidates=candidates)
    return [np.asarray(image) for image in result.images]


def test_an_exception_inside_one_request_fails_only_that_request(served, pipe, monkeypatch, capfd):
    tokenize = pipe._tokenize

    def faulty(prompts):
        if any("explode" in p for p in prompts):
            raise RuntimeError("injected fault")
        return tokenize(prompts)

    monkeypatch.setattr(pipe, "_tokenize", faulty)
    client = _client(served)
    prompts = ["a small red apple", "please explode now", "two rockets", "a cat above a dog"]
    jobs = [client.submit(prompt=p, num_images=2, seed=i, api_name="/generate") for i, p in enumerate(prompts)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result(timeout=120))
        except gradio_client.exceptions.AppError as error:
            outcomes.append(error)
    failed = outcomes.pop(1)
    assert "Something went wrong on the server" in str(failed) and "reference" in str(failed)
    assert "injected fault" not in str(failed)  # internals stay in the server log
    assert "injected fault" in capfd.readouterr().err
    for (files, record), prompt, seed in zip(outcomes, [prompts[0], *prompts[2:]], [0, 2, 3]):
        assert record["prompt"] == prompt and record["seed"] == seed
        for got, want in zip(_pixels(files), _expected(pipe, prompt, 2, seed)):
            np.testing.assert_array_equal(got, want)


@pytest.fixture
def slow_chunks(pipe, monkeypatch):
    """Sampling in 8 chunks of 2 codes, each made to take 0.3 s longer; returns the rows of each
    chunk run, in order (request A samples 4 rows, request B 1, so the two are told apart)."""
    monkeypatch.setattr("model.pipeline.CHUNK_STEPS", 2)
    for size in (4, 1):  # compiled beforehand, so that timings measure the slot, not the compiler
        pipe.generate("warm-up", num_images=size, candidates=size)
    original = sampling.sample_codes_chunk
    rows = []

    def slow(step_fn, params, state, *args, **kwargs):
        time.sleep(0.3)
        rows.append(state.codes.shape[0])
        return original(step_fn, params, state, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_codes_chunk", slow)
    return rows


CHUNK_S = 0.3
CHUNKS = 8  # tiny model: 16 codes in chunks of 2


def _start_and_disconnect(url):
    """Starts /generate over REST, reads its stream until the first chunk's update, then hangs up."""
    body = json.dumps({"data": ["a fox to the left of a butterfly", 4, 1, None, None, None, None, 4, None]})
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/gradio_api/call/generate", body, {"Content-Type": "application/json"})
    event_id = json.loads(connection.getresponse().read())["event_id"]
    connection.request("GET", f"/gradio_api/call/generate/{event_id}")
    response = connection.getresponse()
    while not response.fp.readline().startswith(b"event: generating"):
        pass
    connection.sock.shutdown(2)
    connection.close()


def _run_b_and_check(served, pipe, rows):
    """Request B after A went away: it must start at A's next chunk, not after A's whole run."""
    client = _client(served)
    start = time.perf_counter()
    files, record = client.predict(prompt="two rockets", num_images=1, candidates=1, seed=5, api_name="/generate")
    took = time.perf_counter() - start
    a_chunks = rows.count(4)
    assert a_chunks < CHUNKS, f"A ran all its {a_chunks} chunks after leaving"
    assert rows.count(1) == CHUNKS and record["seed"] == 5
    assert took < CHUNKS * CHUNK_S + 2.0, f"B took {took:.1f} s"
    np.testing.assert_array_equal(_pixels(files)[0], _expected(pipe, "two rockets", 1, 5, candidates=1)[0])


def test_a_client_that_disconnects_frees_its_slot(served, pipe, slow_chunks):
    _start_and_disconnect(served[0])
    _run_b_and_check(served, pipe, slow_chunks)


def test_a_cancelled_request_frees_its_slot(served, pipe, slow_chunks):
    client = _client(served)
    job = client.submit(prompt="a fox to the left of a butterfly", num_images=4, candidates=4, seed=1,
                        api_name="/generate")
    deadline = time.monotonic() + 60
    while not slow_chunks and time.monotonic() < deadline:
        time.sleep(0.05)
    job.cancel()
    _run_b_and_check(served, pipe, slow_chunks)
