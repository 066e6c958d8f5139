"""Train the VQGAN (autoencoder + codebook) on rendered emoji scenes.

    python -m model.train.vqgan --out runs/vqgan --steps 1500   # default config below, ~50 min on 2 CPU cores
    python -m model.train.vqgan --out runs/vqgan --minutes 3 --batch-size 256 --workers 13   # on a GPU
    python -m model.train.vqgan --out runs/vqgan-ft --finetune-decoder checkpoints/emoji/vqgan --steps 2000 \
        --learning-rate 3e-4   # sharper pixels for the same codes: the trained DalleBart stays valid

Default model (the shipped one): the taming VQGAN family at 64x64 pixels with f=4 (a 16x16 grid of
256 codes, as many as DALL-E mini's), channels 64-32-64 (decoder levels), no ResnetBlocks in the
encoder levels and one per decoder level, attention only in the middle blocks, a 1024 x 32 codebook.
`--factor 8` trains the 8x8-code variant (64 codes: DalleBart trains ~10x faster per example and
samples 4x faster, but reconstructions are ~3 dB worse and emoji detail is lost: measured 22.8 dB
after 1,100 steps against 24.9 dB after 1,500 steps for f=4, ~2 s per step at batch 32 on 2 cores).

Losses (no pretrained perceptual network is available offline): L1 + L2 + 0.5 x L1 of the image
gradients (sharp edges) + 0.25 x commitment. The codebook is not trained by gradients but by
exponential moving averages of the encoder outputs assigned to each code (decay 0.99), and codes
that go unused are restarted on random encoder outputs of the current batch, so the whole
codebook stays in use. The codebook lives in the loop's model_state and joins the parameters
only when exported (the saved folder is an ordinary VQGAN checkpoint).

Decoder fine-tuning (`--finetune-decoder FOLDER`) starts from a trained VQGAN and trains only
post_quant_conv and the decoder on the same losses; encoder and codebook are frozen (they live in
model_state, out of the optimizer's reach), so every image keeps exactly the codes it had and a
DalleBart trained on those codes needs no retraining.

Speed: ~20 examples/s at batch 32 on 2 CPU cores shared with other work; ~16,000 examples/s at batch
256 on one H200 GPU with `--workers 13` drawing the scenes (the shipped VQGAN: `--minutes 3`, 7,118
steps, then `--finetune-decoder ... --minutes 3.9 --learning-rate 3e-4`, 10,963 steps, then 5,950 +
11,626 decoder steps with `--kind-mix 0.2,0.4,0.4 --pixel-loss mse`: held-out pairs 26.7 -> 28.1 dB,
counts 26.6 -> 27.9 dB, single objects +0.5 dB; see README).

`--kind-mix` reweights single / pair / count scenes: multi-object scenes, whose objects are drawn
small on few codes, reconstruct worst. `--pixel-loss mse` trains on what PSNR measures; as a last
phase after the edge-weighted loss it gained ~1 dB without visibly softening edges.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from model.checkpoint import load_vqgan, save_vqgan
from model.data import scenes
from model.data.parallel import BatchStream, render_chunk
from model.train.loop import LoopConfig, Task, add_loop_arguments, loop_config, train_from_args
from model.vqgan import VQGAN, VQGANConfig

EMA_DECAY = 0.99
DEAD_CODE_USAGE = 0.03  # EMA count per batch below which a code is restarted
RESTART_USAGE = 1.0  # EMA count a restarted code starts with, so it gets ~300 steps to be picked
COMMITMENT = 0.25
GRADIENT_L1 = 0.5
EVAL_SPLITS = ("heldout_pairs", "heldout_backgrounds", "heldout_positions", "heldout_counts")


def model_config(factor: int = 4, n_embed: int = 1024, resolution: int = scenes.IMAGE_SIZE) -> VQGANConfig:
    ch_mult = {8: (2, 1, 2, 4), 4: (2, 1, 2)}[factor]
    # num_res_blocks=0: the encoder is strided convs plus the middle block, the decoder one
    # ResnetBlock per level; 4x cheaper than num_res_blocks=1 with 32-64-64-128 channels on a CPU.
    # 64 channels at full resolution, not 32: GroupNorm's 32 groups over 32 channels normalize each
    # channel alone, and the decoder's last norm then erases every absolute level, i.e. the colours
    # (measured: grey, washed-out reconstructions). Two channels per group keep relative levels.
    return VQGANConfig(ch=32, ch_mult=ch_mult, num_res_blocks=0, attn_resolutions=(), z_channels=64,
                       embed_dim=32, n_embed=n_embed, resolution=resolution)


def _codebook_params(params, codebook):
    return {**params, "quantize": {"embedding": {"embedding": codebook}}}


def _finetune_params(params, model_state):
    """The whole VQGAN tree of decoder fine-tuning: trained DECODER_PARTS plus the frozen rest."""
    return {**model_state["frozen"], **params}


def psnr(images, target):
    """Mean PSNR in dB of images vs target, both [b, H, W, 3] in [0, 1]."""
    mse = jnp.mean(jnp.square(jnp.clip(images, 0, 1) - target), axis=(1, 2, 3))
    return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def _image_gradients(x):  # [b, H, W, c] -> ([b, H-1, W, c], [b, H, W-1, c])
    return x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1]


PIXEL_LOSSES = ("edges", "mse")


def reconstruction_loss(recon, images, pixel_loss="edges"):
    """pixel_loss "edges": L1 + L2 + GRADIENT_L1 x L1 of the image gradients (sharp edges; the default);
    "mse": L2 alone, what PSNR measures (for a last fine-tuning phase). Returns (loss, l1, l2)."""
    l1 = jnp.mean(jnp.abs(recon - images))
    l2 = jnp.mean(jnp.square(recon - images))
    if pixel_loss == "mse":
        return l2, l1, l2
    if pixel_loss != "edges":
        raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
    grad_l1 = sum(jnp.mean(jnp.abs(a - b)) for a, b in zip(_image_gradients(recon), _image_gradients(images)))
    return l1 + l2 + GRADIENT_L1 * grad_l1, l1, l2


def vqgan_loss(module: VQGAN, params, model_state, batch, key, pixel_loss="edges"):
    """Reconstruction + commitment loss; returns the EMA-updated codebook state in the aux output.

    batch["images"]: uint8 [b, H, W, 3]. model_state: codebook [K, D], usage [K], sums [K, D].
    """
    images = batch["images"].astype(jnp.float32) / 255.0
    codebook = model_state["codebook"]
    full = _codebook_params(params, codebook)
    z = module.apply({"params": full}, images, method=VQGAN.encode_latents)  # [b, h, w, D]
    flat = z.reshape(-1, z.shape[-1])  # [N, D]
    codes = module.apply({"params": full}, z, method=lambda m, z: m.quantize.nearest(z)).reshape(-1)
    quantized = codebook[codes].reshape(z.shape)
    # Straight-through: the decoder sees the code vectors, the encoder gets the decoder's gradient.
    straight = z + jax.lax.stop_gradient(quantized - z)
    recon = module.apply({"params": full}, straight, method=VQGAN.decode)
    reconstruction, l1, l2 = reconstruction_loss(recon, images, pixel_loss)
    commitment = jnp.mean(jnp.square(z - jax.lax.stop_gradient(quantized)))
    loss = reconstruction + COMMITMENT * commitment

    new_state = _ema_update(model_state, jax.lax.stop_gradient(flat), codes, key)
    usage = jnp.mean(model_state["usage"] > DEAD_CODE_USAGE)
    metrics = {"l1": l1, "l2": l2, "commitment": commitment, "psnr": psnr(recon, images), "codes_in_use": usage}
    return loss, (metrics, new_state)


def _ema_update(state, flat, codes, key):
    """EMA codebook step with dead-code restarts. flat [N, D] encoder outputs, codes [N]."""
    n_embed = state["codebook"].shape[0]
    onehot = jax.nn.one_hot(codes, n_embed, dtype=flat.dtype)  # [N, K]
    usage = EMA_DECAY * state["usage"] + (1 - EMA_DECAY) * onehot.sum(0)
    sums = EMA_DECAY * state["sums"] + (1 - EMA_DECAY) * (onehot.T @ flat)
    # Laplace smoothing keeps rarely used codes from dividing by ~0.
    total = usage.sum()
    smoothed = (usage + 1e-5) / (total + n_embed * 1e-5) * total
    codebook = sums / smoothed[:, None]
    dead = usage < DEAD_CODE_USAGE
    picks = flat[jax.random.randint(key, (n_embed,), 0, flat.shape[0])]
    codebook = jnp.where(dead[:, None], picks, codebook)
    usage = jnp.where(dead, RESTART_USAGE, usage)
    sums = jnp.where(dead[:, None], picks * RESTART_USAGE, sums)
    return {"codebook": codebook, "usage": usage, "sums": sums}


DECODER_PARTS = ("post_quant_conv", "decoder")  # what --finetune-decoder trains


def decoder_loss(module: VQGAN, params, model_state, batch, key, pixel_loss="edges"):
    """Reconstruction loss of the decoder alone; params hold DECODER_PARTS, model_state["frozen"] the rest."""
    del key
    images = batch["images"].astype(jnp.float32) / 255.0
    full = _finetune_params(params, model_state)
    quantized, _ = module.apply({"params": full}, images, method=VQGAN.encode)
    recon = module.apply({"params": full}, jax.lax.stop_gradient(quantized), method=VQGAN.decode)
    loss, l1, l2 = reconstruction_loss(recon, images, pixel_loss)
    return loss, ({"l1": l1, "l2": l2, "psnr": psnr(recon, images)}, model_state)


def make_task(config: VQGANConfig | None, batch_size: int, seed: int = 0, eval_examples: int = 128,
              finetune_from=None, workers: int = 0, kind_mix=None, pixel_loss: str = "edges") -> Task:
    """The VQGAN stage; `finetune_from` (a VQGAN folder) trains only its decoder (see the docstring),
    whose config it then uses (pass None, or the same config). `workers`: processes drawing the
    training scenes ahead of the loop (model.data.parallel; for accelerators), 0 = in the loop.
    `kind_mix`: (single, pair, count) weights of the training scenes (scenes.sample_scene).
    `pixel_loss`: one of PIXEL_LOSSES (reconstruction_loss)."""
    if pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {pixel_loss!r}")
    if finetune_from is not None:
        trained_module, trained = load_vqgan(finetune_from)
        if config not in (None, trained_module.config):
            raise ValueError(f"{finetune_from} holds a VQGAN with another config than the one given")
        config = trained_module.config
    module = VQGAN(config)

    def init_finetune(key):
        del key
        frozen = dict(trained)
        params = {name: frozen.pop(name) for name in DECODER_PARTS}
        return params, {"frozen": frozen}

    def init(key):
        example = jnp.zeros((1, config.resolution, config.resolution, 3), jnp.float32)
        params = module.init(key, example)["params"]
        codebook = params.pop("quantize")["embedding"]["embedding"]
        # Zero usage: every code counts as dead on the first step and starts on a real encoder output.
        state = {"codebook": codebook, "usage": jnp.zeros(config.n_embed), "sums": jnp.zeros_like(codebook)}
        return params, state

    scenes_of_step = BatchStream(render_chunk, lambda step: ((seed, step), batch_size, "train", kind_mix), workers)

    def batch(step):
        _, images = scenes_of_step(step)
        return {"images": resize_scenes(images, config.resolution)}

    eval_images = np.concatenate([
        resize_scenes(scenes.sample_batch(np.random.default_rng([seed, 10**9, i]), eval_examples // len(EVAL_SPLITS), split)[1],
                config.resolution)
        for i, split in enumerate(EVAL_SPLITS)])

    def full_params(params, model_state):
        if finetune_from is not None:
            return _finetune_params(params, model_state)
        return _codebook_params(params, model_state["codebook"])

    @jax.jit
    def reconstruct(params, model_state, images):
        return module.apply({"params": full_params(params, model_state)}, images.astype(jnp.float32) / 255.0)

    def evaluate(params, model_state):
        recon = reconstruct(params, model_state, eval_images)
        return {"psnr": float(psnr(recon, eval_images.astype(np.float32) / 255.0))}

    def export(params, model_state, folder):
        save_vqgan(folder, config, full_params(params, model_state))

    if finetune_from is not None:
        return Task(init=init_finetune, loss=functools.partial(decoder_loss, module, pixel_loss=pixel_loss),
                    batch=batch, export=export, evaluate=evaluate, close=scenes_of_step.close)
    return Task(init=init, loss=functools.partial(vqgan_loss, module, pixel_loss=pixel_loss), batch=batch, export=export,
                evaluate=evaluate, close=scenes_of_step.close)


def resize_scenes(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 [n, 64, 64, 3] -> [n, resolution, resolution, 3] by box averaging (for tiny test models)."""
    if images.shape[1] == resolution:
        return images
    factor = images.shape[1] // resolution
    n = images.shape[0]
    pooled = images.reshape(n, resolution, factor, resolution, factor, 3).astype(np.float32).mean((2, 4))
    return np.round(pooled).astype(np.uint8)


DEFAULT_LOOP = LoopConfig(steps=3000, batch_size=32, learning_rate=1e-3, warmup_steps=100, log_every=25,
                          eval_every=250)


def _kind_mix(text: str) -> tuple[float, ...]:
    try:
        weights = tuple(float(part) for part in text.split(","))
        scenes.sample_scene(np.random.default_rng(0), "train", weights)  # validates the weights
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected three non-negative weights like 0.2,0.4,0.4: {error}") from None
    return weights


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_arguments(parser, DEFAULT_LOOP, out="runs/vqgan")
    parser.add_argument("--factor", type=int, choices=(4, 8), default=4, help="downsampling factor")
    parser.add_argument("--n-embed", type=int, default=1024, help="codebook size")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes drawing training scenes ahead of the loop (0: in the loop; ~8 on a GPU)")
    parser.add_argument("--finetune-decoder", metavar="FOLDER", default=None,
                        help="train only the decoder of this trained VQGAN (codes stay the same)")
    parser.add_argument("--kind-mix", metavar="SINGLE,PAIR,COUNT", type=_kind_mix, default=None,
                        help="weights of the training scenes' kinds (default 0.5,0.3,0.2)")
    parser.add_argument("--pixel-loss", choices=PIXEL_LOSSES, default="edges",
                        help="edges: L1 + L2 + edge L1 (default); mse: L2 alone, what PSNR measures")
    args = parser.parse_args(argv)
    loop = loop_config(args, DEFAULT_LOOP)
    config = None if args.finetune_decoder else model_config(args.factor, args.n_embed)
    task = make_task(config, args.batch_size, args.seed, finetune_from=args.finetune_decoder,
                     workers=args.workers, kind_mix=args.kind_mix, pixel_loss=args.pixel_loss)
    train_from_args(task, loop, args)


if __name__ == "__main__":
    main()
