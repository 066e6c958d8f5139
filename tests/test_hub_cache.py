"""The Space on the Hub, proven offline: the README preloads exactly the files model/loading.py pins, a
hub cache laid out as huggingface_hub lays it out (tiny models under the published repo ids, at the
pinned commits) loads as "mini" with HF_HUB_OFFLINE=1, `python app.py` on a Space (SPACE_ID set) opens on
mini when it is cached, and a cache missing a file fails with one line naming the repo and revision.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported: loads run in subprocesses."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
import urllib.request
from pathlib import Path

import pytest
import yaml

from model import checkpoint
from model.loading import HUB_FILES, PRESETS
from support.app_server import REPO, AppServer, server_env
from support.tiny import write_tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")


def _storage(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def _add_repo(cache: Path, repo: str, revision: str, folder: Path) -> None:
    """`folder`'s files stored as huggingface_hub stores a download of `repo` at `revision`: the
    contents in blobs/ named by their hash, linked from snapshots/<revision>/, refs/main naming it."""
    storage = _storage(cache, repo)
    snapshot = storage / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache holding tiny models as mini's three repos at their pinned revisions."""
    base = tmp_path_factory.mktemp("hub")
    tiny = write_tiny_pipeline(base / "tiny")
    # The published CLIP repo's weights are read from its flax_model.msgpack (HUB_FILES): store the
    # tiny CLIP the same way rather than as the safetensors file write_tiny_pipeline writes.
    _, params = checkpoint.load_clip(tiny / "clip")
    checkpoint.write_msgpack(tiny / "clip" / checkpoint.FLAX_WEIGHTS, params)
    (tiny / "clip" / checkpoint.SAFETENSORS_WEIGHTS).unlink()
    cache = base / "cache"
    for stage, (repo, revision) in PRESETS["mini"].items():
        _add_repo(cache, repo, revision, tiny / stage)
    return cache


def _python(code: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=server_env(HF_HUB_CACHE=str(cache)), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_readme_preloads_the_files_and_commits_the_loader_pins():
    front_matter = yaml.safe_load((REPO / "README.md").read_text(encoding="utf-8").split("---\n")[1])
    pinned = {repo: (list(HUB_FILES[stage]), revision)
              for preset in PRESETS.values() for stage, (repo, revision) in preset.items()}
    preloaded = {}
    for line in front_matter["preload_from_hub"]:
        repo, files, revision = line.split()  # "repo_id file1,file2 commit", the Spaces config syntax
        preloaded[repo] = (files.split(","), revision)
    assert preloaded == pinned
    assert sorted(front_matter["models"]) == sorted(pinned)
    assert all(re.fullmatch("[0-9a-f]{40}", revision) for _, revision in pinned.values())


LOAD = """
from model.loading import in_hub_cache, load_pipeline
print("cached", in_hub_cache("mini"), in_hub_cache("mega"))
pipe = load_pipeline("mini", progress=print)
result = pipe.generate("a red apple", seed=0, num_images=2, candidates=2, top_k=8)
print("generated", pipe.name, len(result.images), result.images[0].size)
"""


def test_mini_loads_offline_from_the_hub_cache(hub_cache):
    run = _python(LOAD, hub_cache)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "cached True False" in lines  # mega's DalleBart is not in the cache
    assert [line for line in lines if line.startswith("Loading mini: ") and "/3)" in line] == [
        "Loading mini: DalleBart (1/3) ...", "Loading mini: VQGAN (2/3) ...", "Loading mini: CLIP (3/3) ..."]
    assert "generated mini 2 (16, 16)" in lines


BROKEN = """
import json
from model.errors import CheckpointError
from model.loading import in_hub_cache, load_pipeline
print("cached", in_hub_cache("mini"))
try:
    load_pipeline("mini")
except CheckpointError as error:
    print("error", json.dumps(str(error)))
"""


@pytest.mark.parametrize("missing", ["a file", "the repo"])
def test_a_cache_missing_a_file_fails_in_one_line_naming_repo_and_revision(hub_cache, tmp_path, missing):
    cache = tmp_path / "cache"
    shutil.copytree(hub_cache, cache, symlinks=True)
    repo, revision = PRESETS["mini"]["vqgan"]
    if missing == "a file":
        (_storage(cache, repo) / "snapshots" / revision / checkpoint.FLAX_WEIGHTS).unlink()
    else:
        shutil.rmtree(_storage(cache, repo))
    run = _python(BROKEN, cache)
    lines = run.stdout.splitlines()
    errors = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("error ")]
    assert "cached False" in lines and len(errors) == 1, run.stdout + run.stderr[-3000:]
    message = errors[0]
    assert "\n" not in message and repo in message and revision in message, message


def test_a_model_loaded_on_first_use_tells_its_steps(monkeypatch):
    """What the page shows while a visitor waits for mini or mega (Space._page passes gr.Progress)."""
    import space

    def load(name, compilation_cache, dtype, progress):
        progress(f"Loading {name}: DalleBart (1/3) ...")
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(space, "load_pipeline", load)
    models = space.Models(types.SimpleNamespace(name="tiny"), ["mini"], concurrency=1)
    told = []
    assert models.get("mini", told.append).name == "mini"
    assert told == ["Loading mini (first use) ...", "Loading mini: DalleBart (1/3) ..."]
    models.get("mini", told.append)  # loaded: nothing more to tell
    assert len(told) == 2


def test_on_a_space_the_page_opens_on_mini_when_it_is_cached(hub_cache, tmp_path):
    env = {"HF_HUB_CACHE": str(hub_cache), "SPACE_ID": "someone/dalle-flax"}
    with AppServer(None, tmp_path, env=env) as app:
        with urllib.request.urlopen(app.url + "/config", timeout=30) as response:
            config = json.load(response)
        client = gradio_client.Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))
        files, record = client.predict(prompt="a red apple", num_images=1, candidates=1, top_k=8, seed=0,
                                       api_name="/generate")
        log = app.log()
    assert record["model"] == "mini" and len(files) == 1
    dropdown = next(c["props"] for c in config["components"] if c.get("props", {}).get("elem_id") == "model")
    assert dropdown["value"] == "mini"
    # mega: "not available offline"; the embedded model stays a choice
    assert [choice[1] for choice in dropdown["choices"]] == ["mini", "mega", "emoji"]
    assert "Loading mini: DalleBart (1/3) ..." in log
