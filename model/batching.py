"""The rows of one or more requests sampled as one batch: what `Pipeline.run` samples for one request
and what the server's scheduler (model/scheduler.py) samples for several at once.

Every row carries its own settings, so a request's rows sample the same codes whatever shares the
batch: its keys are `sampling.row_keys(seed)` by candidate index (as alone), its knobs are per-row
traced values (no recompilation), its cross-attention rows see only its own prompt, and a row of a
request without guidance inside a guided batch gets its conditional logits exactly
(`sampling.guided_logits` at scale 1). The batch is padded to `sharding.bucket_rows` so compiled
shapes repeat; padding rows copy the last real row and are dropped.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import sampling, sharding


def guided(request) -> bool:
    """Whether a request samples with super-conditioning (a prompt and a scale other than 1)."""
    return bool(request.prompts) and request.options.condition_scale != 1.0


def row_count(request) -> int:
    """Decoder rows a request samples: its prompts (one for a variation without one) x candidates."""
    return max(len(request.prompts), 1) * request.options.candidates


@dataclasses.dataclass
class Batch:
    """Requests sampled together; request i owns rows `spans[i]` of `state`."""

    requests: list
    spans: list  # slices into the batch's rows
    state: Any  # sampling.SamplerState; None once closed
    knobs: sampling.SamplingKnobs
    use_guidance: bool
    image_length: int
    done: int = 0  # tokens sampled per row so far

    @property
    def rows(self) -> int:
        return self.state.codes.shape[0]

    def host_codes(self) -> np.ndarray:
        """Every row's codes so far, on the host (slice with `spans`)."""
        return sharding.to_host(self.state.codes)

    def close(self) -> None:
        """Drops the decoder's cache (0.5 GiB for a 3x3 grid at mini size) before VQGAN and CLIP run."""
        self.state = None


def start(pipe, requests) -> Batch:
    """Encodes the requests' prompts in one batch and builds the sampler's state and per-row knobs."""
    cfg = pipe.bart_config
    texts, row_text, keys, spans = [], [], [], []
    knob_rows = {name: [] for name in sampling.SamplingKnobs._fields}
    prefixes, prefix_lengths = [], []
    use_guidance = any(guided(r) for r in requests)
    for request in requests:
        options, prompts = request.options, list(request.texts) or [""]  # no prompt: unconditional
        per_prompt, rows = options.candidates, row_count(request)
        spans.append(slice(len(row_text), len(row_text) + rows))
        row_text += [len(texts) + i // per_prompt for i in range(rows)]
        texts += prompts
        # Candidate c of every prompt gets fold_in(key(seed), c): the same keys alone or batched.
        keys += [sampling.row_keys(options.seed, per_prompt)] * len(prompts)
        # The sampler's per-row knobs are the request's options of the same names, except these three.
        strength = getattr(request, "strength", 0.0)
        values = {"condition_scale": options.condition_scale if guided(request) else 1.0, "strength": strength,
                  "overrule": sampling.prompt_overrule(strength) if request.prompts else np.inf}
        row_values = {name: [values[name] if name in values else getattr(options, name)] * rows for name in knob_rows}
        codes = pipe._image_codes(request.image) if request.image is not None else None
        guide = np.tile(codes if codes is not None else np.zeros(cfg.image_length, np.int32), (rows, 1))
        for p, backdrop in enumerate(getattr(request, "backdrops", ())):  # the reader knew nothing: its backdrop
            if backdrop is not None:
                block = slice(p * per_prompt, (p + 1) * per_prompt)
                guide[block] = pipe._image_codes(backdrop)
                row_values["strength"][block] = [1.0] * per_prompt
        for name in knob_rows:
            knob_rows[name] += row_values[name]
        prefixes.append(guide)
        prefix_lengths += [request.keep_rows * pipe.vqgan_config.latent_size] * rows
    real = len(row_text)
    padded = sharding.bucket_rows(real, pipe._data_devices)
    fill = np.minimum(np.arange(padded), real - 1)  # padding rows copy the last real row

    # Text -> encoder states: every prompt and the empty (unconditional) prompt, which comes last.
    ids, mask = pipe._tokenize(texts)
    states = pipe._encode(pipe.bart_params, ids, mask)
    row_index = np.asarray(row_text)[fill]
    if use_guidance:
        row_index = np.concatenate([row_index, np.full(padded, len(texts))])
    cache = pipe._init_cache(pipe.bart_params, states, jnp.asarray(mask), rows=jnp.asarray(row_index, jnp.int32))
    cache = sharding.shard_rows(cache, pipe.mesh)  # every cache array has its rows first
    row_keys = jnp.concatenate(keys)[jnp.asarray(fill)]
    prefix, prefix_length = None, 0
    if any(r.image is not None or any(b is not None for b in getattr(r, "backdrops", ())) for r in requests):
        prefix = sharding.shard_rows(jnp.asarray(np.concatenate(prefixes)[fill]), pipe.mesh)
        prefix_length = np.asarray(prefix_lengths, np.int32)[fill]
    state = sampling.init_sampler(cache, sharding.shard_rows(row_keys, pipe.mesh), batch=padded,
                                  image_length=cfg.image_length, start_token=cfg.decoder_start_token_id,
                                  prefix=prefix, prefix_length=prefix_length)
    knobs = sampling.sampling_knobs(padded, **{name: np.asarray(values)[fill] for name, values in knob_rows.items()})
    return Batch(list(requests), spans, state, knobs, use_guidance, cfg.image_length)


def keep_only(pipe, batch: Batch, keep: list[int], buckets=None) -> bool:
    """Drops every request but `keep` (indices into batch.requests) from a running batch: their rows
    leave at once, the kept rows continue from the same position in the bucket that fits them, so a
    leaving caller's rows stop costing decoder steps. Each kept row's cache, codes, key and knobs move
    with it, so its codes are the same as if nothing had left. Returns whether the batch shrank: not
    when the kept rows need the same bucket, or one outside `buckets` (when given)."""
    rows = np.concatenate([np.arange(batch.spans[i].start, batch.spans[i].stop) for i in keep])
    padded = sharding.bucket_rows(len(rows), pipe._data_devices)
    if padded >= batch.rows or (buckets is not None and padded not in buckets):
        return False
    index = jnp.asarray(rows[np.minimum(np.arange(padded), len(rows) - 1)])  # padding copies the last row
    cache_index = jnp.concatenate([index, index + batch.rows]) if batch.use_guidance else index
    state = batch.state
    batch.state = state._replace(
        cache=sharding.shard_rows(jax.tree.map(lambda x: x[cache_index], state.cache), pipe.mesh),
        **{name: sharding.shard_rows(getattr(state, name)[index], pipe.mesh)
           for name in ("tokens", "codes", "row_keys", "prefix", "prefix_length")})
    batch.knobs = sampling.SamplingKnobs(*(values[index] for values in batch.knobs))
    spans, start = [], 0
    for i in keep:
        size = batch.spans[i].stop - batch.spans[i].start
        spans.append(slice(start, start + size))
        start += size
    batch.requests, batch.spans = [batch.requests[i] for i in keep], spans
    return True


def step(pipe, batch: Batch, num_steps: int) -> None:
    """Samples the next `num_steps` tokens of every row (at most to the end of the image)."""
    num_steps = min(num_steps, batch.image_length - batch.done)
    batch.state = sampling.sample_codes_chunk(pipe._step_fn, pipe.bart_params, batch.state, batch.knobs,
                                              num_steps=num_steps, num_real_codes=pipe.vqgan_config.n_embed,
                                              use_guidance=batch.use_guidance)
    batch.done += num_steps
