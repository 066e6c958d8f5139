"""Every user-facing value is checked with a clear message; nothing else ever escapes."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from model.errors import InvalidInputError
from model.pipeline import Pipeline
from model.validation import LIMITS, MAX_PROMPT_CHARS, check_number, clean_prompt, clean_prompts


@pytest.mark.parametrize("name, value, message", [
    ("num_images", 0, "between 1 and 16"),
    ("num_images", 2.5, "whole number"),
    ("num_images", "many", "must be a whole number, not .many."),
    ("num_images", True, "must be a whole number, not bool"),
    ("temperature", 0, "between 0.01 and 10.0"),
    ("temperature", float("nan"), "finite"),
    ("top_k", -1, "between 0"),
    ("top_p", 0, "between 0.01 and 1.0"),
    ("top_p", 1.5, "between 0.01 and 1.0"),
    ("condition_scale", float("inf"), "between 0.0 and 50.0"),
    ("temperature", float("nan"), "finite"),
    ("num_images", 10**400, "between 1 and 16"),  # beyond any float
    ("seed", -(10**400), "between 0"),
    ("num_images", 1.5, "whole number"),
    ("seed", -3, "between 0"),
    ("seed", 2**40, "between 0"),
    ("candidates", None, "must be a whole number, not NoneType"),
    ("temperature", [1.0], "must be a number, not list"),
])
def test_bad_numbers_are_refused_by_name(name, value, message):
    with pytest.raises(InvalidInputError, match=message) as error:
        check_number(name, value)
    assert name in str(error.value)


def test_a_huge_bad_value_is_not_echoed_whole():
    with pytest.raises(InvalidInputError, match="top_k must be") as error:
        check_number("top_k", "9" * 5000 + "x")
    assert len(str(error.value)) < 120


def test_good_numbers_come_back_typed():
    assert check_number("num_images", "9") == 9 and isinstance(check_number("num_images", 9.0), int)
    assert check_number("temperature", "0.5") == 0.5


@pytest.mark.parametrize("prompt, message", [
    ("", "Please enter a prompt"),
    ("   \t\n", "Please enter a prompt"),
    ("\x00\x1b", "Please enter a prompt"),
    ("x" * (MAX_PROMPT_CHARS + 1), "too long"),
    ("a \ud800 cat", "invalid unicode"),
    (42, "must be text"),
])
def test_bad_prompts(prompt, message):
    with pytest.raises(InvalidInputError, match=message):
        clean_prompt(prompt)


def test_control_characters_become_spaces():
    assert clean_prompt("a\x00red\u200bapple\x1b[31m  ") == "a red apple [31m"


def test_prompt_lists():
    assert clean_prompts(["a", " b "]) == (["a", "b"], False)
    with pytest.raises(InvalidInputError, match="non-empty list"):
        clean_prompts([])
    with pytest.raises(InvalidInputError, match="At most 16 prompts"):
        clean_prompts(["a"] * 17)


class _Defaults:
    num_images, candidates, temperature, top_k, top_p, condition_scale = 9, 9, 1.0, 50, 1.0, 10.0


anything = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({name: anything for name in LIMITS}))
def test_resolve_parameters_accepts_or_explains(knobs):
    pipe = Pipeline.__new__(Pipeline)  # the checks need only the defaults
    pipe.defaults = _Defaults
    try:
        resolved = pipe.resolve_parameters(**knobs)
    except InvalidInputError as error:
        assert str(error)
        return
    for name, (low, high, kind) in LIMITS.items():
        assert isinstance(resolved[name], kind) and low <= resolved[name] <= high
        assert not (isinstance(resolved[name], float) and math.isnan(resolved[name]))
    assert resolved["candidates"] >= resolved["num_images"]
