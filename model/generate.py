"""Command line: python -m model.generate "a prompt" --num-images 9 --seed 0 --out grid.png

Variations of an image: python -m model.generate --image photo.png [--strength 0.7] ["optional prompt"]
(--keep-rows N keeps the top N rows of codes exactly; alone it leaves the rest free, strength 0)

Writes a grid PNG (--out) and/or one PNG per image (--out-dir), best CLIP score first, and prints the
seed so a run can be repeated. --model takes the embedded model (default), "mini", "mega" or a folder.
Options left out take the model's defaults.
"""

import argparse
import sys
from pathlib import Path

from model.errors import CheckpointError, InvalidInputError
from model.options import Options


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__.split("\n")[0],
                                     epilog="Options left out take the model's defaults.")
    parser.add_argument("prompt", nargs="?", default=None,
                        help="what to draw (optional with --image: variations without a prompt)")
    parser.add_argument("--model", default=None, help='embedded model (default), "mini", "mega" or a model folder')
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="precision of the weights on the device (default: float32 on CPU, bfloat16 on "
                             "TPUs and GPUs that have it, else float16)")
    for knob in Options.knobs().values():
        parser.add_argument("--" + knob.name.replace("_", "-"), type=knob.kind, default=None,
                            help=knob.help)
    parser.add_argument("--image", type=Path, default=None,
                        help="make variations of this image (with a prompt: edits of it)")
    parser.add_argument("--strength", type=float, default=None,
                        help="0..1: how closely every code follows --image's (0 = ignore it, 1 = copy it; "
                             "default 0.7, 0.5 with a prompt; 0 when only --keep-rows is given)")
    parser.add_argument("--keep-rows", type=int, default=None, help="top code rows of --image kept exactly (default 0)")
    parser.add_argument("--out", type=Path, default=None,
                        help="grid PNG to write (default grid.png unless --out-dir); with --image a strip: "
                             "original, reconstruction, variations")
    parser.add_argument("--out-dir", type=Path, default=None, help="folder for one PNG per image")
    args = parser.parse_args(argv)
    if args.prompt is None and args.image is None:
        parser.error("give a prompt, an --image, or both")
    for name in ("keep_rows", "strength"):
        if getattr(args, name) is not None and args.image is None:
            parser.error(f"--{name.replace('_', '-')} needs --image")
    if args.out is None and args.out_dir is None:
        args.out = Path("grid.png")
    return args


def check_outputs(out: Path | None, out_dir: Path | None) -> None:
    """InvalidInputError unless --out is a writable image file name and --out-dir a usable folder."""
    from PIL import Image

    if out is not None:
        if out.is_dir():
            raise InvalidInputError(f"--out {out} is a folder; give a file name such as grid.png.")
        if out.suffix.lower() not in Image.registered_extensions():
            raise InvalidInputError(f"--out {out} needs an image file extension such as .png, .jpg or .webp.")
        _make_folder(out.parent, "--out")
    if out_dir is not None:
        if out_dir.exists() and not out_dir.is_dir():
            raise InvalidInputError(f"--out-dir {out_dir} is a file, not a folder.")
        _make_folder(out_dir, "--out-dir")


def _make_folder(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(f"{flag}: cannot create the folder {folder}: {error.strerror}.") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    # Imported after parsing so --help answers at once.
    from tqdm import tqdm

    from PIL import Image

    from model.loading import load_pipeline
    from model.pipeline import Progress, check_inputs, image_grid
    from model.validation import fit_image

    options = {name: getattr(args, name) for name in Options.knobs()}
    # Everything the user typed is checked before the (for the published models, minute-long) load,
    # and the outputs before sampling, so a typo never costs a generation.
    try:
        inputs = check_inputs(args.prompt, image=args.image and str(args.image), keep_rows=args.keep_rows,
                              strength=args.strength, **options)
        check_outputs(args.out, args.out_dir)
        pipe = load_pipeline(args.model, dtype=args.dtype, progress=lambda line: print(line, file=sys.stderr, flush=True))
        request = pipe.complete(inputs)
    except (InvalidInputError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if request.texts != request.prompts:
        print(f"drawn as: {request.texts[0]}")  # the model's prompt reader rewrote the prompt
    elif any(b is not None for b in request.backdrops):
        print("drawn as: the background alone (this model knows none of these words)")
    with tqdm(total=pipe.bart_config.image_length, unit="code", desc="sampling") as bar:
        for item in pipe.run(request):
            if isinstance(item, Progress):
                bar.update(item.step - bar.n)
            else:
                result = item
    if args.out is not None:
        if args.image is not None:
            # A strip: the upload as the model sees it, its VQGAN reconstruction, then the variations.
            size = pipe.vqgan_config.resolution
            original = Image.fromarray(fit_image(request.image, size))
            reconstruction = pipe.decode_codes(pipe.encode_image(original))[0]
            image_grid([original, reconstruction, *result.images], columns=len(result.images) + 2).save(args.out)
        else:
            image_grid(result.images).save(args.out)
        print(f"wrote {args.out}")
    if args.out_dir is not None:
        for rank, (image, score) in enumerate(zip(result.images, result.scores)):
            image.save(args.out_dir / f"{rank:02d}_score{score:.2f}.png")
        print(f"wrote {len(result.images)} images to {args.out_dir}")
    print(f"seed {result.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
