"""What a caller can reach through the live server: its own outputs and nothing else on disk, uploads
bounded in size and checked as images, no fetching of internal URLs on the server's behalf."""

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from support.app_server import REPO, AppServer, tiny_app_model

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_app_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("app-access")
    # A private file in the server's working directory: Gradio must not serve its cwd.
    (workdir / "secret.txt").write_text("do not serve me")
    with AppServer(model, workdir) as app:
        yield app


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _call(server, endpoint: str, data: list) -> tuple[str, object]:
    """One REST call: (final SSE event name, its data)."""
    request = urllib.request.Request(f"{server.url}/gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{server.url}/gradio_api/call/{endpoint}/{event_id}", timeout=120) as response:
        text = response.read().decode()
    event, payload = None, None
    for line in text.splitlines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            payload = json.loads(line[len("data: "):])
    return event, payload


@pytest.fixture(scope="module")
def output_url(server):
    event, (files, record) = _call(server, "generate", ["a small red apple", 1, 0, None, None, None, None, None, None])
    assert event == "complete" and record["seed"] == 0
    return files[0]["url"], files[0]["path"]


def test_own_outputs_are_served(output_url):
    url, _ = output_url
    status, body = _get(url)
    assert status == 200 and body.startswith(b"\x89PNG")


def _traversals(server, model, output_path):
    outputs = output_path.rsplit("/", 1)[0]
    cwd_secret = str(server.log_path.parent / "secret.txt")
    weights = str(model / "bart" / "flax_model.msgpack")
    targets = {
        "absolute system file": "/etc/passwd",
        "the app's source": str(REPO / "app.py"),
        "the model's weights": weights,
        "a file in the server's cwd": cwd_secret,
        "the server's log": str(server.log_path),
        "relative from cwd": "secret.txt",
        "dot-dot out of the outputs": f"{outputs}/../../../../../../etc/passwd",
        "dot-dot to the weights": f"{outputs}/{'../' * 12}{weights.lstrip('/')}",
        "encoded dot-dot": f"{outputs}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "double-encoded dot-dot": f"{outputs}/%252e%252e/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
        "backslashes": f"{outputs}\\..\\..\\..\\..\\..\\..\\etc\\passwd",
        "the proc file system": "/proc/self/environ",
        "a loopback URL": f"{server.url}/gradio_api/info",
        "a cloud metadata URL": "http://169.254.169.254/latest/meta-data/",
    }
    for name, target in targets.items():
        for route in ("/gradio_api/file=", "/gradio_api/file/", "/file="):
            yield name, server.url + route + target
    yield "static dot-dot", f"{server.url}/static/../../app.py"
    yield "assets dot-dot", f"{server.url}/assets/%2e%2e/%2e%2e/app.py"


def test_nothing_else_on_disk_is_reachable(server, model, output_url):
    secrets = [b"root:x:0:0", (REPO / "app.py").read_bytes()[:200], (model / "bart" / "flax_model.msgpack").read_bytes()[:64],
               b"do not serve me", b"Warming up"]
    served = []
    for name, url in _traversals(server, model, output_url[1]):
        status, body = _get(url)
        if status < 400 or any(secret in body for secret in secrets):
            served.append(f"{name}: {url} -> {status} {body[:80]!r}")
    assert not served, "\n".join(served)
    assert server.alive()


def _upload(server, name: str, data: bytes) -> tuple[int, object]:
    boundary = "----dalle-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server.url}/gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def test_uploads_over_the_size_limit_are_refused(server):
    status, answer = _upload(server, "big.png", b"\x89PNG" + bytes(11 * 2**20))
    assert status == 413 and "10" in str(answer), answer
    status, answer = _upload(server, "small.png", _png(Image.new("RGB", (32, 32), "red")))
    assert status == 200 and len(answer) == 1


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, make_data, message", [
    ("script.png", lambda: b"#!/bin/sh\necho owned\n", "not an image that can be read"),
    ("page.html", lambda: b"<html><script>alert(1)</script></html>", "not an image that can be read"),
    # 20000 x 20000 of one colour compresses to a few kB: the pixel cap refuses it before decoding.
    ("bomb.png", lambda: _png(Image.new("1", (20000, 20000))), "too large"),
])
def test_uploads_that_are_not_usable_images_are_clear_errors(server, name, make_data, message):
    status, answer = _upload(server, name, make_data())
    assert status == 200, answer
    file = {"path": answer[0], "meta": {"_type": "gradio.FileData"}, "orig_name": name}
    event, payload = _call(server, "variations", [file, None, 1, 1, 0, None, None, None, None, None, None, None])
    assert event == "error" and message in str(payload), payload
    assert server.alive()


def test_variations_refuse_files_outside_the_upload_folder(server):
    file = {"path": str(REPO / "docs" / "emoji_examples.png"), "meta": {"_type": "gradio.FileData"}}
    event, payload = _call(server, "variations", [file, None, 1, 1, 0, None, None, None, None, None, None, None])
    assert event == "error" and "emoji_examples.png" in str(payload), payload
    assert server.alive()


def test_file_route_quoting_cannot_escape(server, output_url):
    url, path = output_url
    name = path.rsplit("/", 1)[1]
    sneaky = url.replace(name, urllib.parse.quote(f"../{name}", safe=""))
    status, _ = _get(sneaky)
    assert status >= 400
