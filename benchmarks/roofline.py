"""The work generation needs, counted from the configs, and this machine's limits, measured.

The roofline of a stage is the larger of (FLOPs / matmul peak) and (bytes that must be read /
memory bandwidth). Counts are of the work the models need, not of what an implementation does:
matmul FLOPs (2 per multiply-add) and attention; norms, activations and sampling are left out.
A decoding step must read every decoder weight and the keys/values of the positions written so
far (all rows), so at small batch it is memory-bound; the encoder, the VQGAN and CLIP are
compute-bound. Cross-attention keys/values are counted once per distinct prompt (the conditional
rows share one prompt and the unconditional rows the empty one).
"""

import time

FLOAT_BYTES = 4


def decoder_weights(config) -> int:
    """Weights a decoding step multiplies by: per layer self q/k/v/out, cross q/out, GLU in x2 and out;
    then the LM head."""
    d, ffn = config.d_model, config.decoder_ffn_dim
    return config.decoder_layers * (6 * d * d + 3 * d * ffn) + d * (config.image_vocab_size + 1)


def decoder_step(config, rows: int, position: int, text_length: int) -> tuple[float, float]:
    """(FLOPs, bytes read) of the cached decoding step at `position` for `rows` sequences."""
    d, layers = config.d_model, config.decoder_layers
    weights = decoder_weights(config)
    keys = position + 1
    # Per row and layer: scores and weighted values, 2 FLOPs per multiply-add over d per key.
    attention = layers * 4 * d * (keys + text_length)
    flops = rows * (2 * weights + attention)
    cache = layers * rows * 2 * d * keys  # self-attention keys and values read this step
    cross = layers * 2 * d * text_length * 2  # two distinct prompts (conditional and empty)
    return flops, FLOAT_BYTES * (weights + cache + cross)


def decode(config, rows: int, text_length: int, peak_flops: float, bandwidth: float) -> dict:
    """Roofline of the image_length decoding steps: seconds, and FLOPs and bytes summed."""
    seconds = flops_total = bytes_total = 0.0
    for position in range(config.image_length):
        flops, read = decoder_step(config, rows, position, text_length)
        seconds += max(flops / peak_flops, read / bandwidth)
        flops_total += flops
        bytes_total += read
    return {"seconds": seconds, "flops": flops_total, "bytes": bytes_total,
            "ms_per_token": 1e3 * seconds / config.image_length}


def encoder(config, rows: int) -> float:
    """FLOPs of encoding `rows` text rows of max_text_length tokens, plus the decoder's
    cross-attention keys/values of those rows (computed once per prompt batch)."""
    d, ffn, length = config.d_model, config.encoder_ffn_dim, config.max_text_length
    per_layer = 2 * length * (4 * d * d + 3 * d * ffn) + 4 * length * length * d
    cross_kv = config.decoder_layers * 2 * length * 2 * d * d
    return rows * (config.encoder_layers * per_layer + cross_kv)


def vqgan_decode(config) -> float:
    """FLOPs of decoding one image from codes (taming's decoder: convolutions and attention)."""
    flops = 0.0

    def conv(size, c_in, c_out, kernel):
        nonlocal flops
        flops += 2 * size * size * kernel * kernel * c_in * c_out

    def attention(size, c):
        nonlocal flops
        for _ in range(4):  # q, k, v, proj_out
            conv(size, c, c, 1)
        flops += 2 * 2 * (size * size) ** 2 * c  # scores and weighted values

    def resnet(size, c_in, c_out):
        conv(size, c_in, c_out, 3)
        conv(size, c_out, c_out, 3)
        if c_in != c_out:
            conv(size, c_in, c_out, 1)

    size = config.latent_size
    channels = config.ch * config.ch_mult[-1]
    conv(size, config.embed_dim, config.z_channels, 1)  # post_quant_conv
    conv(size, config.z_channels, channels, 3)  # conv_in
    resnet(size, channels, channels)
    attention(size, channels)
    resnet(size, channels, channels)
    for level in reversed(range(config.num_levels)):
        out = config.ch * config.ch_mult[level]
        for _ in range(config.num_res_blocks + 1):
            resnet(size, channels, out)
            channels = out
            if size in config.attn_resolutions:
                attention(size, channels)
        if level != 0:
            size *= 2
            conv(size, channels, channels, 3)  # upsample
    conv(size, channels, config.out_ch, 3)  # conv_out
    return flops


def _transformer(tokens: int, width: int, mlp: int, layers: int) -> float:
    return layers * (2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width)


def clip(config, images: int, prompts: int) -> float:
    """FLOPs of CLIP scoring `images` against `prompts` (both towers and projections)."""
    v, t = config.vision_config, config.text_config
    patches = (v.image_size // v.patch_size) ** 2
    vision = (2 * patches * v.num_channels * v.patch_size ** 2 * v.hidden_size
              + _transformer(patches + 1, v.hidden_size, v.intermediate_size, v.num_hidden_layers)
              + 2 * v.hidden_size * config.projection_dim)
    text = (_transformer(t.max_position_embeddings, t.hidden_size, t.intermediate_size, t.num_hidden_layers)
            + 2 * t.hidden_size * config.projection_dim)
    return images * vision + prompts * text


# ---------------------------------------------------------------------------------------------
# Machine limits (measured in the benchmark's own run, so they share its conditions)


def best_seconds(run, repeats: int) -> float:
    """The fastest of `repeats` timed calls of run(), after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(torch_threads: int = 2, repeats: int = 5) -> dict:
    """Best fp32 matmul FLOP/s and read bandwidth over JAX (XLA) and PyTorch kernels.

    Peak: square matmuls of 2048 and 3072. Bandwidth: a sum over 1 GiB, far beyond the caches.
    The best of both libraries is used, so the roofline is the stricter one.
    """
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(torch_threads)
    result = {"matmul": {}, "bandwidth": {}}
    matmul = jax.jit(lambda a, b: a @ b)
    for n in (2048, 3072):
        a = jnp.ones((n, n), jnp.float32) / n
        seconds = best_seconds(lambda: matmul(a, a).block_until_ready(), repeats)
        result["matmul"][f"jax {n}"] = 2 * n ** 3 / seconds
        ta = torch.ones(n, n) / n
        seconds = best_seconds(lambda: ta @ ta, repeats)
        result["matmul"][f"torch {n}"] = 2 * n ** 3 / seconds
    count = 2 ** 28  # 1 GiB of float32
    array = jnp.ones((count,), jnp.float32)
    total = jax.jit(jnp.sum)
    result["bandwidth"]["jax sum"] = FLOAT_BYTES * count / best_seconds(lambda: total(array).block_until_ready(), repeats)
    del array
    tensor = torch.ones(count)
    result["bandwidth"]["torch sum"] = FLOAT_BYTES * count / best_seconds(lambda: tensor.sum(), repeats)
    result["peak_flops"] = max(result["matmul"].values())
    result["bandwidth_bytes"] = max(result["bandwidth"].values())
    return result
