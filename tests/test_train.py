"""Training stack on tiny configs: each stage's loss falls, checkpoints round-trip, resume is exact,
the data-parallel path runs on several (forced) CPU devices, and the stages assemble into a
pipeline folder that load_pipeline reads."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from model.data.dataset import read_dataset, write_dataset
from model.train import bart as bart_stage
from model.train import clip as clip_stage
from model.train import vqgan as vqgan_stage
from model.train.all import assemble
from model.train.codes import encode_scenes
from model.train.loop import (LoopConfig, init_state, make_optimizer, read_log, restore_checkpoint, save_checkpoint,
                              train, train_within)
from model.vqgan import VQGANConfig

ROOT = Path(__file__).resolve().parent.parent
TINY_VQGAN = VQGANConfig(ch=32, ch_mult=(1, 1), num_res_blocks=0, attn_resolutions=(), z_channels=8, embed_dim=8,
                         n_embed=16, resolution=16)
TINY_BART = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
TINY_CLIP = dict(image_size=16, width=32, text_layers=1, vision_layers=1, patch_size=8)


def _loop(steps, batch_size=8, **overrides):
    return LoopConfig(**{"steps": steps, "batch_size": batch_size, "learning_rate": 3e-3, "warmup_steps": 2,
                         "log_every": 1, "eval_every": 10**6, "checkpoint_every_s": 1e9, **overrides})


def _losses(out):
    return [r["loss"] for r in read_log(out) if "loss" in r]


def _assert_falls(losses):
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.9 * first, f"loss did not fall: {losses}"


@pytest.fixture(scope="module")
def vqgan_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqgan")
    train(vqgan_stage.make_task(TINY_VQGAN, 8, eval_examples=8), _loop(25, learning_rate=1e-2), out, quiet=True)
    return out


def _decoder_losses_on_seen_batches(task, folder, pixel_loss="edges"):
    """(loss, metrics) of decoder_loss for the VQGAN in `folder` on the task's first four batches."""
    from model.checkpoint import load_vqgan

    module, params = load_vqgan(folder)
    decoder = {name: params[name] for name in vqgan_stage.DECODER_PARTS}
    frozen = {name: value for name, value in params.items() if name not in vqgan_stage.DECODER_PARTS}
    results = []
    for step in range(4):
        loss, (metrics, _) = vqgan_stage.decoder_loss(module, decoder, {"frozen": frozen}, task.batch(step), None,
                                                      pixel_loss)
        results.append((float(loss), metrics))
    return results


def test_decoder_finetuning_keeps_every_code(tmp_path, vqgan_run):
    """--finetune-decoder: the decoder learns, encoder and codebook stay bit-identical, so the codes a
    DalleBart was trained on do not change."""
    from model.checkpoint import load_vqgan
    from model.vqgan import VQGAN

    out = tmp_path / "finetuned"
    task = vqgan_stage.make_task(TINY_VQGAN, 8, eval_examples=8, finetune_from=vqgan_run / "model")
    train(task, _loop(15, learning_rate=3e-3), out, quiet=True)
    module, before = load_vqgan(vqgan_run / "model")
    _, after = load_vqgan(out / "model")

    def loss_on_seen_batches(folder):
        return np.mean([loss for loss, _ in _decoder_losses_on_seen_batches(task, folder)])

    assert loss_on_seen_batches(out / "model") < 0.98 * loss_on_seen_batches(vqgan_run / "model")
    for part in ("encoder", "quant_conv", "quantize"):
        for a, b in zip(jax.tree_util.tree_leaves(before[part]), jax.tree_util.tree_leaves(after[part])):
            np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before["decoder"]),
                                                        jax.tree_util.tree_leaves(after["decoder"])))
    images = task.batch(0)["images"].astype(np.float32) / 255.0
    codes = [module.apply({"params": p}, images, method=VQGAN.encode)[1] for p in (before, after)]
    np.testing.assert_array_equal(*codes)


@pytest.fixture(scope="module")
def code_data(tmp_path_factory, vqgan_run):
    """A (caption, encoding) dataset written by the tiny VQGAN: the real encode -> write -> read path."""
    from model.checkpoint import load_vqgan

    folder = tmp_path_factory.mktemp("codes")
    vqgan, params = load_vqgan(vqgan_run / "model")
    captions, codes = encode_scenes(vqgan, params, 64, batch_size=32)
    assert codes.shape == (64, TINY_VQGAN.num_codes) and codes.max() < TINY_VQGAN.n_embed
    write_dataset(folder / "train.jsonl", captions, codes)
    write_dataset(folder / "valid.jsonl", captions[:16], codes[:16])
    return folder


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory, code_data):
    out = tmp_path_factory.mktemp("bart")
    task = bart_stage.make_task(code_data, out, 8, vocab_size=300, image_vocab_size=16, **TINY_BART)
    train(task, _loop(25, eval_every=25), out, quiet=True)
    return out


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    task = clip_stage.make_task(out, 8, vocab_size=300, eval_examples=8, **TINY_CLIP)
    train(task, _loop(25, eval_every=25), out, quiet=True)
    return out


def test_mse_decoder_finetuning_on_a_kind_mix_lowers_the_squared_error(tmp_path, vqgan_run):
    """--pixel-loss mse --kind-mix: the loss is the mean squared error alone (what PSNR measures) and
    fine-tuning on count scenes only lowers it on those scenes."""
    task = vqgan_stage.make_task(None, 8, eval_examples=8, finetune_from=vqgan_run / "model", kind_mix=(0, 0, 1),
                                 pixel_loss="mse")
    train(task, _loop(40, learning_rate=3e-3), tmp_path, quiet=True)

    def squared_error(folder):
        results = _decoder_losses_on_seen_batches(task, folder, "mse")
        for loss, metrics in results:
            assert loss == pytest.approx(float(metrics["l2"]))
        return np.mean([loss for loss, _ in results])

    assert squared_error(tmp_path / "model") < 0.97 * squared_error(vqgan_run / "model")
    with pytest.raises(ValueError, match="pixel_loss"):
        vqgan_stage.make_task(TINY_VQGAN, 8, pixel_loss="ssim")


def test_vqgan_loss_falls_and_exports(vqgan_run):
    _assert_falls(_losses(vqgan_run))
    assert (vqgan_run / "loss.png").is_file()
    assert (vqgan_run / "model" / "flax_model.msgpack").is_file()


def test_bart_loss_falls_and_logs_validation(bart_run):
    _assert_falls(_losses(bart_run))
    evals = [r for r in read_log(bart_run) if "eval" in r]
    assert evals and np.isfinite(evals[-1]["eval_valid_loss"])


def test_warm_start_carries_the_trained_model_over_to_a_finer_code_grid(tmp_path, bart_run, code_data):
    """A VQGAN with half the downsampling: 8x8 -> 16x16 codes from a new, larger codebook."""
    from model.checkpoint import load_dalle_bart

    captions, codes = read_dataset(code_data / "train.jsonl")
    side = 8
    finer = codes.reshape(-1, side, 1, side, 1).repeat(2, axis=2).repeat(2, axis=4).reshape(len(codes), -1) * 2
    write_dataset(tmp_path / "data" / "train.jsonl", captions, finer)
    out = tmp_path / "run"
    task = bart_stage.make_task(tmp_path / "data", out, 8, image_vocab_size=32, init_from=bart_run / "model")
    params, _ = task.init(jax.random.PRNGKey(1))
    _, trained = load_dalle_bart(bart_run / "model")

    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (bart_run / "model" / "tokenizer.json").read_bytes()
    for a, b in zip(jax.tree_util.tree_leaves(params["model"]["encoder"]), jax.tree_util.tree_leaves(trained["model"]["encoder"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree_util.tree_leaves(params["model"]["decoder"]["layers"]),
                    jax.tree_util.tree_leaves(trained["model"]["decoder"]["layers"])):
        np.testing.assert_array_equal(a, b)
    old = np.asarray(trained["model"]["decoder"]["embed_positions"]["embedding"]).reshape(side, side, -1)
    new = np.asarray(params["model"]["decoder"]["embed_positions"]["embedding"]).reshape(2 * side, 2 * side, -1)
    np.testing.assert_array_equal(new, old.repeat(2, axis=0).repeat(2, axis=1))
    assert params["lm_head"]["kernel"].shape == (TINY_BART["d_model"], 33) != trained["lm_head"]["kernel"].shape
    assert params["model"]["decoder"]["embed_tokens"]["embedding"].shape[0] == 33

    train(task, _loop(15), out, quiet=True)
    _assert_falls(_losses(out))


def test_warm_start_keeps_evenly_spaced_decoder_layers(tmp_path, code_data):
    """--decoder-layers with --init-from: a 3-layer decoder shrunk to 2 keeps its first and last layers."""
    from model.checkpoint import load_dalle_bart

    deep = bart_stage.make_task(code_data, tmp_path / "deep", 8, vocab_size=300, image_vocab_size=16,
                                **{**TINY_BART, "decoder_layers": 3})
    deep.export(deep.init(jax.random.PRNGKey(0))[0], {}, tmp_path / "deep" / "model")
    _, trained = load_dalle_bart(tmp_path / "deep" / "model")

    task = bart_stage.make_task(code_data, tmp_path / "shallow", 8, image_vocab_size=16,
                                init_from=tmp_path / "deep" / "model", decoder_layers=2)
    params, _ = task.init(jax.random.PRNGKey(1))
    pairs = zip(jax.tree_util.tree_leaves(params["model"]["decoder"]["layers"]),
                jax.tree_util.tree_leaves(trained["model"]["decoder"]["layers"]))
    for shallow, deep_layers in pairs:
        assert shallow.shape[0] == 2
        np.testing.assert_array_equal(shallow, np.asarray(deep_layers)[[0, 2]])
    np.testing.assert_array_equal(params["lm_head"]["kernel"], trained["lm_head"]["kernel"])
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        bart_stage.keep_decoder_layers(trained, 4)


def test_clip_loss_falls_and_tokenizer_pools_at_the_end_token(clip_run):
    from transformers import AutoTokenizer

    _assert_falls(_losses(clip_run))
    model = clip_run / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    config = json.loads((model / "config.json").read_text())
    end = config["text_config"]["eos_token_id"]
    assert end == tokenizer.eos_token_id == len(tokenizer) - 1 != 2
    ids = tokenizer(["A Red Apple", "a red apple"], padding="max_length", max_length=12)["input_ids"]
    assert ids[0] == ids[1]  # lowercased
    assert ids[0][0] == 0 and ids[0].count(end) > 1 and max(ids[0][: ids[0].index(end)]) < end


def test_dataset_round_trip(tmp_path):
    captions = ["a cat on a red background", "two dogs on a blue background"]
    codes = np.array([[1, 2, 3], [4, 5, 6]])
    write_dataset(tmp_path / "d.jsonl", captions, codes)
    got_captions, got_codes = read_dataset(tmp_path)
    assert got_captions == captions and got_codes.dtype == np.int32
    np.testing.assert_array_equal(got_codes, codes)
    line = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    assert line == {"caption": captions[0], "encoding": [1, 2, 3]}  # upstream's column names


def test_parquet_dataset_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    captions = ["a cat on a red background", "two dogs on a blue background", "a fox"]
    codes = np.arange(12).reshape(3, 4) * 97
    write_dataset(tmp_path / "ours.parquet", captions, codes)
    got_captions, got_codes = read_dataset(tmp_path / "ours.parquet")
    assert got_captions == captions and got_codes.dtype == np.int32
    np.testing.assert_array_equal(got_codes, codes)
    # An upstream-style file (list<int64> column from Python lists) reads the same way.
    pq.write_table(pa.table({"caption": captions, "encoding": codes.tolist()}), tmp_path / "upstream.parquet")
    np.testing.assert_array_equal(read_dataset(tmp_path / "upstream.parquet")[1], codes)
    ragged = pa.table({"caption": captions, "encoding": [[1, 2], [3], [4, 5]]})
    pq.write_table(ragged, tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="different lengths"):
        read_dataset(tmp_path / "ragged.parquet")


def test_checkpoint_round_trips(tmp_path):
    task = vqgan_stage.make_task(TINY_VQGAN, 4, eval_examples=4)
    cfg = _loop(3)
    optimizer = make_optimizer(cfg)
    state = init_state(task, cfg, optimizer)
    state = state.replace(step=state.step + 7, model_state={**state.model_state, "usage": state.model_state["usage"] + 1})
    file = save_checkpoint(tmp_path, state)
    fresh = init_state(task, _loop(3, seed=1), optimizer)
    restored = restore_checkpoint(file, fresh)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(restored.step) == 7


_RESUME_LOOP = dict(steps=6, batch_size=8)


def _unevaluated_task():
    task = vqgan_stage.make_task(TINY_VQGAN, 8, eval_examples=4)
    task.evaluate = None  # one compile less per run
    return task


@pytest.fixture(scope="module")
def straight_out(tmp_path_factory):
    return tmp_path_factory.mktemp("straight")


@pytest.fixture(scope="module")
def straight_run(straight_out):
    """Six uninterrupted steps: the reference for resuming and for the data-parallel run."""
    return train(_unevaluated_task(), _loop(**_RESUME_LOOP), straight_out, quiet=True)


def test_resume_matches_an_uninterrupted_run(tmp_path, straight_run):
    task = _unevaluated_task()
    real_batch = task.batch

    def interrupted(step):
        if step == 3:
            raise KeyboardInterrupt
        return real_batch(step)

    task.batch = interrupted
    with pytest.raises(KeyboardInterrupt):
        train(task, _loop(**_RESUME_LOOP), tmp_path, quiet=True)
    saved = sorted((tmp_path / "checkpoints").glob("*.msgpack"))
    assert [f.name for f in saved] == ["step_00000003.msgpack"]
    task.batch = real_batch
    resumed = train(task, _loop(**_RESUME_LOOP), tmp_path, quiet=True)
    assert int(resumed.step) == 6
    for a, b in zip(jax.tree_util.tree_leaves(straight_run), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_train_within_sizes_the_run_to_the_time_given(tmp_path):
    """The probe's throughput sets the total steps; the run ends near the time given, its first steps
    are the probe's (no step is thrown away), and a rerun resumes that total."""
    task = vqgan_stage.make_task(TINY_VQGAN, 8, eval_examples=8)
    # What a run costs besides its steps (setup, compilation, evaluation, checkpoint) differs tenfold
    # between machines and is paid twice (probe, then the run); the time given must leave room for steps.
    cfg = _loop(10**6, warmup_steps=50, log_every=5)
    init_state(task, cfg, make_optimizer(cfg))  # a process's first initialization costs more than later ones
    began = time.time()
    train(task, _loop(2), tmp_path / "warm", quiet=True)
    seconds = max(24.0, 4 * (time.time() - began))
    run = tmp_path / "run"
    began = time.time()
    state = train_within(task, cfg, run, seconds=seconds, probe_steps=20, quiet=True)
    took = time.time() - began
    steps = json.loads((run / "config.json").read_text())["steps"]
    assert int(state.step) == steps > 40  # the probe is not all it ran
    assert 0.6 * seconds < took < 1.5 * seconds, (took, seconds)
    logged = [r["step"] for r in read_log(run) if "loss" in r]
    assert logged[:4] == [5, 10, 15, 20] and logged[-1] == steps  # probe records, then the run's
    again = train_within(task, cfg, run, seconds=seconds, probe_steps=20, quiet=True)
    assert int(again.step) == steps


def test_an_interruption_while_evaluating_saves_the_finished_step(tmp_path):
    """SIGTERM / Ctrl-C usually lands while the loop waits on a step's results (logging, evaluation):
    that step is finished and must be saved, though its input state was donated."""
    task = _unevaluated_task()

    def evaluate(params, model_state):
        raise KeyboardInterrupt

    task.evaluate = evaluate
    with pytest.raises(KeyboardInterrupt):
        train(task, _loop(**{**_RESUME_LOOP, "eval_every": 2}), tmp_path, quiet=True)
    assert [f.name for f in sorted((tmp_path / "checkpoints").glob("*.msgpack"))] == ["step_00000002.msgpack"]


def _reconstruction(state) -> np.ndarray:
    """The trained VQGAN's output on a fixed batch: what data parallelism must not change."""
    from model.vqgan import VQGAN

    params = vqgan_stage._codebook_params(jax.device_get(state.params), jax.device_get(state.model_state["codebook"]))
    images = _unevaluated_task().batch(0)["images"].astype(np.float32) / 255.0
    return np.asarray(VQGAN(TINY_VQGAN).apply({"params": params}, images))


_DATA_PARALLEL = """
import sys, jax, numpy as np
from model.train.loop import train
from tests.test_train import _RESUME_LOOP, _loop, _reconstruction, _unevaluated_task
assert jax.device_count() == 4
state = train(_unevaluated_task(), _loop(**_RESUME_LOOP), sys.argv[1], quiet=True)
assert all(len(leaf.sharding.device_set) == 4 for leaf in jax.tree_util.tree_leaves(state))
np.save(sys.argv[2], _reconstruction(state))
"""


def test_data_parallel_on_four_cpu_devices_matches_one(tmp_path, straight_run, straight_out):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", _DATA_PARALLEL, str(tmp_path / "run"), str(tmp_path / "out.npy")],
                   cwd=ROOT, env=env, check=True, timeout=300)
    # Same math, different reduction order across devices. Parameters are not compared one by one:
    # biases just before a GroupNorm get zero gradients up to rounding, which Adam turns into
    # lr-sized random steps; they do not change the model's output, which is compared instead.
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    np.testing.assert_allclose(losses, _losses(straight_out), rtol=1e-4)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), _reconstruction(straight_run), atol=1e-4)


def test_stages_assemble_into_a_pipeline(tmp_path, vqgan_run, bart_run, clip_run):
    from model.loading import load_pipeline

    folder = assemble(vqgan_run / "model", bart_run / "model", clip_run / "model", tmp_path / "emoji")
    info = json.loads((folder / "pipeline.json").read_text())
    assert "Twemoji" in info["credit"] and info["examples"]
    pipe = load_pipeline(folder)
    result = pipe.generate("a cat on a red background", num_images=2, candidates=2, seed=0)
    assert len(result.images) == 2 and result.images[0].size == (16, 16)


def test_warm_start_lengthens_the_text_positions_keeping_the_trained_ones():
    fresh = {"model": {"encoder": {"embed_positions": {"embedding": jax.numpy.zeros((40, 4))}}}}
    trained = {"model": {"encoder": {"embed_positions": {"embedding": np.ones((24, 4), np.float32)}}}}
    params, kept_fresh = bart_stage.warm_start(fresh, trained)
    table = np.asarray(params["model"]["encoder"]["embed_positions"]["embedding"])
    assert not kept_fresh and (table[:24] == 1).all() and (table[24:] == 0).all()
