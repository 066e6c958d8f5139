"""CLIP (text + vision transformers) for reranking generated images, computing what transformers' CLIPModel computes.

Covers the openai/clip-vit-base-patch32 / clip-vit-large-patch14 family (reference.md §4). The parameter tree keeps
the names of HF's former Flax CLIP, so published `flax_model.msgpack` files restore as they are;
`params_from_torch_state_dict` / `params_to_torch_state_dict` translate to and from PyTorch `model.safetensors` names.

    module = CLIP(CLIPConfig.from_dict(json.load(open("config.json"))))
    out = module.apply({"params": params}, input_ids, pixel_values, attention_mask)
    out.logits_per_image  # [num_images, num_texts]: logit_scale.exp() * cosine similarity
"""

import dataclasses
import math
from functools import partial

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from model.errors import CheckpointError, UnsupportedOptionError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI's checkpoints
    "gelu": partial(jax.nn.gelu, approximate=False),  # erf, as torch's default GELU
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
}

# The end-of-text id OpenAI's configs carried before transformers PR #24773; HF keeps argmax pooling for it.
LEGACY_EOS_TOKEN_ID = 2


# ---------------------------------------------------------------------------------------------
# Configuration (defaults are HF's, i.e. clip-vit-base-patch32 except for the legacy eos_token_id)


def _check_tower(tower: str, config) -> None:
    if config.hidden_act not in ACTIVATIONS:
        raise UnsupportedOptionError(
            f"CLIP {tower}.hidden_act={config.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}."
        )
    if config.hidden_size % config.num_attention_heads:
        raise CheckpointError(
            f"CLIP {tower}.hidden_size={config.hidden_size} is not a multiple of "
            f"num_attention_heads={config.num_attention_heads}."
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048  # MLP width
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77  # longest token sequence
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # pooling position; 2 (OpenAI's configs) means "argmax of input_ids"

    def __post_init__(self):
        _check_tower("text_config", self)
        if not isinstance(self.eos_token_id, int):
            raise UnsupportedOptionError(
                f"CLIP text_config.eos_token_id={self.eos_token_id!r}: only a single integer id is supported."
            )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    image_size: int = 224  # square input side in pixels
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check_tower("vision_config", self)
        for name in ("image_size", "patch_size"):
            if not isinstance(getattr(self, name), int):
                raise UnsupportedOptionError(
                    f"CLIP vision_config.{name}={getattr(self, name)!r}: only a single integer (square) is supported."
                )


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512  # shared text/image embedding width
    logit_scale_init_value: float = 2.6592  # log(1 / 0.07), only used when initializing

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        """From a HF CLIP config.json dict; unknown keys (dropout, initializers, token ids...) are ignored."""

        def tower(config_class, key):
            # Older config.json files carry `<key>_dict`, which HF lets override `<key>`.
            values = {**(d.get(key) or {}), **(d.get(f"{key}_dict") or {})}
            names = {field.name for field in dataclasses.fields(config_class)}
            return config_class(**{k: v for k, v in values.items() if k in names})

        top = {k: d[k] for k in ("projection_dim", "logit_scale_init_value") if d.get(k) is not None}
        return cls(tower(CLIPTextConfig, "text_config"), tower(CLIPVisionConfig, "vision_config"), **top)

    def to_dict(self) -> dict:
        """A config.json dict that transformers' CLIPConfig (and `from_dict`) reads back to this config."""
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": {"model_type": "clip_text_model", **dataclasses.asdict(self.text_config)},
            "vision_config": {"model_type": "clip_vision_model", **dataclasses.asdict(self.vision_config)},
        }


# ---------------------------------------------------------------------------------------------
# Shared transformer pieces


def dot_product_attention(query, key, value, mask=None):
    """Softmax attention. query/key/value [batch, length, heads, head_dim]; mask [batch, 1, length, length] with
    True where a query may attend to a key. Returns [batch, length, heads, head_dim]."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    if mask is not None:
        # A finite minimum (as HF) keeps fully masked rows, e.g. left padding under the causal mask, free of NaN.
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _layer_norm(config, name):
    # Two-pass variance as torch computes it; the fast E[x^2]-E[x]^2 form loses precision when |mean| >> std.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False, name=name)


def _dense(features, name, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(0.02), name=name)


class Attention(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, hidden, mask):
        """hidden [batch, length, hidden]; mask as in `dot_product_attention`."""
        width, heads = self.config.hidden_size, self.config.num_attention_heads
        heads_shape = (*hidden.shape[:2], heads, width // heads)
        query = _dense(width, "q_proj")(hidden).reshape(heads_shape)
        key = _dense(width, "k_proj")(hidden).reshape(heads_shape)
        value = _dense(width, "v_proj")(hidden).reshape(heads_shape)
        attended = dot_product_attention(query, key, value, mask)
        return _dense(width, "out_proj")(attended.reshape(hidden.shape))


class MLP(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, hidden):
        hidden = _dense(self.config.intermediate_size, "fc1")(hidden)
        hidden = ACTIVATIONS[self.config.hidden_act](hidden)
        return _dense(self.config.hidden_size, "fc2")(hidden)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, hidden, mask):
        config = self.config
        hidden = hidden + Attention(config, name="self_attn")(_layer_norm(config, "layer_norm1")(hidden), mask)
        return hidden + MLP(config, name="mlp")(_layer_norm(config, "layer_norm2")(hidden))


class EncoderLayers(nn.Module):
    """The stack, its layers named "0", "1", ... as in HF's `encoder/layers/{i}`."""

    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, hidden, mask):
        for index in range(self.config.num_hidden_layers):
            hidden = EncoderLayer(self.config, name=str(index))(hidden, mask)
        return hidden


class Encoder(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, hidden, mask=None):
        return EncoderLayers(self.config, name="layers")(hidden, mask)


# ---------------------------------------------------------------------------------------------
# Towers


class TextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        """input_ids [batch, length] -> [batch, length, hidden]."""
        config, init = self.config, nn.initializers.normal(0.02)
        length = input_ids.shape[1]
        if length > config.max_position_embeddings:
            raise ValueError(
                f"CLIP text of {length} tokens exceeds max_position_embeddings={config.max_position_embeddings}."
            )
        width, positions = config.hidden_size, config.max_position_embeddings
        tokens = nn.Embed(config.vocab_size, width, embedding_init=init, name="token_embedding")(input_ids)
        position_embedding = nn.Embed(positions, width, embedding_init=init, name="position_embedding")
        return tokens + position_embedding(jnp.arange(length))[None]


class TextTransformer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids, attention_mask [batch, length] (mask 1 = real token) -> pooled [batch, hidden]."""
        config = self.config
        batch, length = input_ids.shape
        mask = jnp.tril(jnp.ones((1, 1, length, length), bool))
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)
        hidden = TextEmbeddings(config, name="embeddings")(input_ids)
        hidden = Encoder(config, name="encoder")(hidden, mask)
        hidden = _layer_norm(config, "final_layer_norm")(hidden)
        if config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            # OpenAI's end-of-text token is the largest id, so its (first) position is the argmax.
            pooled_at = jnp.argmax(input_ids, axis=-1)
        else:
            pooled_at = jnp.argmax(input_ids == config.eos_token_id, axis=-1)  # first end-of-text
        return hidden[jnp.arange(batch), pooled_at]


class VisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [batch, H, W, channels] -> [batch, 1 + (H / patch) * (W / patch), hidden], class token first."""
        config = self.config
        if pixel_values.shape[1:3] != (config.image_size, config.image_size):
            raise ValueError(
                f"CLIP expects {config.image_size}x{config.image_size} images, "
                f"got {pixel_values.shape[1]}x{pixel_values.shape[2]}."
            )
        width, patch = config.hidden_size, config.patch_size
        class_embedding = self.param("class_embedding", nn.initializers.normal(width**-0.5), (width,))
        patches = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=False,
                          kernel_init=nn.initializers.normal(0.02), name="patch_embedding")(pixel_values)
        patches = patches.reshape(patches.shape[0], -1, width)  # row-major patch order, as torch's flatten(2)
        classes = jnp.broadcast_to(class_embedding, (patches.shape[0], 1, width))
        hidden = jnp.concatenate([classes, patches], axis=1)
        count = hidden.shape[1]
        positions = nn.Embed(count, width, embedding_init=nn.initializers.normal(0.02), name="position_embedding")
        return hidden + positions(jnp.arange(count))[None]


class VisionTransformer(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values [batch, H, W, channels] normalized -> pooled class token [batch, hidden]."""
        hidden = VisionEmbeddings(self.config, name="embeddings")(pixel_values)
        hidden = _layer_norm(self.config, "pre_layrnorm")(hidden)  # sic: HF's name
        hidden = Encoder(self.config, name="encoder")(hidden)
        return _layer_norm(self.config, "post_layernorm")(hidden[:, 0])


# ---------------------------------------------------------------------------------------------
# The model


@flax.struct.dataclass
class CLIPOutput:
    """Scores and L2-normalized embeddings; fields also readable as keys (`out["text_embeds"]`)."""

    text_embeds: jax.Array  # [num_texts, projection_dim]
    image_embeds: jax.Array  # [num_images, projection_dim]
    logits_per_image: jax.Array  # [num_images, num_texts]
    logits_per_text: jax.Array  # [num_texts, num_images]

    def __getitem__(self, key):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


def _l2_normalize(x):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


class CLIP(nn.Module):
    config: CLIPConfig

    def setup(self):
        config = self.config
        self.text_model = TextTransformer(config.text_config)
        self.vision_model = VisionTransformer(config.vision_config)
        self.text_projection = _dense(config.projection_dim, None, use_bias=False)
        self.visual_projection = _dense(config.projection_dim, None, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(config.logit_scale_init_value), ())

    def get_text_features(self, input_ids, attention_mask=None):
        """input_ids, attention_mask [batch, length] -> projected, unnormalized [batch, projection_dim]."""
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_image_features(self, pixel_values):
        """pixel_values [batch, H, W, channels] normalized -> projected, unnormalized [batch, projection_dim]."""
        return self.visual_projection(self.vision_model(pixel_values))

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> CLIPOutput:
        """input_ids, attention_mask [num_texts, length]; pixel_values [num_images, H, W, channels]."""
        text_embeds = _l2_normalize(self.get_text_features(input_ids, attention_mask))
        image_embeds = _l2_normalize(self.get_image_features(pixel_values))
        logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale)
        return CLIPOutput(text_embeds, image_embeds, logits_per_text.T, logits_per_text)


# ---------------------------------------------------------------------------------------------
# PyTorch state dicts (HF CLIPModel names) <-> Flax params


# Flax holds Dense kernels [in, out] where torch Linear holds [out, in], and conv kernels HWIO where torch holds OIHW:
# the axis order that turns each Flax array into its torch layout.
_LINEAR_TO_TORCH, _CONV_TO_TORCH = (1, 0), (3, 2, 0, 1)


def _torch_leaf(path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
    """For a Flax parameter path: the torch leaf name and the axis order to torch (None: same layout)."""
    module, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if leaf == "kernel":
        return "weight", _CONV_TO_TORCH if module == "patch_embedding" else _LINEAR_TO_TORCH
    return {"scale": "weight", "embedding": "weight"}.get(leaf, leaf), None


def _param_shapes(config: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    text = jax.ShapeDtypeStruct((1, config.text_config.max_position_embeddings), jnp.int32)
    size, channels = config.vision_config.image_size, config.vision_config.num_channels
    pixels = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    shapes = jax.eval_shape(CLIP(config).init, jax.random.key(0), text, pixels, text)["params"]
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes).items()}


def params_from_torch_state_dict(state: dict[str, np.ndarray], config: CLIPConfig) -> dict:
    """HF CLIPModel state dict (e.g. `safetensors.numpy.load_file("model.safetensors")`) -> Flax params of
    numpy float32 arrays, checked name by name and shape by shape against `CLIP(config)`.

    Raises CheckpointError (a ValueError) naming the missing, unexpected or misshapen torch parameters."""
    # position_ids are index buffers that older checkpoints saved; they hold no weights.
    state = {name: value for name, value in state.items() if not name.endswith("position_ids")}
    params, problems = {}, []
    for path, shape in _param_shapes(config).items():
        leaf, to_torch = _torch_leaf(path)
        name = ".".join((*path[:-1], leaf))
        torch_shape = shape if to_torch is None else tuple(shape[axis] for axis in to_torch)
        if name not in state:
            problems.append(f"missing {name}")
        elif tuple(state[name].shape) != torch_shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, expected {torch_shape}")
        else:
            # The project computes in fp32, whatever precision the file stores.
            value = np.asarray(state[name], dtype=np.float32)
            params[path] = value if to_torch is None else value.transpose(np.argsort(to_torch))
        state.pop(name, None)
    problems += [f"unexpected {name}" for name in sorted(state)]
    if problems:
        raise CheckpointError(f"CLIP state dict does not match its config: {'; '.join(problems)}.")
    return traverse_util.unflatten_dict(params)


def params_to_torch_state_dict(params) -> dict[str, np.ndarray]:
    """Flax params -> HF CLIPModel state dict of contiguous float32 numpy arrays (ready for safetensors)."""
    state = {}
    for path, value in traverse_util.flatten_dict(params).items():
        leaf, to_torch = _torch_leaf(path)
        value = np.asarray(value, dtype=np.float32)
        value = value if to_torch is None else value.transpose(to_torch)
        state[".".join((*path[:-1], leaf))] = np.array(value, order="C")  # ascontiguousarray would make 0-d 1-d
    return state
