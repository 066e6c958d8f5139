"""Cached decoding: one image token per step, for sampling (the fast path of DalleBart).

A decoding step reads every decoder weight once and little else, so its speed is the speed of that
read. `decoding_params` rearranges the weights once (per-layer arrays, fused matmuls, padded
widths); `init_decode_cache` computes the text's cross-attention keys/values once per prompt batch;
`decode_step` runs one position. The numbers are those of `bart.decode` (teacher forcing): see
tests/test_bart.py.

Shapes: b rows, h heads, k head dim, T text tokens, d d_model, F GLU width, V image_vocab_size.
"""

import jax
import jax.numpy as jnp
from jax import lax

from model.bart import MASKED_SCORE, DalleBartConfig, attend, decoder_layer_stack, dense, embed, layer_norm, split_heads


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
    stack = decoder_layer_stack(params)
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
    stack = decoder_layer_stack(params)
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
    weights = _decoding_weights(params)[0]
    dtype = cache_dtype(params)

    def empty():
        # Separate buffers throughout: callers donate the cache to jit, which refuses a buffer twice.
        return tuple(jnp.zeros((batch, heads, size, config.d_model // heads), dtype)
                     for _, size in _segment_bounds(config))

    layers = []
    for w in weights:
        layers.append({
            "cross_keys": split_heads(dense(encoder_states, w["cross_k"]).astype(dtype), heads)[rows],
            "cross_values": split_heads(dense(encoder_states, w["cross_v"]).astype(dtype), heads)[rows],
            "self_keys": empty(),
            "self_values": empty(),
        })
    return {"text_mask": attention_mask.astype(bool)[rows], "layers": layers}


def cache_dtype(params: dict):
    """The KV cache holds keys and values in the decoder weights' dtype (half with half weights)."""
    return params["model"]["decoder"]["embed_tokens"]["embedding"].dtype


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
    dtype = keys[0].dtype
    q = (q * (q.shape[-1] ** -0.5)).astype(dtype)

    def over_first(count):
        def attend(q, keys, values, position):
            # Products in the cache's dtype, accumulated, masked and normalised in float32.
            scores = jnp.concatenate([jnp.einsum("bhqc,bhkc->bhqk", q, k, preferred_element_type=jnp.float32)
                                      for k in keys[:count]], axis=-1)
            visible = jnp.arange(sum(size for _, size in bounds[:count])) <= position
            weights = jax.nn.softmax(jnp.where(visible, scores, MASKED_SCORE), axis=-1)
            split_at = [start for start, _ in bounds[1:count]]
            return sum(jnp.einsum("bhqk,bhkc->bqhc", w.astype(dtype), v, preferred_element_type=jnp.float32)
                       for w, v in zip(jnp.split(weights, split_at, axis=-1), values[:count]))
        return attend

    branches = [over_first(count) for count in range(1, len(bounds) + 1)]
    out = lax.switch(position // bounds[0][1], branches, q, keys, values, position)  # [b, 1, h, k]
    return dense(out.reshape(out.shape[:2] + (-1,)), out_kernel)


def _decoding_glu(w: dict, h: jax.Array) -> jax.Array:
    """The GLU of a decoding_params layer: h [b, n, d] -> [b, n, d]."""
    width, padded = w["glu_out"].shape[0], w["glu_in"].shape[1] // 2
    both = dense(layer_norm(w["glu_norm_in"], h), w["glu_in"])  # [b, n, 2 * padded]
    gated = jax.nn.gelu(both[..., :width], approximate=False) * both[..., padded:padded + width]
    return dense(layer_norm(w["glu_norm_mid"], gated), w["glu_out"])


def decode_step(params, cache: dict, token_ids: jax.Array, position: jax.Array, config: DalleBartConfig):
    """One decoding step: token_ids [b] int sit at `position` (scalar int32, may be traced;
    0 <= position < image_length). Returns (logits [b, V + 1] predicting the token at
    position + 1, the cache with this position's self-attention keys/values written).

    params: decoding_params(tree) for speed, or upstream's tree (same numbers, slower).
    """
    p = params["model"]["decoder"]
    heads = config.decoder_attention_heads
    bounds = _segment_bounds(config)
    h = embed(p, token_ids[:, None], position[None])  # [b, 1, d]
    text_visible = cache["text_mask"][:, None, None, :]
    layers = []
    # A Python loop, not lax.scan: every layer's weights and cache are then separate arrays that
    # XLA reads and updates in place (scanning over stacks copied each layer's slice per step).
    weights, lm_head = _decoding_weights(params)
    for w, c in zip(weights, cache["layers"]):
        qkv = dense(layer_norm(w["self_norm_in"], h), w["self_qkv"])  # [b, 1, 3d] float32
        dtype = c["self_keys"][0].dtype
        q, k, v = (split_heads(y, heads) for y in jnp.split(qkv, 3, axis=-1))  # [b, h, 1, k]
        k, v = k.astype(dtype), v.astype(dtype)
        keys = _write_position(c["self_keys"], k, position, bounds)
        values = _write_position(c["self_values"], v, position, bounds)
        h = h + layer_norm(w["self_norm_out"], _attend_written(q, keys, values, position, w["self_out"], bounds))
        q = split_heads(dense(layer_norm(w["cross_norm_in"], h), w["cross_q"]), heads)
        h = h + layer_norm(w["cross_norm_out"], attend(q, c["cross_keys"], c["cross_values"], text_visible, w["cross_out"]))
        h = h + _decoding_glu(w, h)
        layers.append({**c, "self_keys": keys, "self_values": values})
    # Logits accumulate and stay in float32 (dense): the sampler's top-k/top-p cut-offs compare them.
    logits = dense(layer_norm(p["final_ln"], h[:, 0]), lm_head)
    return logits[:, :config.image_vocab_size + 1], {**cache, "layers": layers}
