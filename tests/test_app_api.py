"""The app as a real server on loopback, called through gradio_client like any API user."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from support.app_server import REPO, AppServer, tiny_app_model

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_app_model(tmp_path_factory.getbasetemp())
    with AppServer(model, tmp_path_factory.mktemp("app-api")) as app:
        yield app


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server.url, verbose=False, download_files=str(server.log_path.parent / "downloads"))


def _generate(client, **kwargs):
    return client.predict(api_name="/generate", **{"prompt": "a small red apple", **kwargs})


def _png_bytes(files):
    return [open(path, "rb").read() for path in files]


def test_generate_returns_nine_pngs_and_a_record(client):
    files, record = _generate(client, num_images=9, seed=1)
    assert len(files) == 9
    images = []
    for data in _png_bytes(files):
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"
        images.append(np.asarray(image))
    assert len({image.tobytes() for image in images}) == 9  # nine different samples
    assert record["seed"] == 1 and record["model"] == "tiny" and record["prompt"] == "a small red apple"
    assert len(record["scores"]) == 9 and record["scores"] == sorted(record["scores"], reverse=True)
    assert record["dtype"] == "float32" and record["score_kind"] == "clip_logit"
    assert record["read_as"] == record["prompt"]  # the tiny model has no prompt reader
    assert record["parameters"]["num_images"] == 9 and record["parameters"]["top_k"] == 8  # model default


def test_same_seed_is_byte_identical_and_another_differs(client):
    first, first_record = _generate(client, num_images=9, seed=7)
    again, again_record = _generate(client, num_images=9, seed=7)
    other = _generate(client, num_images=9, seed=8)[0]
    assert _png_bytes(first) == _png_bytes(again)
    assert _png_bytes(first) != _png_bytes(other)
    # Identical requests still get files of their own (no shared, possibly half-written, file).
    assert not set(first_record["files"]) & set(again_record["files"])


def test_no_seed_draws_one_and_reports_it(client):
    files, record = _generate(client, num_images=2)
    assert isinstance(record["seed"], int)
    again = _generate(client, num_images=2, seed=record["seed"])[0]
    assert _png_bytes(files) == _png_bytes(again)


def test_batch_endpoint_matches_single_calls(client):
    prompts = ["a small red apple", "two rockets"]
    files, record = client.predict(prompt=prompts, num_images=3, seed=5, api_name="/generate_batch")
    assert len(files) == 6 and record["seed"] == 5
    assert [r["prompt"] for r in record["results"]] == prompts
    for index, prompt in enumerate(prompts):
        alone = _generate(client, prompt=prompt, num_images=3, seed=5)[0]
        assert _png_bytes(files[index * 3:(index + 1) * 3]) == _png_bytes(alone)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_images": 0}, "num_images must be between 1 and 16"),
    ({"top_p": 1.5}, "top_p must be between"),
    ({"prompt": "   "}, "Please enter a prompt"),
    ({"model": "mini"}, "Model 'mini' is not available here"),
])
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(client, server, kwargs, message):
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        _generate(client, **kwargs)
    assert server.alive()
    files, record = _generate(client, num_images=1, seed=0)
    assert len(files) == 1 and record["seed"] == 0


def test_a_missing_model_folder_is_one_clear_startup_error(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "app.py"), "--model", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "No model folder at" in done.stderr and "nowhere" in done.stderr
    assert "Traceback" not in done.stderr


def test_helper_events_are_not_in_the_api(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/generate", "/generate_batch", "/variations"}


def _upload(tmp_path, name, image=None, data=None, **save):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    else:
        image.save(path, **save)
    return gradio_client.handle_file(str(path))


def test_variations_of_an_uploaded_png(client, tmp_path):
    upload = _upload(tmp_path, "upload.png", Image.new("RGB", (40, 30), (200, 40, 40)))
    files, record = client.predict(image=upload, prompt=None, keep_rows=2, num_images=3, seed=4,
                                   api_name="/variations")
    assert len(files) == 3 and record["seed"] == 4 and record["parameters"]["keep_rows"] == 2
    assert all(Image.open(path).size == (16, 16) for path in files)
    again = client.predict(image=upload, prompt=None, keep_rows=2, num_images=3, seed=4, api_name="/variations")[0]
    assert _png_bytes(files) == _png_bytes(again)


@pytest.mark.parametrize("name, kwargs, message", [
    ("notes.png", {"data": b"not an image at all"}, "not an image that can be read"),
    ("cmyk.jpg", {"image": Image.new("CMYK", (32, 32)), "format": "JPEG"}, "CMYK"),
    ("tiny.png", {"image": Image.new("RGB", (4, 4))}, "too small"),
    ("anim.gif", {"image": Image.new("RGB", (32, 32)), "format": "GIF", "save_all": True,
                  "append_images": [Image.new("RGB", (32, 32), "red")]}, "Animated"),
])
def test_bad_uploads_are_clear_errors(client, server, tmp_path, name, kwargs, message):
    upload = _upload(tmp_path, name, **kwargs)
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(image=upload, prompt=None, keep_rows=1, num_images=1, api_name="/variations")
    assert server.alive()


def test_user_errors_are_one_log_line_each_and_name_no_server_path(client, server, tmp_path):
    start = len(server.log_path.read_text(errors="replace"))
    messages = []
    for call in (lambda: _generate(client, num_images=0),
                 lambda: _generate(client, prompt="   "),
                 lambda: client.predict(image=_upload(tmp_path, "notes.png", data=b"plain text"), prompt=None,
                                        api_name="/variations")):
        with pytest.raises(gradio_client.exceptions.AppError) as error:
            call()
        messages.append(str(error.value))
    written = server.log_path.read_text(errors="replace")[start:]
    assert written.count("Refused a request") == 3 and len(written.strip().splitlines()) == 3, written
    assert "Traceback" not in written, written
    assert not any("/tmp" in m or str(tmp_path) in m or "gradio" in m.lower() for m in messages), messages


def test_api_documents_optional_whole_number_options(server):
    import json
    import urllib.request

    with urllib.request.urlopen(server.url + "/gradio_api/info") as response:
        parameters = json.load(response)["named_endpoints"]["/generate"]["parameters"]
    kinds = {p["parameter_name"]: (p["parameter_has_default"], p["python_type"]["type"]) for p in parameters}
    assert kinds["prompt"] == (False, "str")
    assert kinds["num_images"] == (True, "int") and kinds["seed"] == (True, "int") and kinds["top_k"] == (True, "int")
    assert kinds["temperature"] == (True, "float") and kinds["condition_scale"] == (True, "float")


def test_variations_take_strength_as_the_last_parameter(client, tmp_path):
    upload = _upload(tmp_path, "strength.png", Image.new("RGB", (32, 32), (30, 80, 220)))
    # Positional, as callers from before strength send it: image, prompt, keep_rows, options, model, strength.
    files, record = client.predict(upload, None, None, 3, 4, None, None, None, None, None, None, 1.0,
                                   api_name="/variations")
    assert record["parameters"]["strength"] == 1.0 and record["parameters"]["keep_rows"] == 0
    assert len(set(_png_bytes(files))) == 1  # strength 1: the upload's codes, three times
    with pytest.raises(gradio_client.exceptions.AppError, match="strength must be between 0.0 and 1.0"):
        client.predict(image=upload, prompt=None, strength=2, num_images=1, api_name="/variations")
