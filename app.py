"""The Space: a Gradio page and API over `model.pipeline` (UI and API wiring only, no model math).

    python app.py                                  # embedded model on http://127.0.0.1:7860
    python app.py --model mini --host 0.0.0.0      # a published model (needs hub access, a GPU helps)
    DALLE_MODEL=path/to/folder python app.py       # any pipeline folder (bart/, vqgan/, clip/)

API endpoints, with the parameter names of `Pipeline.generate`:
    /generate        prompt, num_images, seed, temperature, top_k, top_p, condition_scale, candidates,
                     model -> (PNG files best first, JSON {model, prompt, seed, scores, parameters, files})
    /generate_batch  the same, `prompt` a list of prompts sampled as one batch with shared knobs
    /variations      image (file), prompt, keep_rows, then the knobs and model as above: the upload's top
                     keep_rows rows of image tokens kept, the rest sampled

Why a separate batched endpoint rather than `batch=True` on /generate: Gradio cannot batch a
generator, and the page needs one to stream previews; the pipeline samples one batch with one seed
and one set of knobs, so requests from different callers (each with its own random seed) would
rarely share a batch; and Gradio fails every request of a batch when one raises, while one bad
request must fail alone. A caller with many prompts sends them together instead.
"""

import argparse
import contextlib
import functools
import inspect
import os
import secrets
import signal
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import gradio as gr
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gradio.utils import get_upload_folder
from PIL import PngImagePlugin

from model.errors import CheckpointError, InvalidInputError
from model.pipeline import (Defaults, Preview, Progress, default_compilation_cache, enable_compilation_cache,
                            load_pipeline)
from model.validation import LIMITS, MAX_SEED, check_number, clean_prompt

TITLE = "DALL·E mini in JAX/Flax"
DEFAULT_DESCRIPTION = "Type a prompt, get a 3x3 grid of images, best match first. The model runs right here."
CREDITS = "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0."
KNOBS = ("num_images", "seed", "temperature", "top_k", "top_p", "condition_scale", "candidates")
MAX_UPLOAD = "10mb"  # uploads (variations) beyond this are refused by the server before they reach the model
EXAMPLE_SEED = 0  # cached examples are reproducible
# Generated files live in Gradio's cache folder and are deleted this long after they were written.
OUTPUT_TTL_S = 3600
CSS = """
.gradio-container {max-width: 980px !important; margin: 0 auto !important}
#title {text-align: center}
#duplicate {margin: 0 auto}
#gallery img {image-rendering: pixelated}
#gallery .grid-wrap {max-height: none; overflow-y: auto}  /* grow with the grid: all images visible, no inner scroll */
#footer {font-size: 0.85em; opacity: 0.85}
"""


# -------------------------------------------------------------------------------------------------
# Inputs


def validate_knobs(**knobs) -> dict:
    """The sampling knobs as ints/floats (None = the model's default); InvalidInputError naming the one
    out of range (a gr.Error once it leaves a `handler`). The ranges are model.validation.LIMITS,
    shared with the Python API and the CLI."""
    return {name: None if value is None else check_number(name, value) for name, value in knobs.items()}


@contextlib.contextmanager
def user_errors():
    """Turns the library's InvalidInputError into the gr.Error the page shows and the API returns, and
    any other failure into a short message with a reference to the traceback in the server's log: the
    request fails alone, its caller learns nothing about the server's internals, the server goes on."""
    try:
        yield
    except gr.Error:
        raise
    except InvalidInputError as error:
        raise gr.Error(str(error)) from None
    except Exception:
        reference = secrets.token_hex(4)
        print(f"Request failed (reference {reference}):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise gr.Error(f"Something went wrong on the server while making these images (reference {reference}). "
                       "Please try again.") from None


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

    def __init__(self, primary, others, concurrency: int):
        self.primary = primary.name
        self.names = [primary.name] + [name for name in others if name != primary.name]
        self.concurrency = concurrency
        self._pipes = {primary.name: primary}
        self._load_locks = {name: threading.Lock() for name in self.names}
        self._slots = {name: threading.BoundedSemaphore(concurrency) for name in self.names}

    def get(self, name):
        """The pipeline, loaded now if needed; a gr.Error when it cannot be."""
        # Gradio's Dropdown lets a list of valid choices through even without multiselect.
        if not isinstance(name, str) or name not in self._load_locks:
            raise gr.Error(f"model must be one of {self.names}, got {name!r}.")
        with self._load_locks[name]:
            if name not in self._pipes:
                print(f"Loading model {name!r} on first use ...", flush=True)
                try:
                    self._pipes[name] = load_pipeline(name, compilation_cache=False)
                except CheckpointError as error:
                    raise gr.Error(f"Model {name!r} is not available here: {error}") from None
            return self._pipes[name]

    def defaults(self, name) -> Defaults:
        """Sampling defaults without loading: published presets use upstream's (`Defaults()`)."""
        pipe = self._pipes.get(name)
        return pipe.defaults if pipe is not None else Defaults()

    @contextlib.contextmanager
    def slot(self, name):
        with self._slots[name]:
            yield


# -------------------------------------------------------------------------------------------------
# Handlers


class Space:
    """Request handlers shared by the page and the API. Every image goes out as a PNG file written
    here under a fresh name and renamed into place, so no client can read a half-written file and
    concurrent identical requests never share one."""

    def __init__(self, models: Models, max_batch_prompts: int, outputs: Path):
        self.models = models
        self.max_batch_prompts = max_batch_prompts
        self.outputs = outputs
        outputs.mkdir(parents=True, exist_ok=True)
        primary = models.get(models.primary)
        self.info = primary.info
        # Previews at a quarter, half and three quarters of the image tokens.
        self.preview_every = max(1, primary.bart_config.image_length // 4)
        self.latent_size = primary.vqgan_config.latent_size  # rows of image tokens (keep_rows range)

    # API --------------------------------------------------------------------------------------

    # The API handlers are generators that yield "no change" after every chunk of sampled codes: when a
    # caller disconnects or cancels, Gradio stops iterating there and closes the generator, which frees
    # the model's slot at once instead of after the whole (possibly minutes long) generation.

    @handler
    def generate(self, prompt, num_images=None, seed=None, temperature=None, top_k=None, top_p=None,
                 condition_scale=None, candidates=None, model=None):
        """Images for one prompt as PNG files, best CLIP score first, and a JSON record
        {model, prompt, seed, scores, parameters, files}. Empty knobs take the model's defaults; an
        empty seed draws a random one, reported in the record."""
        model = model or self.models.primary
        prompt = clean_prompt(prompt)
        knobs = validate_knobs(num_images=num_images, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                               condition_scale=condition_scale, candidates=candidates)
        pipe = self.models.get(model)
        with self.models.slot(model):
            result = yield from _until_result(pipe.generate_stream(prompt, preview_every=None, yield_progress=True,
                                                                   **knobs))
        paths = self._save(result, model)
        yield paths, self._record(result, model, paths)

    @handler
    def generate_batch(self, prompt, num_images=None, seed=None, temperature=None, top_k=None, top_p=None,
                       condition_scale=None, candidates=None, model=None):
        """Several prompts sampled as one batch with the same knobs and seed. Returns every image as PNG
        files (prompt by prompt, each best first) and a JSON record {model, seed, parameters,
        results: [{prompt, scores, files}]}."""
        model = model or self.models.primary
        if not isinstance(prompt, list) or not prompt:
            raise gr.Error("prompt must be a non-empty list of prompts for /generate_batch.")
        if len(prompt) > self.max_batch_prompts:
            raise gr.Error(f"at most {self.max_batch_prompts} prompts per batch, got {len(prompt)}.")
        prompts = [clean_prompt(text) for text in prompt]
        knobs = validate_knobs(num_images=num_images, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                               condition_scale=condition_scale, candidates=candidates)
        pipe = self.models.get(model)
        # One seed for the batch, drawn here when none is given, so the record can report it.
        knobs["seed"] = pipe.resolve_parameters(seed=knobs["seed"])["seed"]
        with self.models.slot(model):
            results = yield from _until_result(pipe.generate_stream(prompts, preview_every=None, yield_progress=True,
                                                                    **knobs))
        all_paths, records = [], []
        for result in results:
            paths = self._save(result, model)
            all_paths += paths
            records.append({"prompt": result.prompt, "scores": result.scores, "files": [Path(p).name for p in paths]})
        yield all_paths, {"model": model, "seed": results[0].seed, "parameters": results[0].parameters,
                          "results": records}

    # Page -------------------------------------------------------------------------------------

    @handler
    def run(self, prompt, model, num_images, candidates, seed, randomize, temperature, top_k, top_p,
            condition_scale, progress=gr.Progress()):
        """The Run button: previews while sampling, then the images with CLIP scores as captions."""
        prompt = clean_prompt(prompt)
        knobs = validate_knobs(num_images=num_images, seed=None if randomize else seed, temperature=temperature,
                               top_k=top_k, top_p=top_p, condition_scale=condition_scale, candidates=candidates)
        pipe = self.models.get(model)
        yield from self._page_stream(
            lambda: pipe.generate_stream(prompt, preview_every=self.preview_every, yield_progress=True, **knobs), model, prompt, progress)

    @handler
    def vary_page(self, image, prompt, keep_rows, model, num_images, candidates, seed, randomize, temperature,
                  top_k, top_p, condition_scale, progress=gr.Progress()):
        """The Variations tab: the upload's top rows kept, the rest sampled (following the prompt if any)."""
        if not image:
            raise gr.Error("Upload an image first.")
        knobs = validate_knobs(num_images=num_images, seed=None if randomize else seed, temperature=temperature,
                               top_k=top_k, top_p=top_p, condition_scale=condition_scale, candidates=candidates)
        pipe = self.models.get(model)
        yield from self._page_stream(
            lambda: pipe.vary_stream(image, prompt or None, keep_rows, preview_every=self.preview_every,
                                  yield_progress=True, **knobs),
            model, prompt or "variation", progress)

    def _page_stream(self, start_stream, model, label, progress):
        """Previews of a pipeline stream into the gallery, then its result with CLIP scores."""
        start = time.perf_counter()
        progress(0.0, desc="Sampling image tokens")
        with self.models.slot(model):
            for item in start_stream():
                if isinstance(item, Progress):
                    progress(item.step / item.total, desc=f"Sampling image tokens {item.step}/{item.total}")
                    yield gr.skip(), gr.skip(), gr.skip()
                elif isinstance(item, Preview):
                    progress(item.step / item.total, desc=f"Sampling image tokens {item.step}/{item.total}")
                    paths = self._write_pngs(item.images[0], {"prompt": label, "preview": str(item.step)})
                    yield ([(p, f"{item.step}/{item.total} tokens") for p in paths], gr.update(),
                           f"Sampling image tokens: {item.step} of {item.total} ...")
                else:
                    result = item
        yield self._page_outputs(result, model, time.perf_counter() - start)

    @handler
    def variations(self, image, prompt=None, keep_rows=None, num_images=None, seed=None, temperature=None,
                   top_k=None, top_p=None, condition_scale=None, candidates=None, model=None):
        """API: variations of an uploaded image file. Its top `keep_rows` rows of image tokens are kept,
        the rest sampled (following `prompt` when given); PNG files best first and a JSON record."""
        model = model or self.models.primary
        if not image:
            raise gr.Error("image is missing: upload a PNG or JPEG file.")
        knobs = validate_knobs(num_images=num_images, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                               condition_scale=condition_scale, candidates=candidates)
        pipe = self.models.get(model)
        with self.models.slot(model):
            result = yield from _until_result(pipe.vary_stream(image, prompt or None, keep_rows, preview_every=None,
                                                               yield_progress=True, **knobs))
        paths = self._save(result, model)
        yield paths, self._record(result, model, paths)

    @handler
    def run_example(self, prompt):
        """An example prompt on the primary model with its defaults and a fixed seed (cached lazily)."""
        pipe = self.models.get(self.models.primary)
        start = time.perf_counter()
        with self.models.slot(self.models.primary):
            result = pipe.generate(prompt, seed=EXAMPLE_SEED)
        return self._page_outputs(result, self.models.primary, time.perf_counter() - start)

    @handler
    def model_defaults(self, model):
        """The knob sliders for a model's defaults when the model choice changes (nothing is loaded)."""
        d = self.models.defaults(model)
        return d.num_images, d.candidates, d.temperature, d.top_k, d.top_p, d.condition_scale

    # Files and records ---------------------------------------------------------------------------

    def _page_outputs(self, result, model, seconds):
        paths = self._save(result, model)
        gallery = [(path, f"CLIP {score:.2f}") for path, score in zip(paths, result.scores)]
        status = (f"Seed **{result.seed}** · model `{model}` · {len(paths)} images from "
                  f"{result.parameters['candidates']} candidates in {seconds:.1f} s")
        return gallery, result.seed, status

    def _save(self, result, model) -> list[str]:
        return self._write_pngs(result.images, {"prompt": result.prompt, "model": model, "seed": str(result.seed)})

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

    @staticmethod
    def _record(result, model, paths) -> dict:
        return {"model": model, "prompt": result.prompt, "seed": result.seed, "scores": result.scores,
                "parameters": result.parameters, "files": [Path(p).name for p in paths]}


def _request_validation_error(request, error):
    """FastAPI's answer to a malformed API body, minus the echoed input: echoing it made a lone
    surrogate in the body (valid JSON, not encodable as UTF-8) an HTTP 500 instead of a 422."""
    details = [{key: value for key, value in item.items() if key in ("loc", "msg", "type")} for item in error.errors()]
    return JSONResponse({"detail": jsonable_encoder(details)}, status_code=422)


def _until_result(stream):
    """Passes a pipeline stream's chunks on as "no change" to both API outputs; returns its result."""
    for item in stream:
        if isinstance(item, (Progress, Preview)):
            yield gr.skip(), gr.skip()
        else:
            return item


# -------------------------------------------------------------------------------------------------
# Page and API wiring


def _slider(name, label, step, value, high=None):
    low, limit, _ = LIMITS[name]
    return gr.Slider(low, high or limit, value=value, step=step, label=label, elem_id=name)


def _footer(info: dict) -> str:
    limitations = info.get("limitations")
    if isinstance(limitations, (list, tuple)):
        limitations = " ".join(limitations)
    lines = [f"**Limitations.** {limitations}"] if limitations else []
    lines.append(f"{CREDITS} Text encoder, sampler, VQGAN and CLIP reranker in the style of "
                 "[DALL·E mini](https://github.com/borisdayma/dalle-mini), in JAX/Flax.")
    return "\n\n".join(lines)


def build_demo(space: Space) -> gr.Blocks:
    models = space.models
    defaults = models.defaults(models.primary)
    generating = {"concurrency_id": "generate", "concurrency_limit": models.concurrency * len(models.names)}
    # No telemetry or version check: the app works offline and talks only to its own clients.
    with gr.Blocks(title=TITLE, delete_cache=(OUTPUT_TTL_S // 2, OUTPUT_TTL_S), analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{space.info.get('description', DEFAULT_DESCRIPTION)}", elem_id="title")
        if os.environ.get("SPACE_ID"):
            gr.DuplicateButton(elem_id="duplicate")
        with gr.Tabs():
            with gr.Tab("Text to image", elem_id="text-tab"):
                with gr.Row(equal_height=True):
                    prompt = gr.Textbox(show_label=False, placeholder="What do you want to see?", max_lines=1,
                                        scale=5, autofocus=True, elem_id="prompt", container=False)
                    run = gr.Button("Run", variant="primary", scale=1, min_width=100, elem_id="run")
            with gr.Tab("Variations", elem_id="variations-tab"):
                with gr.Row():
                    upload = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"], height=200,
                                      elem_id="upload")
                    with gr.Column(scale=2):
                        vary_prompt = gr.Textbox(label="prompt (optional)", max_lines=1, elem_id="vary-prompt",
                                                 placeholder="Leave empty for variations of the image alone")
                        side = space.latent_size
                        keep_rows = gr.Slider(0, side, value=side // 2, step=1, elem_id="keep-rows",
                                              label=f"keep_rows (rows of image tokens kept, of {side})")
                        vary = gr.Button("Make variations", variant="primary", elem_id="vary")
        status = gr.Markdown("", elem_id="status")
        gallery = gr.Gallery(show_label=False, columns=3, height="auto", format="png", object_fit="contain",
                             preview=False, allow_preview=True, elem_id="gallery")
        with gr.Accordion("Advanced", open=False):
            model = gr.Dropdown(models.names, value=models.primary, label="model", elem_id="model",
                                info="Models other than the first load on first use.")
            with gr.Row():
                num_images = _slider("num_images", "num_images", 1, defaults.num_images)
                candidates = _slider("candidates", "candidates (sampled, best kept by CLIP)", 1, defaults.candidates)
            with gr.Row():
                seed = gr.Number(EXAMPLE_SEED, label="seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                randomize = gr.Checkbox(True, label="randomize seed")
            with gr.Row():
                temperature = _slider("temperature", "temperature", 0.01, defaults.temperature, high=3.0)
                top_k = _slider("top_k", "top_k (0 = off)", 1, defaults.top_k, high=1024)
            with gr.Row():
                top_p = _slider("top_p", "top_p (1 = off)", 0.01, defaults.top_p)
                condition_scale = _slider("condition_scale", "condition_scale", 0.5, defaults.condition_scale)
        examples = [[text] for text in space.info.get("examples", [])]
        if examples:
            gr.Examples(examples, inputs=[prompt], outputs=[gallery, seed, status], fn=space.run_example,
                        cache_examples=True, cache_mode="lazy", api_visibility="private", elem_id="examples")
        gr.Markdown(_footer(space.info), elem_id="footer")

        gr.on([run.click, prompt.submit], space.run,
              inputs=[prompt, model, num_images, candidates, seed, randomize, temperature, top_k, top_p,
                      condition_scale],
              outputs=[gallery, seed, status], show_progress_on=[status], api_visibility="private",
              **generating)
        gr.on([vary.click, vary_prompt.submit], space.vary_page,
              inputs=[upload, vary_prompt, keep_rows, model, num_images, candidates, seed, randomize, temperature,
                      top_k, top_p, condition_scale],
              outputs=[gallery, seed, status], show_progress_on=[status], api_visibility="private", **generating)
        model.change(space.model_defaults, model, [num_images, candidates, temperature, top_k, top_p, condition_scale],
                     queue=False, show_progress="hidden", api_visibility="private")

        # API-only inputs and outputs: hidden components named like the Python arguments.
        with gr.Column(visible=False):
            api_model = gr.Dropdown(models.names, value=models.primary, label="model")
            # precision=None for every number: Gradio would round 1.5 to 2 (and True to 1) before
            # model.validation could refuse a fraction for a whole-number knob.
            api_knobs = [gr.Number(None, label=name) for name in KNOBS]
            api_files = gr.File(file_count="multiple", label="images")
            api_record = gr.JSON(label="record")
            gr.Button().click(space.generate, [gr.Textbox(label="prompt"), *api_knobs, api_model],
                              [api_files, api_record], api_name="generate", **generating)
            gr.Button().click(space.generate_batch, [gr.JSON(label="prompt"), *api_knobs, api_model],
                              [api_files, api_record], api_name="generate_batch", **generating)
            # The raw upload (gr.File, not gr.Image, which would re-encode it) so the pipeline sees and
            # checks exactly what was sent: animations, CMYK, sizes.
            gr.Button().click(space.variations,
                              [gr.File(label="image", type="filepath"), gr.Textbox(label="prompt"),
                               gr.Number(None, label="keep_rows"), *api_knobs, api_model],
                              [api_files, api_record], api_name="variations", **generating)
    return demo


# -------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=TITLE + ": the demo page and its API.")
    parser.add_argument("--model", default=env("DALLE_MODEL"),
                        help="model folder or published preset (mini, mega); default: the embedded model "
                             "[env DALLE_MODEL]")
    parser.add_argument("--hub-models", default=env("DALLE_HUB_MODELS", "mini,mega"),
                        help="comma-separated further choices, loaded on first use [env DALLE_HUB_MODELS]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on [env GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="[env GRADIO_SERVER_PORT]")
    parser.add_argument("--queue-size", type=int, default=int(env("DALLE_QUEUE_SIZE", "64")),
                        help="requests waiting beyond this are turned away [env DALLE_QUEUE_SIZE]")
    parser.add_argument("--concurrency", type=int, default=int(env("DALLE_CONCURRENCY", "1")),
                        help="requests running at once per model [env DALLE_CONCURRENCY]")
    parser.add_argument("--max-batch-prompts", type=int, default=int(env("DALLE_MAX_BATCH_PROMPTS", "8")),
                        help="prompts per /generate_batch call [env DALLE_MAX_BATCH_PROMPTS]")
    parser.add_argument("--compile-cache", default=env("JAX_COMPILATION_CACHE_DIR", str(default_compilation_cache())),
                        help="persistent XLA compilation cache folder, '' for none [env JAX_COMPILATION_CACHE_DIR]")
    args = parser.parse_args(argv)
    for name in ("queue_size", "concurrency", "max_batch_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    if args.compile_cache:
        # Start-up compiles dominate; cached on disk they take a fraction of the time.
        enable_compilation_cache(args.compile_cache)
    try:
        print(f"Loading model {args.model or 'embedded'} ...", flush=True)
        primary = load_pipeline(args.model, compilation_cache=False)
        print("Warming up (compiling) ...", flush=True)
        primary.warmup()
    except CheckpointError as error:
        raise SystemExit(f"app.py: {error}") from None
    others = [name.strip() for name in args.hub_models.split(",") if name.strip()]
    space = Space(Models(primary, others, args.concurrency), args.max_batch_prompts,
                  Path(get_upload_folder()) / "dalle-outputs")
    # Gradio keeps cached examples across restarts keyed by position only, so a cache left by another
    # model would be served; unless told otherwise, this process's cache lives and dies with it.
    examples_cache = None
    if "GRADIO_EXAMPLES_CACHE" not in os.environ:
        examples_cache = os.environ["GRADIO_EXAMPLES_CACHE"] = tempfile.mkdtemp(prefix="dalle-examples-")
    # SIGTERM (docker, Spaces) shuts down like Ctrl-C: Gradio closes the server, the cleanup below runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo = build_demo(space)
        demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
        print(f"Ready after {time.perf_counter() - started:.1f} s", flush=True)
        # show_error: the message of an error Gradio itself raises before a handler runs (an upload path
        # outside its folders, a malformed file reference) reaches the caller instead of a bare "Error";
        # the handlers' own failures are gr.Error already (user_errors), with no internals in them.
        demo.launch(server_name=args.host, server_port=args.port, css=CSS, ssr_mode=False, max_file_size=MAX_UPLOAD,
                    show_error=True, footer_links=["api", "gradio", "settings"],
                    app_kwargs={"exception_handlers": {RequestValidationError: _request_validation_error}})
    finally:
        if examples_cache:
            shutil.rmtree(examples_cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
