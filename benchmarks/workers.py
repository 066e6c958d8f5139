"""The measured sides of the generation benchmark, one per process so that each peak RSS is its own.

    python -m benchmarks.workers KIND --result OUT.json [options]

KIND is one of: machine (matmul peak, bandwidth), prepare (random mini-size weights in our
checkpoint formats and as min-dalle state dicts), ours, min-dalle, embedded (the emoji model's
3x3 grid) and knobs (recompilations when sampling knobs change). bench_generate.py runs them.
"""

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

PROMPT = "a photograph of an avocado armchair in a sunny living room"
# Words for the benchmark's BPE tokenizer (random weights: only the token count matters).
TOKENIZER_TEXTS = [
    " a photograph of an avocado armchair in a sunny living room",
    " a painting of a red fox in the snow at sunset",
    " three blue birds on a wooden fence, digital art",
    " an astronaut riding a horse on the moon",
] * 8
WEIGHTS_VERSION = 2  # bump when the prepared files change


def mini_configs():
    """(DalleBart, VQGAN, CLIP) configs at the published mini / vqgan_imagenet_f16_16384 /
    ViT-B/32 sizes. CLIP pools at token id 2 (argmax mode) because the benchmark's tokenizer is a
    small BPE whose end token is 2; the work is the same."""
    from model.bart import DalleBartConfig
    from model.clip import CLIPConfig
    from model.vqgan import VQGANConfig

    return DalleBartConfig.mini(), VQGANConfig(), CLIPConfig.from_dict({"text_config": {"eos_token_id": 2}})


# ---------------------------------------------------------------------------------------------
# Memory (Linux): the peak RSS of a phase is VmHWM after resetting it through clear_refs. The reset
# also resets getrusage's ru_maxrss, so the process's peak is the largest phase peak seen.

_phase_peaks = []


def phase_peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_phase_peak() -> None:
    _phase_peaks.append(phase_peak_bytes())
    Path("/proc/self/clear_refs").write_text("5")


def process_peak_bytes() -> int:
    return max(_phase_peaks + [phase_peak_bytes()])


def tree_bytes(*trees) -> int:
    import jax

    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for tree in trees for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# Workers


def machine(args) -> dict:
    from benchmarks.roofline import measure_machine

    return measure_machine(torch_threads=args.torch_threads)


def prepare(args) -> dict:
    """Random weights with our own init, written once to args.weights (reused when the stamp matches)."""
    folder = Path(args.weights)
    stamp = {"version": WEIGHTS_VERSION, "seed": args.seed}
    stamp_file = folder / "stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return {"folder": str(folder), "reused": True}

    import jax
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from model.bart import DalleBart
    from model.checkpoint import save_clip, save_dalle_bart, save_vqgan
    from model.clip import CLIP
    from model.text import train_bart_tokenizer
    from model.vqgan import VQGAN
    from support import min_dalle_port as port

    bart_cfg, vq_cfg, clip_cfg = mini_configs()
    ours, theirs = folder / "ours", folder / "min_dalle"
    theirs.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bart_tokenizer(TOKENIZER_TEXTS, 400, ours / "bart")
    tokenizer.save_pretrained(str(ours / "clip"))
    for name in ("vocab.json", "merges.txt"):
        (theirs / name).write_bytes((ours / "bart" / name).read_bytes())

    key = jax.random.key(args.seed)
    ids = jnp.zeros((1, 4), jnp.int32)
    bart = jax.jit(DalleBart(bart_cfg).init)(key, ids, ids, ids[:, :2])["params"]
    save_dalle_bart(ours / "bart", bart_cfg, bart)
    save_file(port.encoder_state_dict(bart, bart_cfg), str(theirs / "encoder.safetensors"))
    save_file(port.decoder_state_dict(bart, bart_cfg), str(theirs / "decoder.safetensors"))
    del bart
    size = vq_cfg.resolution
    vqgan = jax.jit(VQGAN(vq_cfg).init)(jax.random.fold_in(key, 1), jnp.zeros((1, size, size, 3)))["params"]
    save_vqgan(ours / "vqgan", vq_cfg, vqgan)
    save_file(port.detokenizer_state_dict(vqgan), str(theirs / "detokenizer.safetensors"))
    del vqgan
    text = jnp.zeros((1, clip_cfg.text_config.max_position_embeddings), jnp.int32)
    side = clip_cfg.vision_config.image_size
    clip = jax.jit(CLIP(clip_cfg).init)(jax.random.fold_in(key, 2), text, jnp.zeros((1, side, side, 3)), text + 1)
    save_clip(ours / "clip", clip_cfg, clip["params"])
    defaults = {"num_images": 9, "candidates": 9, "condition_scale": 10.0, "top_k": 50}
    (ours / "pipeline.json").write_text(json.dumps({"name": "mini-random", "defaults": defaults}))
    stamp_file.write_text(json.dumps(stamp))
    return {"folder": str(folder), "reused": False}


def _stage_timers(pipe, times):
    """Wraps the pipeline's jitted stages so that each call's wall time (synchronised) is recorded."""
    import jax

    from model import sampling

    def timed(name, fn):
        def run(*a, **k):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **k))
            times[name] += time.perf_counter() - start
            return out
        return run

    for owner, name, attribute in ((pipe, "text encoding", "_encode"), (pipe, "cache init", "_init_cache"),
                                   (pipe, "VQGAN", "_decode_images"), (pipe.reranker, "CLIP", "_logits")):
        setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    sampling.sample_codes_chunk = timed("sampling", sampling.sample_codes_chunk)


def _limit_tokens(tokens) -> None:
    """Samples only the chunks that hold the first `tokens` codes of each call and skips the rest
    (their codes stay 0): for memory measurements, whose peak the first chunk already reaches
    (the cache is allocated before it and updated in place after)."""
    from model import sampling

    run = sampling.sample_codes_chunk

    def limited(step_fn, params, state, knobs, **options):
        return state if int(state.step) >= tokens else run(step_fn, params, state, knobs, **options)

    sampling.sample_codes_chunk = limited


def _measure_pipeline(pipe, num_images, knobs, tokens) -> dict:
    """First call (compiles), then a timed warm call with the stages instrumented. Fewer than the
    image's `tokens` sample whole chunks only (see _limit_tokens); the rest are extrapolated."""
    from model.pipeline import CHUNK_STEPS

    steps = pipe.bart_config.image_length
    decoded = min(steps, -(-tokens // CHUNK_STEPS) * CHUNK_STEPS)
    if decoded < steps:
        _limit_tokens(decoded)
    weights = tree_bytes(pipe.bart_params, pipe.vqgan_params, pipe.reranker.params)
    load_peak = phase_peak_bytes()
    reset_phase_peak()
    start = time.perf_counter()
    pipe.generate(PROMPT, num_images=num_images, candidates=num_images, seed=0, **knobs)
    first = time.perf_counter() - start
    first_peak = phase_peak_bytes()
    reset_phase_peak()
    times = defaultdict(float)
    _stage_timers(pipe, times)
    start = time.perf_counter()
    pipe.generate(PROMPT, num_images=num_images, candidates=num_images, seed=1, **knobs)
    warm = time.perf_counter() - start
    per_token = times["sampling"] / decoded
    return {
        "images": num_images,
        "tokens_decoded": decoded,
        "end_to_end_s": warm + per_token * (steps - decoded),
        "end_to_end_extrapolated": decoded < steps,
        "first_call_s": first,
        "text_encoding_ms": 1e3 * times["text encoding"],
        "cache_init_ms": 1e3 * times["cache init"],
        "per_token_ms": 1e3 * per_token,
        "vqgan_ms_per_image": 1e3 * times["VQGAN"] / num_images,
        "clip_ms": 1e3 * times["CLIP"],
        "weights_bytes": weights,
        "peak_rss_bytes": process_peak_bytes(),
        "peak_rss_load_bytes": load_peak,
        "peak_rss_first_call_bytes": first_peak,
        "peak_rss_warm_call_bytes": phase_peak_bytes(),
    }


def ours(args) -> dict:
    from model.loading import load_pipeline

    reset_phase_peak()
    pipe = load_pipeline(Path(args.weights) / "ours", compilation_cache=False)
    knobs = {"condition_scale": 10.0, "top_k": 50, "temperature": 1.0}
    return _measure_pipeline(pipe, args.images, knobs, args.tokens)


def embedded(args) -> dict:
    from model.errors import CheckpointError
    from model.loading import load_pipeline

    reset_phase_peak()
    try:
        pipe = load_pipeline(compilation_cache=False)
    except CheckpointError as error:
        return {"skipped": str(error)}
    result = _measure_pipeline(pipe, args.images, {}, args.tokens)
    result["defaults"] = dataclasses.asdict(pipe.defaults)
    return result


def knobs(args) -> dict:
    """Sampler traces and XLA compilations caused by changing each knob after a warm call."""
    import tempfile

    import jax

    from model import sampling
    from model.errors import CheckpointError
    from model.loading import load_pipeline

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    try:
        pipe, model = load_pipeline(compilation_cache=False), "embedded"
    except CheckpointError:
        from support.tiny import write_tiny_pipeline

        pipe, model = load_pipeline(write_tiny_pipeline(Path(tempfile.mkdtemp())), compilation_cache=False), "tiny random"
    pipe.warmup()  # as the app starts
    traces, compiled = sampling.trace_count(), len(compiles)
    changes = [{"temperature": 1.3}, {"top_k": 3}, {"top_p": 0.5}, {"condition_scale": 7.5}, {"seed": 99}]
    for change in changes:
        pipe.generate("a different prompt", **{"seed": 1, **change})
    return {"model": model, "changes": changes, "sampler_traces": sampling.trace_count() - traces,
            "backend_compiles": len(compiles) - compiled}


def min_dalle(args) -> dict:
    """min-dalle 0.4.11's own modules and sampling loop (MinDalle.generate_raw_image_stream, minus
    its downloads), fp32, `args.torch_threads` threads; decodes args.tokens of the 256 tokens."""
    import torch
    from safetensors.numpy import load_file

    from support import min_dalle_port as port

    torch.set_num_threads(args.torch_threads)  # after the imports: min_dalle sets cpu_count()
    torch.set_grad_enabled(False)
    from min_dalle.text_tokenizer import TextTokenizer

    reset_phase_peak()
    folder = Path(args.weights) / "min_dalle"
    config = mini_configs()[0]
    encoder = port.build_encoder(load_file(str(folder / "encoder.safetensors")), config)
    decoder = port.build_decoder(load_file(str(folder / "decoder.safetensors")), config)
    detokenizer = port.build_detokenizer(load_file(str(folder / "detokenizer.safetensors")))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf8"))
    merges = (folder / "merges.txt").read_text(encoding="utf8").split("\n")[1:-1]
    tokenizer = TextTokenizer(vocab, merges)
    weights = sum(t.numel() * t.element_size() for m in (encoder, decoder, detokenizer) for t in m.state_dict().values())
    load_peak = phase_peak_bytes()

    times = defaultdict(float)

    def timed(name, fn):
        def run(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            times[name] += time.perf_counter() - start
            return out
        return run

    grid = int(round(args.images ** 0.5))
    if grid * grid != args.images:
        raise ValueError("min-dalle makes square grids: --images must be 1, 4, 9, ...")

    def generate(grid_size, tokens, seed):
        image_count = grid_size ** 2
        ids = tokenizer.tokenize(PROMPT)[:config.max_text_length]
        text = np.ones((2, config.max_text_length), np.int32)
        text[0, :2] = [ids[0], ids[-1]]
        text[1, :len(ids)] = ids
        text = torch.tensor(text, dtype=torch.long)
        encoder_state = encoder.forward(text)
        expanded = [0] * image_count + [1] * image_count
        text, encoder_state = text[expanded], encoder_state[expanded]
        attention_mask = text.not_equal(1)[:, None, None, :]
        attention_state = torch.zeros(config.decoder_layers, image_count * 4, 256, config.d_model)
        image_tokens = torch.full((image_count, 257), 2 ** 14 - 1, dtype=torch.long)
        torch.manual_seed(seed)
        token_indices = torch.arange(256)
        settings = torch.tensor([1.0, 50, 10.0], dtype=torch.float32)  # temperature, top_k, condition scale
        for i in range(tokens):
            image_tokens[:, i + 1], attention_state = decoder.sample_tokens(
                settings=settings, attention_mask=attention_mask, encoder_state=encoder_state,
                attention_state=attention_state, prev_tokens=image_tokens[:, [i]], token_index=token_indices[[i]])
        return detokenizer.forward(False, image_tokens[:, 1:])

    generate(1, 2, seed=1)  # warm-up: first-call allocations and kernel setup
    reset_phase_peak()
    encoder.forward = timed("encoder", encoder.forward)
    decoder.sample_tokens = timed("decoder", decoder.sample_tokens)
    detokenizer.forward = timed("VQGAN", detokenizer.forward)
    start = time.perf_counter()
    generate(grid, args.tokens, seed=2)
    wall = time.perf_counter() - start
    per_token = times["decoder"] / args.tokens
    # With fewer tokens, the missing steps are added at the measured per-token cost (min-dalle's
    # step attends over its whole 256-position buffer, so every step costs the same).
    end_to_end = wall + per_token * (256 - args.tokens)
    return {
        "images": args.images,
        "tokens_decoded": args.tokens,
        "end_to_end_s": end_to_end,
        "end_to_end_extrapolated": args.tokens < 256,
        "text_encoding_ms": 1e3 * times["encoder"],
        "per_token_ms": 1e3 * per_token,
        "vqgan_ms_per_image": 1e3 * times["VQGAN"] / args.images,
        "weights_bytes": weights,
        "peak_rss_bytes": process_peak_bytes(),
        "peak_rss_load_bytes": load_peak,
        "peak_rss_warm_call_bytes": phase_peak_bytes(),
        "torch_threads": torch.get_num_threads(),
    }


WORKERS = {"machine": machine, "prepare": prepare, "ours": ours, "min-dalle": min_dalle,
           "embedded": embedded, "knobs": knobs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(WORKERS))
    parser.add_argument("--result", required=True, help="JSON file to write")
    parser.add_argument("--weights", help="prepared weights folder")
    parser.add_argument("--images", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=256, help="tokens to decode per image (rest extrapolated); "
                        "ours and embedded round up to whole sampling chunks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args(argv)
    result = WORKERS[args.kind](args)
    Path(args.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
