"""The live app for the server tests and the load benchmark: a tiny model folder for the app and
`python app.py` as a real subprocess on loopback, stopped (and its log shown on failure) by the caller."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The app's own default, so test runs and `python app.py` share compiled programs.
COMPILE_CACHE = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(Path.home() / ".cache" / "dalle-flax" / "jax"))
TINY_INFO = {
    "description": "A tiny random model for tests: its images are noise.",
    "examples": ["a small red apple on a blue background", "two rockets on a black background"],
    "understands": "Understands nothing: a tiny random model for tests.",
    "limitations": "Random weights: the images mean nothing.",
}
STARTUP_TIMEOUT_S = 240


def server_env(**extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               JAX_COMPILATION_CACHE_DIR=COMPILE_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def tiny_app_model(base: Path) -> Path:
    """A tiny pipeline folder whose defaults make a 3x3 grid, with a description, examples and
    limitations; written once per `base` in a subprocess so it can use the compile cache without
    changing this process's JAX settings."""
    folder = base / "tiny-app-model"
    if (folder / "pipeline.json").is_file():
        return folder
    defaults = {"num_images": 9, "candidates": 9, "condition_scale": 3.0, "top_k": 8}
    code = (
        "import json, sys; from pathlib import Path; from support.tiny import write_tiny_pipeline\n"
        "folder = write_tiny_pipeline(Path(sys.argv[1]), defaults=json.loads(sys.argv[2]))\n"
        "info = json.loads((folder / 'pipeline.json').read_text()); info.update(json.loads(sys.argv[3]))\n"
        "(folder / 'pipeline.json').write_text(json.dumps(info))\n"
    )
    partial = base / "tiny-app-model.partial"
    subprocess.run([sys.executable, "-c", code, str(partial), json.dumps(defaults), json.dumps(TINY_INFO)],
                   env=server_env(), cwd=REPO, check=True, timeout=STARTUP_TIMEOUT_S)
    partial.rename(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py --model FOLDER --port PORT` on 127.0.0.1 with its output in a log file; model
    None leaves out --model, so the app serves its default (the embedded model)."""

    def __init__(self, model: Path | None, workdir: Path, *extra_args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"app-{self.port}.log"
        env = server_env(GRADIO_TEMP_DIR=str(workdir / "gradio"), GRADIO_EXAMPLES_CACHE=str(workdir / "examples"),
                   **(env or {}))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(REPO / "app.py"), *([] if model is None else ["--model", str(model)]),
                 "--host", "127.0.0.1", "--port", str(self.port), *extra_args],
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> "AppServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/gradio_api/info", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"app.py was not ready after {timeout} s:\n{self.log()}")

    def __enter__(self) -> "AppServer":
        """Ready to serve (stopped again if it never gets there); stopped on leaving the block."""
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
