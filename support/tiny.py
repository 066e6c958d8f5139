"""Tiny random models in the real checkpoint formats, for tests that need a whole pipeline folder."""

import json
from pathlib import Path

import jax
import numpy as np

from model.bart import DalleBart, DalleBartConfig
from model.checkpoint import save_clip, save_dalle_bart, save_vqgan
from model.clip import CLIP, CLIPConfig
from model.text import train_bart_tokenizer
from model.vqgan import VQGAN, VQGANConfig

CAPTIONS = [
    "a small red apple in the top left on a blue background",
    "a fox to the left of a butterfly on a purple background",
    "three snails on a yellow background",
    "a large green frog in the center on a white background",
    "a cat above a dog on a pink background",
    "two rockets on a black background",
]


def tiny_bart_config(vocab_size: int, image_vocab_size: int = 32, image_length: int = 16) -> DalleBartConfig:
    return DalleBartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=24, decoder_ffn_dim=24, encoder_vocab_size=vocab_size, image_vocab_size=image_vocab_size,
        image_length=image_length, max_text_length=16,
    )


def tiny_vqgan_config(n_embed: int = 32) -> VQGANConfig:
    # 16x16 pixels, three levels (two downsamples): a 4x4 grid of 16 codes.
    return VQGANConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                       embed_dim=8, n_embed=n_embed, resolution=16, in_channels=3, out_ch=3)


def tiny_clip_config(vocab_size: int) -> CLIPConfig:
    return CLIPConfig.from_dict({
        "projection_dim": 16,
        "text_config": {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 48,
                        "num_attention_heads": 4, "num_hidden_layers": 1, "max_position_embeddings": 16,
                        "eos_token_id": 2},
        "vision_config": {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                          "num_hidden_layers": 1, "image_size": 16, "patch_size": 8},
    })


def _init(module, *inputs, seed: int):
    return jax.jit(module.init)(jax.random.key(seed), *inputs)["params"]


def write_tiny_pipeline(folder: Path, seed: int = 0, defaults: dict | None = None) -> Path:
    """A pipeline folder (bart/, vqgan/, clip/, pipeline.json) of tiny random models; returns it."""
    folder = Path(folder)
    tokenizer = train_bart_tokenizer([" " + c for c in CAPTIONS] * 4, 300, folder / "bart")
    vocab = len(tokenizer)
    bart_cfg = tiny_bart_config(vocab)
    text = np.zeros((1, bart_cfg.max_text_length), np.int32)
    bart_params = _init(DalleBart(bart_cfg), text, text, np.zeros((1, bart_cfg.image_length), np.int32), seed=seed)
    save_dalle_bart(folder / "bart", bart_cfg, bart_params)

    vq_cfg = tiny_vqgan_config()
    vq_params = _init(VQGAN(vq_cfg), np.zeros((1, 16, 16, 3), np.float32), seed=seed + 1)
    save_vqgan(folder / "vqgan", vq_cfg, vq_params)

    clip_cfg = tiny_clip_config(vocab)
    clip_params = _init(CLIP(clip_cfg), np.zeros((1, 16), np.int32), np.zeros((1, 16, 16, 3), np.float32),
                        np.ones((1, 16), np.int32), seed=seed + 2)
    save_clip(folder / "clip", clip_cfg, clip_params)
    tokenizer.save_pretrained(str(folder / "clip"))
    info = {"name": "tiny", "defaults": defaults or {"num_images": 4, "candidates": 4, "condition_scale": 3.0,
                                                    "top_k": 8}}
    (folder / "pipeline.json").write_text(json.dumps(info))
    return folder
