"""The Space's request handlers, shared by the page and the API of app.py (no model math here).

Every handler goes through `Space.serve`: check the request once (`check_inputs`, then
`Pipeline.complete` with the model's defaults), take the model's slot, stream the sampling, write
PNGs, answer. The API handlers answer (PNG files, JSON record); the page handlers stream previews
into a gallery. Every failure becomes a `gr.Error` with a message for people (`user_errors`).
"""

import collections
import contextlib
import dataclasses
import functools
import inspect
import os
import secrets
import sys
import threading
import time
import traceback
from pathlib import Path

import gradio as gr
from gradio.context import LocalContext
from PIL import PngImagePlugin

from model.clip_rank import SCORE_LABELS
from model.loading import cached_or_online
from model.errors import CheckpointError, InvalidInputError
from model.loading import load_pipeline
from model.options import Options
from model.pipeline import DEFAULT_EDIT_STRENGTH, DEFAULT_STRENGTH, MAX_ROWS, Progress, check_inputs, image_grid
from model.scheduler import Scheduler

EXAMPLE_SEED = 0  # cached examples are reproducible
# Runs shorter than this show no previews: the final images arrive before a preview would help.
PREVIEWS_AFTER_S = 2.0
SCORE_HELP = {"clip_logit": "best CLIP score (match to the prompt) first",
              "image_similarity": "most similar to the upload first (CLIP, -1 to 1)"}


# -------------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def user_errors():
    """Turns the library's InvalidInputError into the gr.Error the page shows and the API returns, and
    any other failure into a short message with a reference to the traceback in the server's log: the
    request fails alone, its caller learns nothing about the server's internals, the server goes on."""
    try:
        yield
    except gr.Error as error:
        raise _refused(error.message) from None
    except InvalidInputError as error:
        raise _refused(str(error)) from None
    except Exception:
        reference = secrets.token_hex(4)
        print(f"Request failed (reference {reference}):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise gr.Error(f"Something went wrong on the server while making these images (reference {reference}). "
                       "Please try again.") from None


def _refused(message: str) -> gr.Error:
    """A user's error: one line in the server's log (Gradio would print a traceback) and the message."""
    print(f"Refused a request: {message}", file=sys.stderr, flush=True)
    return gr.Error(message, print_exception=False)


def handler(fn):
    """A request handler (plain or generator) whose every failure goes through `user_errors`."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            with user_errors():
                yield from fn(*args, **kwargs)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with user_errors():
            return fn(*args, **kwargs)
    return call


# -------------------------------------------------------------------------------------------------
# Models


class Models:
    """The served models by name: the primary one is loaded at start-up, the others on first use.

    Each model runs at most `concurrency` requests at a time; the queue's limit for the generating
    events is that times the number of models, so a slow model does not block the others.
    """

    def __init__(self, primary, others, concurrency: int, dtype=None, batching=False, batch_rows=MAX_ROWS,
                 batch_requests=16):
        self.primary = primary.name
        # Batching: each model's requests share sampler steps (model/scheduler.py) instead of taking
        # turns at `concurrency` slots; a batch holds up to batch_rows decoder rows and batch_requests requests.
        self.batching, self.batch_rows, self.batch_requests = batching, batch_rows, batch_requests
        self._schedulers = {}
        self.names = [primary.name] + [name for name in others if name != primary.name]
        self.concurrency = concurrency
        self.dtype = dtype  # for the models loaded on first use; None: the device's default
        self._pipes = {primary.name: primary}
        self._load_locks = {name: threading.Lock() for name in self.names}
        self._slots = {name: threading.BoundedSemaphore(concurrency) for name in self.names}
        self.unavailable = {name: "not available offline" for name in self.names[1:] if not cached_or_online(name)}

    def get(self, name, progress=None):
        """The pipeline, loaded now if needed (`progress` called with a line per loading step, besides the
        log); a gr.Error when it cannot be."""
        # Gradio's Dropdown lets a list of valid choices through even without multiselect.
        if not isinstance(name, str) or name not in self._load_locks:
            raise gr.Error(f"model must be one of {self.names}, got {name!r}.")
        with self._load_locks[name]:
            if name not in self._pipes:
                say = progress or (lambda message: None)
                print(f"Loading model {name!r} on first use ...", flush=True)
                say(f"Loading {name} (first use) ...")

                def step(message):
                    print(message, flush=True)
                    say(message)
                try:
                    self._pipes[name] = load_pipeline(name, compilation_cache=False, dtype=self.dtype, progress=step)
                except CheckpointError as error:
                    print(f"Model {name!r} failed to load: {error}", file=sys.stderr, flush=True)
                    self.unavailable[name] = "failed to load"
                    raise gr.Error(f"Model {name!r} is not available here: its weights are not on this server and "
                                   f"could not be downloaded. Choose {self.primary!r} instead.") from None
            return self._pipes[name]

    def label(self, name) -> str:
        """The model's name as the page lists it, saying when it cannot load here."""
        reason = self.unavailable.get(name)
        return f"{name} ({reason})" if reason else name

    def defaults(self, name) -> Options:
        """A model's options without loading it: published presets use upstream's (`Options()`)."""
        pipe = self._pipes.get(name)
        return pipe.defaults if pipe is not None else Options()

    def slot(self, name):
        return self._slots[name]

    def run(self, name, pipe, request, preview_every=None, previews_after_s=0.0):
        """Samples a checked request of model `name`: in its shared batches when batching, else in
        one of its `concurrency` slots. Closing the stream withdraws the request at the next chunk."""
        if not self.batching:
            with self.slot(name):
                yield from pipe.run(request, preview_every, previews_after_s)
            return
        with self._load_locks[name]:
            if name not in self._schedulers:
                self._schedulers[name] = Scheduler(pipe, self.batch_rows, self.batch_requests)
        yield from self._schedulers[name].submit(request, preview_every, previews_after_s)


# -------------------------------------------------------------------------------------------------
# The serve path

CURRENT = object()  # serve's caller: the one of the Gradio event being handled


def caller_of(request) -> str | None:
    """Who sent a Gradio request, for the per-caller limit: behind a proxy (a Space) the first address of
    X-Forwarded-For, the visitor's; otherwise the Gradio session (one per page or API client), then
    the peer address. None outside a request."""
    if request is None:
        return None
    forwarded = (request.headers or {}).get("x-forwarded-for", "")
    if forwarded.split(",")[0].strip():
        return "ip " + forwarded.split(",")[0].strip()
    if getattr(request, "session_hash", None):
        return "session " + request.session_hash
    client = getattr(request, "client", None)
    return f"ip {client.host}" if client else None


@dataclasses.dataclass
class Answer:
    """A served request: its results (one per prompt), their PNG files, and the time it took."""

    model: str
    results: list
    files: list  # per result, the paths of its PNGs, best first
    seconds: float
    dtype: str  # the model's weights, e.g. "float32"


class Space:
    """Request handlers shared by the page and the API. Every image goes out as a PNG file written
    here under a fresh name and renamed into place, so no client can read a half-written file and
    concurrent identical requests never share one."""

    def __init__(self, models: Models, max_batch_prompts: int, outputs: Path, per_caller: int | None = None):
        self.models = models
        # Fairness: one caller holds at most this many requests in line or running (None: no limit).
        self.per_caller = per_caller
        self._places = collections.Counter()
        self._places_lock = threading.Lock()
        self.max_batch_prompts = max_batch_prompts
        self.outputs = outputs
        outputs.mkdir(parents=True, exist_ok=True)
        primary = models.get(models.primary)
        self.info = primary.info
        self.dtype = primary.dtype
        # Previews at a quarter, half and three quarters of the image tokens.
        self.preview_every = max(1, primary.bart_config.image_length // 4)
        self.latent_size = primary.vqgan_config.latent_size  # rows of image tokens (keep_rows range)

    def serve(self, model, preview_every=None, loading=None, caller=CURRENT, **inputs):
        """The one path of every request: yields `Progress` while sampling (a point where Gradio may
        stop a cancelled request, freeing the slot at once), then the `Answer`. `loading`: told each
        step of loading a model on first use. `caller`: who asks (see `caller_of`; None: no limit), by
        default the caller of the Gradio event being handled."""
        checked = check_inputs(**inputs)  # before the model: a typo never waits for a load
        model = model or self.models.primary
        pipe = self.models.get(model, loading)
        request = pipe.complete(checked)
        start = time.perf_counter()
        with self._place(caller_of(LocalContext.request.get(None)) if caller is CURRENT else caller):
            for item in self.models.run(model, pipe, request, preview_every, PREVIEWS_AFTER_S):
                if isinstance(item, Progress):
                    yield item
                else:
                    results = item if isinstance(item, list) else [item]
        files = [self._write_pngs(r.images, {"prompt": r.prompt, "model": model, "seed": str(r.seed)})
                 for r in results]
        yield Answer(model, results, files, time.perf_counter() - start, pipe.dtype)

    @contextlib.contextmanager
    def _place(self, caller):
        """One of `caller`'s places for a request, held while it waits and runs; a gr.Error when the
        caller already holds `per_caller` of them."""
        if caller is None or self.per_caller is None:
            yield
            return
        with self._places_lock:
            if self._places[caller] >= self.per_caller:
                many = "request" if self.per_caller == 1 else "requests"
                raise gr.Error(f"Busy: you already have {self.per_caller} {many} running; wait for one to finish.")
            self._places[caller] += 1
        try:
            yield
        finally:
            with self._places_lock:
                self._places[caller] -= 1
                if not self._places[caller]:
                    del self._places[caller]

    # API --------------------------------------------------------------------------------------

    @handler
    def generate(self, prompt, num_images=None, seed=None, temperature=None, top_k=None, top_p=None,
                 condition_scale=None, candidates=None, model=None):
        """Images for one prompt as PNG files, best CLIP score first, and a JSON record
        {model, prompt, read_as, seed, scores, score_kind, parameters, files} (read_as: what the model
        drew: the prompt, or its rewrite by the model's prompt reader). Empty options take the model's
        defaults; an empty seed draws a random one, reported in the record."""
        if not isinstance(prompt, str):
            raise gr.Error("prompt must be text for /generate; send a list of prompts to /generate_batch.")
        answer = yield from self._api(model, prompt=prompt, num_images=num_images, seed=seed,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      condition_scale=condition_scale, candidates=candidates)
        yield answer.files[0], _record(answer)

    @handler
    def generate_batch(self, prompt, num_images=None, seed=None, temperature=None, top_k=None, top_p=None,
                       condition_scale=None, candidates=None, model=None):
        """Several prompts sampled as one batch with the same options and seed. Returns every image as
        PNG files (prompt by prompt, each best first) and a JSON record {model, seed, parameters,
        results: [{prompt, scores, files}]}."""
        if not isinstance(prompt, list) or not prompt:
            raise gr.Error("prompt must be a non-empty list of prompts for /generate_batch.")
        if len(prompt) > self.max_batch_prompts:
            raise gr.Error(f"at most {self.max_batch_prompts} prompts per batch, got {len(prompt)}.")
        answer = yield from self._api(model, prompt=prompt, num_images=num_images, seed=seed,
                                      temperature=temperature, top_k=top_k, top_p=top_p,
                                      condition_scale=condition_scale, candidates=candidates)
        first = answer.results[0]
        yield [path for paths in answer.files for path in paths], {
            "model": answer.model, "dtype": answer.dtype, "seed": first.seed, "parameters": first.parameters,
            "score_kind": first.score_kind,
            "results": [{"prompt": r.prompt, "read_as": r.read_as or r.prompt, "scores": r.scores,
                         "files": [Path(p).name for p in paths]} for r, paths in zip(answer.results, answer.files)]}

    @handler
    def variations(self, image, prompt=None, keep_rows=None, num_images=None, seed=None, temperature=None,
                   top_k=None, top_p=None, condition_scale=None, candidates=None, model=None, strength=None):
        """Variations of an uploaded image: its top `keep_rows` rows of image tokens kept exactly, the others
        copied from the upload with probability `strength` (0..1), else sampled (following `prompt` when
        given); PNG files best first and a JSON record. `strength` is last: older positional callers keep working."""
        if not image:
            raise gr.Error("image is missing: upload a PNG or JPEG file.")
        answer = yield from self._api(model, image=image, prompt=prompt or None, keep_rows=keep_rows,
                                      strength=strength, num_images=num_images, seed=seed, temperature=temperature,
                                      top_k=top_k, top_p=top_p, condition_scale=condition_scale,
                                      candidates=candidates)
        yield answer.files[0], _record(answer)

    def _api(self, model, **inputs):
        """`serve` for the API: "no change" to both outputs after every chunk; returns the Answer."""
        for item in self.serve(model, **inputs):
            if isinstance(item, Progress):
                yield gr.skip(), gr.skip()
            else:
                return item

    # Page -------------------------------------------------------------------------------------

    @handler
    def run(self, prompt, model, num_images, candidates, seed, randomize, temperature, top_k, top_p,
            condition_scale, progress=gr.Progress()):
        """The Run button: previews while sampling, then the images with their scores as captions."""
        yield from self._page(model, progress, prompt=prompt, num_images=num_images, candidates=candidates,
                              seed=None if randomize else seed, temperature=temperature, top_k=top_k, top_p=top_p,
                              condition_scale=condition_scale)

    @handler
    def vary_page(self, image, prompt, strength, keep_rows, model, num_images, candidates, seed, randomize,
                  temperature, top_k, top_p, condition_scale, progress=gr.Progress()):
        """The Variations tab: as /variations, with previews (the prompt, if any, steers)."""
        if not image:
            raise gr.Error("Upload an image first.")
        yield from self._page(model, progress, image=image, prompt=prompt or None, keep_rows=keep_rows, strength=strength,
                              num_images=num_images, candidates=candidates, seed=None if randomize else seed,
                              temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale)

    @staticmethod
    def strength_for_prompt(prompt, strength):
        """The Variations tab's slider moves between the two defaults as a prompt is typed or cleared;
        a strength the person set stays."""
        defaults = {DEFAULT_STRENGTH: DEFAULT_EDIT_STRENGTH, DEFAULT_EDIT_STRENGTH: DEFAULT_STRENGTH}
        has_prompt = bool(str(prompt or "").strip())
        if strength in defaults and (strength == DEFAULT_STRENGTH) == has_prompt:
            return defaults[strength]
        return gr.skip()

    @handler
    def run_example(self, prompt):
        """An example prompt on the primary model with its defaults and a fixed seed (cached lazily)."""
        for item in self.serve(None, prompt=prompt, seed=EXAMPLE_SEED):
            answer = item
        return _page_outputs(answer, self._write_grid(answer))[:3]

    def _page(self, model, progress, **inputs):
        """`serve` for the page: a progress bar and previews in the gallery, then the scored images."""
        progress(0.0, desc="Sampling image tokens")
        for item in self.serve(model, self.preview_every, lambda message: progress(0.0, desc=message), **inputs):
            if not isinstance(item, Progress):
                yield _page_outputs(item, self._write_grid(item))
                return
            progress(item.step / item.total, desc=f"Sampling image tokens {item.step}/{item.total}")
            if item.images is None:
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            else:
                paths = self._write_pngs(item.images[0], {"preview": str(item.step)})
                yield ([(p, f"{item.step}/{item.total} tokens") for p in paths], gr.skip(),
                       f"Sampling image tokens: {item.step} of {item.total} ...", gr.skip())

    @handler
    def model_defaults(self, model):
        """The sliders for a model's defaults when the model choice changes (nothing is loaded)."""
        d = self.models.defaults(model)
        return d.num_images, d.candidates, d.temperature, d.top_k, d.top_p, d.condition_scale

    def _write_grid(self, answer: Answer) -> str:
        """The first result's images as one PNG grid, the way people share a run."""
        result = answer.results[0]
        return self._write_pngs([image_grid(result.images)], {"prompt": result.prompt, "model": answer.model,
                                                             "seed": str(result.seed)})[0]

    def _write_pngs(self, images, text: dict) -> list[str]:
        """PNG files under fresh names, each written beside its final name and renamed into place."""
        metadata = PngImagePlugin.PngInfo()
        for key, value in text.items():
            metadata.add_itxt(key, value)
        stem = secrets.token_hex(8)
        paths = []
        for index, image in enumerate(images):
            final = self.outputs / f"{stem}-{index + 1}.png"
            partial = self.outputs / f".{stem}-{index + 1}.partial"
            image.save(partial, format="PNG", pnginfo=metadata)
            os.replace(partial, final)
            paths.append(str(final))
        return paths


def _page_outputs(answer: Answer, grid_path: str):
    """(gallery with labelled scores, the seed used, the status line, the grid to download) of a
    finished request."""
    result, paths = answer.results[0], answer.files[0]
    label = SCORE_LABELS[result.score_kind]
    gallery = [(path, f"{label} {score:.2f}") for path, score in zip(paths, result.scores)]
    status = (f"Seed **{result.seed}** · model `{answer.model}` · {len(paths)} images from "
              f"{result.parameters['candidates']} candidates in {answer.seconds:.1f} s · "
              f"{SCORE_HELP[result.score_kind]}")
    if result.read_as:  # the model's prompt reader rewrote the prompt: say what was drawn
        status += f"  \nDrawn as: *{result.read_as}*"
    elif not result.understood:
        status += "  \nNone of these words name something this model knows, so only the background was drawn."
    return gallery, result.seed, status, gr.update(value=grid_path, visible=True)


def _record(answer: Answer) -> dict:
    result, paths = answer.results[0], answer.files[0]
    return {"model": answer.model, "dtype": answer.dtype, "prompt": result.prompt,
            "read_as": result.read_as or result.prompt, "understood": result.understood, "seed": result.seed,
            "scores": result.scores, "score_kind": result.score_kind, "parameters": result.parameters,
            "files": [Path(p).name for p in paths]}
