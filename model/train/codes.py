"""Encode rendered scenes to VQGAN codes: the (caption, encoding) dataset DalleBart trains on.

    python -m model.train.codes --vqgan runs/vqgan/model --out runs/codes --scenes 40000

Writes `train.jsonl` (training-split scenes) and `valid.jsonl` (an equal mix of the held-out
splits, for the validation loss) in upstream's training format (see model/data/dataset.py).
Scenes are a pure function of (seed, index), so the same command writes the same files.
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from model.checkpoint import load_vqgan
from model.data.parallel import ordered_map, render_chunk
from model.data.dataset import write_dataset
from model.train.vqgan import resize_scenes
from model.vqgan import VQGAN

VALID_SPLITS = ("heldout_pairs", "heldout_backgrounds", "heldout_positions", "heldout_counts")


def encode_scenes(vqgan: VQGAN, params, count: int, split: str = "train", seed: int = 0, batch_size: int = 128,
                  quiet: bool = True, workers: int = 0) -> tuple[list[str], np.ndarray]:
    """(captions [count], codes int32 [count, num_codes]) of `count` scenes of `split`; `workers`
    processes draw the scenes (model.data.parallel: the same scenes for any number)."""
    encode = jax.jit(lambda p, images: vqgan.apply({"params": p}, images, method=VQGAN.encode)[1])
    resolution = vqgan.config.resolution
    captions, codes = [], []
    jobs = [((seed, start), min(batch_size, count - start), split) for start in range(0, count, batch_size)]
    for texts, images in tqdm(ordered_map(render_chunk, jobs, workers), total=len(jobs), disable=quiet,
                              desc=f"encoding {split}"):
        n = len(texts)
        images = resize_scenes(images, resolution)
        # Fixed batch shape (the last batch padded) so jit compiles once.
        padded = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
        codes.append(np.asarray(encode(params, jnp.asarray(padded, jnp.float32) / 255.0))[:n])
        captions += texts
    return captions, np.concatenate(codes).astype(np.int32)


def write_code_datasets(vqgan_folder, out, scenes_count: int, valid_count: int = 512, seed: int = 0,
                        quiet: bool = False, workers: int = 0, batch_size: int = 128, suffix: str = ".jsonl") -> Path:
    """Writes out/train{suffix} and out/valid{suffix} (.jsonl or .parquet); returns out."""
    out = Path(out)
    vqgan, params = load_vqgan(vqgan_folder)
    captions, codes = encode_scenes(vqgan, params, scenes_count, "train", seed, batch_size, quiet, workers)
    write_dataset(out / f"train{suffix}", captions, codes)
    valid_captions, valid_codes = [], []
    for i, split in enumerate(VALID_SPLITS):
        texts, rows = encode_scenes(vqgan, params, valid_count // len(VALID_SPLITS), split, seed + 1 + i)
        valid_captions += texts
        valid_codes.append(rows)
    write_dataset(out / f"valid{suffix}", valid_captions, np.concatenate(valid_codes))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqgan", default="runs/vqgan/model", help="VQGAN model folder")
    parser.add_argument("--out", default="runs/codes")
    parser.add_argument("--scenes", type=int, default=40000, help="training scenes to encode")
    parser.add_argument("--valid", type=int, default=512, help="held-out scenes for the validation loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes drawing the scenes (0: this one)")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="scenes per encoding call (a different size draws different scenes)")
    parser.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl",
                        help="parquet (needs pyarrow) reads and writes far faster at 100k+ scenes")
    args = parser.parse_args(argv)
    write_code_datasets(args.vqgan, args.out, args.scenes, args.valid, args.seed, workers=args.workers,
                        batch_size=args.batch_size, suffix=f".{args.format}")


if __name__ == "__main__":
    main()
