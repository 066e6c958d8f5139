"""DalleBart: the encoder-decoder that turns text tokens into VQGAN image codes.

Computes what the published dalle-mini / dalle-mega checkpoints compute (dalle-mini 0.1.5 with
`ln_type="layernorm"`, `ln_positions="normformer"`, GLU feed-forward, no biases, exact gelu):

    embed:          h = LN(token_embedding + position_embedding)
    encoder layer:  h = h + LN_post(SelfAttention(LN_pre(h)))
                    h = h + GLU(h),  GLU(x) = W2 LN_mid(gelu(W0 LN_in(x)) * W1 LN_in(x))
    decoder layer:  causal self-attention as above, then
                    h = h + LN_post2(CrossAttention(LN_pre2(h), text)), then the GLU
    output:         final_ln(h); the decoder then applies lm_head -> [image_vocab_size + 1] logits.
    LN_pre, LN_pre2, LN_in, LN_mid and final_ln have a bias but no scale.

The parameter tree is declared as data (`param_shapes`) so that it is exactly upstream's scanned
tree (`flax_model.msgpack` restores into it as is), and the math is a set of pure functions over
that tree. The encoder and the teacher-forced decoder loop over layers with `lax.scan` over the
stacked `[L, ...]` parameters. Cached one-token decoding (`decode_step`), bound by reading the
weights once per token, runs on `decoding_params(params)`: the same weights split per layer, with
q/k/v and the GLU inputs fused into single matmuls, built once outside jit.

Shapes: b batch, T text tokens (<= max_text_length), S image positions (<= image_length),
d d_model, h heads, k head dim, L layers, F GLU width, V image_vocab_size.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from model.errors import UnsupportedOptionError

# Upstream passes epsilon=1e-05 to every norm (flax's own default is 1e-6); the checkpoints were
# trained with it, and with the small-variance embeddings the difference is visible in the output.
LAYER_NORM_EPS = 1e-5

# Masked attention scores are set to a finite value rather than -inf: for any row with at least
# one visible key, exp() of it underflows to exactly 0 (same result as upstream), and a row with
# no visible key (e.g. a batch-padding row with an all-zero text mask) gets uniform weights
# instead of NaN.
MASKED_SCORE = -1e9

# Options upstream offers that change the math, at the only values computed here (those of the
# published mini and mega models). Any other value is refused rather than silently ignored.
SUPPORTED_OPTIONS = {
    "activation_function": "gelu",
    "ln_type": "layernorm",
    "ln_positions": "normformer",
    "use_glu": True,
    "use_bias": False,
    "use_head_scale": False,
    "use_cosine_attention": False,
    "use_swin_position_embeddings": False,
    "use_deepnet_scaling": False,
    "use_subln_init": False,
    "use_alibi": False,
    "sinkhorn_iters": 1,
    "tie_word_embeddings": False,
    "scale_embedding": False,
    "force_ln_scale": False,
    "use_absolute_position_embeddings": True,
    "use_final_ln_encoder": True,
    "use_final_ln_decoder": True,
}


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    """Sizes of a DalleBart model; field names and defaults are those of upstream's config.json.

    The published models: mini d_model 1024, 12+12 layers, 16 heads, ffn 2730, encoder vocab 50264,
    image vocab 16384; mega d_model 2048, 24+24 layers, 32 heads, ffn 4096, encoder vocab 50272,
    image vocab 16415. Both: 64 text tokens, 256 image tokens, special ids 16384/16385.
    """

    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096  # GLU width F
    decoder_ffn_dim: int = 4096
    encoder_vocab_size: int = 50264  # text embedding rows
    image_vocab_size: int = 16384  # V image codes; the decoder embeds V + 1 ids (start token)
    image_length: int = 256  # decoder positions (codes per image)
    max_text_length: int = 64  # encoder positions
    # Special ids default to image_vocab_size, as upstream appends them to the image vocabulary.
    decoder_start_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    normalize_text: bool = False  # whether prompts go through the text normalizer first
    init_std: float = 0.02  # std of the normal init of kernels and embeddings
    # Fixed architecture options (see SUPPORTED_OPTIONS); kept as fields because callers read them.
    activation_function: str = "gelu"
    ln_type: str = "layernorm"
    ln_positions: str = "normformer"
    use_glu: bool = True
    use_bias: bool = False

    def __post_init__(self):
        for name in ("activation_function", "ln_type", "ln_positions", "use_glu", "use_bias"):
            _check_option(name, getattr(self, name))
        for name in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                # Frozen dataclass: this is the one place a default depends on another field.
                object.__setattr__(self, name, self.image_vocab_size)
        for side in ("encoder", "decoder"):
            heads = getattr(self, f"{side}_attention_heads")
            if self.d_model % heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by {side}_attention_heads={heads}")
        if not 0 <= self.decoder_start_token_id <= self.image_vocab_size:
            raise ValueError(
                f"decoder_start_token_id={self.decoder_start_token_id} is outside the decoder "
                f"embedding (image_vocab_size + 1 = {self.image_vocab_size + 1} rows)"
            )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "DalleBartConfig":
        """Reads an upstream config.json dict.

        Math options other than the published models' values raise UnsupportedOptionError.
        Dropout rates, `use_scan`, `gradient_checkpointing`, generation defaults and bookkeeping
        keys (architectures, transformers_version, ...) do not change inference and are ignored,
        as is any key upstream's DalleBartConfig does not define (transformers adds some).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, value in config.items():
            if name in SUPPORTED_OPTIONS and name not in fields:
                _check_option(name, value)
        return cls(**{name: value for name, value in config.items() if name in fields})

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that upstream's DalleBartConfig reads back to the same model."""
        return {
            "model_type": "dallebart",
            "architectures": ["DalleBart"],
            "is_encoder_decoder": True,
            **SUPPORTED_OPTIONS,
            **dataclasses.asdict(self),
            # Upstream defaults dropout to 0.1; this model computes none.
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "activation_dropout": 0.0,
            "use_scan": True,
        }


def _check_option(name: str, value: Any) -> None:
    supported = SUPPORTED_OPTIONS[name]
    if value != supported:
        raise UnsupportedOptionError(
            f"DalleBart config option {name}={value!r} is not implemented; only {name}={supported!r} "
            "(the value of the published dalle-mini and dalle-mega models) is supported"
        )


# ---------------------------------------------------------------------------------------------
# Parameter tree


def _layer_stack_shapes(layers: int, d: int, ffn: int, attentions: int) -> dict:
    """One scanned layer stack: `attentions` attention blocks (self, then cross) and a GLU."""
    tree = {}
    for i in range(attentions):
        tree[f"FlaxBartAttention_{i}"] = {
            name: {"kernel": (layers, d, d)} for name in ("q_proj", "k_proj", "v_proj", "out_proj")
        }
        tree[f"LayerNorm_{2 * i}"] = {"bias": (layers, d)}  # before attention: bias only
        tree[f"LayerNorm_{2 * i + 1}"] = {"scale": (layers, d), "bias": (layers, d)}  # after
    tree["GLU_0"] = {
        "LayerNorm_0": {"bias": (layers, d)},
        "Dense_0": {"kernel": (layers, d, ffn)},  # gelu branch
        "Dense_1": {"kernel": (layers, d, ffn)},  # linear branch
        "LayerNorm_1": {"bias": (layers, ffn)},
        "Dense_2": {"kernel": (layers, ffn, d)},
    }
    return tree


def param_shapes(config: DalleBartConfig) -> dict:
    """The upstream scanned parameter tree, as nested dicts of shapes. Kernels are (in, out)."""
    d = config.d_model

    def stack(vocab, positions, layers_name, layers, ffn, attentions):
        return {
            "embed_tokens": {"embedding": (vocab, d)},
            "embed_positions": {"embedding": (positions, d)},
            "layernorm_embedding": {"scale": (d,), "bias": (d,)},
            "layers": {layers_name: _layer_stack_shapes(layers, d, ffn, attentions)},
            "final_ln": {"bias": (d,)},
        }

    return {
        "lm_head": {"kernel": (d, config.image_vocab_size + 1)},
        "model": {
            "encoder": stack(config.encoder_vocab_size, config.max_text_length,
                             "FlaxBartEncoderLayers", config.encoder_layers, config.encoder_ffn_dim, 1),
            "decoder": stack(config.image_vocab_size + 1, config.image_length,
                             "FlaxBartDecoderLayers", config.decoder_layers, config.decoder_ffn_dim, 2),
        },
    }


def _init_tree(rng: jax.Array, shapes: dict, std: float) -> dict:
    """Upstream's init: LayerNorm scale 1 and bias 0, kernels and embeddings normal(std)."""
    flat = traverse_util.flatten_dict(shapes)
    params = {}
    for i, (path, shape) in enumerate(sorted(flat.items())):
        if path[-1] == "scale":
            params[path] = jnp.ones(shape, jnp.float32)
        elif path[-1] == "bias":
            params[path] = jnp.zeros(shape, jnp.float32)
        else:
            params[path] = std * jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
    return traverse_util.unflatten_dict(params)


# ---------------------------------------------------------------------------------------------
# Math: pure functions over (slices of) the parameter tree


def _norm(p: dict, x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis; `p` holds `bias` and, for some norms, `scale`."""
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * lax.rsqrt(variance + LAYER_NORM_EPS)
    if "scale" in p:
        y = y * p["scale"]
    return y + p["bias"]


def _split_heads(y: jax.Array, heads: int) -> jax.Array:
    """[b, n, h * k] -> [b, h, n, k]."""
    return y.reshape(y.shape[:2] + (heads, -1)).transpose(0, 2, 1, 3)


def _heads(x: jax.Array, kernel: jax.Array, heads: int) -> jax.Array:
    """Projects [b, n, d] with a [d, d] kernel into [b, h, n, k]."""
    return _split_heads(x @ kernel, heads)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, out_kernel: jax.Array) -> jax.Array:
    """Multi-head attention: q [b, h, S, k], keys/values [b, h, K, k], `visible` a bool mask
    broadcastable to [b, h, S, K]; returns the out-projected [b, S, d]."""
    q = q * (q.shape[-1] ** -0.5)
    scores = jnp.einsum("bhqc,bhkc->bhqk", q, k)
    weights = jax.nn.softmax(jnp.where(visible, scores, MASKED_SCORE), axis=-1)
    out = jnp.einsum("bhqk,bhkc->bqhc", weights, v)
    return out.reshape(out.shape[:2] + (-1,)) @ out_kernel


def _glu(p: dict, x: jax.Array) -> jax.Array:
    x = _norm(p["LayerNorm_0"], x)
    gated = jax.nn.gelu(x @ p["Dense_0"]["kernel"], approximate=False) * (x @ p["Dense_1"]["kernel"])
    return _norm(p["LayerNorm_1"], gated) @ p["Dense_2"]["kernel"]


def _embed(p: dict, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """ids [b, n], positions [n] -> [b, n, d]."""
    h = p["embed_tokens"]["embedding"][ids] + p["embed_positions"]["embedding"][positions]
    return _norm(p["layernorm_embedding"], h)


def _encoder_layer(p: dict, h: jax.Array, visible: jax.Array, heads: int) -> jax.Array:
    a = p["FlaxBartAttention_0"]
    x = _norm(p["LayerNorm_0"], h)
    q, k, v = (_heads(x, a[name]["kernel"], heads) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + _norm(p["LayerNorm_1"], _attend(q, k, v, visible, a["out_proj"]["kernel"]))
    return h + _glu(p["GLU_0"], h)


def _decoder_layer(p: dict, h, causal, text, text_visible, heads: int) -> jax.Array:
    """One teacher-forced decoder layer over upstream layer params: h [b, S, d] -> [b, S, d];
    text [b, T, d] the encoder output."""
    self_attn, cross = p["FlaxBartAttention_0"], p["FlaxBartAttention_1"]
    x = _norm(p["LayerNorm_0"], h)
    q, k, v = (_heads(x, self_attn[name]["kernel"], heads) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + _norm(p["LayerNorm_1"], _attend(q, k, v, causal, self_attn["out_proj"]["kernel"]))
    q = _heads(_norm(p["LayerNorm_2"], h), cross["q_proj"]["kernel"], heads)
    k, v = _heads(text, cross["k_proj"]["kernel"], heads), _heads(text, cross["v_proj"]["kernel"], heads)
    h = h + _norm(p["LayerNorm_3"], _attend(q, k, v, text_visible, cross["out_proj"]["kernel"]))
    return h + _glu(p["GLU_0"], h)


def encode(params: dict, input_ids, attention_mask, config: DalleBartConfig) -> jax.Array:
    """Encoder: input_ids [b, T] int, attention_mask [b, T] (1 = token, 0 = padding) -> [b, T, d]."""
    p = params["model"]["encoder"]
    h = _embed(p, input_ids, jnp.arange(input_ids.shape[1]))
    visible = attention_mask.astype(bool)[:, None, None, :]
    heads = config.encoder_attention_heads

    def layer(h, layer_params):
        return _encoder_layer(layer_params, h, visible, heads), None

    h, _ = lax.scan(layer, h, p["layers"]["FlaxBartEncoderLayers"])
    return _norm(p["final_ln"], h)


def decode(params, encoder_states, attention_mask, decoder_input_ids, config: DalleBartConfig) -> jax.Array:
    """Teacher-forced causal decoder: encoder_states [b, T, d], attention_mask [b, T],
    decoder_input_ids [b, S] (start token first) -> logits [b, S, V + 1]."""
    p = params["model"]["decoder"]
    length = decoder_input_ids.shape[1]
    h = _embed(p, decoder_input_ids, jnp.arange(length))
    causal = jnp.tril(jnp.ones((length, length), bool))
    text_visible = attention_mask.astype(bool)[:, None, None, :]
    heads = config.decoder_attention_heads

    stack = _decoder_layer_stack(params)
    if stack is None:
        raise ValueError("teacher-forced decode needs upstream's parameter tree, not decoding_params()")

    def layer(h, layer_params):
        return _decoder_layer(layer_params, h, causal, encoder_states, text_visible, heads), None

    h, _ = lax.scan(layer, h, stack)
    return _norm(p["final_ln"], h) @ params["lm_head"]["kernel"]


# ---------------------------------------------------------------------------------------------
# Cached decoding: one token per step, bound by reading the decoder's weights once per step


def _decoder_layer_stack(params: dict):
    """The decoder's layers as upstream's [L, ...] stack, or None for a `decoding_params` tree."""
    layers = params["model"]["decoder"]["layers"]
    return None if isinstance(layers, (list, tuple)) else layers["FlaxBartDecoderLayers"]


# Output widths of the decoding matmuls are zero-padded to a multiple of this: at batch 18 the
# CPU matmul ran [d, 2 x 2816] ~1.4x faster than [d, 2 x 2730] (mini's GLU) and [d, 16512] ~1.7x
# faster than [d, 16385] (mini's lm_head), for under 3% more bytes.
MATMUL_WIDTH_MULTIPLE = 128


def _pad_columns(kernel: jax.Array) -> jax.Array:
    return jnp.pad(kernel, ((0, 0), (0, -kernel.shape[1] % MATMUL_WIDTH_MULTIPLE)))


def _decoding_layer(stack: dict, i: int) -> dict:
    """Layer i of an upstream decoder stack in the layout decode_step reads (see decoding_params)."""
    p = jax.tree_util.tree_map(lambda x: x[i], stack)
    self_attn, cross, glu = p["FlaxBartAttention_0"], p["FlaxBartAttention_1"], p["GLU_0"]
    return {
        "self_norm_in": p["LayerNorm_0"],
        "self_qkv": jnp.concatenate([self_attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], axis=1),
        "self_out": self_attn["out_proj"]["kernel"],
        "self_norm_out": p["LayerNorm_1"],
        "cross_norm_in": p["LayerNorm_2"],
        "cross_q": cross["q_proj"]["kernel"],
        "cross_k": cross["k_proj"]["kernel"],  # read once per prompt batch, by init_decode_cache
        "cross_v": cross["v_proj"]["kernel"],
        "cross_out": cross["out_proj"]["kernel"],
        "cross_norm_out": p["LayerNorm_3"],
        "glu_norm_in": glu["LayerNorm_0"],
        # [d, 2 * padded F]: the gelu branch's columns, then the linear branch's.
        "glu_in": jnp.concatenate([_pad_columns(glu["Dense_0"]["kernel"]), _pad_columns(glu["Dense_1"]["kernel"])], axis=1),
        "glu_norm_mid": glu["LayerNorm_1"],
        "glu_out": glu["Dense_2"]["kernel"],  # [F, d]
    }


def decoding_params(params: dict) -> dict:
    """The weights in the layout decode_step reads fastest; build it once, outside jit.

    A decoding step reads every decoder weight once and little else, so its speed is the speed of
    that read. On XLA CPU, slicing a layer out of an [L, ...] stack inside the step copies it (on
    every step, doubling the traffic), so here each layer gets its own arrays: a list of L dicts
    under model/decoder/layers. Within a layer, the self-attention q/k/v kernels are one [d, 3d]
    matmul and the GLU's two input kernels one matmul (measured at batch 18: ~1.2x and ~2x faster
    than separate matmuls), and output widths are padded (MATMUL_WIDTH_MULTIPLE); lm_head moves to
    model/decoder/lm_head, padded likewise. The encoder, embeddings and norms are shared with
    `params`, not copied; drop `params` afterwards to keep one copy of the weights in memory.
    Place (shard) `params` first: the result's names no longer match the partition rules.

    encode, init_decode_cache and decode_step accept the result; teacher-forced decode does not.
    """
    stack = _decoder_layer_stack(params)
    if stack is None:
        return params
    count = jax.tree_util.tree_leaves(stack)[0].shape[0]
    decoder = {**params["model"]["decoder"], "layers": [_decoding_layer(stack, i) for i in range(count)],
               "lm_head": _pad_columns(params["lm_head"]["kernel"])}
    return {"model": {**params["model"], "decoder": decoder}}


def _decoding_weights(params: dict) -> tuple[list, jax.Array]:
    """(per-layer weights, lm_head kernel [d, >= V + 1]) for cached decoding. From upstream's stack
    this slices inside the traced step, which is correct but copies the weights on every step;
    pass decoding_params() for speed."""
    stack = _decoder_layer_stack(params)
    if stack is None:
        return params["model"]["decoder"]["layers"], params["model"]["decoder"]["lm_head"]
    count = jax.tree_util.tree_leaves(stack)[0].shape[0]
    return [_decoding_layer(stack, i) for i in range(count)], params["lm_head"]["kernel"]


# The self-attention cache of a layer is this many separate arrays (segments of consecutive
# positions), and a step reads only the segments up to its position: on average 5/8 of the cache
# instead of all of it (all of it is ~450 MB per step at batch 18, a third of a step's reads).
# Separate arrays because XLA CPU copies a slice of a buffer before a matmul reads it (attending
# over a static 64-position slice was ~2x slower than over all 256 positions) while whole
# arrays are read in place. More segments read less but compile longer (8 compiled 2-3x longer
# than 4, for ~1-2% per step).
SELF_CACHE_SEGMENTS = 4


def _segment_bounds(config: DalleBartConfig) -> list[tuple[int, int]]:
    """(start, size) of each self-attention cache segment; the last may be shorter."""
    size = -(-config.image_length // SELF_CACHE_SEGMENTS)
    return [(start, min(size, config.image_length - start)) for start in range(0, config.image_length, size)]


def init_decode_cache(params, encoder_states, attention_mask, config: DalleBartConfig, rows=None) -> dict:
    """The state of cached decoding, built once per prompt batch.

    params: upstream's tree or decoding_params(); encoder_states [P, T, d], attention_mask [P, T].
    rows: optional [b] int, which of the P encoded prompts each cache row decodes (e.g. several
      candidates per prompt): cross-attention keys/values are then computed once per prompt and
      copied to the rows (for 9 candidates and the empty prompt, 2 projections instead of 18).
      None: one row per prompt (b = P).
    Returns {"text_mask": [b, T] bool, "layers": a list with one dict per decoder layer}; each
    layer holds
      cross_keys, cross_values [b, h, T, k]: the text's cross-attention keys/values, and
      self_keys, self_values: tuples of zero arrays [b, h, segment size, k] (SELF_CACHE_SEGMENTS
        consecutive segments of the image_length positions), filled one position per step.
    Every array has its rows (batch) first. Layers get separate arrays because XLA CPU copied a
    layer's slice out of one [L, ...] buffer on every step (~40 MB per layer at batch 18).
    """
    heads = config.decoder_attention_heads
    rows = jnp.arange(encoder_states.shape[0]) if rows is None else rows
    batch = rows.shape[0]

    def empty():
        # Separate buffers throughout: callers donate the cache to jit, which refuses a buffer twice.
        return tuple(jnp.zeros((batch, heads, size, config.d_model // heads), jnp.float32)
                     for _, size in _segment_bounds(config))

    layers = []
    for w in _decoding_weights(params)[0]:
        layers.append({
            "cross_keys": _split_heads(encoder_states @ w["cross_k"], heads)[rows],
            "cross_values": _split_heads(encoder_states @ w["cross_v"], heads)[rows],
            "self_keys": empty(),
            "self_values": empty(),
        })
    return {"text_mask": attention_mask.astype(bool)[rows], "layers": layers}


def _write_position(segments: tuple, x: jax.Array, position: jax.Array, bounds) -> tuple:
    """Writes x [b, h, 1, k] at `position` into the segment that holds it. Every segment is written
    (a segment that does not hold it gets one of its own slots back): one tiny in-place update
    each, where choosing the segment by lax.cond would copy the segments it passes through."""
    written = []
    for segment, (start, size) in zip(segments, bounds):
        offset = jnp.clip(position - start, 0, size - 1)
        old = lax.dynamic_slice_in_dim(segment, offset, 1, axis=2)
        inside = (position >= start) & (position < start + size)
        written.append(lax.dynamic_update_slice_in_dim(segment, jnp.where(inside, x, old), offset, axis=2))
    return tuple(written)


def _attend_written(q, keys: tuple, values: tuple, position, out_kernel, bounds) -> jax.Array:
    """Self-attention of q [b, h, 1, k] over positions <= `position`, reading only the segments
    up to the one holding it (lax.switch: one branch per segment count). Returns [b, 1, d]."""
    q = q * (q.shape[-1] ** -0.5)

    def over_first(count):
        def attend(q, keys, values, position):
            scores = jnp.concatenate([jnp.einsum("bhqc,bhkc->bhqk", q, k) for k in keys[:count]], axis=-1)
            visible = jnp.arange(sum(size for _, size in bounds[:count])) <= position
            weights = jax.nn.softmax(jnp.where(visible, scores, MASKED_SCORE), axis=-1)
            split_at = [start for start, _ in bounds[1:count]]
            return sum(jnp.einsum("bhqk,bhkc->bqhc", w, v)
                       for w, v in zip(jnp.split(weights, split_at, axis=-1), values[:count]))
        return attend

    branches = [over_first(count) for count in range(1, len(bounds) + 1)]
    out = lax.switch(position // bounds[0][1], branches, q, keys, values, position)  # [b, 1, h, k]
    return out.reshape(out.shape[:2] + (-1,)) @ out_kernel


def _decoding_glu(w: dict, h: jax.Array) -> jax.Array:
    """The GLU of a decoding_params layer: h [b, n, d] -> [b, n, d]."""
    width, padded = w["glu_out"].shape[0], w["glu_in"].shape[1] // 2
    both = _norm(w["glu_norm_in"], h) @ w["glu_in"]  # [b, n, 2 * padded]
    gated = jax.nn.gelu(both[..., :width], approximate=False) * both[..., padded:padded + width]
    return _norm(w["glu_norm_mid"], gated) @ w["glu_out"]


def decode_step(params, cache: dict, token_ids: jax.Array, position: jax.Array, config: DalleBartConfig):
    """One decoding step: token_ids [b] int sit at `position` (scalar int32, may be traced;
    0 <= position < image_length). Returns (logits [b, V + 1] predicting the token at
    position + 1, the cache with this position's self-attention keys/values written).

    params: decoding_params(tree) for speed, or upstream's tree (same numbers, slower).
    """
    p = params["model"]["decoder"]
    heads = config.decoder_attention_heads
    bounds = _segment_bounds(config)
    h = _embed(p, token_ids[:, None], position[None])  # [b, 1, d]
    text_visible = cache["text_mask"][:, None, None, :]
    layers = []
    # A Python loop, not lax.scan: every layer's weights and cache are then separate arrays that
    # XLA reads and updates in place (scanning over stacks copied each layer's slice per step).
    weights, lm_head = _decoding_weights(params)
    for w, c in zip(weights, cache["layers"]):
        qkv = _norm(w["self_norm_in"], h) @ w["self_qkv"]  # [b, 1, 3d]
        q, k, v = (_split_heads(y, heads) for y in jnp.split(qkv, 3, axis=-1))  # [b, h, 1, k]
        keys = _write_position(c["self_keys"], k, position, bounds)
        values = _write_position(c["self_values"], v, position, bounds)
        h = h + _norm(w["self_norm_out"], _attend_written(q, keys, values, position, w["self_out"], bounds))
        q = _split_heads(_norm(w["cross_norm_in"], h) @ w["cross_q"], heads)
        h = h + _norm(w["cross_norm_out"], _attend(q, c["cross_keys"], c["cross_values"], text_visible, w["cross_out"]))
        h = h + _decoding_glu(w, h)
        layers.append({**c, "self_keys": keys, "self_values": values})
    logits = _norm(p["final_ln"], h[:, 0]) @ lm_head
    return logits[:, :config.image_vocab_size + 1], {**cache, "layers": layers}


class DalleBart(nn.Module):
    """DalleBart as a flax.linen Module over upstream's scanned parameter tree.

    `apply({"params": p}, input_ids [b, T], attention_mask [b, T], decoder_input_ids [b, S])`
    gives teacher-forced logits [b, S, V + 1]. Methods `encode`, `decode` (teacher-forced, from
    encoder states), `init_decode_cache` and `decode_step` call the module-level functions of the
    same names; sampling uses encode -> init_decode_cache -> decode_step per position.
    """

    config: DalleBartConfig

    def setup(self):
        # Two parameters holding nested dicts, so the tree is exactly upstream's: the layers'
        # [L, ...] stacks and their names come from param_shapes, not from flax's submodules.
        shapes = param_shapes(self.config)
        std = self.config.init_std
        self.lm_head = self.param("lm_head", _init_tree, shapes["lm_head"], std)
        self.model = self.param("model", _init_tree, shapes["model"], std)

    def _params(self) -> dict:
        return {"lm_head": self.lm_head, "model": self.model}

    def __call__(self, input_ids, attention_mask, decoder_input_ids):
        states = encode(self._params(), input_ids, attention_mask, self.config)
        return decode(self._params(), states, attention_mask, decoder_input_ids, self.config)

    def encode(self, input_ids, attention_mask):
        return encode(self._params(), input_ids, attention_mask, self.config)

    def decode(self, encoder_states, attention_mask, decoder_input_ids):
        return decode(self._params(), encoder_states, attention_mask, decoder_input_ids, self.config)

    def init_decode_cache(self, encoder_states, attention_mask):
        return init_decode_cache(self._params(), encoder_states, attention_mask, self.config)

    def decode_step(self, cache, token_ids, position):
        return decode_step(self._params(), cache, token_ids, jnp.asarray(position, jnp.int32), self.config)
