"""VQGAN of the taming-transformers `vqgan_imagenet_f16_16384` family: images <-> grids of codes.

NHWC, fp32. Pixels in and out are in [0, 1] (callers clip the decoder output). The parameter tree
is exactly the one of the published vqgan-jax checkpoint (`flax_model.msgpack`):

    encoder/conv_in, encoder/down_{i}/block_{j}, encoder/down_{i}/attn_{j}, encoder/down_{i}/downsample/conv,
    encoder/mid/{block_1,attn_1,block_2}, encoder/norm_out, encoder/conv_out,
    decoder/conv_in, decoder/mid/..., decoder/up_{i}/block_{j}, decoder/up_{i}/attn_{j},
    decoder/up_{i}/upsample/conv, decoder/norm_out, decoder/conv_out,
    quantize/embedding/embedding, quant_conv, post_quant_conv
    block_{j}: norm1, conv1, norm2, conv2 (+ nin_shortcut when channels change)
    attn_{j}:  norm, q, k, v, proj_out

Convs hold `kernel [kh, kw, in, out]` and `bias`; GroupNorms hold `scale` and `bias`.
Taming's PyTorch names are the same path with dots, `.i` for `_i` and `weight` for
`kernel`/`scale`/`embedding`, conv kernels OIHW; see `params_from_torch_state_dict`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from model.errors import CheckpointError, UnsupportedOptionError


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
    """Architecture of a VQGAN; the defaults are the published `vqgan_imagenet_f16_16384`."""

    ch: int = 128  # channels of the first level; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (decoder levels have one more)
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    z_channels: int = 256  # encoder output / decoder input channels
    embed_dim: int = 256  # codebook vector size
    n_embed: int = 16384  # codebook size
    resolution: int = 256  # image height = width
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0  # training-time only upstream; kept for the config round trip

    # Upstream options this implementation computes only in one setting; anything else is refused.
    _FIXED_OPTIONS = {"double_z": False, "resamp_with_conv": True, "give_pre_end": False}
    _REQUIRED = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "embed_dim",
                 "n_embed", "resolution", "in_channels", "out_ch")

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise CheckpointError(f"VQGAN config: ch * ch_mult = {self.ch * mult} channels "
                                      "is not divisible by the 32 GroupNorm groups")
        if self.resolution % self.downsample_factor:
            raise CheckpointError(f"VQGAN config: resolution {self.resolution} is not divisible by "
                                  f"the downsample factor {self.downsample_factor}")

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self.num_levels - 1)

    @property
    def latent_size(self) -> int:
        """Height = width of the code grid."""
        return self.resolution // self.downsample_factor

    @property
    def num_codes(self) -> int:
        """Codes per image (256 for the published model)."""
        return self.latent_size**2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQGANConfig":
        """Reads an upstream (vqgan-jax) config.json; bookkeeping keys are ignored."""
        for option, supported in cls._FIXED_OPTIONS.items():
            if option in d and bool(d[option]) != supported:
                raise UnsupportedOptionError(
                    f"VQGAN config.json: {option}={d[option]!r} is not supported (only {supported})")
        missing = [key for key in cls._REQUIRED if key not in d]
        if missing:
            raise CheckpointError(f"VQGAN config.json lacks {', '.join(missing)}")
        fields = {key: d[key] for key in cls._REQUIRED}
        fields["dropout"] = float(d.get("dropout", 0.0))
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """A config.json that vqgan-jax's VQGANConfig reads back as the same architecture."""
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return {**d, **self._FIXED_OPTIONS}


def _conv(features: int, kernel: int, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, name=name)


def _group_norm(name: str) -> nn.GroupNorm:
    # Taming's Normalize: 32 groups, eps 1e-6. Two-pass variance: the one-pass E[x^2] - E[x]^2
    # loses fp32 precision on groups whose mean is large against their spread (same speed here).
    return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):  # [b, h, w, c_in] -> [b, h, w, features]
        h = _conv(self.features, 3, "conv1")(nn.swish(_group_norm("norm1")(x)))
        h = _conv(self.features, 3, "conv2")(nn.swish(_group_norm("norm2")(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions."""

    @nn.compact
    def __call__(self, x):  # [b, h, w, c]
        b, height, width, c = x.shape
        h = _group_norm("norm")(x)
        q = _conv(c, 1, "q")(h).reshape(b, height * width, c)
        k = _conv(c, 1, "k")(h).reshape(b, height * width, c)
        v = _conv(c, 1, "v")(h).reshape(b, height * width, c)
        weights = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * c**-0.5, axis=-1)
        h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
        return x + _conv(c, 1, "proj_out")(h)


class Downsample(nn.Module):
    @nn.compact
    def __call__(self, x):  # [b, h, w, c] -> [b, h/2, w/2, c]
        # Taming pads only bottom/right by one, then a VALID stride-2 conv.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(x.shape[-1], 3, "conv", stride=2, padding="VALID")(x)


class Upsample(nn.Module):
    @nn.compact
    def __call__(self, x):  # [b, h, w, c] -> [b, 2h, 2w, c]
        b, h, w, c = x.shape
        # Nearest-neighbour x2 as a broadcast: exact and a single copy.
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return _conv(c, 3, "conv")(x)


class Level(nn.Module):
    """One resolution level: ResnetBlocks, `attn_{j}` right after `block_{j}` when `attention`."""

    features: int
    num_blocks: int
    attention: bool
    resample: str | None  # "downsample", "upsample", or None at the end of the pyramid

    @nn.compact
    def __call__(self, x):
        for j in range(self.num_blocks):
            x = ResnetBlock(self.features, name=f"block_{j}")(x)
            if self.attention:
                x = AttnBlock(name=f"attn_{j}")(x)
        if self.resample:
            x = {"downsample": Downsample, "upsample": Upsample}[self.resample](name=self.resample)(x)
        return x


class MidBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(self.features, name="block_1")(x)
        x = AttnBlock(name="attn_1")(x)
        return ResnetBlock(self.features, name="block_2")(x)


class Encoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, images):  # [b, H, W, in_channels] -> [b, h, w, z_channels]
        cfg = self.config
        x = _conv(cfg.ch, 3, "conv_in")(images)
        size = cfg.resolution  # feature-map side at the current level
        for i, mult in enumerate(cfg.ch_mult):
            last = i == cfg.num_levels - 1
            x = Level(cfg.ch * mult, cfg.num_res_blocks, size in cfg.attn_resolutions,
                      None if last else "downsample", name=f"down_{i}")(x)
            if not last:
                size //= 2
        x = MidBlock(cfg.ch * cfg.ch_mult[-1], name="mid")(x)
        x = nn.swish(_group_norm("norm_out")(x))
        return _conv(cfg.z_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
    config: VQGANConfig

    @nn.compact
    def __call__(self, z):  # [b, h, w, z_channels] -> [b, H, W, out_ch]
        cfg = self.config
        x = _conv(cfg.ch * cfg.ch_mult[-1], 3, "conv_in")(z)
        x = MidBlock(cfg.ch * cfg.ch_mult[-1], name="mid")(x)
        size = cfg.latent_size  # feature-map side at the current level
        for i in reversed(range(cfg.num_levels)):
            x = Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, size in cfg.attn_resolutions,
                      "upsample" if i else None, name=f"up_{i}")(x)
            size *= 2
        x = nn.swish(_group_norm("norm_out")(x))
        return _conv(cfg.out_ch, 3, "conv_out")(x)


class Quantizer(nn.Module):
    config: VQGANConfig

    def setup(self):
        self.embedding = nn.Embed(self.config.n_embed, self.config.embed_dim)

    def nearest(self, z):  # [b, h, w, embed_dim] -> codes [b, h*w] int32, row-major
        flat = z.reshape(z.shape[0], -1, z.shape[-1])
        table = self.embedding.embedding  # [n_embed, embed_dim]
        # |z|^2 + |e|^2 - 2 z.e, the same expansion as taming, so near-ties break the same way.
        distances = (jnp.sum(flat**2, axis=-1, keepdims=True) + jnp.sum(table**2, axis=-1)
                     - 2 * jnp.einsum("bnd,kd->bnk", flat, table))
        return jnp.argmin(distances, axis=-1).astype(jnp.int32)

    def lookup(self, codes):  # [b, h*w] -> [b, h, w, embed_dim]
        side = self.config.latent_size
        return self.embedding(codes).reshape(codes.shape[0], side, side, self.config.embed_dim)


class VQGAN(nn.Module):
    """Encoder, codebook and decoder; call methods through `apply(..., method=VQGAN.decode_code)`."""

    config: VQGANConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = _conv(cfg.embed_dim, 1, "quant_conv")
        self.post_quant_conv = _conv(cfg.z_channels, 1, "post_quant_conv")

    def encode_latents(self, images):
        """images [b, H, W, 3] in [0, 1] -> z [b, h, w, embed_dim], before quantization."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images):
        """images [b, H, W, 3] in [0, 1] -> (quantized [b, h, w, embed_dim], codes [b, h*w] int32)."""
        codes = self.quantize.nearest(self.encode_latents(images))
        return self.quantize.lookup(codes), codes

    def decode(self, quantized):
        """quantized [b, h, w, embed_dim] -> images [b, H, W, 3], unclipped."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode_code(self, codes):
        """codes [b, h*w] (row-major) -> images [b, H, W, 3], unclipped."""
        return self.decode(self.quantize.lookup(codes))

    def __call__(self, images):
        """Reconstruction [b, H, W, 3] through the codebook (initializes every parameter)."""
        return self.decode(self.encode(images)[0])


def param_shapes(config: VQGANConfig) -> dict:
    """The parameter tree of `VQGAN(config)` as ShapeDtypeStructs, without computing anything."""
    images = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32)
    return jax.eval_shape(VQGAN(config).init, jax.random.key(0), images)["params"]


_INDEX = re.compile(r"^(.*)_(\d+)$")
# Taming-only entries of a training checkpoint (discriminator, LPIPS); not part of the VQGAN.
_TRAINING_PREFIX = "loss."


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax path -> taming state-dict name: `down_0/block_1/conv1/kernel` -> `down.0.block.1.conv1.weight`."""
    parts = []
    for parent, part in zip(("",) + path, path[:-1]):
        match = _INDEX.match(part)
        # List entries become `.i`; mid's own `block_1`/`attn_1`/`block_2` keep their underscore.
        parts += [match.group(1), match.group(2)] if match and parent != "mid" else [part]
    parts.append("weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1])
    return ".".join(parts)


def params_from_torch_state_dict(state: Mapping[str, np.ndarray], config: VQGANConfig) -> dict:
    """Taming-style torch tensors (conv weights OIHW) -> our parameter tree (conv kernels HWIO).

    Every parameter of `VQGAN(config)` must be present with its shape; extra keys are an error,
    except taming's training-time `loss.*` entries.
    """
    expected = flatten_dict(param_shapes(config))
    names = {_torch_name(path): path for path in expected}
    unexpected = sorted(k for k in state if k not in names and not k.startswith(_TRAINING_PREFIX))
    missing = sorted(k for k in names if k not in state)
    if missing or unexpected:
        raise CheckpointError(f"VQGAN torch state dict: missing {missing[:5]} ({len(missing)} in all), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    params = {}
    for name, path in names.items():
        array = np.asarray(state[name], dtype=np.float32)
        if path[-1] == "kernel":
            array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if array.shape != expected[path].shape:
            raise CheckpointError(f"VQGAN torch state dict: {name} has shape {array.shape} after "
                                  f"conversion, expected {expected[path].shape}")
        params[path] = jnp.asarray(array)
    return unflatten_dict(params)


def params_to_torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our parameter tree -> taming-style state dict of numpy arrays (conv weights OIHW)."""
    state = {}
    for path, value in flatten_dict(params).items():
        array = np.array(value, dtype=np.float32)  # a writable copy, as torch.from_numpy wants
        if path[-1] == "kernel":
            array = np.ascontiguousarray(array.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        state[_torch_name(path)] = array
    return state
