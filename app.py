"""The Space: a Gradio page and API over the model library (UI and API wiring only, no model math).

    python app.py                                  # embedded model on http://127.0.0.1:7860
    python app.py --model mini --host 0.0.0.0      # a published model (needs hub access, a GPU helps)
    DALLE_MODEL=path/to/folder python app.py       # any pipeline folder (bart/, vqgan/, clip/)

API endpoints, with the parameter names of `Pipeline.generate` (model/options.py defines the options):
    /generate        prompt, num_images, seed, temperature, top_k, top_p, condition_scale, candidates,
                     model -> (PNG files best first, JSON {model, prompt, seed, scores, score_kind,
                     parameters, files})
    /generate_batch  the same, `prompt` a list of prompts sampled as one batch with shared options
    /variations      image (file), prompt, keep_rows, then the options and model as above, then strength:
                     the upload's top keep_rows rows of image tokens kept, every other token copied from
                     the upload with probability strength (0..1), else sampled (strength last: older
                     positional callers keep working)

Every handler, page or API, goes through one path (`space.Space.serve`); this file is the page's
layout, the API's wiring and the command line. Why a separate batched endpoint rather than
`batch=True` on /generate: Gradio cannot batch a generator, which the page needs for previews, and
fails every request of a batch when one raises.
"""

import os

# Before transformers is imported (through model/): its start-up notice that PyTorch is missing reads
# like a failure, and this app needs no PyTorch.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import jax
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from gradio.utils import get_upload_folder

from model.errors import CheckpointError
from model.loading import (EMBEDDED_NAME, default_compilation_cache, enable_compilation_cache, in_hub_cache,
                           load_pipeline)
from model.options import Options
from model.pipeline import DEFAULT_STRENGTH, STRENGTH
from space import EXAMPLE_SEED, Models, Space

TITLE = "DALL·E mini in JAX/Flax"
DEFAULT_DESCRIPTION = "Type a prompt, get a 3x3 grid of images, best match first. The model runs right here."
CREDITS = "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0."
MAX_UPLOAD = "10mb"  # uploads (variations) beyond this are refused by the server before they reach the model
# Generated files live in Gradio's cache folder and are deleted this long after they were written.
OUTPUT_TTL_S = 3600
# The whole 3x3 grid fits a 1280x800 screen under the prompt: the gallery is at most 410 px wide.
# Small images (the embedded model's are 64 px) are enlarged without smoothing.
CSS = """
.gradio-container {max-width: 980px !important; margin: 0 auto !important}
#title {text-align: center; font-size: 0.9em}
#title h1 {margin: 0 0 0.2em 0}
#duplicate {margin: 0 auto}
.results {max-width: 410px; margin: 0 auto !important}
.results img {image-rendering: pixelated}
.results .grid-wrap {max-height: none; overflow-y: auto}  /* grow with the grid: all images visible */
#understands, #footer {font-size: 0.8em; opacity: 0.85}
#prompt-row {flex-wrap: nowrap}
/* A phone: no captions over small tiles, and tiles that may shrink below Gradio's 100 px minimum,
   which made three columns wider than the screen. */
@media (max-width: 600px) {.results .caption-label {display: none} #run {min-width: 64px !important}
  .results .grid-container {grid-template-columns: repeat(3, minmax(0, 1fr)) !important}}
"""


# -------------------------------------------------------------------------------------------------
# Page and API wiring


def _slider(knob, value, label=None):
    return gr.Slider(knob.low, knob.ui_high or knob.high, value=value, step=knob.step, label=label or knob.name,
                     info=knob.help, elem_id=knob.name)


def _footer(info: dict) -> str:
    limitations = info.get("limitations")
    if isinstance(limitations, (list, tuple)):
        limitations = " ".join(limitations)
    lines = [f"**Limitations.** {limitations}"] if limitations else []
    lines.append(f"{CREDITS} Text encoder, sampler, VQGAN and CLIP reranker in the style of "
                 "[DALL·E mini](https://github.com/borisdayma/dalle-mini), in JAX/Flax.")
    return "\n\n".join(lines)


def _results(prefix: str):
    """A tab's own status line, gallery and grid download, so each tab keeps its own results."""
    status = gr.Markdown("", elem_id=f"{prefix}status")
    gallery = gr.Gallery(show_label=False, columns=3, height="auto", format="png", object_fit="contain",
                         preview=False, allow_preview=True, elem_id=f"{prefix}gallery", elem_classes="results")
    download = gr.DownloadButton("Download the grid (PNG)", visible=False, size="sm", elem_id=f"{prefix}download")
    return status, gallery, download


def _number(name: str, whole: bool, help: str = "") -> gr.Number:
    """An API number input. precision=None always: Gradio would round 1.5 to 2 before model.options
    could refuse it; whole numbers are documented as integers instead (an instance's api_info, since
    a gr.Number subclass makes Gradio write a .pyi stub beside this file)."""
    number = gr.Number(None, label=name, info=help)
    if whole:
        number.api_info = lambda: {"type": "integer"}
    return number


def build_demo(space: Space) -> gr.Blocks:
    models = space.models
    defaults = models.defaults(models.primary)
    knobs = Options.knobs()
    # Batching: twice a batch's requests run their handlers at once (a batch sampling, the next one
    # gathering); the rest wait in the bounded queue, as without batching.
    limit = 2 * models.batch_requests if models.batching else models.concurrency * len(models.names)
    generating = {"concurrency_id": "generate", "concurrency_limit": limit}
    # No telemetry or version check: the app works offline and talks only to its own clients.
    with gr.Blocks(title=TITLE, delete_cache=(OUTPUT_TTL_S // 2, OUTPUT_TTL_S), analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{space.info.get('description', DEFAULT_DESCRIPTION)}", elem_id="title")
        if os.environ.get("SPACE_ID"):
            gr.DuplicateButton(elem_id="duplicate")
        with gr.Tabs():
            with gr.Tab("Text to image", elem_id="text-tab"):
                with gr.Row(equal_height=True, elem_id="prompt-row"):
                    prompt = gr.Textbox(show_label=False, placeholder="What do you want to see?", max_lines=1,
                                        scale=5, autofocus=True, elem_id="prompt", container=False)
                    run = gr.Button("Run", variant="primary", scale=1, min_width=70, elem_id="run")
                understands = space.info.get("understands")
                if understands:
                    gr.Markdown(understands, elem_id="understands")
                status, gallery, download = _results("")
            with gr.Tab("Variations", elem_id="variations-tab"):
                with gr.Row():
                    upload = gr.Image(type="filepath", label="image", sources=["upload", "clipboard"], height=200,
                                      elem_id="upload")
                    with gr.Column(scale=2):
                        vary_prompt = gr.Textbox(label="prompt (optional)", max_lines=1, elem_id="vary-prompt",
                                                 placeholder="Leave empty for variations of the image alone")
                        strength = gr.Slider(STRENGTH.low, STRENGTH.high, value=DEFAULT_STRENGTH, step=STRENGTH.step,
                                             label="strength", info=STRENGTH.help, elem_id="strength")
                        side = space.latent_size
                        keep_rows = gr.Slider(0, side, value=0, step=1, elem_id="keep-rows",
                                              label=f"keep_rows (top rows of image tokens kept exactly, of {side})")
                        vary = gr.Button("Make variations", variant="primary", elem_id="vary")
                vary_status, vary_gallery, vary_download = _results("vary-")
        with gr.Accordion("Advanced", open=False):
            model = gr.Dropdown([(models.label(name), name) for name in models.names], value=models.primary,
                                label="model", elem_id="model",
                                info="Models other than the first load on first use.")
            with gr.Row():
                num_images = _slider(knobs["num_images"], defaults.num_images)
                candidates = _slider(knobs["candidates"], defaults.candidates)
            with gr.Row():
                seed = gr.Number(EXAMPLE_SEED, label="seed", precision=0, minimum=knobs["seed"].low,
                                 maximum=knobs["seed"].high, elem_id="seed")
                randomize = gr.Checkbox(True, label="randomize seed", elem_id="randomize")
            with gr.Row():
                temperature = _slider(knobs["temperature"], defaults.temperature)
                top_k = _slider(knobs["top_k"], defaults.top_k)
            with gr.Row():
                top_p = _slider(knobs["top_p"], defaults.top_p)
                condition_scale = _slider(knobs["condition_scale"], defaults.condition_scale)
        examples = [[text] for text in space.info.get("examples", [])]
        if examples:
            # Not the download button: Gradio 6.31 fails to cache an example that updates one.
            gr.Examples(examples, inputs=[prompt], outputs=[gallery, seed, status], fn=space.run_example,
                        cache_examples=True, cache_mode="lazy", api_visibility="private", elem_id="examples")
        gr.Markdown(_footer(space.info) + f" Weights in {space.dtype}.", elem_id="footer")

        options = [num_images, candidates, seed, randomize, temperature, top_k, top_p, condition_scale]
        gr.on([run.click, prompt.submit], space.run, inputs=[prompt, model, *options],
              outputs=[gallery, seed, status, download], show_progress_on=[status], api_visibility="private",
              **generating)
        gr.on([vary.click, vary_prompt.submit], space.vary_page,
              inputs=[upload, vary_prompt, strength, keep_rows, model, *options],
              outputs=[vary_gallery, seed, vary_status, vary_download], show_progress_on=[vary_status],
              api_visibility="private",
              **generating)
        vary_prompt.change(space.strength_for_prompt, [vary_prompt, strength], strength, queue=False,
                           show_progress="hidden", api_visibility="private")
        model.change(space.model_defaults, model, [num_images, candidates, temperature, top_k, top_p, condition_scale],
                     queue=False, show_progress="hidden", api_visibility="private")

        # API-only inputs and outputs: hidden components named like the Python arguments, in the
        # positional order of model.options.Options.
        with gr.Column(visible=False):
            api_model = gr.Dropdown(models.names, value=models.primary, label="model")
            api_options = [_number(k.name, k.kind is int, k.help) for k in knobs.values()]
            api_files = gr.File(file_count="multiple", label="images")
            api_record = gr.JSON(label="record")
            gr.Button().click(space.generate, [gr.Textbox(label="prompt"), *api_options, api_model],
                              [api_files, api_record], api_name="generate", **generating)
            gr.Button().click(space.generate_batch, [gr.JSON(label="prompt"), *api_options, api_model],
                              [api_files, api_record], api_name="generate_batch", **generating)
            # The raw upload (gr.File, not gr.Image, which would re-encode it) so the pipeline sees and
            # checks exactly what was sent: animations, CMYK, sizes.
            gr.Button().click(space.variations,
                              [gr.File(label="image", type="filepath"), gr.Textbox(label="prompt"),
                               _number("keep_rows", True, "rows of image tokens kept from the top"), *api_options, api_model,
                               _number("strength", False, STRENGTH.help)],
                              [api_files, api_record], api_name="variations", **generating)
    return demo


# -------------------------------------------------------------------------------------------------
# Command line


def _request_validation_error(request, error):
    """FastAPI's answer to a malformed API body, minus the echoed input: echoing it made a lone
    surrogate in the body (valid JSON, not encodable as UTF-8) an HTTP 500 instead of a 422."""
    details = [{key: value for key, value in item.items() if key in ("loc", "msg", "type")} for item in error.errors()]
    return JSONResponse({"detail": jsonable_encoder(details)}, status_code=422)




def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=TITLE + ": the demo page and its API.")
    parser.add_argument("--model", default=env("DALLE_MODEL"),
                        help="model folder or published preset (mini, mega); default: the embedded model, or "
                             "on a Space (SPACE_ID set) mini when its files are in the local hub cache "
                             "[env DALLE_MODEL]")
    parser.add_argument("--hub-models", default=env("DALLE_HUB_MODELS", "mini,mega"),
                        help="comma-separated further choices, loaded on first use [env DALLE_HUB_MODELS]")
    parser.add_argument("--dtype", default=env("DALLE_DTYPE"), choices=["float32", "bfloat16", "float16"],
                        help="weights' precision; default: float32 on CPU, bfloat16 or float16 on accelerators "
                             "[env DALLE_DTYPE]")
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on [env GRADIO_SERVER_NAME]")
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")),
                        help="[env GRADIO_SERVER_PORT]")
    parser.add_argument("--queue-size", type=int, default=int(env("DALLE_QUEUE_SIZE", "64")),
                        help="requests waiting beyond this are turned away [env DALLE_QUEUE_SIZE]")
    parser.add_argument("--concurrency", type=int, default=int(env("DALLE_CONCURRENCY", "1")),
                        help="requests running at once per model [env DALLE_CONCURRENCY]")
    parser.add_argument("--batching", choices=["auto", "on", "off"], default=env("DALLE_BATCHING", "auto"),
                        help="on: concurrent requests for a model share its sampler steps (model/scheduler.py); "
                             "off: they take turns at --concurrency slots; auto: on for accelerators, off on "
                             "a CPU, where a step costs about as much per row shared as alone (docs/serving.md) "
                             "[env DALLE_BATCHING]")
    parser.add_argument("--batch-requests", type=int, default=int(env("DALLE_BATCH_REQUESTS", "4")),
                        help="with batching: requests sharing one batch [env DALLE_BATCH_REQUESTS]")
    parser.add_argument("--batch-rows", type=int, default=int(env("DALLE_BATCH_ROWS", "128")),
                        help="with batching: decoder rows (prompts x candidates) in one batch; a larger "
                             "request runs alone [env DALLE_BATCH_ROWS]")
    parser.add_argument("--per-caller", type=int, default=int(env("DALLE_PER_CALLER", "2")),
                        help="requests one caller (session, or address behind a proxy) may have waiting or "
                             "running; more are refused as busy [env DALLE_PER_CALLER]")
    parser.add_argument("--max-batch-prompts", type=int, default=int(env("DALLE_MAX_BATCH_PROMPTS", "8")),
                        help="prompts per /generate_batch call [env DALLE_MAX_BATCH_PROMPTS]")
    parser.add_argument("--compile-cache", default=env("JAX_COMPILATION_CACHE_DIR", str(default_compilation_cache())),
                        help="persistent XLA compilation cache folder, '' for none [env JAX_COMPILATION_CACHE_DIR]")
    args = parser.parse_args(argv)
    for name in ("queue_size", "concurrency", "max_batch_prompts", "batch_requests", "batch_rows", "per_caller"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    if args.compile_cache:
        # Start-up compiles dominate; cached on disk they take a fraction of the time.
        enable_compilation_cache(args.compile_cache)
    model = args.model
    if model is None and os.environ.get("SPACE_ID"):
        # On the Hub the page opens on mini when the Space's build preloaded it (README front matter:
        # preload_from_hub), on the embedded model otherwise; decided before loading, asking no network.
        model = "mini" if in_hub_cache("mini") else None
    try:
        print(f"Loading model {model or 'embedded'} ...", flush=True)
        primary = load_pipeline(model, compilation_cache=False, dtype=args.dtype,
                                progress=lambda line: print(line, flush=True))
        print("Warming up (compiling) ...", flush=True)
        primary.warmup()
    except CheckpointError as error:
        raise SystemExit(f"app.py: {error}") from None
    others = [name.strip() for name in args.hub_models.split(",") if name.strip()]
    if model == "mini" and args.model is None:
        others.append(EMBEDDED_NAME)  # opened on mini by default: the embedded model stays a choice
    batching = args.batching == "on" or (args.batching == "auto" and jax.default_backend() != "cpu")
    models = Models(primary, others, args.concurrency, dtype=args.dtype, batching=batching,
                    batch_rows=args.batch_rows, batch_requests=args.batch_requests)
    space = Space(models, args.max_batch_prompts, Path(get_upload_folder()) / "dalle-outputs",
                  per_caller=args.per_caller)
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
