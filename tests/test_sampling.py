"""Sampler tests on fake decoder steps: logits from fixed tables, no model involved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2

from model import sampling

VOCAB = 10  # logits width: 8 real codes, the start token (8) and one padded id (9)
NUM_REAL = 8
START = 8
LENGTH = 6
# Every compilation costs seconds on this CPU, so all tests share two batch sizes.
SMALL = 4
BIG = 2000


def table_step(params, cache, tokens, position):
    """Logits = table[position] + transition[previous token]; the cache records every token fed."""
    logits = params["table"][position][None, :] + params["transition"][tokens]
    return logits, cache.at[:, position].set(tokens)


_step_traces = []


def guided_step(params, cache, tokens, position):
    """Like table_step, but the first half of the rows reads `cond`, the second half `uncond`."""
    _step_traces.append(1)  # runs once per trace of the decoding loop, never per execution
    half = tokens.shape[0] // 2
    base = jnp.concatenate([
        jnp.broadcast_to(params["cond"][position], (half, VOCAB)),
        jnp.broadcast_to(params["uncond"][position], (half, VOCAB)),
    ])
    return base + params["transition"][tokens], cache.at[:, position].set(tokens)


def random_params(seed, transition_scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "table": jnp.asarray(rng.normal(0, 2, (LENGTH, VOCAB)), jnp.float32),
        "cond": jnp.asarray(rng.normal(0, 2, (LENGTH, VOCAB)), jnp.float32),
        "uncond": jnp.asarray(rng.normal(0, 2, (LENGTH, VOCAB)), jnp.float32),
        "transition": jnp.asarray(transition_scale * rng.normal(0, 1, (VOCAB, VOCAB)), jnp.float32),
    }


def sample(step_fn, params, batch, rng, use_guidance=False, **knobs):
    rows = 2 * batch if use_guidance else batch
    return np.asarray(sampling.sample_codes(
        step_fn, params, jnp.zeros((rows, LENGTH), jnp.int32), rng,
        batch=batch, image_length=LENGTH, start_token=START, num_real_codes=NUM_REAL,
        use_guidance=use_guidance, **knobs,
    ))


def start(batch, seed, use_guidance=True):
    rows = 2 * batch if use_guidance else batch
    return sampling.init_sampler(jnp.zeros((rows, LENGTH), jnp.int32), seed,
                                 batch=batch, image_length=LENGTH, start_token=START)


def run_chunk(params, state, num_steps, use_guidance=True, **knobs):
    return sampling.sample_codes_chunk(
        guided_step if use_guidance else table_step, params, state,
        sampling.sampling_knobs(state.tokens.shape[0], **knobs),
        num_steps=num_steps, num_real_codes=NUM_REAL, use_guidance=use_guidance,
    )


def np_filter(logits, temperature, top_k, top_p, num_real):
    """Reference filter by sorting, row by row: kept entries hold logits / temperature, others -inf."""
    out = np.full(logits.shape, -np.inf, np.float32)
    for r, row in enumerate(logits):
        t, k, p = temperature[r], top_k[r], top_p[r]
        if t <= 0:
            t, k = 1.0, 1
        x = (row[:num_real] / np.float32(t)).astype(np.float32)
        ranked = np.sort(x)[::-1]
        if k > 0:
            x = np.where(x >= ranked[min(k, num_real) - 1], x, -np.inf)
        if p < 1:
            ranked = np.sort(x)[::-1]
            probs = np.exp(ranked.astype(np.float64) - ranked[0])
            probs /= probs.sum()
            mass_before = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
            nucleus = max(1, int(np.sum(mass_before < p)))
            x = np.where(x >= ranked[nucleus - 1], x, -np.inf)
        out[r, :num_real] = x
    return out


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def chi_square(samples, probs):
    counts = np.bincount(samples, minlength=len(probs))
    assert counts[probs == 0].sum() == 0, "sampled an id of probability 0"
    expected = len(samples) * probs
    kept = probs > 0
    return float(np.sum((counts[kept] - expected[kept]) ** 2 / expected[kept])), int(kept.sum()) - 1


def assert_matches(samples, probs):
    stat, dof = chi_square(samples, probs)
    assert stat < chi2.ppf(1 - 1e-6, dof), stat


def assert_mismatches(samples, probs):
    stat, dof = chi_square(samples, probs)
    assert stat > 10 * chi2.ppf(1 - 1e-6, dof), stat


# --- pure functions ---------------------------------------------------------------------------

# One jitted filter for all [12, 64] cases: op-by-op eager execution would compile every primitive.
filter_jit = jax.jit(sampling.filter_logits, static_argnames="num_real_codes")


def test_guided_logits_formula():
    rng = np.random.default_rng(0)
    cond, uncond = rng.normal(size=(2, 3, 7)).astype(np.float32)
    scale = np.array([0.0, 1.0, 7.5], np.float32)
    got = sampling.guided_logits(jnp.asarray(cond), jnp.asarray(uncond), jnp.asarray(scale))
    want = uncond * (1 - scale[:, None]) + cond * scale[:, None]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sampling.guided_logits(cond, uncond, 3.0)),
                               uncond + 3.0 * (cond - uncond), rtol=1e-6)


def test_temperature_divides_and_unreal_ids_are_masked():
    logits = np.random.default_rng(1).normal(size=(12, 64)).astype(np.float32)
    temperature = np.linspace(0.3, 3.0, 12).astype(np.float32)
    got = np.asarray(filter_jit(logits, temperature, 0, 1.0, num_real_codes=60))
    np.testing.assert_allclose(got[:, :60], logits[:, :60] / temperature[:, None], rtol=1e-6)
    assert np.all(got[:, 60:] == -np.inf)


def test_filter_matches_sorting_reference_per_row():
    rng = np.random.default_rng(2)
    vocab, num_real = 64, 60
    logits = rng.normal(0, 3, (12, vocab)).astype(np.float32)
    logits[9:] = np.round(logits[9:])  # rows with many ties
    logits[:, num_real:] = 50.0  # unreal ids would win every filter if they were not masked
    temperature = np.array([1, 0.7, 2, 1, 1, 1, 0.5, 1, 0, 1, 1, 1.3], np.float32)
    top_k = np.array([0, 5, 0, 1, 100, 0, 12, 3, 0, 4, 0, 7], np.int32)
    top_p = np.array([1, 1, 0.9, 1, 0.5, 0.05, 0.8, 0.0, 1, 1, 0.6, 0.95], np.float32)
    got = np.asarray(filter_jit(logits, temperature, top_k, top_p, num_real_codes=num_real))
    want = np_filter(logits, temperature, top_k, top_p, num_real)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)
    kept = np.isfinite(got).sum(axis=1)
    assert kept[0] == num_real and kept[1] == 5 and kept[3] == 1 and kept[8] == 1
    assert kept[9] >= 4  # ties at the 4th value are all kept


def test_top_p_one_keeps_every_real_code_at_full_vocab():
    # At 16k ids the probabilities sum to 1 - 6e-8 in fp32 for some rows (this seed has them),
    # so "top_p = 1 is off" must not depend on the mass reaching 1.
    logits = 3 * jax.random.normal(jax.random.key(4), (4, 16415))
    got = filter_jit(logits, 1.0, 0, 1.0, num_real_codes=16384)
    assert np.all(np.isfinite(np.asarray(got)).sum(axis=1) == 16384)


# --- sampling loop ------------------------------------------------------------------------------


def test_unreal_ids_are_never_sampled():
    params = random_params(3, transition_scale=0.0)
    params["table"] = params["table"].at[:, NUM_REAL:].set(100.0)
    codes = sample(table_step, params, BIG, 0)
    assert codes.max() < NUM_REAL
    assert np.array_equal(sample(table_step, params, SMALL, 0, top_k=1),
                          np.tile(np.argmax(np.asarray(params["table"])[:, :NUM_REAL], axis=1), (SMALL, 1)))


def test_top_k_one_and_zero_temperature_are_greedy():
    params = random_params(4)
    codes_k1 = sample(table_step, params, SMALL, 1, top_k=1)
    codes_t0 = sample(table_step, params, SMALL, 2, temperature=0.0, top_k=40, top_p=0.9)
    table, transition = np.asarray(params["table"]), np.asarray(params["transition"])
    token, greedy = START, []
    for t in range(LENGTH):
        token = int(np.argmax((table[t] + transition[token])[:NUM_REAL]))
        greedy.append(token)
    assert np.array_equal(codes_k1, np.tile(greedy, (SMALL, 1)))
    assert np.array_equal(codes_t0, codes_k1)


@pytest.mark.parametrize("knobs", [
    dict(top_k=3), dict(top_p=0.7), dict(top_k=4, top_p=0.6, temperature=0.8),
])
def test_samples_stay_inside_the_filtered_set(knobs):
    params = random_params(5)
    batch = BIG
    codes = sample(table_step, params, batch, 7, **knobs)
    table, transition = np.asarray(params["table"]), np.asarray(params["transition"])
    previous = np.concatenate([np.full((batch, 1), START), codes[:, :-1]], axis=1)
    full = [np.full(batch, knobs.get(name, default), dtype)
            for name, default, dtype in (("temperature", 1.0, np.float32), ("top_k", 0, np.int32),
                                         ("top_p", 1.0, np.float32))]
    for t in range(LENGTH):
        allowed = np.isfinite(np_filter(table[t] + transition[previous[:, t]], *full, NUM_REAL))
        assert allowed[np.arange(batch), codes[:, t]].all()
    first = np.isfinite(np_filter(table[:1] + transition[[START]], *(f[:1] for f in full), NUM_REAL))[0]
    assert set(codes[:, 0]) == set(np.flatnonzero(first))  # the whole set is reachable, not just its top


@pytest.mark.parametrize("temperature, wrong", [(1.0, 0.5), (0.5, 1.0)])
def test_frequencies_follow_the_softmax(temperature, wrong):
    params = random_params(6, transition_scale=0.0)
    codes = sample(table_step, params, BIG, 11, temperature=temperature)
    table = np.asarray(params["table"], np.float64)
    for t in range(LENGTH):
        probs = np.zeros(VOCAB)
        probs[:NUM_REAL] = np_softmax(table[t, :NUM_REAL] / temperature)
        assert_matches(codes[:, t], probs)
    wrong_probs = np.zeros(VOCAB)
    wrong_probs[:NUM_REAL] = np_softmax(table[0, :NUM_REAL] / wrong)
    assert_mismatches(codes[:, 0], wrong_probs)


def test_every_step_draws_fresh_randomness():
    params = random_params(14, transition_scale=0.0)
    params["table"] = jnp.zeros_like(params["table"])  # uniform over the 8 real codes at every step
    codes = sample(table_step, params, BIG, 3)
    for t in range(1, LENGTH):
        assert abs(np.mean(codes[:, t] == codes[:, t - 1]) - 1 / NUM_REAL) < 0.03


def test_guidance_follows_guided_logits():
    params = random_params(7, transition_scale=0.0)
    scale = 3.0
    codes = sample(guided_step, params, BIG, 12, use_guidance=True, condition_scale=scale)
    cond, uncond = np.asarray(params["cond"], np.float64), np.asarray(params["uncond"], np.float64)
    for t in range(LENGTH):
        probs = np.zeros(VOCAB)
        probs[:NUM_REAL] = np_softmax((uncond[t] + scale * (cond[t] - uncond[t]))[:NUM_REAL])
        assert_matches(codes[:, t], probs)
    cond_probs = np.zeros(VOCAB)
    cond_probs[:NUM_REAL] = np_softmax(cond[0, :NUM_REAL])
    assert_mismatches(codes[:, 0], cond_probs)


def test_both_halves_are_fed_the_sampled_tokens():
    params, batch = random_params(8), SMALL
    state = run_chunk(params, start(batch, 5), LENGTH, condition_scale=4.0)
    fed, codes = np.asarray(state.cache), np.asarray(state.codes)
    assert np.array_equal(fed[:batch], fed[batch:])
    assert np.all(fed[:, 0] == START)
    assert np.array_equal(fed[:batch, 1:], codes[:, :-1])
    assert int(state.step) == LENGTH


def test_per_row_knobs_apply_to_their_own_rows():
    params = random_params(9, transition_scale=0.0)
    cond, uncond = np.asarray(params["cond"]), np.asarray(params["uncond"])
    # Rows: greedy on uncond (scale 0), greedy on cond (scale 1), greedy at scale 5, then free rows.
    free = BIG - 3
    scale = np.concatenate([[0.0, 1.0, 5.0], np.ones(free)]).astype(np.float32)
    temperature = np.concatenate([[0.0, 0.0, 1.0], np.ones(free)]).astype(np.float32)
    top_k = np.concatenate([[0, 0, 1], np.zeros(free)]).astype(np.int32)
    codes = sample(guided_step, params, BIG, 13, use_guidance=True,
                   temperature=temperature, top_k=top_k, condition_scale=scale)
    assert np.array_equal(codes[0], np.argmax(uncond[:, :NUM_REAL], axis=1))
    assert np.array_equal(codes[1], np.argmax(cond[:, :NUM_REAL], axis=1))
    assert np.array_equal(codes[2], np.argmax((uncond + 5 * (cond - uncond))[:, :NUM_REAL], axis=1))
    assert all(len(set(codes[3:, t])) > 1 for t in range(LENGTH))


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("use_guidance", [False, True])
def test_seeds_are_reproducible_and_rows_independent_of_batch(use_guidance):
    params = random_params(10)
    step = guided_step if use_guidance else table_step
    knobs = dict(use_guidance=use_guidance, top_k=5, condition_scale=2.0)
    small = sample(step, params, SMALL, 42, **knobs)
    assert np.array_equal(small, sample(step, params, SMALL, 42, **knobs))
    assert np.array_equal(small, sample(step, params, BIG, 42, **knobs)[:SMALL])
    assert not np.array_equal(small, sample(step, params, SMALL, 43, **knobs))
    assert len({row.tobytes() for row in small}) > 1  # rows draw different randomness


def test_seed_forms_agree_and_requests_can_share_a_batch():
    params = random_params(11)
    from_int = sample(table_step, params, SMALL, 9)
    assert np.array_equal(from_int, sample(table_step, params, SMALL, jax.random.key(9)))
    assert np.array_equal(from_int, sample(table_step, params, SMALL, jax.random.PRNGKey(9)))
    # Two requests (seed 9 and seed 5, two images each) batched together keep their own codes.
    keys = jnp.concatenate([sampling.row_keys(9, 2), sampling.row_keys(5, 2)])
    both = sample(table_step, params, SMALL, keys)
    assert np.array_equal(both[:2], from_int[:2])
    assert np.array_equal(both[2:], sample(table_step, params, SMALL, 5)[:2])
    with pytest.raises(ValueError, match="keys of shape"):
        sampling.row_keys(keys, 3)


@pytest.mark.parametrize("chunks", [[2, 2, 2], [4, 2]])
def test_chunked_sampling_equals_single_scan(chunks):
    params, batch = random_params(12), SMALL
    knobs = dict(temperature=np.float32([0.9, 1.0, 1.5, 0.0]), top_k=np.int32([0, 4, 6, 0]),
                 top_p=np.float32([0.8, 1.0, 0.95, 1.0]), condition_scale=np.float32([3.0, 1.0, 6.0, 2.0]))
    whole = sample(guided_step, params, batch, 21, use_guidance=True, **knobs)
    state, done = start(batch, 21), 0
    for num_steps in chunks:
        state = run_chunk(params, state, num_steps, **knobs)
        done += num_steps
        assert np.array_equal(np.asarray(state.codes)[:, :done], whole[:, :done])
    assert np.array_equal(np.asarray(state.codes), whole)


def test_chunk_size_is_checked():
    with pytest.raises(ValueError, match="num_steps"):
        run_chunk(random_params(0), start(SMALL, 0), LENGTH + 1)


# --- compilation --------------------------------------------------------------------------------


def test_knob_and_seed_changes_never_recompile():
    params, batch = random_params(13), SMALL

    def run_chunks(seed, **knobs):
        state = start(batch, seed)
        for _ in range(LENGTH // 2):
            state = run_chunk(params, state, 2, **knobs)

    sample(guided_step, params, batch, 0, use_guidance=True)
    run_chunks(0)
    traces, step_traces = sampling.trace_count(), len(_step_traces)
    settings = [
        dict(temperature=0.7, top_k=50, top_p=0.9, condition_scale=10.0),
        dict(temperature=1, top_k=0, top_p=1, condition_scale=1),
        dict(temperature=np.float32(0.0), top_k=np.int64(3), top_p=np.float64(0.5),
             condition_scale=jnp.float32(2)),
        dict(temperature=np.float32([0.5, 1, 2, 0]), top_k=jnp.asarray([1, 2, 0, 7]),
             top_p=[0.1, 0.9, 1.0, 0.3], condition_scale=np.float32([1, 3, 16, 0])),
    ]
    for seed, knobs in enumerate(settings):
        sample(guided_step, params, batch, seed + 100, use_guidance=True, **knobs)
        run_chunks(seed + 100, **knobs)
    sample(guided_step, params, batch, jax.random.key(5), use_guidance=True)
    sample(guided_step, params, batch, np.int64(7), use_guidance=True)
    assert sampling.trace_count() == traces
    assert len(_step_traces) == step_traces


def test_forced_prefix_is_kept_and_fed_to_the_model():
    params = random_params(5)
    prefix = jnp.asarray(np.random.default_rng(0).integers(0, NUM_REAL, (SMALL, LENGTH)), jnp.int32)
    lengths = jnp.asarray([0, 2, 3, LENGTH], jnp.int32)  # per-row prefix lengths
    state = sampling.init_sampler(jnp.zeros((2 * SMALL, LENGTH), jnp.int32), 1, batch=SMALL, image_length=LENGTH,
                                  start_token=START, prefix=prefix, prefix_length=lengths)
    state = run_chunk(params, state, LENGTH)
    codes, fed = np.asarray(state.codes), np.asarray(state.cache)
    for row, length in enumerate(np.asarray(lengths)):
        np.testing.assert_array_equal(codes[row, :length], np.asarray(prefix)[row, :length])
        # The model saw the known codes: position t is fed code t-1 in both guidance halves.
        np.testing.assert_array_equal(fed[row, 1:], codes[row, :-1])
        np.testing.assert_array_equal(fed[SMALL + row, 1:], codes[row, :-1])
    # Past the prefix the codes are sampled, not copied.
    assert not np.array_equal(codes[0], np.asarray(prefix)[0])
    # Without a prefix, the result equals plain sampling with the same seed.
    plain = run_chunk(params, start(SMALL, 1), LENGTH)
    np.testing.assert_array_equal(codes[0], np.asarray(plain.codes)[0])


def ruled_out_params(code):
    """Random tables in which `code` is 50 logits below every other code at every position."""
    params = random_params(9)
    params["table"] = params["table"].at[:, code].set(-50.0)
    return params


@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_guide_codes_are_copied_with_probability_strength(strength):
    # The model never picks code 7 itself, so every 7 in the output is a copy of the guide.
    guide = jnp.full((BIG, LENGTH), 7, jnp.int32)
    codes = sample(table_step, ruled_out_params(7), BIG, 3, guide=guide, strength=strength)
    copies = int(np.sum(codes == 7))
    n = codes.size
    assert abs(copies - strength * n) < 5 * np.sqrt(n * strength * (1 - strength)), (copies, n)
    # Each row draws its own positions.
    assert len({tuple(row) for row in (codes == 7).tolist()}) > 20


def test_a_margin_lets_the_model_refuse_a_ruled_out_guide_code():
    guide = jnp.full((BIG, LENGTH), 7, jnp.int32)
    params = ruled_out_params(7)
    refused = sample(table_step, params, BIG, 3, guide=guide, strength=0.9, overrule=2.0)
    assert not np.any(refused == 7)
    # Within the margin the same code is copied; strength 1 copies whatever the margin.
    within = sample(table_step, params, BIG, 3, guide=guide, strength=0.9, overrule=60.0)
    assert np.mean(within == 7) > 0.85
    forced = sample(table_step, params, BIG, 3, guide=guide, strength=1.0, overrule=2.0)
    assert np.all(forced == 7)


def test_the_copy_draw_leaves_the_sampling_noise_alone():
    # At the first position nothing earlier differs, so rows that did not copy equal plain sampling.
    params = ruled_out_params(7)
    guide = jnp.full((BIG, LENGTH), 7, jnp.int32)
    varied = sample(table_step, params, BIG, 5, guide=guide, strength=0.5)[:, 0]
    plain = sample(table_step, params, BIG, 5)[:, 0]
    free = varied != 7
    assert 0.4 < free.mean() < 0.6
    np.testing.assert_array_equal(varied[free], plain[free])
