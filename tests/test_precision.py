"""Half precision (load_pipeline's dtype) against float32: the same models, weights rounded to bfloat16 or
float16 as the loaders store them, compared number by number.

Models: the tiny random pipeline (support/tiny.py), the embedded trained model (checkpoints/emoji), and
a random DalleBart of mini's widths (d_model 1024, 16 heads, GLU 2730, both vocabularies) with 2+2
layers instead of 12+12 to keep CPU time low. Thresholds are those of docs/precision.md; each
assertion message carries the measured figure. `pytest -s tests/test_precision.py` prints them all.

Top-1 agreement is measured where the context is the model's own (codes the float32 embedded model
sampled for real prompts). Random weights give near-flat logits (mini-shaped: std 0.64 over 16,385
codes, so the best two are often within bfloat16's rounding of each other); there the sampler's
distribution is compared instead (total variation), with agreement reported and held to 95%.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import bart as bart_lib
from model import bart_decode
from model.checkpoint import cast_weight, load_clip, load_dalle_bart, load_vqgan
from model.clip_rank import float32_params
from model.data import scenes
from model.loading import EMBEDDED_MODEL, default_dtype, resolve_dtype
from model.errors import InvalidInputError
from model.pipeline import _decode_images
from support.tiny import write_tiny_pipeline

HALF = ("bfloat16", "float16")
MIN_TOP1 = 0.99  # top-1 agreement of half-precision logits with float32 (trained model, own context)
MIN_TOP1_RANDOM = 0.95  # the same for random weights (near-flat logits)
MAX_TV = 0.05  # total variation between the float32 and half-precision next-code distributions
MIN_PSNR = 40.0  # dB, VQGAN pixels in [0, 1] against float32


def _cast(params, dtype):
    """What the loaders store: weight matrices in `dtype`, vectors float32 (checkpoint.cast_weight)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(cast_weight(np.asarray(x), jnp.dtype(dtype))), params)


def _report(name, **figures):
    print(f"\n{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def mini_shaped():
    config = bart_lib.DalleBartConfig.mini(encoder_layers=2, decoder_layers=2)
    text = jnp.zeros((1, config.max_text_length), jnp.int32)
    image = jnp.zeros((1, config.image_length), jnp.int32)
    params = jax.jit(bart_lib.DalleBart(config).init)(jax.random.key(0), text, text, image)["params"]
    return config, params


@pytest.fixture(scope="module")
def embedded_inputs():
    """Prompts and codes the float32 embedded model sampled for them: teacher forcing on its own context."""
    from model.loading import load_pipeline
    from model.text import tokenize_prompts

    pipe = load_pipeline()
    prompts = ["three apples on a purple background", "a fox to the left of a butterfly on a blue background",
               "two rockets on a black background", "a large green frog in the center"]
    results = pipe.generate(prompts, seed=0, num_images=1, candidates=1)
    ids, mask = tokenize_prompts(pipe.bart_tokenizer, prompts, pipe.bart_config.max_text_length, pipe.normalizer)
    codes = np.stack([r.codes[0] for r in results])[:, :-1]
    start = np.full((len(prompts), 1), pipe.bart_config.decoder_start_token_id)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(np.concatenate([start, codes], axis=1), jnp.int32)


def _bart_inputs(config, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    length = min(config.max_text_length, 24)
    ids = np.zeros((rows, config.max_text_length), np.int32)
    ids[:, :length] = rng.integers(4, config.encoder_vocab_size, (rows, length))
    mask = (np.arange(config.max_text_length) < length)[None].repeat(rows, 0).astype(np.int32)
    codes = rng.integers(0, config.image_vocab_size, (rows, config.image_length - 1))
    decoder_ids = np.concatenate([np.full((rows, 1), config.decoder_start_token_id), codes], axis=1).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(decoder_ids)


@functools.cache
def _teacher_forced(config):
    return jax.jit(lambda p, ids, mask, dec: bart_lib.decode(p, bart_lib.encode(p, ids, mask, config), mask, dec, config))


def _compare_logits(name, reference, half, min_top1):
    """Max abs error, top-1 agreement and total variation over real image codes (the sampler never
    draws the others)."""
    assert half.dtype == jnp.float32, f"{name}: logits reach the sampler as {half.dtype}, not float32"
    reference, half = reference[..., :-1], half[..., :-1]
    error = float(jnp.max(jnp.abs(half - reference)))
    agree = float(jnp.mean(jnp.argmax(half, -1) == jnp.argmax(reference, -1)))
    tv = float(jnp.max(0.5 * jnp.sum(jnp.abs(jax.nn.softmax(half) - jax.nn.softmax(reference)), -1)))
    spread = float(jnp.std(reference))
    _report(name, max_abs_error=error, logit_std=spread, top1_agreement=agree, max_total_variation=tv,
            positions=int(np.prod(reference.shape[:-1])))
    assert np.isfinite(error) and error < 0.1 * spread + 0.05, f"{name}: max abs error {error:.4g} (logit std {spread:.3g})"
    assert tv <= MAX_TV, f"{name}: total variation {tv:.4g} > {MAX_TV} (max abs error {error:.4g})"
    assert agree >= min_top1, f"{name}: top-1 agreement {agree:.2%} < {min_top1:.0%} (max abs error {error:.4g})"


def _bart_cases(tiny, mini_shaped, embedded_inputs):
    module, params = load_dalle_bart(tiny / "bart")
    yield "tiny", module, params, _bart_inputs(module.config), MIN_TOP1_RANDOM
    module, params = load_dalle_bart(EMBEDDED_MODEL / "bart")
    yield "embedded", module, params, embedded_inputs, MIN_TOP1
    config, params = mini_shaped
    yield "mini-shaped", bart_lib.DalleBart(config), params, _bart_inputs(config), MIN_TOP1_RANDOM


@pytest.mark.parametrize("dtype", HALF)
def test_teacher_forced_logits_match_float32(tiny, mini_shaped, embedded_inputs, dtype):
    for name, module, params, inputs, min_top1 in _bart_cases(tiny, mini_shaped, embedded_inputs):
        run = _teacher_forced(module.config)
        _compare_logits(f"teacher-forced {name} {dtype}", run(params, *inputs), run(_cast(params, dtype), *inputs),
                        min_top1)


def _cached_logits(config, params, inputs, steps):
    """Logits of the first `steps` positions by cached decoding (the sampler's path), teacher-forced."""
    ids, mask, decoder_ids = inputs
    params = bart_decode.decoding_params(params)
    cache = bart_decode.init_decode_cache(params, bart_lib.encode(params, ids, mask, config), mask, config)
    step = jax.jit(functools.partial(bart_decode.decode_step, config=config))
    logits = []
    for position in range(steps):
        out, cache = step(params, cache, decoder_ids[:, position], jnp.int32(position))
        logits.append(out)
    return jnp.stack(logits, axis=1), cache


@pytest.mark.parametrize("dtype", HALF)
def test_cached_decode_logits_match_float32(tiny, mini_shaped, embedded_inputs, dtype):
    for name, module, params, inputs, min_top1 in _bart_cases(tiny, mini_shaped, embedded_inputs):
        config = module.config
        steps = min(config.image_length, 72)  # past the first self-attention cache segment
        reference, _ = _cached_logits(config, params, inputs, steps)
        half, cache = _cached_logits(config, _cast(params, dtype), inputs, steps)
        assert cache["layers"][0]["self_keys"][0].dtype == jnp.dtype(dtype), "the KV cache is not in the weights' dtype"
        _compare_logits(f"cached decode {name} {dtype}", reference, half, min_top1)


def _psnr(a, b) -> float:
    mse = float(np.mean((np.clip(a, 0, 1) - np.clip(b, 0, 1)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.mark.parametrize("dtype", HALF)
def test_vqgan_pixels_match_float32(tiny, dtype):
    """The pipeline's VQGAN: half-precision weights, float32 math (float32_params)."""
    for name, folder in (("tiny", tiny / "vqgan"), ("embedded", EMBEDDED_MODEL / "vqgan")):
        module, params = load_vqgan(folder)
        _, half = load_vqgan(folder, dtype=dtype)
        assert {x.dtype for x in jax.tree_util.tree_leaves(half) if x.ndim >= 2} == {jnp.dtype(dtype)}
        codes = jnp.asarray(np.random.default_rng(0).integers(0, module.config.n_embed, (4, module.config.num_codes)),
                            jnp.int32)
        decode = jax.jit(lambda p, c: module.apply({"params": float32_params(p)}, c, method="decode_code"))
        psnr = _psnr(np.asarray(decode(params, codes)), np.asarray(decode(half, codes)))
        _report(f"VQGAN {name} {dtype}", psnr_db=psnr)
        assert psnr >= MIN_PSNR, f"VQGAN {name} at {dtype}: PSNR {psnr:.1f} dB < {MIN_PSNR} dB"
        uint8 = jax.jit(lambda p, c: _decode_images(module, float32_params(p), c))
        differ = float(np.mean(np.asarray(uint8(params, codes)) != np.asarray(uint8(half, codes))))
        _report(f"VQGAN {name} {dtype} uint8", pixels_changed=differ)


@pytest.mark.parametrize("dtype", HALF)
def test_clip_ranking_order_unchanged(dtype):
    """The embedded CLIP ranks 8 scenes against 4 prompts in the same order with half-precision weights."""
    from model.clip_rank import Reranker
    from model.loading import _clip_preprocessing
    from model.text import load_clip_tokenizer

    folder = EMBEDDED_MODEL / "clip"
    rng = np.random.default_rng(0)
    images = [np.asarray(scenes.render(scenes.sample_scene(rng, "heldout_backgrounds"))) for _ in range(8)]
    prompts = ["three apples on a purple background", "a fox to the left of a butterfly", "two rockets on a black "
               "background", "a large green frog in the center on a white background"]
    scores = {}
    for d in ("float32", dtype):
        clip, params = load_clip(folder, dtype=None if d == "float32" else d)
        size, mean, std = _clip_preprocessing(folder, clip.config)
        reranker = Reranker(clip, params, load_clip_tokenizer(folder), image_size=size, mean=mean, std=std)
        scores[d] = reranker.logits(prompts, images)
    error = float(np.max(np.abs(scores[dtype] - scores["float32"])))
    _report(f"CLIP {dtype}", max_abs_logit_error=error)
    order = lambda s: np.argsort(-s, axis=0, kind="stable")  # noqa: E731  images per prompt, best first
    np.testing.assert_array_equal(order(scores[dtype]), order(scores["float32"]),
                                  err_msg=f"CLIP ranking changed at {dtype} (max logit error {error:.4g})")


def test_default_dtype_per_device():
    assert default_dtype("cpu") == "float32"
    assert default_dtype("tpu") == "bfloat16"
    assert default_dtype("gpu", "8.0") == "bfloat16"  # A100
    assert default_dtype("gpu", "9.0") == "bfloat16"  # H100
    assert default_dtype("gpu", "8.6") == "bfloat16"  # A10G
    assert default_dtype("gpu", "7.5") == "float16"  # T4
    assert default_dtype("gpu", "6.0") == "float16"  # P100
    assert default_dtype("gpu", None) == "float16"


def test_resolve_dtype_accepts_names_and_dtypes_and_refuses_others():
    assert resolve_dtype(None) == "float32"  # this CPU
    assert resolve_dtype("bfloat16") == resolve_dtype(jnp.bfloat16) == "bfloat16"
    assert resolve_dtype(np.float16) == resolve_dtype("float16") == "float16"
    assert resolve_dtype(np.dtype("float32")) == "float32"
    for bad in ("float64", "int8", "fp16", "half-ish", 3):
        with pytest.raises(InvalidInputError, match="float32, bfloat16, float16"):
            resolve_dtype(bad)
