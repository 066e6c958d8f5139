"""Every user-facing value is checked with a clear message; nothing else ever escapes."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from model.errors import InvalidInputError
from model.options import Options
from model.validation import MAX_PROMPT_CHARS, clean_prompt, clean_prompts

KNOBS = Options.knobs()


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
        KNOBS[name].check(value)
    assert name in str(error.value)


def test_a_huge_bad_value_is_not_echoed_whole():
    with pytest.raises(InvalidInputError, match="top_k must be") as error:
        KNOBS["top_k"].check("9" * 5000 + "x")
    assert len(str(error.value)) < 120


def test_good_numbers_come_back_typed():
    assert KNOBS["num_images"].check("9") == 9 and isinstance(KNOBS["num_images"].check(9.0), int)
    assert KNOBS["temperature"].check("0.5") == 0.5


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


def test_unknown_options_are_named():
    with pytest.raises(InvalidInputError, match="Unknown option 'topk'; the options are num_images, "):
        Options().updated(topk=5)


anything = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8), st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({name: anything for name in KNOBS}))
def test_options_accept_or_explain(given_values):
    """Any values: either every option comes back in range, or the error names an option that was
    given a value it refuses on its own, and says what that option takes."""
    try:
        resolved = Options().updated(**given_values).resolved()
    except InvalidInputError as error:
        message = str(error)
        name = message.split(" ", 1)[0]
        assert name in given_values and given_values[name] is not None, message
        with pytest.raises(InvalidInputError) as alone:
            KNOBS[name].check(given_values[name])
        assert str(alone.value) == message
        assert message.startswith(f"{name} must be "), message
        return
    for name, knob in KNOBS.items():
        value = getattr(resolved, name)
        assert isinstance(value, knob.kind) and knob.low <= value <= knob.high
        assert not (isinstance(value, float) and math.isnan(value))
    assert resolved.candidates >= resolved.num_images
