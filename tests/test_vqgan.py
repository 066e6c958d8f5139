"""VQGAN parity against two independent torch implementations, plus shapes and config checks.

Random weights are drawn so that mistakes show at the 1e-5 tolerance: GroupNorm scales/biases
and conv biases are perturbed away from their defaults, and the hidden convolutions are scaled
so that GroupNorm inputs have low variance: a GroupNorm epsilon of 1e-5 instead of 1e-6 moves
the outputs by 9e-4 (published size) and 4e-4 (small config), measured.
"""

import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from model.errors import UnsupportedOptionError
from model.vqgan import (VQGAN, VQGANConfig, param_shapes, params_from_torch_state_dict,
                         params_to_torch_state_dict)

TOLERANCE = 1e-5
# A small member of the family: three levels (32 -> 16 -> 8), attention at 16x16 so it sits
# between blocks and before a resampling, channel change 32 -> 64 (nin_shortcut).
SMALL = VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), z_channels=16,
                    embed_dim=16, n_embed=64, resolution=32)


def relative_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(1.0, np.max(np.abs(ref))))


def random_params(shapes, seed: int, codebook_scale: float = 0.3, hidden_gain: float = 0.3) -> dict:
    """Random parameters for a tree of shapes: kernels ~ hidden_gain / sqrt(fan_in), except
    conv_out at unit gain so outputs are O(1)."""
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in flatten_dict(shapes).items():
        shape = shape.shape
        if path[-1] == "kernel":
            gain = 1.0 if path[-2] == "conv_out" else hidden_gain
            value = rng.standard_normal(shape) * gain / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif path[-1] == "embedding":
            value = codebook_scale * rng.standard_normal(shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        params[path] = jnp.asarray(value, jnp.float32)
    return unflatten_dict(params)


# FLOAT64 REFERENCES: both torch references run in float64. In fp32, torch's GroupNorm alone is
# off by 1.4e-5 at the small config's first norm (groups whose mean is large against their
# spread), and at the published depth min-dalle in fp32 is ~8e-6 away from its float64 self while
# ours is ~3e-6 away (measured): an fp32 reference would leave no margin under the tolerance.


def load_taming():
    """taming's torch Encoder/Decoder/VectorQuantizer modules (installed with --no-deps)."""
    # quantize.py imports einops.rearrange for classes we do not use; without einops installed,
    # a stand-in that fails loudly keeps VectorQuantizer importable.
    try:
        import einops  # noqa: F401
    except ImportError:
        stub = types.ModuleType("einops")

        def rearrange(*args, **kwargs):
            raise RuntimeError("einops is not installed; VectorQuantizer does not need it")

        stub.rearrange = rearrange
        sys.modules["einops"] = stub
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer
    return Encoder, Decoder, VectorQuantizer


def test_decode_code_matches_min_dalle_at_published_size():
    from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer

    config = VQGANConfig()
    shapes = {k: v for k, v in param_shapes(config).items() if k in ("decoder", "post_quant_conv", "quantize")}
    params = random_params(shapes, seed=0)
    codes = np.random.default_rng(1).integers(0, config.n_embed, (1, config.num_codes))

    # min-dalle names the codebook `embedding` (taming: `quantize.embedding`) and has no encoder.
    state = params_to_torch_state_dict(params)
    state["embedding.weight"] = state.pop("quantize.embedding.weight")
    detokenizer = VQGanDetokenizer().eval()
    detokenizer.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    # The reference runs in float64 (see FLOAT64 REFERENCES). Two adjustments: min-dalle builds
    # its GroupNorms with torch's default eps 1e-5 where the published model (taming, vqgan-jax)
    # uses 1e-6, and its Upsample casts to fp32 (for its fp16 mode), which float64 cannot pass.
    detokenizer.double()
    for module in detokenizer.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.eps = 1e-6
    for level in detokenizer.decoder.up:
        if level.has_upsample:
            up = level.upsample
            up.forward = lambda x, up=up: up.conv(up.upsample(x))

    start = time.perf_counter()
    with torch.no_grad():  # min-dalle's forward up to, not including, its clip/scale/tiling
        z = detokenizer.embedding(torch.from_numpy(codes)).view(1, 16, 16, 256).permute(0, 3, 1, 2).contiguous()
        ref = detokenizer.decoder(detokenizer.post_quant_conv(z)).permute(0, 2, 3, 1).numpy()
    torch_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = np.asarray(VQGAN(config).apply({"params": params}, jnp.asarray(codes, jnp.int32),
                                          method=VQGAN.decode_code))
    jax_s = time.perf_counter() - start
    error = relative_error(ours, ref)
    print(f"min-dalle decode_code: rel err {error:.2e}, max|ref| {np.abs(ref).max():.3f}, "
          f"torch {torch_s:.1f}s, ours (incl. compile) {jax_s:.1f}s")
    assert ours.shape == (1, 256, 256, 3)
    assert error <= TOLERANCE


def test_encoder_quantizer_decoder_match_taming():
    Encoder, Decoder, VectorQuantizer = load_taming()
    config = SMALL
    params = random_params(param_shapes(config), seed=2, codebook_scale=0.1, hidden_gain=1.0)
    images = np.random.default_rng(3).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)

    arch = dict(ch=config.ch, out_ch=config.out_ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                attn_resolutions=config.attn_resolutions, in_channels=config.in_channels,
                resolution=config.resolution, z_channels=config.z_channels, double_z=False, dropout=0.0)
    ref = torch.nn.Module()
    ref.encoder, ref.decoder = Encoder(**arch), Decoder(**arch)
    ref.quantize = VectorQuantizer(config.n_embed, config.embed_dim, beta=0.25)
    ref.quant_conv = torch.nn.Conv2d(config.z_channels, config.embed_dim, 1)
    ref.post_quant_conv = torch.nn.Conv2d(config.embed_dim, config.z_channels, 1)
    state = params_to_torch_state_dict(params)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    ref.eval().double()  # see FLOAT64 REFERENCES
    with torch.no_grad():
        z_ref = ref.quant_conv(ref.encoder(torch.from_numpy(images).double().permute(0, 3, 1, 2)))
        quantized_ref, _, (_, _, codes_ref) = ref.quantize(z_ref)
        decoded_ref = ref.decoder(ref.post_quant_conv(quantized_ref)).permute(0, 2, 3, 1).numpy()
    z_ref = z_ref.permute(0, 2, 3, 1).numpy()
    codes_ref = codes_ref.reshape(2, config.num_codes).numpy()

    model = VQGAN(config)
    variables = {"params": params}
    z = model.apply(variables, images, method=VQGAN.encode_latents)
    quantized, codes = model.apply(variables, images, method=VQGAN.encode)
    decoded = model.apply(variables, quantized, method=VQGAN.decode)
    from_codes = model.apply(variables, codes, method=VQGAN.decode_code)
    reconstruction = model.apply(variables, images)

    errors = {"z": relative_error(z, z_ref),
              "quantized": relative_error(quantized, quantized_ref.permute(0, 2, 3, 1).numpy()),
              "decoded": relative_error(decoded, decoded_ref)}
    print("taming parity:", {k: f"{v:.2e}" for k, v in errors.items()},
          f"max|decoded| {np.abs(decoded_ref).max():.3f}, {len(np.unique(codes_ref))} distinct codes")
    assert codes.dtype == jnp.int32 and codes.shape == (2, config.num_codes)
    assert len(np.unique(codes_ref)) > 10, "the test should exercise many codes"
    np.testing.assert_array_equal(np.asarray(codes), codes_ref)
    assert max(errors.values()) <= TOLERANCE
    np.testing.assert_array_equal(np.asarray(from_codes), np.asarray(decoded))
    np.testing.assert_array_equal(np.asarray(reconstruction), np.asarray(decoded))

    # The state dict converts back to the same tree, and the converter insists on a complete one.
    back = params_from_torch_state_dict({**state, "loss.discriminator.main.0.weight": np.zeros(1)}, config)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    del state["decoder.up.1.attn.0.q.bias"]
    with pytest.raises(ValueError, match="decoder.up.1.attn.0.q.bias"):
        params_from_torch_state_dict(state, config)


def test_published_shapes():
    config = VQGANConfig()
    flat = flatten_dict(param_shapes(config))
    count = sum(int(np.prod(s.shape)) for s in flat.values())
    print(f"published VQGAN: {count:,} parameters")
    assert count == 76_073_859
    expected = {
        "quantize/embedding/embedding": (16384, 256),
        "quant_conv/kernel": (1, 1, 256, 256),
        "post_quant_conv/bias": (256,),
        "encoder/conv_in/kernel": (3, 3, 3, 128),
        "encoder/down_0/downsample/conv/kernel": (3, 3, 128, 128),
        "encoder/down_2/block_0/nin_shortcut/kernel": (1, 1, 128, 256),
        "encoder/down_4/attn_1/proj_out/kernel": (1, 1, 512, 512),
        "encoder/mid/attn_1/q/kernel": (1, 1, 512, 512),
        "encoder/norm_out/scale": (512,),
        "encoder/conv_out/kernel": (3, 3, 512, 256),
        "decoder/conv_in/kernel": (3, 3, 256, 512),
        "decoder/mid/block_2/norm2/bias": (512,),
        "decoder/up_4/attn_2/k/kernel": (1, 1, 512, 512),
        "decoder/up_3/block_0/nin_shortcut/kernel": (1, 1, 512, 256),
        "decoder/up_1/upsample/conv/kernel": (3, 3, 128, 128),
        "decoder/up_0/block_2/conv2/kernel": (3, 3, 128, 128),
        "decoder/conv_out/kernel": (3, 3, 128, 3),
    }
    for name, shape in expected.items():
        assert flat[tuple(name.split("/"))].shape == shape, name
    paths = {"/".join(p) for p in flat}
    # Attention only at 16x16 (the deepest level), no resampling at the ends of the pyramid.
    assert not any("attn" in p for p in paths if p.startswith(("encoder/down_3", "decoder/up_3")))
    assert not any(p.startswith(("encoder/down_4/downsample", "decoder/up_0/upsample")) for p in paths)
    assert "decoder/up_4/block_3/conv1/kernel" not in paths

    images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    params = param_shapes(config)
    quantized, codes = jax.eval_shape(lambda p, x: VQGAN(config).apply({"params": p}, x, method=VQGAN.encode),
                                      params, images)
    assert quantized.shape == (2, 16, 16, 256) and codes.shape == (2, 256) and codes.dtype == jnp.int32
    assert config.latent_size == 16 and config.num_codes == 256 and config.downsample_factor == 16


def test_config_round_trip_and_refusals():
    upstream = {"ch": 128, "out_ch": 3, "in_channels": 3, "num_res_blocks": 2, "resolution": 256,
                "z_channels": 256, "ch_mult": [1, 1, 2, 2, 4], "attn_resolutions": [16], "n_embed": 16384,
                "embed_dim": 256, "dropout": 0.0, "double_z": False, "resamp_with_conv": True,
                "give_pre_end": False, "architectures": ["VQModel"], "transformers_version": "4.16.0.dev0",
                "_name_or_path": "dalle-mini/vqgan_imagenet_f16_16384"}
    config = VQGANConfig.from_dict(upstream)
    assert config == VQGANConfig()
    assert VQGANConfig.from_dict(config.to_dict()) == config
    assert VQGANConfig.from_dict(SMALL.to_dict()) == SMALL
    written = config.to_dict()
    assert {k: v for k, v in upstream.items() if k in written} == written
    for option, value in (("double_z", True), ("resamp_with_conv", False), ("give_pre_end", True)):
        with pytest.raises(UnsupportedOptionError, match=option):
            VQGANConfig.from_dict({**upstream, option: value})
    with pytest.raises(ValueError, match="n_embed"):
        VQGANConfig.from_dict({k: v for k, v in upstream.items() if k != "n_embed"})
