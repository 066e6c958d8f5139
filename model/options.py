"""The sampling options of a request, defined once: names, limits, defaults and the seed rule.

    Options()                                  # upstream's defaults (mini, mega)
    Options.from_dict(pipeline_json["defaults"])  # a model's own defaults
    Options.check(seed="3", top_k=None)        # {"seed": 3}: what a caller gave, checked
    pipe.defaults.updated(seed=3, top_k=20)    # checked and set, the rest kept
    options.resolved()                         # candidates >= num_images, a seed drawn if none was given

Every front end reads this table: the pipeline (Python API), the page's sliders and the API of
app.py, and the CLI (model/generate.py). A value a person typed is checked exactly once (by `check`,
through `model.pipeline.check_inputs`) and refused with an `InvalidInputError` naming it and its range.
"""

import dataclasses
import math
import numbers
import random

from model.errors import InvalidInputError

MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Knob:
    """One option's name, type, range and help; `ui_high`/`step` shape its slider on the page."""

    name: str
    kind: type  # int or float
    low: float
    high: float
    help: str
    ui_high: float | None = None  # sliders stop here (typing a larger value is still allowed by the API)
    step: float = 1

    def check(self, value):
        """`value` as this knob's int/float, or InvalidInputError naming the knob and its range."""
        number = _as_float(self.name, value, "a whole number" if self.kind is int else "a number")
        if not self.low <= number <= self.high:  # also infinities
            raise InvalidInputError(f"{self.name} must be between {self.low} and {self.high}; got {_shown(value)}.")
        if self.kind is int:
            if number != int(number):
                raise InvalidInputError(f"{self.name} must be a whole number, not {_shown(value)}.")
            return int(number)
        return number


def _option(default, kind, low, high, help, **slider):
    return dataclasses.field(default=default, metadata={"knob": (kind, low, high, help, slider)})


@dataclasses.dataclass(frozen=True)
class Options:
    """Sampling options; the defaults are upstream's (dalle-mini's inference notebook). The field order
    is the positional order of the API's endpoints (app.py), which callers rely on."""

    num_images: int = _option(9, int, 1, 16, "images returned, best CLIP score first")
    seed: int | None = _option(None, int, 0, MAX_SEED, "random seed; left out, one is drawn and reported with the images")
    temperature: float = _option(1.0, float, 0.01, 10.0, "lower: safer, more alike images", ui_high=3.0, step=0.01)
    top_k: int = _option(50, int, 0, 16384, "sample among the k likeliest image tokens; 0 = off", ui_high=1024)
    top_p: float = _option(1.0, float, 0.01, 1.0, "sample within this probability mass; 1 = off", step=0.01)
    condition_scale: float = _option(10.0, float, 0.0, 50.0, "how strongly the prompt steers; 1 = off", step=0.5)
    candidates: int = _option(9, int, 1, 64, "images sampled per prompt; CLIP keeps the best num_images")

    @classmethod
    def knobs(cls) -> dict[str, Knob]:
        """The table of options by name, in the order the page and the API list them."""
        table = {}
        for field in dataclasses.fields(cls):
            kind, low, high, help, slider = field.metadata["knob"]
            table[field.name] = Knob(field.name, kind, low, high, help, **slider)
        return table

    @classmethod
    def from_dict(cls, values: dict) -> "Options":
        """A model's defaults from its pipeline.json (unknown keys ignored, known ones checked)."""
        return cls().updated(**{name: value for name, value in values.items() if name in cls.knobs()})

    @classmethod
    def check(cls, **given) -> dict:
        """The given values (None = not given, left out) checked: InvalidInputError names the first
        bad one and its range."""
        knobs = cls.knobs()
        unknown = sorted(set(given) - set(knobs))
        if unknown:
            raise InvalidInputError(f"Unknown option {unknown[0]!r}; the options are {', '.join(knobs)}.")
        return {name: knobs[name].check(value) for name, value in given.items() if value is not None}

    def updated(self, **given) -> "Options":
        """These options with each given value checked and set; None keeps the current value."""
        return dataclasses.replace(self, **self.check(**given))

    def resolved(self) -> "Options":
        """Ready to sample: candidates raised to num_images, and a random seed when none is set (the
        seed rule: a request without a seed gets a fresh one, and the result reports it)."""
        seed = random.SystemRandom().randint(0, MAX_SEED) if self.seed is None else self.seed
        return dataclasses.replace(self, candidates=max(self.candidates, self.num_images), seed=seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_float(name: str, value, what: str) -> float:
    """A number or numeric string as a float (NaN refused, huge ints as infinities)."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise InvalidInputError(f"{name} must be {what}, not {type(value).__name__}.")
    try:
        number = float(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be {what}, not {_shown(value)}.") from None
    except OverflowError:  # an int beyond any float (JSON allows 10**400): outside every range
        number = math.inf if value > 0 else -math.inf
    if math.isnan(number):
        raise InvalidInputError(f"{name} must be a finite number, not {_shown(value)}.")
    return number


def _shown(value) -> str:
    """The value as quoted in a message, cut short: a 5,000-digit "number" need not come back whole."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_count(name: str, value, low: int, high: int) -> int:
    """A whole number in [low, high] whose range depends on the model (e.g. keep_rows)."""
    number = _as_float(name, value, "a whole number")
    if not low <= number <= high or number != int(number):
        raise InvalidInputError(f"{name} must be a whole number between {low} and {high}; got {_shown(value)}.")
    return int(number)
