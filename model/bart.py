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
that tree. The teacher-forced pass and the cached one-token decoding step share those functions;
both loop over layers with `lax.scan` over the stacked `[L, ...]` parameters.

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


def _heads(x: jax.Array, kernel: jax.Array, heads: int) -> jax.Array:
    """Projects [b, n, d] with a [d, d] kernel into [b, h, n, k]."""
    y = x @ kernel
    return y.reshape(y.shape[:2] + (heads, -1)).transpose(0, 2, 1, 3)


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


def _decoder_self_qkv(p: dict, h: jax.Array, heads: int):
    """The self-attention query, key and value of decoder states h [b, S, d], each [b, h, S, k]."""
    a = p["FlaxBartAttention_0"]
    x = _norm(p["LayerNorm_0"], h)
    return tuple(_heads(x, a[name]["kernel"], heads) for name in ("q_proj", "k_proj", "v_proj"))


def _decoder_cross_kv(p: dict, text: jax.Array, heads: int):
    """Cross-attention keys and values of the encoder output text [b, T, d], each [b, h, T, k]."""
    a = p["FlaxBartAttention_1"]
    return _heads(text, a["k_proj"]["kernel"], heads), _heads(text, a["v_proj"]["kernel"], heads)


def _decoder_layer_rest(p, h, q, k, v, self_visible, cross_k, cross_v, text_visible, heads):
    """The decoder layer after its self-attention q/k/v: self-attention over k/v, cross-attention
    to the text's cross_k/cross_v, then the GLU. h [b, S, d] -> [b, S, d]."""
    out_kernel = p["FlaxBartAttention_0"]["out_proj"]["kernel"]
    h = h + _norm(p["LayerNorm_1"], _attend(q, k, v, self_visible, out_kernel))
    a = p["FlaxBartAttention_1"]
    q = _heads(_norm(p["LayerNorm_2"], h), a["q_proj"]["kernel"], heads)
    h = h + _norm(p["LayerNorm_3"], _attend(q, cross_k, cross_v, text_visible, a["out_proj"]["kernel"]))
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

    def layer(h, layer_params):
        q, k, v = _decoder_self_qkv(layer_params, h, heads)
        cross_k, cross_v = _decoder_cross_kv(layer_params, encoder_states, heads)
        h = _decoder_layer_rest(layer_params, h, q, k, v, causal, cross_k, cross_v, text_visible, heads)
        return h, None

    h, _ = lax.scan(layer, h, p["layers"]["FlaxBartDecoderLayers"])
    return _norm(p["final_ln"], h) @ params["lm_head"]["kernel"]


def init_decode_cache(params, encoder_states, attention_mask, config: DalleBartConfig) -> dict:
    """The state of cached decoding, built once per prompt batch.

    encoder_states [b, T, d], attention_mask [b, T] -> dict of arrays:
      cross_keys, cross_values [L, b, h, T, k]: the text's cross-attention keys/values per layer;
      self_keys, self_values   [L, b, h, image_length, k]: zeros, filled one position per step;
      text_mask                [b, T] bool.
    """
    layers = params["model"]["decoder"]["layers"]["FlaxBartDecoderLayers"]
    heads = config.decoder_attention_heads
    # All layers at once: one batched matmul per projection.
    cross_keys, cross_values = jax.vmap(lambda p: _decoder_cross_kv(p, encoder_states, heads))(layers)
    batch = encoder_states.shape[0]
    shape = (config.decoder_layers, batch, heads, config.image_length, config.d_model // heads)
    return {
        "cross_keys": cross_keys,
        "cross_values": cross_values,
        # Two separate buffers: callers donate the cache to jit, which refuses a buffer twice.
        "self_keys": jnp.zeros(shape, jnp.float32),
        "self_values": jnp.zeros(shape, jnp.float32),
        "text_mask": attention_mask.astype(bool),
    }


def decode_step(params, cache: dict, token_ids: jax.Array, position: jax.Array, config: DalleBartConfig):
    """One decoding step: token_ids [b] int sit at `position` (scalar int32, may be traced;
    0 <= position < image_length). Returns (logits [b, V + 1] predicting the token at
    position + 1, the cache with this position's self-attention keys/values written)."""
    p = params["model"]["decoder"]
    heads = config.decoder_attention_heads
    h = _embed(p, token_ids[:, None], position[None])  # [b, 1, d]
    # Attend over the whole fixed-length buffer; positions not yet written are masked out.
    self_visible = jnp.arange(config.image_length) <= position  # [image_length]
    text_visible = cache["text_mask"][:, None, None, :]

    def layer(carry, xs):
        h, self_keys, self_values = carry
        layer_params, cross_k, cross_v, index = xs
        q, k, v = _decoder_self_qkv(layer_params, h, heads)
        # The [L, ...] buffers travel in the carry so XLA updates them in place (scanning them
        # as xs -> ys instead made XLA copy each layer's buffer: ~1.2-1.4x slower per step).
        at = (index, 0, 0, position, 0)
        self_keys = lax.dynamic_update_slice(self_keys, k[None], at)
        self_values = lax.dynamic_update_slice(self_values, v[None], at)
        h = _decoder_layer_rest(layer_params, h, q, self_keys[index], self_values[index], self_visible,
                                cross_k, cross_v, text_visible, heads)
        return (h, self_keys, self_values), None

    xs = (p["layers"]["FlaxBartDecoderLayers"], cache["cross_keys"], cache["cross_values"],
          jnp.arange(config.decoder_layers))
    (h, self_keys, self_values), _ = lax.scan(layer, (h, cache["self_keys"], cache["self_values"]), xs)
    logits = _norm(p["final_ln"], h[:, 0]) @ params["lm_head"]["kernel"]
    return logits, {**cache, "self_keys": self_keys, "self_values": self_values}


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
