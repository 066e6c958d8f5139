"""How well a model trained on emoji scenes follows compositional prompts, split by split.

    python -m model.evaluate --model checkpoints/emoji --per-split 60 --out eval.json --grid examples.png

For each split of `model.data.scenes` (seen compositions from "train", and each held-out split), and
"heldout_paraphrases" (train-distribution scenes captioned only in the wordings that
`model.data.captions` keeps out of training), it samples scenes with a fixed seed, generates one
image per caption (best of `--candidates` by the model's own CLIP) and measures the image against the scene it was asked for, with checks that do
not use the model's CLIP:
- background: the colour of the image border, nearest of the named backgrounds (only where the
  caption names one: "a fox in the top left" accepts any background);
- identity (single objects): template matching of the drawn object against every vocabulary emoji
  rendered at the same box on the same background (Twemoji art, as the scenes are drawn);
- position (single objects): the object's box centre left/right/above/below the image centre;
- relation (pairs): both named objects located by sliding template matching, then the relation of
  their centres;
- count: connected blobs of foreground;
plus the VQGAN's reconstruction PSNR on rendered scenes and CLIP text->image retrieval top-1 among
the split's rendered scenes. Prints a markdown table and writes JSON.
"""

import argparse
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from scipy import ndimage

from model.data import scenes
from model.data.captions import Paraphrase, paraphrase

SPLITS = ("train", "heldout_pairs", "heldout_backgrounds", "heldout_positions", "heldout_counts",
          "heldout_paraphrases")
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is "drawn"
MIN_BLOB_PIXELS = 20  # count blobs smaller than this are noise
POSITION_TOLERANCE = 6  # pixels off the image centre that still count as "center"
_BG_NAMES = tuple(scenes.BACKGROUNDS)
_BG_RGB = np.array([scenes.BACKGROUNDS[n] for n in _BG_NAMES], np.float32)


def background_of(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(nearest named background, median border colour) of a uint8 [64, 64, 3] image."""
    border = np.concatenate([image[:2].reshape(-1, 3), image[-2:].reshape(-1, 3),
                             image[:, :2].reshape(-1, 3), image[:, -2:].reshape(-1, 3)]).astype(np.float32)
    colour = np.median(border, axis=0)
    return _BG_NAMES[int(np.argmin(np.linalg.norm(_BG_RGB - colour, axis=1)))], colour


def foreground(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return np.linalg.norm(image.astype(np.float32) - colour, axis=-1) > FOREGROUND_DISTANCE


def _template(name: str, background: str, x: int, y: int, size: int) -> np.ndarray:
    placed = scenes.PlacedObject(name, scenes.VOCABULARY[name], x, y, size)
    return np.asarray(scenes.render(scenes.Scene(background, (placed,), "single")), np.float32)


def identify(image: np.ndarray, background: str, mask: np.ndarray) -> str | None:
    """The vocabulary name whose art, drawn in the foreground's box, is closest (MSE) to the image."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    size = int(max(xs.max() - xs.min(), ys.max() - ys.min()) + 1)
    size = min(max(size, 8), scenes.IMAGE_SIZE)
    x = int(np.clip((xs.min() + xs.max() + 1 - size) // 2, 0, scenes.IMAGE_SIZE - size))
    y = int(np.clip((ys.min() + ys.max() + 1 - size) // 2, 0, scenes.IMAGE_SIZE - size))
    box = (slice(y, y + size), slice(x, x + size))
    crop = image.astype(np.float32)[box]
    errors = {name: float(np.mean((_template(name, background, x, y, size)[box] - crop) ** 2))
              for name in scenes.VOCABULARY}
    return min(errors, key=errors.get)


def locate(image: np.ndarray, name: str, background: str, size: int = 24, stride: int = 2) -> tuple[float, float]:
    """Centre (x, y) of the best match of `name` drawn at `size` anywhere in the image."""
    art = _template(name, background, 0, 0, size)[:size, :size]
    best, where = np.inf, (0.0, 0.0)
    picture = image.astype(np.float32)
    for y in range(0, scenes.IMAGE_SIZE - size + 1, stride):
        for x in range(0, scenes.IMAGE_SIZE - size + 1, stride):
            error = float(np.mean((picture[y:y + size, x:x + size] - art) ** 2))
            if error < best:
                best, where = error, (x + size / 2, y + size / 2)
    return where


def relation_holds(first: tuple[float, float], second: tuple[float, float], relation: str) -> bool:
    dx, dy = second[0] - first[0], second[1] - first[1]
    return {"to the left of": dx > abs(dy), "to the right of": -dx > abs(dy),
            "above": dy > abs(dx), "below": -dy > abs(dx)}[relation]


def count_blobs(mask: np.ndarray) -> int:
    # Dilating by one pixel joins the pieces of one emoji (eyes, outlines) but not separate copies.
    labels, found = ndimage.label(ndimage.binary_dilation(mask))
    sizes = ndimage.sum(mask, labels, range(1, found + 1))
    return int(np.sum(np.asarray(sizes) >= MIN_BLOB_PIXELS))


def position_of(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    # The box centre against the image centre: large objects at a side still reach the middle third.
    middle = scenes.IMAGE_SIZE / 2

    def side(low, high):
        centre = (low + high + 1) / 2
        return 0 if centre < middle - POSITION_TOLERANCE else 2 if centre > middle + POSITION_TOLERANCE else 1

    return scenes.POSITIONS[side(ys.min(), ys.max()) * 3 + side(xs.min(), xs.max())]


def judge(scene, image: np.ndarray, names_background: bool = True) -> dict:
    """Per-image checks of a generated image against the scene its caption described; a caption
    that names no background (names_background=False) accepts any background."""
    background, colour = background_of(image)
    mask = foreground(image, colour)
    checks = {"background": background == scene.background} if names_background else {}
    if scene.kind == "single":
        checks["identity"] = identify(image, background, mask) == scene.objects[0].name
        checks["position"] = position_of(mask) == scene.position
    elif scene.kind == "pair":
        first = locate(image, scene.objects[0].name, background)
        second = locate(image, scene.objects[1].name, background)
        checks["relation"] = relation_holds(first, second, scene.relation)
    else:
        checks["count"] = count_blobs(mask) == scene.count
    return checks


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def evaluate(pipe, per_split: int, candidates: int, seed: int = 0, batch: int = 8, splits=SPLITS):
    """Metrics per split (dict of dicts) and (caption, image) examples per split."""
    table, examples = {}, {}
    for split_index, split in enumerate(SPLITS):
        if split not in splits:
            continue  # each split keeps its own random stream whichever others run
        rng = np.random.default_rng([seed, split_index])
        if split == "heldout_paraphrases":  # train-distribution scenes in held-out wordings
            drawn = [scenes.sample_scene(rng, "train") for _ in range(per_split)]
            worded = [paraphrase(s, rng, heldout=True) for s in drawn]
        else:
            drawn = [scenes.sample_scene(rng, split) for _ in range(per_split)]
            worded = [Paraphrase(scenes.caption(s), True) for s in drawn]
        captions = [w.text for w in worded]
        truth = np.stack([np.asarray(scenes.render(s)) for s in drawn])
        # Reconstruction through the VQGAN.
        codes = np.stack([pipe.encode_image(image) for image in truth])
        rebuilt = np.stack([np.asarray(image) for image in pipe.decode_codes(codes)])
        # CLIP retrieval among the split's rendered scenes, of the text the pipeline's CLIP reads (a
        # model's prompt reader may rewrite a caption, see Pipeline.reader).
        logits = pipe.reranker.logits([pipe.read(c) for c in captions], list(truth))
        retrieval = float(np.mean(np.argmax(logits.T, axis=1) == np.arange(per_split)))
        # Generation, best of `candidates` by the model's CLIP.
        generated = []
        for start in range(0, per_split, batch):
            results = pipe.generate(captions[start:start + batch], num_images=1, candidates=candidates,
                                    seed=seed + start)
            generated += [np.asarray(r.images[0]) for r in results]
        checks = [judge(s, g, w.names_background) for s, g, w in zip(drawn, generated, worded)]
        row = {"scenes": per_split, "psnr": float(np.mean([psnr(a, b) for a, b in zip(truth, rebuilt)])),
               "clip_top1": retrieval}
        for key in ("background", "identity", "position", "relation", "count"):
            values_ = [c[key] for c in checks if key in c]
            row[key] = float(np.mean(values_)) if values_ else None
        table[split] = row
        examples[split] = list(zip(captions[:6], generated[:6]))
    return table, examples


def markdown(table: dict) -> str:
    columns = ("psnr", "background", "identity", "position", "relation", "count", "clip_top1")
    lines = ["| split | scenes | PSNR dB | background | identity | position | relation | count | CLIP top-1 |",
             "|---" * 9 + "|"]
    for split, row in table.items():
        cells = [f"{row['psnr']:.1f}"] + ["-" if row[c] is None else f"{100 * row[c]:.0f}%" for c in columns[1:]]
        lines.append(f"| {split} | {row['scenes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Prompts as newcomers type them (issue 18's among them), for the model card's grid (--free-grid).
FREE_PROMPTS = (
    ("A FOX IN THE CENTER ON A BLUE BACKGROUND", "blue picture with a fox in it", "Fox in the centre, background: blue",
     "cat"),
    ("a cat-headed man selling popsicles on Mars", "a red apple", "three happy kittens on pink",
     "a dog sitting on top of a car, yellow bg"),
    ("tiny rocket in the upper-right corner on black", "horse on the right, cow on the left",
     "a ship with an anchor underneath it", "2 pizzas please"),
    ("a girafe in the top rigth corner, purple backgound", "top: moon / bottom: house, black",
     "guitar | bottom left | 4k | yellow", "a bus, and below it a car"),
)


def free_prompt_grid(pipe, path: Path, seed: int = 0) -> None:
    """FREE_PROMPTS drawn (best of the model's candidates), each with what the model read it as."""
    rows = {}
    for r, prompts in enumerate(FREE_PROMPTS):
        results = pipe.generate(list(prompts), num_images=1, seed=seed)
        rows[r] = [(f"{res.prompt}\n= {res.read_as or res.prompt}", np.asarray(res.images[0])) for res in results]
    example_grid(rows, path, text_height=88)


def example_grid(examples: dict, path: Path, text_height: int = 44) -> None:
    """One row per split: generated images with their captions underneath."""
    from PIL import Image, ImageDraw

    cell, columns = 128, max(len(v) for v in examples.values())
    grid = Image.new("RGB", (columns * cell, len(examples) * (cell + text_height)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (split, items) in enumerate(examples.items()):
        for c, (text, image) in enumerate(items):
            top = r * (cell + text_height)
            grid.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (c * cell, top))
            lines = [line for part in text.split("\n") for line in textwrap.wrap(part, 22)][:text_height // 11]
            draw.multiline_text((c * cell + 2, top + cell + 1), "\n".join(lines), fill="black", spacing=0)
    grid.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--per-split", type=int, default=60, help="scenes per split (0: no table)")
    parser.add_argument("--candidates", type=int, default=None, help="CLIP candidates per caption (default: model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("eval.json"))
    parser.add_argument("--grid", type=Path, default=None, help="PNG of example generations per split")
    parser.add_argument("--free-grid", type=Path, default=None,
                        help="PNG of FREE_PROMPTS (prompts as people type them) and what the model read them as")
    args = parser.parse_args(argv)
    unknown = set(args.splits.split(",")) - set(SPLITS)
    if unknown:
        parser.error(f"unknown split(s) {', '.join(sorted(unknown))}; known: {', '.join(SPLITS)}")

    from model.loading import load_pipeline

    pipe = load_pipeline(args.model)
    candidates = args.candidates or pipe.defaults.candidates
    if args.per_split > 0:  # 0: only the free-prompt grid
        table, examples = evaluate(pipe, args.per_split, candidates, args.seed, splits=args.splits.split(","))
        args.out.write_text(json.dumps({"model": pipe.name, "candidates": candidates, "seed": args.seed,
                                        "splits": table}, indent=2) + "\n")
        print(markdown(table))
        if args.grid:
            example_grid(examples, args.grid)
    if args.free_grid:
        free_prompt_grid(pipe, args.free_grid, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
