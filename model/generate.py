"""Command line: python -m model.generate "a prompt" --num-images 9 --seed 0 --out grid.png

Variations of an image: python -m model.generate --image photo.png --keep-rows 8 ["optional prompt"]

Writes a grid PNG (--out) and/or one PNG per image (--out-dir), best CLIP score first, and prints the
seed so a run can be repeated. --model takes the embedded model (default), "mini", "mega" or a folder.
"""

import argparse
import sys
from pathlib import Path

from model.errors import CheckpointError, InvalidInputError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0])
    parser.add_argument("prompt", nargs="?", default=None,
                        help="what to draw (optional with --image: variations without a prompt)")
    parser.add_argument("--model", default=None, help='embedded model (default), "mini", "mega" or a model folder')
    parser.add_argument("--num-images", type=int, default=None, help="images to keep (default: the model's, 9)")
    parser.add_argument("--candidates", type=int, default=None, help="images sampled before CLIP keeps the best")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0 = off")
    parser.add_argument("--top-p", type=float, default=None, help="1 = off")
    parser.add_argument("--condition-scale", type=float, default=None, help="super-conditioning; 1 = off")
    parser.add_argument("--image", type=Path, default=None,
                        help="make variations of this image: its top --keep-rows rows of codes are kept")
    parser.add_argument("--keep-rows", type=int, default=None, help="code rows of --image to keep (default: half)")
    parser.add_argument("--out", type=Path, default=None,
                        help="grid PNG to write (default grid.png unless --out-dir); with --image a strip: "
                             "original, reconstruction, variations")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for one PNG per image")
    args = parser.parse_args(argv)
    if args.prompt is None and args.image is None:
        parser.error("give a prompt, an --image, or both")
    if args.keep_rows is not None and args.image is None:
        parser.error("--keep-rows needs --image")
    if args.out is None and args.out_dir is None:
        args.out = Path("grid.png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after parsing so --help answers at once.
    from tqdm import tqdm

    from PIL import Image

    from model.pipeline import image_grid, load_pipeline
    from model.validation import clean_image, fit_image

    try:
        pipe = load_pipeline(args.model)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    knobs = dict(num_images=args.num_images, candidates=args.candidates, seed=args.seed,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 condition_scale=args.condition_scale)
    with tqdm(total=pipe.bart_config.image_length, unit="code", desc="sampling") as bar:
        def advance(step, total):
            bar.update(step - bar.n)

        try:
            if args.image is not None:
                result = pipe.vary(str(args.image), prompt=args.prompt, keep_rows=args.keep_rows,
                                   on_progress=advance, **knobs)
            else:
                result = pipe.generate(args.prompt, on_progress=advance, **knobs)
        except InvalidInputError as error:
            bar.close()
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.image is not None:
            # A strip: the upload as the model sees it, its VQGAN reconstruction, then the variations.
            size = pipe.vqgan_config.resolution
            original = Image.fromarray(fit_image(clean_image(str(args.image)), size))
            reconstruction = pipe.decode_codes(pipe.encode_image(original))[0]
            image_grid([original, reconstruction, *result.images], columns=len(result.images) + 2).save(args.out)
        else:
            image_grid(result.images).save(args.out)
        print(f"wrote {args.out}")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for rank, (image, score) in enumerate(zip(result.images, result.scores)):
            image.save(args.out_dir / f"{rank:02d}_score{score:.2f}.png")
        print(f"wrote {len(result.images)} images to {args.out_dir}")
    print(f"seed {result.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
