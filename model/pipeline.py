"""The Pipeline facade: prompt -> tokens -> DalleBart codes -> VQGAN pixels -> CLIP order.

    pipe = load_pipeline()                       # the embedded emoji-scenes model (model/loading.py)
    result = pipe.generate("a red apple on a blue background", seed=0)
    result.images[0]                             # PIL image with the best CLIP score

Every call goes the same way: `request(...)` checks what the caller gave (prompts, image, options)
once (`check_inputs`, then `complete` with the model's defaults) and returns a `Request`;
`run(request)` samples it, yielding a `Progress` after every chunk of
image tokens (with preview images when asked) and then the result. `generate`, `vary` and `stream`
are thin calls over those two. Shapes are padded to a few row counts (sharding.ROW_BUCKETS) so a
server compiles once per bucket, and the sampling knobs are traced values: changing them never
recompiles.
"""

import ctypes
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from model import bart as bart_lib
from model import bart_decode, batching, sharding, xla_options
from model.clip_rank import Reranker, float32_params
from model.errors import CheckpointError, InvalidInputError
from model.options import Knob, Options, check_count
from model.text import tokenize_prompts
from model.validation import clean_image, clean_prompt, clean_prompts, fit_image

MAX_ROWS = 128  # sampled images per call (prompts x candidates): bounds memory per request
# Decoding runs in chunks of this many steps: the points where progress is reported and where a
# consumer may stop the work by closing the stream.
CHUNK_STEPS = 32
# Variations: the share of image tokens taken from the upload (model.sampling), 0..1.
STRENGTH = Knob("strength", float, 0.0, 1.0, "how closely variations follow the upload: 0 = ignore it, "
                "1 = reproduce it", step=0.05)
# Variations given neither keep_rows nor strength: no rows kept and the strength for their kind
# (measured on the emoji model, docs/variations.md): without a prompt the upload is the only source of
# what to draw, so more of it is kept; with one, the prompt overrules the codes it rules out (a new
# background or object) wherever they are. keep_rows alone keeps its old meaning (strength 0).
DEFAULT_STRENGTH = 0.7  # no prompt
DEFAULT_EDIT_STRENGTH = 0.5  # with a prompt


@dataclasses.dataclass(frozen=True)
class Request:
    """One call's work, checked: made by `Pipeline.request`, run by `Pipeline.run`."""

    prompts: tuple[str, ...]  # empty for variations without a prompt
    options: Options  # resolved: the seed is set and candidates >= num_images
    single: bool = True  # the prompt was one text: the result is one GenerationResult, not a list
    image: Image.Image | None = None  # variations: the upload, RGB
    keep_rows: int = 0  # variations: rows of the upload's image tokens kept as they are
    strength: float = 0.0  # variations: share of the other tokens copied from the upload (0 = none, 1 = all)
    readings: tuple = ()  # per prompt, its model's prompt reader's caption (None: nothing known); () no reader
    backdrops: tuple = ()  # per prompt, None or the picture drawn instead when the reader knows nothing in it

    @property
    def texts(self) -> tuple[str, ...]:
        """What the model reads for each prompt: the reader's caption, else the prompt as written."""
        return tuple(r or p for r, p in zip(self.readings, self.prompts)) if self.readings else self.prompts


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a caller gave, checked as far as it can be without a model (see `check_inputs`)."""

    prompts: tuple[str, ...]
    single: bool
    image: Image.Image | None
    keep_rows: object  # checked against the model's rows of image tokens by Pipeline.complete
    options: dict  # the options given, checked (model.options.Options.check)
    strength: float | None = None  # variations: checked, None = not given


def check_inputs(prompt=None, *, image=None, keep_rows=None, strength=None, **options) -> Inputs:
    """Prompts, upload and options checked once, before any model is needed (so a front end can refuse
    a typo before a minute-long load): InvalidInputError names the first bad input."""
    if image is None:
        for name, value in (("keep_rows", keep_rows), ("strength", strength)):
            if value is not None:
                raise InvalidInputError(f"{name} applies to variations of an image; give an image too.")
        prompts, single = clean_prompts(prompt)
        upload = None
    else:
        upload = clean_image(image)
        prompts, single = ([clean_prompt(prompt)] if prompt is not None and str(prompt).strip() else []), True
    strength = None if strength is None else STRENGTH.check(strength)
    return Inputs(tuple(prompts), single, upload, keep_rows, Options.check(**options), strength)


@dataclasses.dataclass
class GenerationResult:
    """The images of one prompt, best score first."""

    prompt: str  # "" for variations without a prompt
    images: list  # PIL.Image, RGB
    scores: list  # per image, descending, on the scale `score_kind` names (model.clip_rank)
    seed: int  # the seed used (random when none was given)
    codes: np.ndarray  # [num_images, image_length] int32 VQGAN codes, same order as images
    parameters: dict  # every option as used, defaults filled in (keep_rows, strength too for variations)
    score_kind: str = "clip_logit"  # or "image_similarity" (variations without a prompt)
    read_as: str = ""  # the caption the model drew, when its prompt reader rewrote `prompt`
    understood: bool = True  # False: the model's prompt reader found nothing it knows in `prompt` (see backdrop)


@dataclasses.dataclass
class Progress:
    """A chunk of image tokens sampled: a point where a consumer may stop by closing the stream."""

    step: int  # tokens sampled per image so far
    total: int  # image_length
    images: list | None = None  # a preview when one was due: per prompt, its first num_images candidates


class Pipeline:
    """Text-to-image with super-conditioned DalleBart sampling, VQGAN decoding and CLIP reranking."""

    def __init__(self, *, bart, bart_params, bart_tokenizer, vqgan, vqgan_params, reranker: Reranker,
                 normalizer=None, reader=None, backdrop=None, defaults=Options(), name="custom", info=None,
                 mesh=None, dtype="float32"):
        self.name = name
        self.dtype = str(dtype)  # the weights' precision on the device (load_pipeline's dtype)
        self.info = info or {}
        self.defaults = defaults
        self.bart_config = bart.config
        self.vqgan_config = vqgan.config
        if self.bart_config.image_length != self.vqgan_config.num_codes:
            raise CheckpointError(
                f"DalleBart makes {self.bart_config.image_length} codes per image but the VQGAN decodes "
                f"{self.vqgan_config.num_codes}: the two stages do not belong together."
            )
        if self.bart_config.image_vocab_size < self.vqgan_config.n_embed:
            raise CheckpointError(
                f"DalleBart predicts {self.bart_config.image_vocab_size} codes but the VQGAN codebook has "
                f"{self.vqgan_config.n_embed}."
            )
        self.bart_tokenizer = bart_tokenizer
        self.normalizer = normalizer
        # A model's prompt reader (model.data.reading for the emoji model): text -> the caption it was
        # trained on, or None to use the text as written. Set to None to send prompts unchanged.
        self.reader = reader
        # With a reader: text -> the picture drawn for a prompt in which the reader finds nothing it knows
        # (the emoji model: its background alone), since the model would draw shapeless blobs.
        self.backdrop = backdrop
        self.reranker = reranker
        self.mesh = mesh
        # Already placed on `mesh` and in the per-layer layout decode_step reads (bart_decode.decoding_params):
        # load_pipeline builds that layout before it loads the other stages (see there).
        self.bart_params = bart_params
        self.vqgan_params = sharding.place_params(vqgan_params, mesh)
        self._data_devices = sharding.data_size(mesh)

        cfg = self.bart_config
        # Built once: the sampler takes step_fn as a static argument and keys its compile cache on it.
        self._step_fn = functools.partial(bart_decode.decode_step, config=cfg)
        jit = functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
        self._encode = jit(functools.partial(bart_lib.encode, config=cfg))
        self._init_cache = jit(functools.partial(bart_decode.init_decode_cache, config=cfg))
        # The VQGAN computes in float32 whatever precision its weights are stored in (docs/precision.md).
        self._decode_images = jit(lambda p, codes: _decode_images(vqgan, float32_params(p), codes))
        self._encode_image = jit(lambda p, x: vqgan.apply({"params": float32_params(p)}, x, method="encode")[1])

    # -------------------------------------------------------------------------------------------
    # Public API

    def generate(self, prompt, **options):
        """Images for a prompt (a `GenerationResult`) or a list of prompts (a list of them, one batch).

        Options (model.options.Options) left out take the model's defaults (`pipe.defaults`);
        `candidates` > `num_images` samples that many per prompt and keeps the best by CLIP.
        """
        return _last(self.run(self.request(prompt, **options)))

    def vary(self, image, prompt=None, keep_rows=None, strength=None, **options) -> GenerationResult:
        """Variations of an image: its top `keep_rows` rows of codes kept exactly, and every other code
        copied from the upload with probability `strength` (0..1), else sampled in context; with a
        prompt, codes the prompt rules out are not copied. 0 ignores the upload, 1 reproduces it
        (model.sampling).

        With a prompt the sampling follows the prompt (super-conditioned) and CLIP ranks by the prompt;
        without one it is unconditional and ranked by CLIP image similarity to `image`. Neither given:
        keep_rows 0 and strength DEFAULT_STRENGTH (DEFAULT_EDIT_STRENGTH with a prompt); only keep_rows
        given: strength 0 (the rest sampled freely); only strength given: keep_rows 0. keep_rows 0 and
        strength 0 with a prompt is plain text-to-image (same seed, same codes), without one
        unconditional generation.
        """
        return _last(self.run(self.request(prompt, image=image, keep_rows=keep_rows, strength=strength, **options)))

    def stream(self, prompt=None, *, image=None, keep_rows=None, strength=None, preview_every=None,
               **options) -> Iterator:
        """`generate` (or `vary`, given an image) as a stream: a `Progress` after every chunk of
        sampled tokens, with preview images every `preview_every` tokens, then the result."""
        return self.run(self.request(prompt, image=image, keep_rows=keep_rows, strength=strength, **options),
                        preview_every)

    def request(self, prompt=None, *, image=None, keep_rows=None, strength=None, **options) -> Request:
        """Checks a call's inputs once (InvalidInputError naming the first bad one) and completes them
        with the model's defaults and, when none is given, a random seed."""
        return self.complete(check_inputs(prompt, image=image, keep_rows=keep_rows, strength=strength, **options))

    def complete(self, inputs: Inputs) -> Request:
        """Inputs checked without a model (`check_inputs`) -> this model's Request: keep_rows within its
        rows of image tokens, its defaults for the options not given, the seed drawn if needed."""
        keep_rows, strength = 0, 0.0
        if inputs.image is not None:
            side = self.vqgan_config.latent_size
            if inputs.keep_rows is not None:
                keep_rows = check_count("keep_rows", inputs.keep_rows, 0, side)
            if inputs.strength is not None:
                strength = inputs.strength
            elif inputs.keep_rows is None:
                strength = DEFAULT_EDIT_STRENGTH if inputs.prompts else DEFAULT_STRENGTH
        resolved = dataclasses.replace(self.defaults, **inputs.options).resolved()
        rows = max(len(inputs.prompts), 1) * resolved.candidates
        if rows > MAX_ROWS:
            raise InvalidInputError(f"Too many images in one call: {max(len(inputs.prompts), 1)} prompts x "
                                    f"{resolved.candidates} candidates = {rows}; at most {MAX_ROWS}.")
        readings = tuple(self.reader(p) for p in inputs.prompts) if self.reader else ()
        backdrops = ()
        if self.backdrop and inputs.image is None and None in readings:
            backdrops = tuple(self.backdrop(p) if r is None else None for p, r in zip(inputs.prompts, readings))
        return Request(inputs.prompts, resolved, inputs.single, inputs.image, keep_rows, strength, readings,
                       backdrops)

    def read(self, prompt: str) -> str:
        """The text the model reads for `prompt` (see `reader`)."""
        return (self.reader(prompt) if self.reader else None) or prompt

    def run(self, request: Request, preview_every: int | None = None, previews_after_s: float = 0.0) -> Iterator:
        """Samples a checked request: yields a `Progress` after every chunk of tokens (with preview
        images every `preview_every` tokens, once sampling has taken `previews_after_s` seconds; None:
        none), then the result (a `GenerationResult`, or a list of them for a list of prompts)."""
        results = yield from self._sample(request, preview_every, previews_after_s)
        yield answer(request, results)

    def encode_image(self, image) -> np.ndarray:
        """An image (PIL or uint8 array) -> its VQGAN codes [image_length], centre-cropped and resized
        to the model's resolution."""
        return self._image_codes(clean_image(image))

    def decode_codes(self, codes) -> list:
        """VQGAN codes [n, image_length] -> PIL images (e.g. the reconstruction of an encoded image)."""
        codes = np.atleast_2d(np.asarray(codes, np.int32))
        return [Image.fromarray(image) for image in self._pixels(codes)]

    def warmup(self, num_images=None, candidates=None):
        """Compiles every stage for the default request shape (JAX caches it on disk, see loading).

        condition_scale 1 samples without the unconditional rows, a separately compiled sampler; a
        model whose default is 1 (the embedded one: a grid takes about a second) also compiles the
        guided one, so moving the slider off 1 never waits for a compilation. Models whose default
        guides (mini, mega) skip the unguided one, which would cost a whole extra generation.
        """
        result = self.generate("warm-up", num_images=num_images, candidates=candidates, seed=0)
        if self.defaults.condition_scale == 1.0:
            self.generate("warm-up", num_images=num_images, candidates=candidates, seed=0, condition_scale=2.0)
        return result

    # -------------------------------------------------------------------------------------------
    # Steps

    def _sample(self, request: Request, preview_every, previews_after_s=0.0):
        """Samples `candidates` images per prompt (continuing the upload's kept rows for variations),
        yields progress, and returns the reranked results, one per prompt."""
        batch = batching.start(self, [request])
        previews = Previews(preview_every, previews_after_s)
        while batch.done < batch.image_length:
            batching.step(self, batch, CHUNK_STEPS)
            codes = batch.host_codes()[batch.spans[0]] if previews.due(batch.done, batch.image_length) else None
            yield Progress(step=batch.done, total=batch.image_length,
                           images=None if codes is None else self.preview(request, codes, batch.done))
        codes = batch.host_codes()[batch.spans[0]]
        batch.close()
        return_freed_memory()
        return self.finish(request, codes)

    def preview(self, request: Request, codes: np.ndarray, step: int) -> list:
        """Preview images of a request's rows of codes after `step` tokens (see `_preview`)."""
        options = request.options
        return self._preview(codes, step, max(len(request.prompts), 1), options.candidates, options.num_images)

    def finish(self, request: Request, codes: np.ndarray) -> list:
        """A request's sampled codes [rows, image_length] -> its results, one per prompt: pixels, then
        scores (CLIP against each image's own prompt, or against the upload), best first."""
        options, per_prompt = request.options, request.options.candidates
        prompts, texts = list(request.prompts) or [""], list(request.texts) or [""]
        pixels = self._pixels(codes)
        for p, backdrop in enumerate(request.backdrops):
            if backdrop is not None:  # shown as it is: the VQGAN, which never saw an empty scene, frays its edges
                pixels[p * per_prompt:(p + 1) * per_prompt] = np.asarray(backdrop.resize(pixels.shape[2:0:-1]))
        if request.prompts:
            scores, score_kind = self.reranker.by_prompt(texts, pixels, per_prompt), "clip_logit"
        else:
            scores, score_kind = self.reranker.by_image(request.image, pixels), "image_similarity"
        parameters = options.to_dict() | ({"keep_rows": request.keep_rows, "strength": request.strength}
                                          if request.image is not None else {})
        results = []
        for p, text in enumerate(prompts):
            block = slice(p * per_prompt, (p + 1) * per_prompt)
            # Stable sort: ties keep sampling order, so results are reproducible.
            order = np.argsort(-scores[block], kind="stable")[: options.num_images]
            results.append(GenerationResult(
                prompt=text,
                images=[Image.fromarray(image) for image in pixels[block][order]],
                scores=[float(s) for s in scores[block][order]],
                seed=options.seed,
                codes=codes[block][order],
                parameters=dict(parameters),
                score_kind=score_kind,
                read_as=texts[p] if texts[p] != text else "",
                understood=not request.readings or request.readings[p] is not None,
            ))
        return_freed_memory()
        return results

    def _image_codes(self, upload: Image.Image) -> np.ndarray:
        pixels = fit_image(upload, self.vqgan_config.resolution)
        return sharding.to_host(self._encode_image(self.vqgan_params, pixels[None].astype(np.float32) / 255.0))[0]

    def _tokenize(self, prompts):
        ids, mask = tokenize_prompts(self.bart_tokenizer, prompts, self.bart_config.max_text_length, self.normalizer)
        # The unconditional row: the empty prompt, never normalized (as upstream).
        empty_ids, empty_mask = tokenize_prompts(self.bart_tokenizer, [""], self.bart_config.max_text_length)
        return jnp.asarray(np.concatenate([ids, empty_ids])), jnp.asarray(np.concatenate([mask, empty_mask]))

    def _pixels(self, codes: np.ndarray) -> np.ndarray:
        """codes [n, image_length] -> uint8 images [n, H, W, 3], one image per device at a time: on CPU
        batches of images decoded no faster per image and held far more activation memory."""
        step = self._data_devices
        padded = -(-len(codes) // step) * step
        batch = np.concatenate([codes, np.repeat(codes[-1:], padded - len(codes), axis=0)])
        images = [sharding.to_host(self._decode_images(self.vqgan_params,
                                                       sharding.shard_rows(jnp.asarray(batch[i:i + step]), self.mesh)))
                  for i in range(0, padded, step)]
        return np.concatenate(images)[: len(codes)]  # a new, writable array: previews paint over it

    def _preview(self, codes, step, num_prompts, per_prompt, num_images) -> list:
        """The first num_images candidates of each prompt with their finished rows of tokens decoded;
        the rest is blank. The rows not sampled yet repeat the last finished row while decoding, so
        what shows comes from decided tokens only (zeros there bled a colour of their own upward)."""
        codes = sharding.to_host(codes)
        shown = np.concatenate([np.arange(p * per_prompt, p * per_prompt + num_images) for p in range(num_prompts)])
        side = self.vqgan_config.latent_size
        finished_rows = step // side
        grid = codes[shown].reshape(len(shown), side, side)
        if finished_rows:
            grid[:, finished_rows:] = grid[:, finished_rows - 1: finished_rows]
        pixels = self._pixels(grid.reshape(len(shown), -1))
        pixels[:, finished_rows * self.vqgan_config.downsample_factor:] = 255
        images = [Image.fromarray(image) for image in pixels]
        return [images[p * num_images:(p + 1) * num_images] for p in range(num_prompts)]


def answer(request: Request, results: list):
    """What `run` yields last: one GenerationResult for one prompt, the list for a list of prompts."""
    return results[0] if request.single else results


class Previews:
    """When a stream shows a preview: every `every` tokens (None: never), once sampling has taken
    `after_s` seconds (a short run's final images come before a preview would help)."""

    def __init__(self, every: int | None, after_s: float = 0.0):
        self.every, self.next, self.after_s = every, every, after_s
        self.started = time.perf_counter()

    def due(self, done: int, total: int) -> bool:
        if not self.every or not self.next <= done < total:
            return False
        self.next += self.every
        return time.perf_counter() - self.started >= self.after_s


def _last(stream):
    for item in stream:
        result = item
    return result


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side in rows (a square-ish grid by default: 9 -> 3x3)."""
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def _decode_images(vqgan, params, codes):
    """codes [n, image_length] -> uint8 [n, H, W, 3], clipped to [0, 1] as upstream."""
    images = vqgan.apply({"params": params}, codes, method="decode_code")
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def return_freed_memory() -> None:
    """Hands freed buffers back to the OS, which glibc keeps otherwise: the loaders', and in a call the
    decoder's cache and XLA's buffers. Those are spread over several malloc arenas (one per
    allocating thread) and were reused so poorly that, untrimmed, each call at mini size peaked
    higher than the one before. A trim takes tens of milliseconds."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
