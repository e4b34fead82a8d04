"""Declared input shapes (``meshd.takes``): what a handler never has to check itself."""

from __future__ import annotations

import math

import pytest

from meshd import choice, flag, integer, list_of, number, text
from meshd.plugin import check_input

SHAPE = {
    "dx": number(-1.0, 1.0, default=0.0),
    "count": integer(1, 5),
    "name": text(8, default=""),
    "loud": flag(default=False),
    "mode": choice("walk", "run", default="walk"),
    "path": list_of(list_of(integer(0, 9), 2), 3, default=[]),
}


def test_valid_arguments_come_out_with_defaults_filled_in() -> None:
    assert check_input(SHAPE, {"count": 2, "dx": 1}) == {
        "dx": 1.0,  # a number is a float for the handler
        "count": 2,
        "name": "",
        "loud": False,
        "mode": "walk",
        "path": [],
    }
    assert check_input(SHAPE, {"count": 5, "path": [[1, 2], []], "mode": "run"})["path"] == [
        [1, 2],
        [],
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "argument count is missing"),
        (
            {"count": 1, "dz": 0},
            "unexpected argument dz (it takes dx, count, name, loud, mode, path)",
        ),
        ({"count": "2"}, "argument count must be a whole number, got '2'"),
        ({"count": 2.0}, "argument count must be a whole number, got 2.0"),
        ({"count": True}, "argument count must be a whole number, got True"),
        ({"count": 6}, "argument count must be 1 to 5, got 6"),
        ({"count": 1, "dx": 1.5}, "argument dx must be -1 to 1, got 1.5"),
        ({"count": 1, "dx": math.nan}, "argument dx is nan: numbers must be finite"),
        ({"count": 1, "dx": -math.inf}, "argument dx is -inf: numbers must be finite"),
        ({"count": 1, "dx": False}, "argument dx must be a number, got False"),
        ({"count": 1, "name": "x" * 9}, "argument name is longer than 8 characters"),
        ({"count": 1, "name": 7}, "argument name must be text, got 7"),
        ({"count": 1, "loud": 1}, "argument loud must be true or false, got 1"),
        ({"count": 1, "mode": "fly"}, "argument mode must be one of 'walk', 'run', got 'fly'"),
        ({"count": 1, "path": [[1, 2], [3], [4], [5]]}, "argument path has more than 3 items"),
        ({"count": 1, "path": [[1, 2, 3]]}, "argument path[0] has more than 2 items"),
        ({"count": 1, "path": [[1, 10]]}, "argument path[0][1] must be 0 to 9, got 10"),
        ({"count": 1, "path": {"a": 1}}, "argument path must be a list, got {'a': 1}"),
    ],
)
def test_each_wrong_argument_is_refused_naming_it(args, message) -> None:
    with pytest.raises(ValueError) as refused:
        check_input(SHAPE, args)
    assert str(refused.value) == message


def test_choices_are_exact_and_defaults_must_fit() -> None:
    with pytest.raises(ValueError, match="one of 1, 2"):
        check_input({"n": choice(1, 2)}, {"n": True})  # True == 1, but it is not a number here
    with pytest.raises(ValueError, match="argument default must be 0 to 1"):
        number(0, 1, default=2)
