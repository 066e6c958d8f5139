"""The training loop every stage shares: optax AdamW, a jitted data-parallel step, checkpoints, logs.

A stage describes itself as a `Task`: how to initialize its parameters (and any state that is not
trained by gradients, such as an EMA codebook), its loss, and its batch for a given step. Batches
are a pure function of (seed, step), so a run resumed from a checkpoint sees exactly the batches
and random keys an uninterrupted run would have seen, and reaches the same parameters.

Run folder layout (`out`):
    checkpoints/step_{n:08d}.msgpack  params, optimizer state, model state, step, rng (last two kept)
    log.jsonl                         one JSON object per logged step (train and eval metrics)
    loss.png                          the loss curves from log.jsonl
    model/                            the stage's model folder, exported at every checkpoint

Data parallelism: with several devices, a `jax.sharding.Mesh` with a "data" axis splits every
batch by rows and replicates parameters and optimizer state; jit inserts the gradient all-reduce.
The code path is the same on one device (no mesh) and on many.
"""

import argparse
import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from model import sharding, xla_options
from model.errors import CheckpointError

KEEP_CHECKPOINTS = 2


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Optimization and bookkeeping settings shared by all stages."""

    steps: int = 1000  # total optimizer steps (a resumed run continues up to this)
    batch_size: int = 32  # global batch; must be divisible by the number of devices
    learning_rate: float = 1e-3  # peak of the warmup + cosine schedule
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1  # the cosine decays to this fraction of the peak
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # global-norm clipping
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every_s: float = 180.0  # wall-clock interval between checkpoints (and at the end)


@flax.struct.dataclass
class TrainState:
    params: dict
    opt_state: optax.OptState
    model_state: dict  # arrays updated by the loss itself (e.g. an EMA codebook), not by gradients
    step: jax.Array  # int32 scalar: optimizer steps taken
    rng: jax.Array  # uint32 [2]: the run's base key; step keys are fold_in(rng, step)


@dataclasses.dataclass
class Task:
    """What a stage gives the loop.

    init(key) -> (params, model_state)
    loss(params, model_state, batch, key) -> (loss scalar, (metrics dict of scalars, new model_state))
    batch(step) -> dict of numpy arrays with a leading batch axis; must depend only on step
    evaluate(params, model_state) -> dict of floats (optional; logged with an "eval_" prefix)
    export(params, model_state, folder) -> writes the stage's model folder
    close() -> stops what batch() started, e.g. worker processes (optional; called when `train` ends)
    """

    init: Callable
    loss: Callable
    batch: Callable[[int], dict]
    export: Callable
    evaluate: Callable | None = None
    close: Callable | None = None


def make_optimizer(cfg: LoopConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.final_lr_fraction)
    # Decay only matrices and embeddings; norms, biases and scalars (e.g. CLIP's logit_scale) keep theirs.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask))


def init_state(task: Task, cfg: LoopConfig, optimizer) -> TrainState:
    rng = jax.random.PRNGKey(cfg.seed)
    params, model_state = task.init(jax.random.fold_in(rng, 2**31 - 1))
    return TrainState(params=params, opt_state=optimizer.init(params), model_state=model_state,
                      step=jnp.zeros((), jnp.int32), rng=rng)


def make_train_step(task: Task, optimizer):
    """(state, batch) -> (state, metrics); the caller jits it with shardings."""

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(task.loss, has_aux=True)
        (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}
        return state.replace(params=params, opt_state=opt_state, model_state=model_state,
                             step=state.step + 1), metrics

    return train_step


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_files(out: Path) -> list[Path]:
    return sorted((Path(out) / "checkpoints").glob("step_*.msgpack"))


def save_checkpoint(out: Path, state: TrainState) -> Path:
    folder = Path(out) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"step_{int(state.step):08d}.msgpack"
    # Write then rename, so an interruption never leaves a truncated latest checkpoint.
    tmp = file.with_suffix(".tmp")
    tmp.write_bytes(serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(state))))
    tmp.replace(file)
    for old in checkpoint_files(out)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return file


def restore_checkpoint(file: Path, target: TrainState) -> TrainState:
    """`target` with every leaf replaced by the file's; any missing, extra or misshapen leaf is an error
    (flax's from_state_dict would silently keep the target's value for a missing key)."""
    loaded = serialization.msgpack_restore(Path(file).read_bytes())
    want = traverse_util.flatten_dict(serialization.to_state_dict(target), sep="/")
    got = traverse_util.flatten_dict(loaded, sep="/")
    if set(want) != set(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise CheckpointError(f"{file}: does not match this run's state (missing {missing[:3]}, "
                              f"unexpected {extra[:3]}); was it written with another config?")
    for name, value in want.items():
        if np.shape(value) != np.shape(got[name]):
            raise CheckpointError(f"{file}: {name} has shape {np.shape(got[name])}, expected {np.shape(value)}")
    return serialization.from_state_dict(target, loaded)


# ---------------------------------------------------------------------------------------------
# Logs


def read_log(out: Path) -> list[dict]:
    """The log's records, keeping the last record per (step, kind) (a resumed run rewrites steps)."""
    file = Path(out) / "log.jsonl"
    if not file.is_file():
        return []
    records = {}
    for line in file.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["step"], "eval" in record)] = record
    return [records[key] for key in sorted(records)]


def plot_losses(out: Path) -> Path | None:
    """loss.png: training loss and every eval_* metric against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    records = read_log(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    eval_names = sorted({k for r in evals for k in r if k.startswith("eval_")})
    if not train:
        return None
    figure, axes = plt.subplots(1, 1 + len(eval_names), figsize=(5 * (1 + len(eval_names)), 3.5), squeeze=False)
    axes[0, 0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0, 0].set(title="training loss", xlabel="step", yscale="log")
    for axis, name in zip(axes[0, 1:], eval_names):
        points = [(r["step"], r[name]) for r in evals if name in r]
        axis.plot(*zip(*points), marker="o")
        axis.set(title=name, xlabel="step")
    figure.tight_layout()
    file = Path(out) / "loss.png"
    figure.savefig(file, dpi=80)
    plt.close(figure)
    return file


def _append_log(out: Path, record: dict) -> None:
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# The loop


def add_loop_arguments(parser, defaults: LoopConfig, out: str) -> None:
    """The command-line flags every trainer shares (run folder, length, batch, rate, seed, resume)."""
    parser.add_argument("--out", default=out, help="run folder (checkpoints, log, model/)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                        help="continue from the latest checkpoint in --out (default on)")
    parser.add_argument("--checkpoint-every", type=float, default=defaults.checkpoint_every_s, help="seconds")
    parser.add_argument("--minutes", type=float, default=None,
                        help="train a new run for this long instead of --steps (compilation included; "
                             "for accelerators: the speed measured on the first steps sets the total)")


def loop_config(args, defaults: LoopConfig) -> LoopConfig:
    """`defaults` with the shared flags of `add_loop_arguments` applied."""
    return dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, seed=args.seed,
                               checkpoint_every_s=args.checkpoint_every)


def train_from_args(task: Task, cfg: LoopConfig, args) -> TrainState:
    """`train`, or `train_within` when the command line gave --minutes (see add_loop_arguments)."""
    if args.minutes:
        return train_within(task, cfg, args.out, 60 * args.minutes)
    return train(task, cfg, args.out, resume=args.resume)


def train(task: Task, cfg: LoopConfig, out, resume: bool = True, mesh=None, quiet: bool = False) -> TrainState:
    """Trains `task` for cfg.steps steps (continuing from the latest checkpoint in `out` if `resume`).

    `mesh`: a Mesh with a "data" axis; default `sharding.make_mesh()` over all devices (None for one).
    Returns the final state; `out` holds its checkpoint, log, loss.png and exported model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh() if mesh is None else mesh
    devices = sharding.data_size(mesh)
    if cfg.batch_size % devices:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {devices} data-parallel devices")
    optimizer = make_optimizer(cfg)
    state = init_state(task, cfg, optimizer)
    latest = checkpoint_files(out)
    if resume and latest:
        state = restore_checkpoint(latest[-1], state)
    elif latest:
        raise FileExistsError(f"{out} already holds checkpoints; pass resume or use a fresh folder")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    step_fn = make_train_step(task, optimizer)
    options = xla_options.compiler_options()
    if mesh is None:
        jit_step = jax.jit(step_fn, donate_argnums=0, compiler_options=options)
        place_batch = lambda batch: batch  # noqa: E731
    else:
        replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.DATA))
        state = jax.device_put(state, replicated)
        jit_step = jax.jit(step_fn, donate_argnums=0, in_shardings=(replicated, rows),
                           out_shardings=(replicated, replicated), compiler_options=options)
        place_batch = lambda batch: jax.device_put(batch, rows)  # noqa: E731

    start = int(state.step)
    last_save = time.time()
    window = {"start": time.time(), "examples": 0}  # throughput since the last log record
    bar = tqdm(total=cfg.steps, initial=start, disable=quiet, mininterval=5.0, dynamic_ncols=True)
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        # `kill` (SIGTERM) saves like Ctrl-C; background jobs of a non-interactive shell ignore SIGINT.
        previous_handler = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for step in range(start, cfg.steps):
            # The new state is bound before logging waits on it, so an interruption while logging or
            # evaluating still saves this step (a donated input state is gone once the step runs).
            state, metrics = jit_step(state, place_batch(task.batch(step)))
            _log_step(task, cfg, out, state, metrics, step, bar, window)
            if time.time() - last_save >= cfg.checkpoint_every_s or step + 1 == cfg.steps:
                _checkpoint(task, state, out)
                last_save = time.time()
    except KeyboardInterrupt:
        # Ctrl-C (or a stage's own interruption) keeps the steps done so far.
        # A step interrupted inside jit may have consumed the donated state; then nothing is saved.
        if not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state)) and int(state.step) > start:
            _checkpoint(task, state, out)
        raise
    finally:
        bar.close()
        if task.close is not None:
            task.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    if start >= cfg.steps and not (out / "model").is_dir():
        _checkpoint(task, state, out)
    return state


def train_within(task: Task, cfg: LoopConfig, out, seconds: float, probe_steps: int = 40, mesh=None,
                 quiet: bool = False) -> TrainState:
    """Trains a new run in `out` for as many steps as fit in `seconds` of wall clock (compilation
    included); cfg.steps is ignored. For accelerators, whose speed on a model nobody knows ahead.

    The first `probe_steps` steps (at most the warmup, so the learning rates so far do not depend on
    the total) are the run's own first steps; their throughput sets the total, with which the run
    resumes (the cosine schedule spans the total; the probe's setup, compilation and closing
    checkpoint come again and are counted in). Rerun on an interrupted run, it resumes that run's total.
    """
    began = time.time()
    out = Path(out)
    saved = out / "config.json"
    if checkpoint_files(out) and saved.is_file():
        saved_steps = json.loads(saved.read_text())["steps"]
        if saved_steps > probe_steps:
            return train(task, dataclasses.replace(cfg, steps=saved_steps), out, True, mesh, quiet)
    probe_steps = min(probe_steps, cfg.warmup_steps)
    probe = dataclasses.replace(cfg, steps=probe_steps, log_every=max(probe_steps // 4, 1), eval_every=10**9)
    train(task, probe, out, True, mesh, quiet)
    windows = [r for r in read_log(out) if "examples_per_s" in r and r["step"] <= probe.steps]
    rate = float(np.median([r["examples_per_s"] for r in windows[1:]] or [windows[-1]["examples_per_s"]]))
    # What the probe spent besides its steps comes again: setting up (initialization, restoring),
    # the first step's compilation, and after the last step an evaluation and a checkpoint.
    setup_and_compile = windows[0]["time"] - began - probe.log_every * cfg.batch_size / rate
    closing = time.time() - windows[-1]["time"]
    left = seconds - (time.time() - began) - max(setup_and_compile, 0.0) - max(closing, 0.0)
    # 5% for evaluations, checkpoints and exports along the way.
    total = probe.steps + max(int(0.95 * left * rate / cfg.batch_size), 1)
    if not quiet:
        print(f"{out}: {rate:.0f} examples/s after ~{setup_and_compile:.0f} s of setup and compilation: "
              f"{total} steps fit {seconds:.0f} s", flush=True)
    return train(task, dataclasses.replace(cfg, steps=total), out, True, mesh, quiet)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _log_step(task, cfg, out, state, metrics, step, bar, window):
    """The log record and evaluation of a finished optimizer step, when due."""
    window["examples"] += cfg.batch_size
    done = step + 1
    if done % cfg.log_every == 0 or done == cfg.steps:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.time() - window["start"]
        record = {"step": done, **metrics, "examples_per_s": window["examples"] / max(elapsed, 1e-9),
                  "time": time.time()}
        _append_log(out, record)
        window.update(start=time.time(), examples=0)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if task.evaluate is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
        results = task.evaluate(state.params, state.model_state)
        _append_log(out, {"step": done, "eval": True, **{f"eval_{k}": float(v) for k, v in results.items()}})
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    bar.update(1)


def _checkpoint(task: Task, state: TrainState, out: Path) -> None:
    save_checkpoint(out, state)
    host = jax.device_get(state)
    task.export(host.params, host.model_state, out / "model")
    plot_losses(out)
