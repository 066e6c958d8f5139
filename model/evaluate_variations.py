"""Variations and text edits of rendered emoji scenes, measured (docs/variations.md).

    python -m model.evaluate_variations --uploads 48 --strengths 0.7 --keep-rows 8

Uploads: single-object scenes (medium or large objects, any of the nine positions, plain
backgrounds) rendered at 64x64. For each upload and setting, one `pipe.vary` call (its own seed)
returns `--variations` images, every one of which is judged with the checks of model.evaluate
(nearest named border colour; the object identified by template matching wherever it is drawn; its
box's position), never with the model's own CLIP:
- none: no prompt. Passes when the object and the background are kept and the image is no near-copy:
  PSNR against the upload's VQGAN reconstruction (what strength 1 returns) below 35 dB.
- background / position / object: the upload's caption with that one attribute changed (a background
  the new object stands out on). Passes when the new attribute shows and the object (for an object
  edit: the background) is kept.
Prints a markdown table; --out writes the rows as JSON.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from model.data import scenes
from model.evaluate import background_of, foreground, identify, position_of, psnr

MODES = ("none", "background", "position", "object")
NEAR_COPY_DB = 35.0  # PSNR against the reconstruction at or above which a variation counts as a copy


def uploads(count: int, seed: int = 0) -> list:
    """Single-object scenes of medium or large objects, drawn like the training scenes."""
    rng = np.random.default_rng([seed, 19])
    drawn = []
    while len(drawn) < count:
        scene = scenes.sample_scene(rng, "train", kind_mix=(1, 0, 0))
        if scene.size_name in ("medium", "large"):
            drawn.append(scene)
    return drawn


def edited(scene, mode: str, rng):
    """The scene with one attribute changed (None for `none`): what the edit prompt describes."""
    placed = scene.objects[0]
    if mode == "none":
        return None
    if mode == "background":
        choices = [b for b in scenes.visible_backgrounds(placed.name) if b != scene.background]
        return dataclasses.replace(scene, background=str(rng.choice(choices)))
    if mode == "position":
        return dataclasses.replace(scene, position=str(rng.choice([p for p in scenes.POSITIONS if p != scene.position])))
    names = [n for n in scenes.VOCABULARY if n != placed.name and scene.background in scenes.visible_backgrounds(n)]
    name = str(rng.choice(names))
    return dataclasses.replace(scene, objects=(dataclasses.replace(placed, name=name, emoji=scenes.VOCABULARY[name]),))


def measure(image: np.ndarray, target, upload: np.ndarray, reconstruction: np.ndarray) -> dict:
    """What one image shows against the scene it should show (`target`: the upload's or the edit's)."""
    background, colour = background_of(image)
    mask = foreground(image, colour)
    return {"background": background == target.background,
            "object": identify(image, background, mask) == target.objects[0].name,
            "position": position_of(mask) == target.position,
            "psnr_upload": psnr(image, upload), "psnr_reconstruction": psnr(image, reconstruction)}


def passed(mode: str, kept: dict, new: dict) -> bool:
    if mode == "none":
        return kept["object"] and kept["background"] and kept["psnr_reconstruction"] < NEAR_COPY_DB
    if mode == "object":
        return new["object"] and kept["background"]
    return new[mode] and kept["object"]


def evaluate(pipe, drawn: list, setting: dict, variations: int, modes=MODES, seed: int = 0,
             candidates: int | None = None) -> dict:
    """One row per mode: shares of images (over uploads x variations) that pass each check."""
    rows = {}
    for mode in modes:
        rng = np.random.default_rng([seed, MODES.index(mode)])
        records = []
        for index, scene in enumerate(drawn):
            upload = scenes.render(scene)
            pixels = np.asarray(upload)
            reconstruction = np.asarray(pipe.decode_codes(pipe.encode_image(upload))[0])
            target = edited(scene, mode, rng)
            prompt = None if target is None else scenes.caption(target)
            result = pipe.vary(upload, prompt=prompt, seed=seed + index, num_images=variations,
                               candidates=candidates or variations, **setting)
            for image in result.images:
                image = np.asarray(image)
                kept = measure(image, scene, pixels, reconstruction)
                new = kept if target is None else measure(image, target, pixels, reconstruction)
                records.append({"kept": kept, "new": new, "pass": passed(mode, kept, new)})
        rows[mode] = summary(mode, records)
    return rows


def summary(mode: str, records: list) -> dict:
    def share(values):
        return float(np.mean(values))

    row = {"images": len(records), "pass": share([r["pass"] for r in records]),
           "new": None if mode == "none" else share([r["new"][mode] for r in records]),
           "near_copy": share([r["kept"]["psnr_reconstruction"] >= NEAR_COPY_DB for r in records]),
           "psnr_upload": share([r["kept"]["psnr_upload"] for r in records])}
    for check in ("object", "background", "position"):
        row["kept_" + check] = share([r["kept"][check] for r in records])
    return row


def markdown(table: dict) -> str:
    lines = ["| setting | edit | images | pass | new attribute | object kept | background kept | position kept "
             "| near-copies | PSNR vs upload |", "|---" * 10 + "|"]
    for setting, rows in table.items():
        for mode, row in rows.items():
            cells = [row["pass"], row["new"], row["kept_object"], row["kept_background"], row["kept_position"],
                     row["near_copy"]]
            shown = ["-" if c is None else f"{100 * c:.0f}%" for c in cells]
            lines.append(f"| {setting} | {mode} | {row['images']} | " + " | ".join(shown)
                         + f" | {row['psnr_upload']:.1f} dB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.evaluate_variations", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--uploads", type=int, default=48, help="rendered scenes to vary")
    parser.add_argument("--variations", type=int, default=9, help="images per upload and edit")
    parser.add_argument("--strengths", default="default",
                        help="comma-separated strengths to measure ('default': the pipeline's default)")
    parser.add_argument("--keep-rows", default="", help="comma-separated keep_rows settings (strength 0) to compare")
    parser.add_argument("--modes", default=",".join(MODES), help="which of: " + ", ".join(MODES))
    parser.add_argument("--candidates", type=int, default=None,
                        help="images sampled per upload, of which CLIP keeps --variations (default: as many)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the table")
    args = parser.parse_args(argv)

    from model.loading import load_pipeline

    pipe = load_pipeline(args.model)
    settings = {}
    for value in filter(None, args.strengths.split(",")):
        settings["default" if value == "default" else f"strength {value}"] = (
            {} if value == "default" else {"strength": float(value)})
    for value in filter(None, args.keep_rows.split(",")):
        settings[f"keep_rows {value}"] = {"keep_rows": int(value)}
    drawn = uploads(args.uploads, args.seed)
    modes = tuple(m for m in args.modes.split(",") if m)
    table = {}
    for name, setting in settings.items():
        started = time.perf_counter()
        table[name] = evaluate(pipe, drawn, setting, args.variations, modes, args.seed, args.candidates)
        print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(markdown(table))
    if args.out:
        args.out.write_text(json.dumps({"model": pipe.name, "uploads": args.uploads, "variations": args.variations,
                                        "candidates": args.candidates, "seed": args.seed, "table": table},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
