"""Device memory a pipeline needs, known before any weight is loaded.

    need = estimate(DalleBartConfig.mega(), VQGANConfig(), CLIPConfig(), "float16", images=9)
    need.total  # bytes: weights + the largest stage (KV cache + sampling temporaries, VQGAN, CLIP)

- weights: every parameter's shape x its stored size (model.checkpoint.cast_weight: matrices in
  `dtype`, vectors float32), DalleBart in the decoding layout the pipeline keeps
  (bart_decode.decoding_params: padded widths, no teacher-forcing stack), VQGAN and CLIP whole.
- cache: the KV cache of `init_decode_cache` for the rows sampled at once (with super-conditioning
  two decoder rows per image: a 3x3 grid is 18 rows), freed before the VQGAN and CLIP run.
- temporaries: XLA's own figure (`compile().memory_analysis().temp_size_in_bytes`) for the three
  stages, lowered from `jax.ShapeDtypeStruct`s (nothing allocated): a sampling chunk
  (pipeline.CHUNK_STEPS decode steps), the VQGAN decoding one image, CLIP scoring the images. The
  stages run one after another, so the largest (sampling: with the cache) counts. Compiled for the CPU backend when no other is
  given: a GPU's fusions differ, so the figure is an estimate (docs/precision.md).

`estimate(..., measure=False)` skips the compiles (seconds for mini, a minute for mega on a CPU) and
bounds the temporaries from the shapes instead (`bound_temporaries`); load_pipeline uses that.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import bart, bart_decode, sampling, vqgan
from model.checkpoint import cast_weight
from model.clip import CLIP, CLIPConfig
from model.clip_rank import float32_params
from model.pipeline import CHUNK_STEPS, _decode_images
from model.sharding import bucket_rows

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device. `parts` breaks weights and temporaries down by stage."""

    dtype: str
    images: int
    decoder_rows: int
    weights: int
    cache: int
    temporaries: int
    parts: dict

    @property
    def total(self) -> int:
        """Weights, plus the larger of sampling (cache and its temporaries) and the later stages: the
        pipeline frees the cache before the VQGAN and CLIP run."""
        temps = self.parts["temporaries"]
        return self.weights + max(self.cache + temps["sampling"], temps["vqgan"], temps["clip"])

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def _stored(shapes, dtype):
    """ShapeDtypeStructs of a parameter tree as load_pipeline stores it in `dtype`."""
    def leaf(s):
        stored = cast_weight(np.zeros((0,) * len(s.shape), s.dtype), dtype).dtype  # the dtype rule only
        return jax.ShapeDtypeStruct(tuple(s.shape), stored)
    return jax.tree_util.tree_map(leaf, shapes)


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def bart_decoding_shapes(config: bart.DalleBartConfig, dtype):
    """The decoding layout's parameter tree (ShapeDtypeStructs) of a DalleBart stored in `dtype`."""
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), bart.param_shapes(config),
                                    is_leaf=lambda x: isinstance(x, tuple))
    return jax.eval_shape(bart_decode.decoding_params, _stored(shapes, dtype))


def clip_shapes(config: CLIPConfig):
    text = jax.ShapeDtypeStruct((1, config.text_config.max_position_embeddings), jnp.int32)
    size = config.vision_config.image_size
    pixels = jax.ShapeDtypeStruct((1, size, size, config.vision_config.num_channels), jnp.float32)
    return jax.eval_shape(CLIP(config).init, jax.random.key(0), text, pixels, text)["params"]


def _sampler_inputs(config, params, rows: int, guidance: bool):
    """Abstract (state, knobs) of one sampling chunk over `rows` images."""
    prompts = 2 if guidance else 1
    states = jax.ShapeDtypeStruct((prompts, config.max_text_length, config.d_model), jnp.float32)
    mask = jax.ShapeDtypeStruct((prompts, config.max_text_length), jnp.int32)
    cache_rows = jax.ShapeDtypeStruct((2 * rows if guidance else rows,), jnp.int32)
    cache = jax.eval_shape(lambda p, s, m, r: bart_decode.init_decode_cache(p, s, m, config, rows=r),
                           params, states, mask, cache_rows)
    state = jax.eval_shape(lambda c: sampling.init_sampler(c, 0, batch=rows, image_length=config.image_length,
                                                           start_token=config.decoder_start_token_id), cache)
    knobs = jax.eval_shape(lambda: sampling.sampling_knobs(rows, temperature=1.0, top_k=50, condition_scale=10.0))
    return cache, state, knobs


def decode_chunk_temporaries(config, params, rows: int, guidance: bool = True, num_real_codes: int = 16384) -> int:
    """XLA's temporaries of one sampling chunk (the pipeline's jitted loop of CHUNK_STEPS steps)."""
    _, state, knobs = _sampler_inputs(config, params, rows, guidance)
    step_fn = functools.partial(bart_decode.decode_step, config=config)
    lowered = sampling._run_steps_jit().lower(step_fn, params, state, knobs, min(CHUNK_STEPS, config.image_length),
                                              min(num_real_codes, config.image_vocab_size), guidance)
    return int(lowered.compile().memory_analysis().temp_size_in_bytes)


@functools.cache
def _float32_chunk_temporaries(config, rows: int, guidance: bool) -> int:
    return decode_chunk_temporaries(config, bart_decoding_shapes(config, jnp.float32), rows, guidance)


def vqgan_temporaries(config: vqgan.VQGANConfig, params) -> int:
    """XLA's temporaries of the pipeline's VQGAN decoding of one image (float32 compute)."""
    module = vqgan.VQGAN(config)
    codes = jax.ShapeDtypeStruct((1, config.num_codes), jnp.int32)
    fn = jax.jit(lambda p, c: _decode_images(module, float32_params(p), c))
    return int(fn.lower(params, codes).compile().memory_analysis().temp_size_in_bytes)


def clip_temporaries(config: CLIPConfig, params, images: int, prompts: int = 1) -> int:
    """XLA's temporaries of CLIP scoring `images` (padded as the Reranker pads) against `prompts`."""
    module = CLIP(config)
    size = config.vision_config.image_size
    ids = jax.ShapeDtypeStruct((prompts, config.text_config.max_position_embeddings), jnp.int32)
    pixels = jax.ShapeDtypeStruct((bucket_rows(images), size, size, 3), jnp.float32)
    fn = jax.jit(lambda p, i, m, x: module.apply({"params": float32_params(p)}, i, x, m).logits_per_image)
    return int(fn.lower(params, ids, ids, pixels).compile().memory_analysis().temp_size_in_bytes)


def _param_count(shapes) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def bound_temporaries(bart_config, vq_config, clip_config, rows: int, guidance: bool = True) -> dict:
    """Upper bounds of the stages' temporaries from shapes alone (no compile), for load_pipeline's check.

    Sampling: 16 float32 [cache rows, vocab] arrays (logits, guidance, filtering, Gumbel noise) and
    16 per cache row of the widest layer activation. VQGAN and CLIP: their weights widened to float32
    (float32_params) plus 6 (VQGAN) or 16 (CLIP, per image) float32 copies of their largest activation.
    tests/test_memory.py and benchmarks/memory.py check them against XLA's figures."""
    cache_rows = 2 * rows if guidance else rows
    widest = max(bart_config.decoder_ffn_dim, bart_config.d_model)
    sampling_bytes = 4 * 16 * cache_rows * (bart_config.image_vocab_size + 1 + widest)
    largest_map = max((vq_config.resolution // 2 ** i) ** 2 * vq_config.ch * m for i, m in enumerate(vq_config.ch_mult))
    vq_bytes = 4 * _param_count(vqgan.param_shapes(vq_config)) + 4 * 6 * largest_map
    vision, text = clip_config.vision_config, clip_config.text_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    largest_activation = max(tokens * max(vision.intermediate_size, vision.hidden_size),
                             text.max_position_embeddings * max(text.intermediate_size, text.hidden_size),
                             vision.num_attention_heads * tokens ** 2)
    clip_bytes = 4 * _param_count(clip_shapes(clip_config)) + 4 * 16 * bucket_rows(rows) * largest_activation
    return {"sampling": sampling_bytes, "vqgan": vq_bytes, "clip": clip_bytes}


def estimate(bart_config, vq_config, clip_config, dtype="float32", images: int = 1, guidance: bool = True,
             measure: bool = True) -> MemoryEstimate:
    """Device bytes to sample `images` images at once (padded to the pipeline's row buckets) with the
    three stages' weights stored in `dtype`; `measure` compiles each stage for XLA's temporaries."""
    dtype = jnp.dtype(dtype)
    rows = bucket_rows(images)
    bart_params = bart_decoding_shapes(bart_config, dtype)
    vq_params = _stored(vqgan.param_shapes(vq_config), dtype)
    clip_params = _stored(clip_shapes(clip_config), dtype)
    cache, _, _ = _sampler_inputs(bart_config, bart_params, rows, guidance)
    weights = {"bart": _nbytes(bart_params), "vqgan": _nbytes(vq_params), "clip": _nbytes(clip_params)}
    if measure:
        # The sampler is compiled with float32 weights whatever `dtype` is: XLA's CPU backend widens
        # half-precision matmul weights to float32 (temporaries of ~the whole decoder, 0.9 GB for mini)
        # where a GPU multiplies them as they are, and the activations are float32 in both (bart.dense).
        temps = {"sampling": _float32_chunk_temporaries(bart_config, rows, guidance),
                 "vqgan": vqgan_temporaries(vq_config, vq_params),
                 "clip": clip_temporaries(clip_config, clip_params, images)}
    else:
        temps = bound_temporaries(bart_config, vq_config, clip_config, rows, guidance)
    return MemoryEstimate(dtype=dtype.name, images=images, decoder_rows=2 * rows if guidance else rows,
                          weights=sum(weights.values()), cache=_nbytes(cache), temporaries=max(temps.values()),
                          parts={"weights": weights, "temporaries": temps})
