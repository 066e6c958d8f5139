"""The Pipeline facade: prompt -> tokens -> DalleBart codes -> VQGAN pixels -> CLIP order.

    pipe = load_pipeline()                       # the embedded emoji-scenes model
    result = pipe.generate("a red apple on a blue background", num_images=9, seed=0)
    result.images[0]                             # PIL image with the best CLIP score

Every public method builds on one streaming generator (`generate_stream`), so previews, the final
result and batched calls share the same compiled functions. Shapes are padded to a few row counts
(`ROW_BUCKETS`) so a server compiles once per bucket, and sampling knobs are traced values: changing
them never recompiles.
"""

import ctypes
import dataclasses
import functools
import gc
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from model import bart as bart_lib
from model import sampling, sharding, xla_options
from model.checkpoint import load_clip, load_dalle_bart, load_vqgan, resolve_folder
from model.errors import CheckpointError, InvalidInputError
from model.text import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TextNormalizer,
    clip_preprocess,
    clip_tokenize,
    load_bart_tokenizer,
    tokenize_prompts,
)
from model.validation import (
    MAX_SEED,
    check_count,
    check_number,
    clean_image,
    clean_prompt,
    clean_prompts,
    fit_image,
)

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "emoji"
PIPELINE_FILE = "pipeline.json"
MAX_ROWS = 128  # sampled images per call (prompts x candidates): bounds memory per request

# Published models: (hub repo, revision) per stage. Revisions pin what the loaders were written for;
# the VQGAN revision is the one the dalle-mini inference notebook pins.
PRESETS = {
    "mini": {
        "bart": ("dalle-mini/dalle-mini", None),
        "vqgan": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"),
        "clip": ("openai/clip-vit-base-patch32", None),
    },
    "mega": {
        "bart": ("dalle-mini/dalle-mega", None),
        "vqgan": ("dalle-mini/vqgan_imagenet_f16_16384", "e93a26e7707683d349bf5d5c41c5b0ef69b677a9"),
        "clip": ("openai/clip-vit-base-patch32", None),
    },
}

# Sampled rows are padded up to one of these counts, so a server compiles a handful of shapes.
# 9 is here because a 3x3 grid is the product's default.
ROW_BUCKETS = (1, 2, 4, 8, 9, 12, 16, 24, 32, 48, 64, 96, 128)
# Decoding runs in chunks of this many steps whether or not previews are asked for, so
# `generate` and `generate_stream` share one compiled loop.
CHUNK_STEPS = 32


@dataclasses.dataclass(frozen=True)
class Defaults:
    """Per-model sampling defaults, read from the model folder's pipeline.json (upstream's here)."""

    num_images: int = 9
    candidates: int = 9  # sampled per prompt before CLIP keeps the best num_images
    temperature: float = 1.0
    top_k: int = 50  # 0 = off
    top_p: float = 1.0  # 1 = off
    condition_scale: float = 10.0  # 1 = no super-conditioning

    @classmethod
    def from_dict(cls, d: dict) -> "Defaults":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclasses.dataclass
class GenerationResult:
    """The images of one prompt, best CLIP score first."""

    prompt: str
    images: list  # PIL.Image, RGB
    scores: list  # CLIP logit per image, descending
    seed: int  # the seed used (random when none was given)
    codes: np.ndarray  # [num_images, image_length] int32 VQGAN codes, same order as images
    parameters: dict  # every sampling knob as used, defaults filled in


@dataclasses.dataclass
class Preview:
    """Progress while sampling: images decoded from the codes so far (unsampled rows blank)."""

    step: int  # codes sampled per image so far
    total: int  # image_length
    images: list  # per prompt: list of PIL images (the first num_images candidates)


@dataclasses.dataclass
class Progress:
    """A chunk of codes sampled (streams with `yield_progress`): a point where a consumer may stop."""

    step: int  # codes sampled per image so far
    total: int  # image_length


def _bucket(rows: int, multiple: int) -> int:
    """The smallest bucket >= rows that the data-parallel device count divides."""
    for size in ROW_BUCKETS:
        if size >= rows and size % multiple == 0:
            return size
    return -(-rows // multiple) * multiple


class Pipeline:
    """Text-to-image with super-conditioned DalleBart sampling, VQGAN decoding and CLIP reranking."""

    def __init__(self, *, bart, bart_params, bart_tokenizer, vqgan, vqgan_params, clip, clip_params,
                 clip_tokenizer, clip_image_size=None, clip_mean=OPENAI_CLIP_MEAN, clip_std=OPENAI_CLIP_STD,
                 normalizer=None, defaults=Defaults(), name="custom", info=None, mesh=None):
        self.name = name
        self.info = info or {}
        self.defaults = defaults
        self.bart_config = bart.config
        self.vqgan_config = vqgan.config
        self.clip_config = clip.config
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
        self.clip_tokenizer = clip_tokenizer
        self.normalizer = normalizer
        self.clip_image_size = clip_image_size or clip.config.vision_config.image_size
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.mesh = mesh
        # Already placed on `mesh` and in the per-layer layout decode_step reads (bart.decoding_params):
        # load_pipeline builds that layout before it loads the other stages (see there).
        self.bart_params = bart_params
        self.vqgan_params = sharding.place_params(vqgan_params, mesh)
        self.clip_params = sharding.place_params(clip_params, mesh)
        self._data_devices = sharding.data_size(mesh)

        cfg = self.bart_config
        # Built once: the sampler takes step_fn as a static argument and keys its compile cache on it.
        self._step_fn = functools.partial(bart_lib.decode_step, config=cfg)
        jit = functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
        self._encode = jit(functools.partial(bart_lib.encode, config=cfg))
        self._init_cache = jit(self._rows_cache)
        self._decode_images = jit(functools.partial(_decode_images, vqgan))
        self._clip_scores = jit(functools.partial(_clip_scores, clip))
        self._clip_image_features = jit(lambda p, x: clip.apply({"params": p}, x, method="get_image_features"))
        self._encode_image = jit(lambda p, x: vqgan.apply({"params": p}, x, method="encode")[1])

    # -------------------------------------------------------------------------------------------
    # Public API

    def generate(self, prompt, num_images=None, seed=None, temperature=None, top_k=None, top_p=None,
                 condition_scale=None, candidates=None, on_progress=None):
        """Images for a prompt (a `GenerationResult`) or a list of prompts (a list of them, one batch).

        Arguments left as None take the model's defaults (`pipe.defaults`). `candidates` >
        `num_images` samples that many per prompt and keeps the best by CLIP.
        """
        for item in self.generate_stream(prompt, num_images, seed, temperature, top_k, top_p,
                                         condition_scale, candidates, preview_every=None,
                                         on_progress=on_progress):
            result = item
        return result

    def generate_stream(self, prompt, num_images=None, seed=None, temperature=None, top_k=None,
                        top_p=None, condition_scale=None, candidates=None, preview_every=64,
                        on_progress=None, yield_progress=False) -> Iterator:
        """Yields `Preview`s every `preview_every` sampled codes (None: no previews), then the result
        (a `GenerationResult`, or a list of them when `prompt` is a list).

        `on_progress(step, total)` is called after every chunk of sampled codes (for progress bars).
        `yield_progress`: also yield a `Progress` after each chunk that yields no preview, so a consumer can
        stop the work between chunks by closing the stream (the app does when its client goes away).
        """
        prompts, single = clean_prompts(prompt)
        knobs = self.resolve_parameters(num_images=num_images, seed=seed, temperature=temperature,
                                        top_k=top_k, top_p=top_p, condition_scale=condition_scale,
                                        candidates=candidates)
        results = yield from self._stream(prompts, knobs, knobs["condition_scale"] != 1.0, preview_every, on_progress,
                                          yield_progress)
        yield results[0] if single else results

    def vary(self, image, prompt=None, keep_rows=None, num_images=None, seed=None, temperature=None, top_k=None,
             top_p=None, condition_scale=None, candidates=None, on_progress=None):
        """Variations of an image: its top `keep_rows` rows of codes kept exactly, the rest sampled.

        With a prompt the rest follows the prompt (super-conditioned) and CLIP ranks by the prompt;
        without one the rest is sampled unconditionally and ranked by CLIP image similarity to
        `image` (scores are then cosine similarities). keep_rows defaults to half the code rows;
        0 with a prompt is plain text-to-image.
        """
        for item in self.vary_stream(image, prompt, keep_rows, num_images, seed, temperature, top_k, top_p,
                                     condition_scale, candidates, preview_every=None, on_progress=on_progress):
            result = item
        return result

    def vary_stream(self, image, prompt=None, keep_rows=None, num_images=None, seed=None, temperature=None,
                    top_k=None, top_p=None, condition_scale=None, candidates=None, preview_every=64,
                    on_progress=None, yield_progress=False) -> Iterator:
        """`vary` with `Preview`s every `preview_every` codes (and `Progress` as in `generate_stream`),
        then the `GenerationResult`."""
        side = self.vqgan_config.latent_size
        keep_rows = side // 2 if keep_rows is None else check_count("keep_rows", keep_rows, 0, side)
        upload = clean_image(image)
        prompts = [clean_prompt(prompt)] if prompt is not None and str(prompt).strip() else None
        knobs = self.resolve_parameters(num_images=num_images, seed=seed, temperature=temperature,
                                        top_k=top_k, top_p=top_p, condition_scale=condition_scale,
                                        candidates=candidates)
        knobs["keep_rows"] = keep_rows
        codes = self.encode_image(upload)
        use_guidance = prompts is not None and knobs["condition_scale"] != 1.0
        results = yield from self._stream(prompts or [""], knobs, use_guidance, preview_every, on_progress,
                                          yield_progress, prefix=codes, prefix_length=keep_rows * side,
                                          reference=None if prompts else upload)
        yield results[0]

    def encode_image(self, image) -> np.ndarray:
        """An image (PIL or uint8 array) -> its VQGAN codes [image_length], centre-cropped and resized
        to the model's resolution."""
        pixels = fit_image(clean_image(image), self.vqgan_config.resolution)
        return sharding.to_host(self._encode_image(self.vqgan_params, pixels[None].astype(np.float32) / 255.0))[0]

    def decode_codes(self, codes) -> list:
        """VQGAN codes [n, image_length] -> PIL images (e.g. the reconstruction of an encoded image)."""
        codes = np.atleast_2d(np.asarray(codes, np.int32))
        return [Image.fromarray(image) for image in self._pixels(codes)]

    def _stream(self, prompts, knobs, use_guidance, preview_every, on_progress, yield_progress=False, prefix=None,
                prefix_length=0, reference=None):
        """Samples knobs["candidates"] images per prompt (optionally continuing `prefix` codes), yields
        previews, and returns the reranked results (by `reference` image similarity when given)."""
        cfg = self.bart_config
        per_prompt = knobs["candidates"]
        rows = len(prompts) * per_prompt
        if rows > MAX_ROWS:
            raise InvalidInputError(f"Too many images in one call: {len(prompts)} prompts x {per_prompt} candidates "
                                    f"= {rows}; at most {MAX_ROWS}.")
        padded = _bucket(rows, self._data_devices)

        # 1. Text -> encoder states, prompts and the empty (unconditional) prompt in one batch.
        ids, mask = self._tokenize(prompts)
        states = self._encode(self.bart_params, ids, mask)
        # 2. One decoder row per candidate (padding rows repeat the last prompt and are dropped).
        prompt_of_row = np.minimum(np.arange(padded) // per_prompt, len(prompts) - 1)
        row_index = np.concatenate([prompt_of_row, np.full(padded, len(prompts))]) if use_guidance else prompt_of_row
        cache = self._init_cache(self.bart_params, states, jnp.asarray(mask), jnp.asarray(row_index, jnp.int32))
        cache = sharding.shard_rows(cache, self.mesh)  # every cache array has its rows first
        # 3. Sample codes in chunks; per-prompt keys make each prompt's images independent of the batch.
        # Padding rows (discarded) reuse the first prompt's keys.
        prompt_keys = sampling.row_keys(knobs["seed"], max(per_prompt, padded - rows))
        keys = jnp.concatenate([prompt_keys[:per_prompt]] * len(prompts) + [prompt_keys[: padded - rows]])
        if prefix is not None:
            prefix = np.broadcast_to(np.asarray(prefix, np.int32), (padded, cfg.image_length))
        state = sampling.init_sampler(cache, sharding.shard_rows(keys, self.mesh), batch=padded,
                                      image_length=cfg.image_length, start_token=cfg.decoder_start_token_id,
                                      prefix=None if prefix is None else sharding.shard_rows(jnp.asarray(prefix), self.mesh),
                                      prefix_length=prefix_length)
        sampler_knobs = sampling.sampling_knobs(padded, temperature=knobs["temperature"], top_k=knobs["top_k"],
                                                top_p=knobs["top_p"], condition_scale=knobs["condition_scale"])
        next_preview = preview_every
        for start in range(0, cfg.image_length, CHUNK_STEPS):
            steps = min(CHUNK_STEPS, cfg.image_length - start)
            state = sampling.sample_codes_chunk(
                self._step_fn, self.bart_params, state, sampler_knobs, num_steps=steps,
                num_real_codes=self.vqgan_config.n_embed, use_guidance=use_guidance)
            done = start + steps
            if on_progress is not None:
                on_progress(done, cfg.image_length)
            if preview_every and done >= next_preview and done < cfg.image_length:
                next_preview += preview_every
                yield self._preview(state.codes, done, len(prompts), per_prompt, knobs["num_images"])
            elif yield_progress and done < cfg.image_length:
                yield Progress(step=done, total=cfg.image_length)
        codes = sharding.to_host(state.codes)[:rows]
        # The decoder's cache (0.5 GiB for a 3x3 grid at mini size) goes before VQGAN and CLIP run.
        del state
        _return_freed_memory()
        # 4. Pixels, then CLIP scores of each image against its own prompt (or the reference image).
        pixels = self._pixels(codes)
        if reference is None:
            scores = self._score(prompts, pixels, per_prompt)
        else:
            scores = self._image_similarity(reference, pixels)
        results = []
        for p, text in enumerate(prompts):
            block = slice(p * per_prompt, (p + 1) * per_prompt)
            # Stable sort: ties keep sampling order, so results are reproducible.
            order = np.argsort(-scores[block], kind="stable")[: knobs["num_images"]]
            results.append(GenerationResult(
                prompt=text,
                images=[Image.fromarray(image) for image in pixels[block][order]],
                scores=[float(s) for s in scores[block][order]],
                seed=knobs["seed"],
                codes=codes[block][order],
                parameters=dict(knobs),
            ))
        _return_freed_memory()
        return results

    def resolve_parameters(self, **given) -> dict:
        """The sampling knobs, checked (InvalidInputError), with the model's defaults filled in and a
        random seed drawn when none is given. Candidates below num_images are raised to it."""
        d = self.defaults
        knobs = {name: check_number(name, getattr(d, name) if given.get(name) is None else given[name])
                 for name in ("num_images", "candidates", "temperature", "top_k", "top_p", "condition_scale")}
        knobs["candidates"] = max(knobs["candidates"], knobs["num_images"])
        seed = given.get("seed")
        knobs["seed"] = random.SystemRandom().randint(0, MAX_SEED) if seed is None else check_number("seed", seed)
        return knobs

    def warmup(self, num_images=None, candidates=None):
        """Compiles every stage for the default request shape (JAX caches it on disk, see startup).

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

    def _tokenize(self, prompts):
        normalize = self.normalizer
        ids, mask = tokenize_prompts(self.bart_tokenizer, prompts, self.bart_config.max_text_length, normalize)
        # The unconditional row: the empty prompt, never normalized (as upstream).
        empty_ids, empty_mask = tokenize_prompts(self.bart_tokenizer, [""], self.bart_config.max_text_length)
        return jnp.asarray(np.concatenate([ids, empty_ids])), jnp.asarray(np.concatenate([mask, empty_mask]))

    def _rows_cache(self, params, states, mask, row_index):
        """Decoder cache for rows picked from the encoded prompts: states [P+1, T, d] -> rows."""
        return bart_lib.init_decode_cache(params, states, mask, self.bart_config, rows=row_index)

    def _pixels(self, codes: np.ndarray) -> np.ndarray:
        """codes [n, image_length] -> uint8 images [n, H, W, 3], one image per device at a time: on CPU
        a batch of 9 decoded ~12% slower per image than single images and held 0.84 GiB of
        activations instead of 0.09 GiB."""
        step = self._data_devices
        padded = -(-len(codes) // step) * step
        batch = np.concatenate([codes, np.repeat(codes[-1:], padded - len(codes), axis=0)])
        images = [sharding.to_host(self._decode_images(self.vqgan_params,
                                                       sharding.shard_rows(jnp.asarray(batch[i:i + step]), self.mesh)))
                  for i in range(0, padded, step)]
        return np.concatenate(images)[: len(codes)]  # a new, writable array: previews paint over it

    def _score(self, prompts, pixels: np.ndarray, per_prompt: int) -> np.ndarray:
        """CLIP logit of every image [P * per_prompt] against its own prompt."""
        max_length = self.clip_config.text_config.max_position_embeddings
        ids, mask = clip_tokenize(self.clip_tokenizer, prompts, max_length)
        values = clip_preprocess(list(pixels), self.clip_image_size, self.clip_mean, self.clip_std)
        padded = _bucket(len(values), self._data_devices)
        values = np.concatenate([values, np.repeat(values[-1:], padded - len(values), axis=0)])
        logits = sharding.to_host(self._clip_scores(self.clip_params, jnp.asarray(ids), jnp.asarray(mask),
                                              sharding.shard_rows(jnp.asarray(values), self.mesh)))
        own_prompt = np.arange(len(pixels)) // per_prompt
        return logits[np.arange(len(pixels)), own_prompt]

    def _image_similarity(self, reference: Image.Image, pixels: np.ndarray) -> np.ndarray:
        """Cosine similarity of CLIP image embeddings: each of `pixels` [n, H, W, 3] vs `reference`."""
        values = clip_preprocess([reference, *pixels], self.clip_image_size, self.clip_mean, self.clip_std)
        padded = _bucket(len(values), self._data_devices)
        values = np.concatenate([values, np.repeat(values[-1:], padded - len(values), axis=0)])
        features = sharding.to_host(self._clip_image_features(self.clip_params,
                                                              sharding.shard_rows(jnp.asarray(values), self.mesh)))
        features = features / np.linalg.norm(features, axis=-1, keepdims=True)
        return features[1: len(pixels) + 1] @ features[0]

    def _preview(self, codes, step, num_prompts, per_prompt, num_images) -> Preview:
        """Decodes the first num_images candidates of each prompt; token rows not sampled yet are blank."""
        codes = sharding.to_host(codes)
        shown = np.concatenate([np.arange(p * per_prompt, p * per_prompt + num_images) for p in range(num_prompts)])
        pixels = self._pixels(codes[shown])
        side = self.vqgan_config.latent_size
        finished_rows = step // side
        cut = finished_rows * self.vqgan_config.downsample_factor
        pixels[:, cut:] = 255
        images = [Image.fromarray(image) for image in pixels]
        return Preview(step=step, total=self.bart_config.image_length,
                       images=[images[p * num_images:(p + 1) * num_images] for p in range(num_prompts)])


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Images of one size side by side in rows (a square-ish grid by default: 9 -> 3x3)."""
    columns = columns or int(np.ceil(np.sqrt(len(images))))
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def default_compilation_cache() -> Path:
    """$XDG_CACHE_HOME/dalle-flax/jax (~/.cache/dalle-flax/jax)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dalle-flax" / "jax"


def enable_compilation_cache(folder=None) -> Path:
    """Turns on JAX's persistent compilation cache (start-up in seconds instead of recompiling)."""
    folder = Path(folder or default_compilation_cache())
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every compile: the decode loop is small to compile but paid at each start otherwise.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def _decode_images(vqgan, params, codes):
    """codes [n, image_length] -> uint8 [n, H, W, 3], clipped to [0, 1] as upstream."""
    images = vqgan.apply({"params": params}, codes, method="decode_code")
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _clip_scores(clip, params, input_ids, attention_mask, pixel_values):
    """logits_per_image [n_images, n_prompts]."""
    return clip.apply({"params": params}, input_ids, pixel_values, attention_mask).logits_per_image


# -----------------------------------------------------------------------------------------------
# Loading


def _read_pipeline_file(folder: Path) -> dict:
    file = folder / PIPELINE_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None


def _clip_preprocessing(folder: Path, clip_config) -> tuple[int, tuple, tuple]:
    """Image size, mean and std from a preprocessor_config.json, else OpenAI's for the config's size."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return clip_config.vision_config.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    d = json.loads(file.read_text(encoding="utf-8"))
    size = d.get("crop_size", clip_config.vision_config.image_size)
    size = size.get("height", clip_config.vision_config.image_size) if isinstance(size, dict) else size
    return int(size), tuple(d.get("image_mean", OPENAI_CLIP_MEAN)), tuple(d.get("image_std", OPENAI_CLIP_STD))


def _load_tokenizer(folder: Path, what: str):
    """The tokenizer of the class the folder's tokenizer_config.json names, as AutoTokenizer loads it for
    a CLIP folder. AutoTokenizer itself is imported only when no class is named: importing it imports
    torch wherever torch is installed (transformers' config module does), and torch stays resident:
    0.18 GiB, 7% of the mini pipeline's weights."""
    import transformers

    try:
        named = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object: AutoTokenizer reports it
        named = None
    tokenizer_class = getattr(transformers, named, None) if isinstance(named, str) else None
    if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase)):
        tokenizer_class = transformers.AutoTokenizer
    try:
        return tokenizer_class.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder}: cannot read the {what} tokenizer ({error}).") from None


def load_pipeline(name_or_path=None, mesh=None, compilation_cache=True) -> Pipeline:
    """The embedded emoji model (no argument), a published preset ("mini", "mega") or a folder with
    bart/, vqgan/, clip/ sub-folders (and optionally pipeline.json with defaults).

    `mesh`: a `jax.sharding.Mesh` (see `model.sharding.make_mesh`) to spread rows, and optionally
    DalleBart's weights, over several devices; None uses one device.
    `compilation_cache`: turn on JAX's persistent compilation cache (see enable_compilation_cache).
    """
    if compilation_cache:
        enable_compilation_cache()
    if name_or_path is None:
        if not (EMBEDDED_MODEL / "bart" / "config.json").is_file():
            raise CheckpointError(f"The embedded model is missing: {EMBEDDED_MODEL} holds no bart/config.json.")
        name_or_path = EMBEDDED_MODEL
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
        folders = {stage: resolve_folder(repo, revision) for stage, (repo, revision) in preset.items()}
        info, name = {"name": name_or_path}, name_or_path
    else:
        root = Path(name_or_path)
        if not root.is_dir():
            raise CheckpointError(f"No model folder at {root}; give a folder with bart/, vqgan/ and clip/, "
                                  f"or one of {sorted(PRESETS)}.")
        folders = {stage: root / stage for stage in ("bart", "vqgan", "clip")}
        for stage, folder in folders.items():
            if not folder.is_dir():
                raise CheckpointError(f"{root} has no {stage}/ sub-folder.")
        info = _read_pipeline_file(root)
        name = info.get("name", root.name)

    bart, bart_params = load_dalle_bart(folders["bart"])
    # Only the decoding layout is kept, so the decoder's weights are in memory once. Building it copies
    # the decoder while the loaded stack still exists (0.7 GiB at mini size): built before the other
    # stages load, that copy stays below the memory the loaded pipeline holds.
    bart_params = bart_lib.decoding_params(sharding.place_params(bart_params, mesh, model_parallel_rules=True))
    vqgan, vqgan_params = load_vqgan(folders["vqgan"])
    clip, clip_params = load_clip(folders["clip"])
    word_file = folders["bart"] / "enwiki-words-frequency.txt"
    normalizer = TextNormalizer(word_file if word_file.is_file() else None) if bart.config.normalize_text else None
    size, mean, std = _clip_preprocessing(folders["clip"], clip.config)
    pipeline = Pipeline(
        bart=bart, bart_params=bart_params, bart_tokenizer=load_bart_tokenizer(folders["bart"]),
        vqgan=vqgan, vqgan_params=vqgan_params,
        clip=clip, clip_params=clip_params, clip_tokenizer=_load_tokenizer(folders["clip"], "CLIP"),
        clip_image_size=size, clip_mean=mean, clip_std=std, normalizer=normalizer,
        defaults=Defaults.from_dict(info.get("defaults", {})), name=name, info=info, mesh=mesh,
    )
    del bart_params
    gc.collect()
    _return_freed_memory()
    return pipeline


def _return_freed_memory() -> None:
    """Hands freed buffers back to the OS, which glibc keeps otherwise: the loaders' (~0.2 GiB at mini
    size), and in a call the decoder's cache and XLA's buffers. Those are spread over several malloc
    arenas (one per allocating thread) and were reused so poorly that, untrimmed, each 3x3 call at
    mini size peaked higher than the one before (3.96, 4.19, 4.52 GiB). A trim takes ~10-40 ms."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
