"""DalleBart: parity with min-dalle (an independent PyTorch implementation of the published
models), cached decoding vs teacher forcing, the published parameter trees, and config.json."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from model import bart, bart_decode
from model.bart import DalleBart, DalleBartConfig
from model.errors import UnsupportedOptionError
from support.min_dalle_port import MIN_DALLE_IMAGE_POSITIONS, min_dalle_decoder, min_dalle_encoder

TINY = DalleBartConfig(
    d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=100, image_vocab_size=100,
    max_text_length=16, image_length=24,
)
TOLERANCE = 1e-5


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def random_params(config: DalleBartConfig, seed: int) -> dict:
    """Random values on the module's own tree. Every norm scale/bias is random and nonzero;
    embeddings are small (std 0.02, as trained), so the embedding LayerNorm divides a small
    variance and its epsilon shows; kernels are ~1/sqrt(fan_in) so attention is far from uniform."""
    shapes = jax.eval_shape(DalleBart(config).init, jax.random.key(0), *example_inputs(config, 1))["params"]
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        noise = rng.standard_normal(leaf.shape)
        if path[-1] == "scale":
            value = 1 + 0.5 * noise
        elif path[-1] == "bias":
            value = 0.5 * noise
        elif path[-1] == "embedding":
            value = 0.02 * noise
        else:
            value = noise / math.sqrt(leaf.shape[-2])
        params[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(params)


def example_inputs(config: DalleBartConfig, batch: int, seed: int = 0):
    """Prompts padded with id 1 to max_text_length (mask 0 there), and a teacher-forced image
    sequence [start, c0, ...] of image_length ids."""
    rng = np.random.default_rng(seed)
    length = config.max_text_length
    ids = np.ones((batch, length), np.int32)
    for row in range(batch):
        used = 3 + (row * 5) % (length - 3)
        ids[row, :used] = np.concatenate([[0], rng.integers(3, config.encoder_vocab_size, used - 2), [2]])
    decoder_ids = rng.integers(0, config.image_vocab_size, (batch, config.image_length)).astype(np.int32)
    decoder_ids[:, 0] = config.decoder_start_token_id
    return jnp.asarray(ids), jnp.asarray((ids != 1).astype(np.int32)), jnp.asarray(decoder_ids)


def decode_all_steps(config, params, input_ids, attention_mask, decoder_ids):
    """Cached decoding of every position inside one jitted lax.scan, as a sampler runs it; params in
    upstream's tree or bart_decode.decoding_params' layout."""

    @jax.jit
    def run(params, input_ids, attention_mask, decoder_ids):
        states = bart.encode(params, input_ids, attention_mask, config)
        cache = bart_decode.init_decode_cache(params, states, attention_mask, config)

        def step(cache, position):
            tokens = decoder_ids[:, position]
            logits, cache = bart_decode.decode_step(params, cache, tokens, position, config)
            return cache, logits

        _, logits = jax.lax.scan(step, cache, jnp.arange(decoder_ids.shape[1], dtype=jnp.int32))
        return jnp.swapaxes(logits, 0, 1)  # [b, S, V + 1]

    return run(params, input_ids, attention_mask, decoder_ids)


def test_matches_min_dalle():
    model = DalleBart(TINY)
    params = random_params(TINY, seed=1)
    # min-dalle's encoder takes exactly two rows, and its decoder feeds the same image tokens to
    # both (its conditional and unconditional rows).
    input_ids, attention_mask, decoder_ids = example_inputs(TINY, batch=2)
    decoder_ids = jnp.tile(decoder_ids[:1], (2, 1))
    length = TINY.image_length

    encoder = min_dalle_encoder(params, TINY)
    decoder = min_dalle_decoder(params, TINY)
    text = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    text_visible = text.not_equal(1)[:, None, None, :]
    prev = torch.tensor(np.asarray(decoder_ids[:1]), dtype=torch.long)
    with torch.no_grad():
        ref_states = encoder(text)
        # Several tokens per call: min-dalle attends causally among them and ignores the buffer.
        buffer = torch.zeros(TINY.decoder_layers, 4, MIN_DALLE_IMAGE_POSITIONS, TINY.d_model)
        ref_logits = decoder(text_visible, ref_states, buffer, prev, torch.arange(length))[0]
        # min-dalle's own decoding loop: one token per call, keys/values kept in the buffer.
        buffer = torch.zeros(TINY.decoder_layers, 4, MIN_DALLE_IMAGE_POSITIONS, TINY.d_model)
        ref_step_logits = []
        for i in range(length):
            logits, buffer = decoder(text_visible, ref_states, buffer, prev[:, [i]], torch.tensor([i]))
            ref_step_logits.append(logits[:, 0])
        ref_step_logits = torch.stack(ref_step_logits, 1)

    states = model.apply({"params": params}, input_ids, attention_mask, method="encode")
    logits = model.apply({"params": params}, input_ids, attention_mask, decoder_ids)
    step_logits = decode_all_steps(TINY, params, input_ids, attention_mask, decoder_ids)

    errors = {
        "encoder": relative_error(states, ref_states.numpy()),
        "teacher-forced logits": relative_error(logits, ref_logits.numpy()),
        "cached-step logits": relative_error(step_logits, ref_step_logits.numpy()),
    }
    print("relative errors vs min-dalle:", errors)
    assert all(error <= TOLERANCE for error in errors.values()), errors


@pytest.mark.parametrize("layout", ["upstream tree", "decoding_params"])
def test_cached_decoding_matches_teacher_forcing(layout):
    model = DalleBart(TINY)
    params = random_params(TINY, seed=2)
    input_ids, attention_mask, decoder_ids = example_inputs(TINY, batch=3, seed=3)
    logits = model.apply({"params": params}, input_ids, attention_mask, decoder_ids)
    # TINY's GLU (48) and lm_head (101) widths are not multiples of MATMUL_WIDTH_MULTIPLE: the
    # decoding layout pads them, and the padding must not show in the logits.
    decoding = bart_decode.decoding_params(params) if layout == "decoding_params" else params
    step_logits = decode_all_steps(TINY, decoding, input_ids, attention_mask, decoder_ids)
    assert logits.shape == step_logits.shape == (3, TINY.image_length, TINY.image_vocab_size + 1)
    error = relative_error(step_logits, logits)
    print(f"cached ({layout}) vs teacher-forced relative error:", error)
    assert error <= TOLERANCE


MINI, MEGA = DalleBartConfig.mini(), DalleBartConfig.mega()

# Layer parameter paths of the published scanned flax_model.msgpack (reference.md §1).
LAYER_PATHS = [
    "LayerNorm_0/bias", "LayerNorm_1/scale", "LayerNorm_1/bias",
    "GLU_0/LayerNorm_0/bias", "GLU_0/Dense_0/kernel", "GLU_0/Dense_1/kernel", "GLU_0/LayerNorm_1/bias",
    "GLU_0/Dense_2/kernel",
] + [f"FlaxBartAttention_0/{name}/kernel" for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
DECODER_ONLY_LAYER_PATHS = ["LayerNorm_2/bias", "LayerNorm_3/scale", "LayerNorm_3/bias"] + [
    f"FlaxBartAttention_1/{name}/kernel" for name in ("q_proj", "k_proj", "v_proj", "out_proj")
]
STACK_PATHS = ["embed_tokens/embedding", "embed_positions/embedding", "layernorm_embedding/scale",
               "layernorm_embedding/bias", "final_ln/bias"]


@pytest.mark.parametrize("config, count", [(MINI, 437_833_712), (MEGA, 2_587_521_024)], ids=["mini", "mega"])
def test_published_parameter_trees(config, count):
    ids = jax.ShapeDtypeStruct((1, config.max_text_length), jnp.int32)
    decoder_ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(DalleBart(config).init, jax.random.key(0), ids, ids, decoder_ids)["params"]
    flat = {"/".join(path): leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}
    assert sum(math.prod(shape) for shape in flat.values()) == count

    expected = {"lm_head/kernel"}
    for side, layers_name, layer_paths in [
        ("encoder", "FlaxBartEncoderLayers", LAYER_PATHS),
        ("decoder", "FlaxBartDecoderLayers", LAYER_PATHS + DECODER_ONLY_LAYER_PATHS),
    ]:
        expected |= {f"model/{side}/{path}" for path in STACK_PATHS}
        expected |= {f"model/{side}/layers/{layers_name}/{path}" for path in layer_paths}
    assert set(flat) == expected

    d, ffn, layers = config.d_model, config.decoder_ffn_dim, config.decoder_layers
    decoder_layers = "model/decoder/layers/FlaxBartDecoderLayers"
    assert flat["lm_head/kernel"] == (d, config.image_vocab_size + 1)
    assert flat["model/encoder/embed_tokens/embedding"] == (config.encoder_vocab_size, d)
    assert flat["model/encoder/embed_positions/embedding"] == (64, d)
    assert flat["model/decoder/embed_tokens/embedding"] == (config.image_vocab_size + 1, d)
    assert flat["model/decoder/embed_positions/embedding"] == (256, d)
    encoder_layers = "model/encoder/layers/FlaxBartEncoderLayers"
    assert flat[f"{encoder_layers}/FlaxBartAttention_0/q_proj/kernel"] == (layers, d, d)
    assert flat[f"{decoder_layers}/GLU_0/Dense_0/kernel"] == (layers, d, ffn)
    assert flat[f"{decoder_layers}/GLU_0/Dense_2/kernel"] == (layers, ffn, d)
    assert flat[f"{decoder_layers}/GLU_0/LayerNorm_1/bias"] == (layers, ffn)
    # Bias-only norms (upstream's use_scale=False) have no scale at all.
    bias_only = ["model/encoder/final_ln", f"{encoder_layers}/LayerNorm_0", f"{decoder_layers}/LayerNorm_2",
                 f"{decoder_layers}/GLU_0/LayerNorm_0", f"{decoder_layers}/GLU_0/LayerNorm_1"]
    for path in bias_only:
        assert f"{path}/bias" in flat and f"{path}/scale" not in flat


# The published mini config.json, as upstream (transformers 4.x) wrote it.
MINI_CONFIG_JSON = {
    "_name_or_path": "dalle-mini/dalle-mini", "activation_dropout": 0.0, "activation_function": "gelu",
    "architectures": ["eBart"], "attention_dropout": 0.0, "bos_token_id": 16385, "d_model": 1024,
    "decoder_attention_heads": 16, "decoder_ffn_dim": 2730, "decoder_layers": 12,
    "decoder_start_token_id": 16384, "do_sample": True, "dropout": 0.0, "encoder_attention_heads": 16,
    "encoder_ffn_dim": 2730, "encoder_layers": 12, "encoder_vocab_size": 50264, "eos_token_id": 16385,
    "force_ln_scale": False, "gradient_checkpointing": False, "image_length": 256, "image_vocab_size": 16384,
    "init_std": 0.02, "is_encoder_decoder": True, "ln_positions": "normformer", "ln_type": "layernorm",
    "max_length": 257, "max_text_length": 64, "min_length": 257, "model_type": "dallebart",
    "normalize_text": True, "pad_token_id": 16385, "scale_embedding": False, "sinkhorn_iters": 1,
    "tau_init": 0.05, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.19.0.dev0", "use_absolute_position_embeddings": True, "use_alibi": False,
    "use_bias": False, "use_cache": True, "use_cosine_attention": False, "use_deepnet_scaling": False,
    "use_final_ln_decoder": True, "use_final_ln_encoder": True, "use_glu": True, "use_head_scale": False,
    "use_scan": True, "use_subln_init": False, "use_swin_position_embeddings": False,
}


def test_config_reads_published_config_and_round_trips():
    assert DalleBartConfig.from_dict(MINI_CONFIG_JSON) == MINI
    written = MINI.to_dict()
    assert written["model_type"] == "dallebart" and written["use_scan"] is True and written["dropout"] == 0.0
    assert DalleBartConfig.from_dict(written) == MINI
    for config in (MEGA, TINY):
        assert DalleBartConfig.from_dict(config.to_dict()) == config
    # Special ids default to image_vocab_size, as upstream.
    assert TINY.decoder_start_token_id == TINY.pad_token_id == 100


@pytest.mark.parametrize("name, value", [
    ("ln_positions", "swinv2"), ("ln_type", "rmsnorm"), ("use_glu", False), ("use_bias", True),
    ("activation_function", "gelu_new"), ("use_head_scale", True), ("use_cosine_attention", True),
    ("sinkhorn_iters", 3), ("tie_word_embeddings", True), ("use_final_ln_decoder", False),
])
def test_config_refuses_unsupported_options(name, value):
    with pytest.raises(UnsupportedOptionError, match=f"{name}={value!r}"):
        DalleBartConfig.from_dict({**MINI_CONFIG_JSON, name: value})
