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
stacked `[L, ...]` parameters. Cached one-token decoding, the sampler's fast path, lives in
model/bart_decode.py.

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


# What the published mini and mega share (reference: their config.json files).
_PUBLISHED = {"max_text_length": 64, "image_length": 256, "decoder_start_token_id": 16384, "bos_token_id": 16385,
              "eos_token_id": 16385, "pad_token_id": 16385, "normalize_text": True}


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    """Sizes of a DalleBart model; field names and defaults are those of upstream's config.json.
    `DalleBartConfig.mini()` and `.mega()` are the published models' sizes."""

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
    def mini(cls, **overrides) -> "DalleBartConfig":
        """dalle-mini/dalle-mini: 12+12 layers of d_model 1024, 16 heads, GLU 2730 (0.4 B parameters)."""
        return cls(**{**_PUBLISHED, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
                      "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 2730,
                      "decoder_ffn_dim": 2730, "encoder_vocab_size": 50264, "image_vocab_size": 16384, **overrides})

    @classmethod
    def mega(cls, **overrides) -> "DalleBartConfig":
        """dalle-mini/dalle-mega: 24+24 layers of d_model 2048, 32 heads, GLU 4096 (2.6 B parameters);
        its image vocabulary is padded to 16415 rows, of which the VQGAN uses 16384."""
        return cls(**{**_PUBLISHED, "d_model": 2048, "encoder_layers": 24, "decoder_layers": 24,
                      "encoder_attention_heads": 32, "decoder_attention_heads": 32, "encoder_ffn_dim": 4096,
                      "decoder_ffn_dim": 4096, "encoder_vocab_size": 50272, "image_vocab_size": 16415, **overrides})

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


def layer_norm(p: dict, x: jax.Array) -> jax.Array:
    """LayerNorm over the last axis; `p` holds `bias` and, for some norms, `scale`. Computed in
    float32 whatever the weights' precision (half-precision variance loses the small-spread rows),
    and returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * lax.rsqrt(variance + LAYER_NORM_EPS)
    if "scale" in p:
        y = y * p["scale"].astype(jnp.float32)
    return (y + p["bias"].astype(jnp.float32)).astype(x.dtype)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel with x in the kernel's dtype, accumulated and returned in float32.

    With half-precision weights (model/loading.py, `dtype`) the matmul runs in half precision but the
    activations between matmuls (residual stream, norms, gelu, logits) stay float32; with float32
    weights every cast is a no-op and the numbers are those of a plain `x @ kernel`."""
    return jnp.matmul(x.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


def split_heads(y: jax.Array, heads: int) -> jax.Array:
    """[b, n, h * k] -> [b, h, n, k]."""
    return y.reshape(y.shape[:2] + (heads, -1)).transpose(0, 2, 1, 3)


def _heads(x: jax.Array, kernel: jax.Array, heads: int) -> jax.Array:
    """Projects [b, n, d] with a [d, d] kernel into [b, h, n, k]."""
    return split_heads(dense(x, kernel), heads)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, out_kernel: jax.Array) -> jax.Array:
    """Multi-head attention: q [b, h, S, k], keys/values [b, h, K, k], `visible` a bool mask
    broadcastable to [b, h, S, K]; returns the out-projected [b, S, d]. The products run in the
    weights' dtype; scores and softmax in float32."""
    dtype = out_kernel.dtype
    q = q * (q.shape[-1] ** -0.5)
    scores = jnp.einsum("bhqc,bhkc->bhqk", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(jnp.where(visible, scores, MASKED_SCORE), axis=-1)
    out = jnp.einsum("bhqk,bhkc->bqhc", weights.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32)
    return dense(out.reshape(out.shape[:2] + (-1,)), out_kernel)


def _glu(p: dict, x: jax.Array) -> jax.Array:
    x = layer_norm(p["LayerNorm_0"], x)
    gated = jax.nn.gelu(dense(x, p["Dense_0"]["kernel"]), approximate=False) * dense(x, p["Dense_1"]["kernel"])
    return dense(layer_norm(p["LayerNorm_1"], gated), p["Dense_2"]["kernel"])


def embed(p: dict, ids: jax.Array, positions: jax.Array) -> jax.Array:
    """ids [b, n], positions [n] -> [b, n, d] float32 (the residual stream stays float32)."""
    h = (p["embed_tokens"]["embedding"][ids].astype(jnp.float32)
         + p["embed_positions"]["embedding"][positions].astype(jnp.float32))
    return layer_norm(p["layernorm_embedding"], h)


def _encoder_layer(p: dict, h: jax.Array, visible: jax.Array, heads: int) -> jax.Array:
    a = p["FlaxBartAttention_0"]
    x = layer_norm(p["LayerNorm_0"], h)
    q, k, v = (_heads(x, a[name]["kernel"], heads) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + layer_norm(p["LayerNorm_1"], attend(q, k, v, visible, a["out_proj"]["kernel"]))
    return h + _glu(p["GLU_0"], h)


def _decoder_layer(p: dict, h, causal, text, text_visible, heads: int) -> jax.Array:
    """One teacher-forced decoder layer over upstream layer params: h [b, S, d] -> [b, S, d];
    text [b, T, d] the encoder output."""
    self_attn, cross = p["FlaxBartAttention_0"], p["FlaxBartAttention_1"]
    x = layer_norm(p["LayerNorm_0"], h)
    q, k, v = (_heads(x, self_attn[name]["kernel"], heads) for name in ("q_proj", "k_proj", "v_proj"))
    h = h + layer_norm(p["LayerNorm_1"], attend(q, k, v, causal, self_attn["out_proj"]["kernel"]))
    q = _heads(layer_norm(p["LayerNorm_2"], h), cross["q_proj"]["kernel"], heads)
    k, v = _heads(text, cross["k_proj"]["kernel"], heads), _heads(text, cross["v_proj"]["kernel"], heads)
    h = h + layer_norm(p["LayerNorm_3"], attend(q, k, v, text_visible, cross["out_proj"]["kernel"]))
    return h + _glu(p["GLU_0"], h)


def encode(params: dict, input_ids, attention_mask, config: DalleBartConfig) -> jax.Array:
    """Encoder: input_ids [b, T] int, attention_mask [b, T] (1 = token, 0 = padding) -> [b, T, d]."""
    p = params["model"]["encoder"]
    h = embed(p, input_ids, jnp.arange(input_ids.shape[1]))
    visible = attention_mask.astype(bool)[:, None, None, :]
    heads = config.encoder_attention_heads

    def layer(h, layer_params):
        return _encoder_layer(layer_params, h, visible, heads), None

    h, _ = lax.scan(layer, h, p["layers"]["FlaxBartEncoderLayers"])
    return layer_norm(p["final_ln"], h)


def decode(params, encoder_states, attention_mask, decoder_input_ids, config: DalleBartConfig) -> jax.Array:
    """Teacher-forced causal decoder: encoder_states [b, T, d], attention_mask [b, T],
    decoder_input_ids [b, S] (start token first) -> logits [b, S, V + 1]."""
    p = params["model"]["decoder"]
    length = decoder_input_ids.shape[1]
    h = embed(p, decoder_input_ids, jnp.arange(length))
    causal = jnp.tril(jnp.ones((length, length), bool))
    text_visible = attention_mask.astype(bool)[:, None, None, :]
    heads = config.decoder_attention_heads

    stack = decoder_layer_stack(params)
    if stack is None:
        raise ValueError("teacher-forced decode needs upstream's parameter tree, not decoding_params()")

    def layer(h, layer_params):
        return _decoder_layer(layer_params, h, causal, encoder_states, text_visible, heads), None

    h, _ = lax.scan(layer, h, stack)
    return dense(layer_norm(p["final_ln"], h), params["lm_head"]["kernel"])


def decoder_layer_stack(params: dict):
    """The decoder's layers as upstream's [L, ...] stack, or None for a `decoding_params` tree."""
    layers = params["model"]["decoder"]["layers"]
    return None if isinstance(layers, (list, tuple)) else layers["FlaxBartDecoderLayers"]


class DalleBart(nn.Module):
    """DalleBart as a flax.linen Module over upstream's scanned parameter tree.

    `apply({"params": p}, input_ids [b, T], attention_mask [b, T], decoder_input_ids [b, S])`
    gives teacher-forced logits [b, S, V + 1]. Methods `encode` and `decode` (teacher-forced, from
    encoder states) call the module-level functions of the same names; sampling uses encode, then
    model.bart_decode (init_decode_cache, decode_step per position).
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

