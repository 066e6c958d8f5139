"""Checks of the prompts and images a user can pass, with messages a person can act on.

The UI, the API, the CLI and the Python call all go through here (via `Pipeline.request`), so one bad
value gets the same answer everywhere. The sampling options are checked by model/options.py.
"""

import io
import unicodedata
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import InvalidInputError

MAX_PROMPT_CHARS = 500  # far beyond the 64 text tokens the model reads; stops abuse, not users
MAX_PROMPTS = 16  # prompts in one batched call


def clean_prompt(prompt) -> str:
    """The prompt with control characters replaced by spaces; refuses empty, overlong or broken text."""
    if not isinstance(prompt, str):
        raise InvalidInputError(f"The prompt must be text, not {type(prompt).__name__}.")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError("The prompt holds invalid unicode (a lone surrogate); please retype it.") from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"The prompt is too long: {len(prompt)} characters, at most {MAX_PROMPT_CHARS}.")
    # Control and format characters (NUL, escapes, zero-width, bidi overrides) carry no meaning for the model.
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf") else c for c in prompt)
    text = " ".join(text.split())
    if not text:
        raise InvalidInputError("Please enter a prompt: describe the image you want.")
    return text


def clean_prompts(prompt) -> tuple[list[str], bool]:
    """(prompts, single): one prompt or a list of 1..MAX_PROMPTS prompts, each cleaned."""
    if isinstance(prompt, str):
        return [clean_prompt(prompt)], True
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InvalidInputError("Give a prompt (text) or a non-empty list of prompts.")
    if len(prompt) > MAX_PROMPTS:
        raise InvalidInputError(f"At most {MAX_PROMPTS} prompts in one call; got {len(prompt)}.")
    return [clean_prompt(p) for p in prompt], False


# Uploads: big enough to show something, small enough to decode safely (Pillow's own bomb limit is
# higher and only warns below twice of it).
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 4096 * 4096
_PLAIN_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1", "RGBX", "YCbCr"}


def clean_image(image) -> Image.Image:
    """An upload (PIL image, uint8 array [h, w(, 3|4)], file path or bytes) as an RGB PIL image.

    Refused with a message: unreadable files, animations, CMYK and other non-RGB colour spaces,
    fewer than MIN_IMAGE_SIDE pixels a side, more than MAX_IMAGE_PIXELS pixels. Transparent pixels
    become white.
    """
    if isinstance(image, (str, Path, bytes)):
        image = _open_image(image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise InvalidInputError(f"An image array must be uint8 [height, width, 3 or 4]; got {image.dtype} "
                                    f"{list(image.shape)}.")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise InvalidInputError(f"Expected an image, got {type(image).__name__}.")
    if getattr(image, "is_animated", False) or getattr(image, "n_frames", 1) > 1:
        raise InvalidInputError("Animated images are not supported; upload a still image (PNG or JPEG).")
    if image.mode == "CMYK":
        raise InvalidInputError("CMYK images are not supported; save the image as RGB (sRGB) and upload it again.")
    if image.mode not in _PLAIN_MODES:
        raise InvalidInputError(f"Images with {image.mode} pixels are not supported; upload an 8-bit RGB image.")
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise InvalidInputError(f"The image is too small ({width}x{height}); it needs at least "
                                f"{MIN_IMAGE_SIDE} pixels on each side.")
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidInputError(f"The image is too large ({width}x{height}); at most {MAX_IMAGE_PIXELS:,} pixels.")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(source) -> Image.Image:
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(f"The image is too large ({image.width}x{image.height}); at most "
                                        f"{MAX_IMAGE_PIXELS:,} pixels.")
            image.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow refuses far larger images in Image.open already, before the size check above.
        raise InvalidInputError(f"The image is too large ({error}); at most {MAX_IMAGE_PIXELS:,} pixels.") from None
    except FileNotFoundError:
        raise InvalidInputError("The image file was not found; upload it again.") from None
    except (OSError, SyntaxError, ValueError):
        # Pillow's own words name the file, a server path for uploads: people get the gist only.
        raise InvalidInputError("The upload is not an image that can be read (PNG, JPEG, WebP, ...).") from None
    return image


def fit_image(image: Image.Image, size: int) -> np.ndarray:
    """Centre square crop, resized to size x size (Lanczos): uint8 [size, size, 3]."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)
