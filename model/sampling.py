"""Autoregressive sampling of image codes with super-conditioning (classifier-free guidance).

Pure functions over a generic decoder step, so the sampler knows nothing of DalleBart:

    step_fn(params, cache, tokens [rows] int32, position int32 scalar)
        -> (logits [rows, vocab] float32, cache)

`position` t feeds the start token (t = 0) or code t-1, and its logits predict code t, so an image
of `image_length` codes takes exactly `image_length` steps (reference.md §2).

With guidance the cache holds 2*batch rows: rows [0, batch) see the prompt, rows [batch, 2*batch)
the empty prompt. One forward pass serves both halves (as min-dalle does) and the sampled token is
fed to both, so the unconditional half always continues the same image as the conditional half.

Per step, in this order (the order of upstream's HF warpers, after guidance):
  1. guidance     logits = uncond + condition_scale * (cond - uncond)
  2. mask         ids >= num_real_codes (start token, padded vocab of mega) -> -inf
  3. temperature  logits / temperature            (temperature <= 0: greedy, i.e. top_k = 1)
  4. top-k        keep the k largest              (k <= 0: off)
  5. top-p        keep the smallest set of the top-k survivors whose renormalised probability
                  mass reaches p                  (p >= 1: off; p <= 0: top-1)
  6. sample       one categorical draw per row with the row's own key.
Ties: top-k and top-p cut at a threshold *value*, so every id equal to the cut-off value is kept
(the kept set may exceed k), and top_k = 1 keeps all ids tied for the maximum.

The knobs (temperature, top_k, top_p, condition_scale) are traced per-row arrays `[batch]`, so a
batch may mix requests with different settings, and no value of them ever recompiles. Top-k and
top-p find their cut-offs by a 32-step radix select over the float bit patterns instead of a full
sort: exact and shape-static; on this CPU both cut-offs took ~3.5 ms for [16, 16415] logits where
one descending sort took ~50 ms.

Forced prefixes (image variations): rows may carry known codes for their first `prefix_length`
positions; those steps feed the known code instead of a sample, so the cache sees exactly the
given prefix and sampling continues from it. prefix_length 0 is plain sampling (same compile).

Guided variations (per-row `strength` s in [0, 1], traced): past the prefix, the same `prefix` codes
guide each step. At position t the guide code g_t is copied with probability s (a uniform draw from
the row's own stream, apart from the sampling noise), unless the model rules it out: its
temperature-scaled logit lies more than the row's `overrule` margin below the best code's (the
pipeline gives a margin only to rows with a prompt, so a prompt saying "pink" can replace a blue
background; without a prompt nothing overrules the upload). Every other position is sampled as
usual, in the context of the copied ones. s = 0 copies nothing (plain sampling, the same codes bit
for bit) and s = 1 copies every g_t (the guide reproduced exactly).

Randomness: row r's key at step t is fold_in(row_key[r], t), and `row_keys(seed, n)` gives row r
fold_in(key(seed), r). A row's codes therefore depend only on (seed, row index within its request,
knobs, model), not on the batch it was computed in, how rows are sharded, or on chunking.
"""

import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from model import xla_options

StepFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


class SamplingKnobs(NamedTuple):
    """Per-row sampling settings, each `[batch]`; traced, so changing them never recompiles."""

    temperature: jax.Array  # float32; <= 0 means greedy
    top_k: jax.Array  # int32; <= 0 means off
    top_p: jax.Array  # float32; >= 1 means off
    condition_scale: jax.Array  # float32; used only when sampling with guidance
    strength: jax.Array  # float32 in [0, 1]; chance of copying the `prefix` code past prefix_length; 0 = off
    overrule: jax.Array  # float32 >= 0; logit margin beyond which the model refuses a guide code; inf = never


class SamplerState(NamedTuple):
    """Everything the decoding loop carries from one step to the next."""

    cache: Any  # step_fn's cache pytree; 2*batch rows with guidance, batch rows without
    tokens: jax.Array  # [batch] int32, the token to feed at position `step`
    codes: jax.Array  # [batch, image_length] int32, codes sampled so far (0 beyond `step`)
    step: jax.Array  # int32 scalar, the next position to run
    row_keys: jax.Array  # [batch] PRNG keys, one per row
    prefix: jax.Array  # [batch, image_length] int32 known codes (below prefix_length), guides beyond
    prefix_length: jax.Array  # [batch] int32, positions whose code is given rather than sampled


def sampling_knobs(batch, *, temperature=1.0, top_k=0, top_p=1.0, condition_scale=1.0,
                   strength=0.0, overrule=jnp.inf) -> SamplingKnobs:
    """Broadcasts scalars or per-row `[batch]` values to a `SamplingKnobs` of `[batch]` arrays.

    Fixed dtypes and shapes here are what keep Python floats, numpy values and jax arrays from
    producing different jit signatures.
    """
    def per_row(value, dtype):
        return jnp.broadcast_to(jnp.asarray(value, dtype), (batch,))

    return SamplingKnobs(
        temperature=per_row(temperature, jnp.float32),
        top_k=per_row(top_k, jnp.int32),
        top_p=per_row(top_p, jnp.float32),
        condition_scale=per_row(condition_scale, jnp.float32),
        strength=per_row(strength, jnp.float32),
        overrule=per_row(overrule, jnp.float32),
    )


# With a prompt, the margin grows with strength, so the stronger the pull the surer the model must be
# to refuse the upload's code: 2.2 at s = 0.35, 4 at 0.5, inf at 1 (docs/variations.md).
OVERRULE_SCALE = 4.0


def prompt_overrule(strength: float) -> float:
    """The `overrule` margin for a row with a prompt: `OVERRULE_SCALE * s / (1 - s)`."""
    return float("inf") if strength >= 1 else OVERRULE_SCALE * strength / (1 - strength)


# Folded into a step's key for the copy draw of guided variations, so the sampling noise is untouched.
_COPY_STREAM = 0x636F7079


def guide_copies(scaled, guide, strength, overrule, step_keys):
    """`[batch]` bool: copy the guide code here (see the module docstring).

    scaled: `[batch, vocab]` logits from `scale_logits`; guide: `[batch]` codes; strength, overrule:
    `[batch]`."""
    margin = jnp.max(scaled, axis=1) - jnp.take_along_axis(scaled, guide[:, None], axis=1)[:, 0]
    allowed = jnp.isinf(overrule) | (margin <= overrule)
    draw = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _COPY_STREAM)))(step_keys)
    return (strength >= 1) | ((draw < strength) & allowed)


def row_keys(rng, batch: int) -> jax.Array:
    """Per-row PRNG keys `[batch]` from an int seed, a single key, or `batch` keys.

    A single key (typed, or raw uint32[2]) or an int seed gives row r the key fold_in(key, r).
    Per-row keys (typed [batch], or raw uint32[batch, 2]) are returned as typed keys, which is how
    a server concatenates the rows of several requests with different seeds into one batch.
    """
    if isinstance(rng, numbers.Integral):
        rng = jax.random.key(rng)
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(batch, dtype=jnp.uint32))
    if rng.shape != (batch,):
        raise ValueError(f"rng holds keys of shape {rng.shape}; expected one key or {batch} keys")
    return rng


def guided_logits(cond, uncond, condition_scale):
    """Super-conditioning: `uncond + condition_scale * (cond - uncond)`.

    Args:
      cond, uncond: `[batch, vocab]` logits with and without the prompt.
      condition_scale: scalar or per-row `[batch]`.
    Returns:
      `[batch, vocab]` guided logits.
    """
    scale = jnp.broadcast_to(jnp.asarray(condition_scale, cond.dtype), cond.shape[:1])[:, None]
    # Scale 1 is `cond` exactly: uncond + 1 * (cond - uncond) may differ from it in the last bit, and a
    # row without guidance sharing a guided batch (a server's mixed batch) must sample as it does alone.
    return jnp.where(scale == 1, cond, uncond + scale * (cond - uncond))


def _order_keys(x):
    """uint32 keys whose unsigned order is the float order of `x` (-inf < ... < -0 < +0 < ... < inf)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _largest_threshold(keys, reaches):
    """Per row, the largest key T with `reaches(keys >= T)` true, found bit by bit from the top.

    `reaches` maps a kept-mask `[batch, vocab]` to `[batch]` bools and must be monotone (true for
    T, true for every smaller T). Keeping `keys >= T` then keeps the smallest such set, ties included.
    """
    def set_bit(i, threshold):
        candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(reaches(keys >= candidate[:, None]), candidate, threshold)

    return lax.fori_loop(0, 32, set_bit, jnp.zeros(keys.shape[:1], jnp.uint32))


def filter_logits(logits, temperature, top_k, top_p, num_real_codes: int):
    """Masks unreal ids, applies temperature, then top-k, then top-p (see the module docstring).

    Args:
      logits: `[batch, vocab]` float32 (already guided).
      temperature, top_k, top_p: scalars or per-row `[batch]` arrays (traced).
      num_real_codes: static; ids >= it are never sampled.
    Returns:
      `[batch, vocab]` float32: logits / temperature where kept, -inf elsewhere.
    """
    return filter_scaled(scale_logits(logits, temperature, num_real_codes), temperature, top_k, top_p)


def scale_logits(logits, temperature, num_real_codes: int):
    """`[batch, vocab]` float32: unreal ids masked to -inf, the rest divided by the temperature (by 1
    for greedy rows, temperature <= 0)."""
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits.shape[:1])
    logits = jnp.where(jnp.arange(logits.shape[1]) < num_real_codes, logits.astype(jnp.float32), -jnp.inf)
    return logits / jnp.where(temperature <= 0, 1.0, temperature)[:, None]


def filter_scaled(logits, temperature, top_k, top_p):
    """`filter_logits` past `scale_logits`: top-k (greedy rows keep their top-1), then top-p."""
    batch, vocab = logits.shape
    temperature = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (batch,))
    top_k = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (batch,))
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (batch,))
    greedy = temperature <= 0
    # k = vocab keeps every id: the threshold drops to the smallest key, -inf included.
    k = jnp.where(greedy, 1, jnp.where(top_k <= 0, vocab, jnp.minimum(top_k, vocab)))

    keys = _order_keys(logits)
    # Each threshold search is 32 passes over the logits (~10% of a small model's decoding step, ~3% of
    # mini's); when no row filters, lax.cond skips it (the knobs stay traced: no recompilation).
    keep_all = jnp.zeros((batch,), jnp.uint32)  # every key is >= 0
    k_cut = lax.cond(jnp.all(k >= vocab), lambda: keep_all,
                     lambda: _largest_threshold(keys, lambda kept: jnp.sum(kept, axis=-1) >= k))
    logits = jnp.where(keys >= k_cut[:, None], logits, -jnp.inf)

    # Top-p measures mass under the top-k survivors' renormalised distribution, as HF's warpers do.
    probs = jax.nn.softmax(logits, axis=-1)
    # Requiring a non-empty set keeps the top-1 when top_p <= 0 (the empty set has mass 0 >= p).
    p_cut = lax.cond(jnp.all(top_p >= 1), lambda: keep_all, lambda: _largest_threshold(
        keys, lambda kept: (jnp.sum(jnp.where(kept, probs, 0.0), axis=-1) >= top_p) & jnp.any(kept, axis=-1)))
    # Summed probabilities may fall short of 1.0 by rounding, so "off" must not rely on them.
    p_cut = jnp.where(top_p >= 1, jnp.uint32(0), p_cut)
    return jnp.where(keys >= p_cut[:, None], logits, -jnp.inf)


def _first_argmax(x):
    """`jnp.argmax(x, -1)` for `[batch, n]` float rows without NaNs (the first index of the maximum).

    Two plain reductions: XLA CPU runs jnp.argmax's (value, index) reduction ~4x slower
    (24 vs 6 us per step for [9, 1025])."""
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(x == best, lax.iota(jnp.int32, x.shape[-1]), x.shape[-1]), axis=-1)
    return jnp.minimum(index, x.shape[-1] - 1)  # a NaN row matches nothing: any valid index


def _sample_rows(step_keys, logits):
    """One categorical draw per row: `[batch]` keys, `[batch, vocab]` logits -> `[batch]` int32.

    The Gumbel-max draw of jax.random.categorical (same noise, same ids), with a faster argmax."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:], logits.dtype))(step_keys)
    return _first_argmax(logits + noise)


_traces = 0


def trace_count() -> int:
    """How many times the decoding loop has been traced (each trace is one compilation)."""
    return _traces


def _run_steps(step_fn, params, state, knobs, num_steps, num_real_codes, use_guidance):
    global _traces
    _traces += 1
    batch = state.tokens.shape[0]

    def one_step(_, state):
        feed = jnp.concatenate([state.tokens, state.tokens]) if use_guidance else state.tokens
        logits, cache = step_fn(params, state.cache, feed, state.step)
        logits = logits.astype(jnp.float32)
        if use_guidance:
            logits = guided_logits(logits[:batch], logits[batch:], knobs.condition_scale)
        known = lax.dynamic_index_in_dim(state.prefix, state.step, axis=1, keepdims=False)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, state.step)
        scaled = scale_logits(logits, knobs.temperature, num_real_codes)
        copied = guide_copies(scaled, known, knobs.strength, knobs.overrule, step_keys)
        logits = filter_scaled(scaled, knobs.temperature, knobs.top_k, knobs.top_p)
        tokens = _sample_rows(step_keys, logits)
        forced = (state.step < state.prefix_length) | copied
        tokens = jnp.where(forced, known, tokens)
        codes = lax.dynamic_update_slice(state.codes, tokens[:, None], (0, state.step))
        return state._replace(cache=cache, tokens=tokens, codes=codes, step=state.step + 1)

    return lax.fori_loop(0, num_steps, one_step, state)


@functools.cache
def _run_steps_jit():
    """The jitted loop, built on first use: its compiler options depend on the backend.

    Donating the state lets the decoder's KV cache be updated in place across chunks instead of
    being copied (for mega at batch 8 with guidance the cache is ~2 GB)."""
    return jax.jit(
        _run_steps,
        static_argnames=("step_fn", "num_steps", "num_real_codes", "use_guidance"),
        donate_argnames=("state",),
        compiler_options=xla_options.compiler_options(),
    )


def init_sampler(cache, rng, *, batch: int, image_length: int, start_token: int,
                 prefix=None, prefix_length=0) -> SamplerState:
    """The state before step 0: every row about to be fed `start_token` at position 0.

    Args:
      cache: step_fn's initial cache (2*batch rows with guidance). It is consumed: the first
        chunk donates its buffers, so do not use it afterwards.
      rng: int seed, one key, or `[batch]` keys (see `row_keys`).
      prefix: optional `[batch, image_length]` known codes; the first `prefix_length` (scalar or
        per-row `[batch]`) of each row are kept exactly instead of sampled.
    """
    if prefix is None:
        prefix = jnp.zeros((batch, image_length), jnp.int32)
    return SamplerState(
        cache=cache,
        tokens=jnp.full((batch,), start_token, jnp.int32),
        codes=jnp.zeros((batch, image_length), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        row_keys=row_keys(rng, batch),
        # Copies: the state is donated to the loop, which must not delete the caller's arrays.
        prefix=jnp.array(prefix, jnp.int32, copy=True),
        prefix_length=jnp.array(jnp.broadcast_to(jnp.asarray(prefix_length, jnp.int32), (batch,)), copy=True),
    )


def sample_codes_chunk(
    step_fn: StepFn,
    params,
    state: SamplerState,
    knobs: SamplingKnobs,
    *,
    num_steps: int,
    num_real_codes: int,
    use_guidance: bool,
) -> SamplerState:
    """Runs `num_steps` decoding steps from `state` in one jitted loop; returns the new state.

    Chunks of any sizes reproduce `sample_codes` exactly (same seed, same codes), so a pipeline can
    decode previews of `state.codes[:, :state.step]` between chunks. One compilation per
    (batch shape, num_steps, num_real_codes, use_guidance, step_fn); pick a chunk size that divides
    image_length to compile once. `state` is consumed (donated). The caller must not run past
    image_length steps in total.

    `step_fn` is a static argument: pass the same function object every time (a module-level
    function, or a partial built once), or every call recompiles.
    """
    image_length = state.codes.shape[1]
    if not 0 < num_steps <= image_length:
        raise ValueError(f"num_steps={num_steps} must be in 1..{image_length} (image_length)")
    return _run_steps_jit()(step_fn, params, state, knobs, num_steps, num_real_codes, use_guidance)


def sample_codes(
    step_fn: StepFn,
    params,
    cache,
    rng,
    *,
    batch: int,
    image_length: int,
    start_token: int,
    num_real_codes: int,
    use_guidance: bool,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    condition_scale=1.0,
    strength=0.0,
    overrule=jnp.inf,
    guide=None,
) -> jax.Array:
    """Samples `[batch, image_length]` int32 codes in one jitted loop.

    Args:
      step_fn: the decoder step (see the module docstring); static, keep the same object.
      params: step_fn's parameters.
      cache: step_fn's initial cache: 2*batch rows (prompt rows, then empty-prompt rows) when
        `use_guidance`, else batch rows. Consumed (donated).
      rng: int seed, one key, or `[batch]` keys (see `row_keys`).
      use_guidance: static; pass False when condition_scale == 1 to skip the unconditional rows
        (condition_scale is then ignored).
      temperature, top_k, top_p, condition_scale, strength, overrule: scalars or per-row `[batch]`; traced.
      guide: optional `[batch, image_length]` codes that `strength` copies from.
    """
    state = init_sampler(cache, rng, batch=batch, image_length=image_length, start_token=start_token, prefix=guide)
    knobs = sampling_knobs(
        batch, temperature=temperature, top_k=top_k, top_p=top_p, condition_scale=condition_scale,
        strength=strength, overrule=overrule,
    )
    state = sample_codes_chunk(
        step_fn, params, state, knobs,
        num_steps=image_length, num_real_codes=num_real_codes, use_guidance=use_guidance,
    )
    return state.codes
