"""Train every stage of the embedded emoji model in order and assemble its model folder.

    python -m model.train.all                       # runs/{vqgan,codes,bart,clip} -> checkpoints/emoji
    python -m model.train.all --assemble-only       # rebuild checkpoints/emoji from the runs as they are
    python -m model.train.all --runs runs8 --factor 8 --n-embed 512    # 8x8 codes: faster, blurrier
    python -m model.train.all --runs runs2 --bart-init checkpoints/emoji/bart   # DalleBart warm-started
    python -m model.train.all --runs runs3 --bart-init checkpoints/emoji/bart --decoder-layers 3
                                                    # ... keeping 3 of its 4 decoder layers (faster sampling)
    python -m model.train.all --runs runs-gpu --decoder-layers 3 --vqgan-minutes 3 --bart-minutes 4 \
        --vqgan-batch-size 256 --bart-batch-size 512 --scenes 300000 --code-format parquet --workers 13 \
        --clip-from checkpoints/emoji/clip          # on one GPU: each stage trains for so many minutes

Stages: VQGAN on scenes -> encode scenes to codes with it -> DalleBart on the codes -> CLIP on
scenes. Each stage resumes from its latest checkpoint, so rerunning the command after an
interruption continues where it stopped, and a finished stage is skipped (its run is at --*-steps).
Raising a stage's --*-steps and rerunning trains it further (the cosine schedule is stretched to
the new total). The code dataset is rebuilt only when missing (`--reencode` forces it, e.g. after
training the VQGAN further); DalleBart must then be retrained from scratch (`--fresh-bart`).

Defaults are sized for ~1 h on 2 CPU cores shared with other work; see each stage's module for
its model and measured speed. On accelerators, raise steps and batch sizes.
"""

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from model.data import scenes
from model.train import bart as bart_stage
from model.train import clip as clip_stage
from model.train import codes as codes_stage
from model.train import vqgan as vqgan_stage
from model.train.loop import LoopConfig, train, train_within

MAX_FOLDER_BYTES = 40 * 2**20

# Sampling defaults of the shipped model (pipeline.json), picked with model.evaluate. For the GPU-trained
# model (2026-11-26; 72 single-object scenes, then 60 scenes per split): condition_scale 1 (no
# super-conditioning, so sampling runs half the rows) gave identity 83% and position 97%; 1.25 gave
# 86% / 100% on the singles but 69-85% / 79-97% per split; 1.5 75% / 90%; 2 47% / 58%; 3 and 5 drew
# almost no right object. top_k 16, 32, 64, 128 and none all gave 82-83% identity. (The earlier,
# CPU-trained model wanted condition_scale 2: guidance helps an undertrained model and hurts a better one.)
DEFAULTS = {"num_images": 9, "candidates": 9, "temperature": 1.0, "top_k": 64, "top_p": 1.0, "condition_scale": 1.0}

DESCRIPTION = ("A small DALL-E mini trained from scratch on 64x64 scenes of Twemoji artwork (on one GPU for about "
               "12 minutes): one to four objects from a vocabulary of 181 animals, foods, plants, vehicles "
               "and things, on plain coloured backgrounds, with their sizes, positions and relations.")
LIMITATIONS = ("Your prompt is read into the caption form it was trained on by a small built-in reader "
               "(known object names, colours, sizes, positions, relations and counts; other words are "
               "ignored, so 'a cat-headed man selling popsicles on Mars' draws a cat, and an object's "
               "own colour cannot be changed). Images are 64x64 from a 16x16 grid of codes. It gets "
               "background colours, positions and relations right nearly always, counts and the exact "
               "emoji about four times in five; objects in pairs and counts are drawn less crisply "
               "than single ones. It knows nothing outside its emoji vocabulary and 12 background colours: "
               "a prompt that names no known object gets its background alone (the colour it names, else "
               "white).")
UNDERSTANDS = ("Understands plain English about one to four of its 181 emoji objects, their size, position, "
               "relation or count, and 12 background colours: 'blue picture with a fox in it', 'three kittens "
               "on pink'.")
CREDIT = "Twemoji graphics by Twitter, Inc and other contributors, CC-BY 4.0"
# Training captions and prompts as people type them (read by the prompt reader), side by side.
EXAMPLES = ("a large fox in the center on a blue background",
            "blue picture with a fox in it",
            "a cat to the left of a dog on a yellow background",
            "three kittens on pink",
            "a small rocket in the top right on a black background",
            "a dog sitting on top of a car, green background")


def _copy(source: Path, target: Path, names) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _word_frequencies(count: int = 20000) -> str:
    """`word count` lines of the scene captions' words, most frequent first: the hashtag splitter's
    word list (upstream's enwiki-words-frequency.txt format), so prompts never need a download."""
    rng = np.random.default_rng(0)
    words = Counter(w for _ in range(count) for w in scenes.caption(scenes.sample_scene(rng)).split())
    return "".join(f"{word} {n}\n" for word, n in words.most_common())


def assemble(vqgan_folder, bart_folder, clip_folder, out, examples=EXAMPLES) -> Path:
    """Copies the three stages' model folders into `out` (bart/, vqgan/, clip/) with pipeline.json."""
    out = Path(out)
    _copy(Path(vqgan_folder), out / "vqgan", ("config.json", "flax_model.msgpack"))
    _copy(Path(bart_folder), out / "bart", ("config.json", "flax_model.msgpack") + bart_stage.TOKENIZER_FILES)
    (out / "bart" / "enwiki-words-frequency.txt").write_text(_word_frequencies())
    _copy(Path(clip_folder), out / "clip", ("config.json", "model.safetensors", "preprocessor_config.json")
          + bart_stage.TOKENIZER_FILES)
    info = {"name": "emoji", "description": DESCRIPTION, "defaults": DEFAULTS, "examples": list(examples),
            "prompt_reader": "emoji-scenes", "understands": UNDERSTANDS, "limitations": LIMITATIONS,
            "credit": CREDIT}
    (out / "pipeline.json").write_text(json.dumps(info, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if total > MAX_FOLDER_BYTES:
        raise ValueError(f"{out} holds {total / 2**20:.1f} MB, over the {MAX_FOLDER_BYTES / 2**20:.0f} MB budget")
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="folder of the stages' run folders")
    parser.add_argument("--out", default="checkpoints/emoji", help="the assembled model folder")
    for stage, module in (("vqgan", vqgan_stage), ("bart", bart_stage), ("clip", clip_stage)):
        parser.add_argument(f"--{stage}-steps", type=int, default=module.DEFAULT_LOOP.steps)
        parser.add_argument(f"--{stage}-batch-size", type=int, default=module.DEFAULT_LOOP.batch_size)
    for stage in ("vqgan", "bart"):
        parser.add_argument(f"--{stage}-minutes", type=float, default=None,
                            help=f"train a new {stage} run for this long instead of --{stage}-steps "
                                 "(compilation included; see model.train.loop.train_within)")
    parser.add_argument("--clip-from", default=None, help="a trained CLIP folder to ship instead of training one")
    parser.add_argument("--scenes", type=int, default=40000, help="scenes encoded for DalleBart")
    parser.add_argument("--code-format", choices=("jsonl", "parquet"), default="jsonl",
                        help="the code dataset's files (parquet needs pyarrow; far faster at 100k+ scenes)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes drawing scenes for the VQGAN and the code dataset (0: the trainer's)")
    parser.add_argument("--reencode", action="store_true", help="rebuild the code dataset")
    parser.add_argument("--fresh-bart", action="store_true", help="discard the DalleBart run and start over")
    parser.add_argument("--factor", type=int, choices=(4, 8), default=4,
                        help="VQGAN downsampling: 8 = 8x8 codes per image, 4 = 16x16 (DALL-E mini's 256 codes; "
                             "sharper, ~3x the VQGAN's and ~10x DalleBart's training time per example on a CPU)")
    parser.add_argument("--n-embed", type=int, default=1024, help="VQGAN codebook size")
    parser.add_argument("--bart-init", default=None,
                        help="start DalleBart from a trained one (see model.train.bart --init-from), e.g. "
                             "checkpoints/emoji/bart after changing the VQGAN")
    parser.add_argument("--decoder-layers", type=int, default=None,
                        help="DalleBart decoder depth (default 4); with --bart-init, keeps that many of its layers")
    parser.add_argument("--assemble-only", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    clip_folder = Path(args.clip_from) if args.clip_from else runs / "clip" / "model"

    if not args.assemble_only:
        def run(name, stage, task):
            config = LoopConfig(**{**stage.DEFAULT_LOOP.__dict__, "seed": args.seed,
                                   "steps": getattr(args, f"{name}_steps"),
                                   "batch_size": getattr(args, f"{name}_batch_size")})
            minutes = getattr(args, f"{name}_minutes", None)
            if minutes:
                return train_within(task, config, runs / name, 60 * minutes)
            return train(task, config, runs / name)

        vq_config = vqgan_stage.model_config(args.factor, args.n_embed)
        run("vqgan", vqgan_stage, vqgan_stage.make_task(vq_config, args.vqgan_batch_size, args.seed,
                                                        workers=args.workers))
        codes = runs / "codes"
        if args.reencode or not any(codes.glob("train.*")):
            shutil.rmtree(codes, ignore_errors=True)
            codes_stage.write_code_datasets(runs / "vqgan" / "model", codes, args.scenes, seed=args.seed,
                                            workers=args.workers, suffix=f".{args.code_format}")
        if args.fresh_bart:
            shutil.rmtree(runs / "bart", ignore_errors=True)
        run("bart", bart_stage, bart_stage.make_task(codes, runs / "bart", args.bart_batch_size, args.seed,
                                                     image_vocab_size=vq_config.n_embed, init_from=args.bart_init,
                                                     decoder_layers=args.decoder_layers))
        if not args.clip_from:
            run("clip", clip_stage, clip_stage.make_task(runs / "clip", args.clip_batch_size, args.seed))
    folder = assemble(runs / "vqgan" / "model", runs / "bart" / "model", clip_folder, args.out)
    print(f"assembled {folder}")


if __name__ == "__main__":
    main()
