"""Checks of everything a user can pass: prompts and sampling knobs, with messages a person can act on.

The UI, the API, the CLI and the Python call all go through here (via Pipeline.resolve_parameters and
clean_prompts), so one bad value gets the same answer everywhere.
"""

import math
import numbers
import unicodedata

from model.errors import InvalidInputError

MAX_PROMPT_CHARS = 500  # far beyond the 64 text tokens the model reads; stops abuse, not users
MAX_PROMPTS = 16  # prompts in one batched call
MAX_SEED = 2**31 - 1

# name -> (lowest, highest, kind); one table so the UI's sliders and the checks agree.
LIMITS = {
    "num_images": (1, 16, int),
    "candidates": (1, 64, int),
    "seed": (0, MAX_SEED, int),
    "temperature": (0.01, 10.0, float),
    "top_k": (0, 16384, int),  # 0 = off
    "top_p": (0.01, 1.0, float),  # 1 = off
    "condition_scale": (0.0, 50.0, float),  # 1 = no super-conditioning
}


def check_number(name: str, value):
    """`value` as the int/float that LIMITS says `name` takes, or InvalidInputError."""
    low, high, kind = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise InvalidInputError(f"{name} must be a number, not {type(value).__name__}.")
    try:
        number = float(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be a number, not {value!r}.") from None
    if not math.isfinite(number):
        raise InvalidInputError(f"{name} must be a finite number, not {value!r}.")
    if kind is int:
        if number != int(number):
            raise InvalidInputError(f"{name} must be a whole number, not {value!r}.")
        number = int(number)
    if not low <= number <= high:
        raise InvalidInputError(f"{name} must be between {low} and {high}; got {value!r}.")
    return number


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
