"""The one rule for typed numbers (gptforge.numeric): ranges in words, what parses, what is refused."""

from __future__ import annotations

import argparse
import math

import pytest

from gptforge.errors import UserError
from gptforge.numeric import (COUNT_OR_OFF, INT_LIMIT, NON_NEGATIVE, PORT, POSITIVE, POSITIVE_INT, SEED, Range)


@pytest.mark.parametrize("rule, words", [
    (POSITIVE_INT, "a positive integer"),
    (COUNT_OR_OFF, "an integer >= 0 (0 = off)"),
    (POSITIVE, "a positive number"),
    (NON_NEGATIVE, "a number >= 0"),
    (SEED, "an integer in 0..4294967295"),
    (PORT, "an integer in 0..65535 (0 = any free port)"),
    (Range(float, 0, 1, low_open=True, note="1 = off"), "a number in (0, 1] (1 = off)"),
    (Range(float, 0, 1, high_open=True), "a number in [0, 1)"),
    (Range(int, 2), "an integer >= 2"),
])
def test_ranges_read_as_words(rule, words):
    assert rule.describe() == words


@pytest.mark.parametrize("rule, text, value", [
    (POSITIVE_INT, "3", 3), (POSITIVE_INT, "1e6", 1_000_000), (POSITIVE_INT, "2.0", 2), (POSITIVE_INT, " 7 ", 7),
    (COUNT_OR_OFF, "0", 0), (SEED, "0", 0), (SEED, "4294967295", 2**32 - 1), (POSITIVE, "1e-9", 1e-9),
    (POSITIVE, "3", 3.0), (NON_NEGATIVE, "0", 0.0), (PORT, "65535", 65535),
])
def test_what_parses(rule, text, value):
    parsed = rule.parse(text, "--x")
    assert parsed == value and type(parsed) is rule.kind


@pytest.mark.parametrize("rule, text", [
    (POSITIVE_INT, "0"), (POSITIVE_INT, "-1"), (POSITIVE_INT, "1.5"), (POSITIVE_INT, "inf"), (POSITIVE_INT, "nan"),
    (POSITIVE_INT, "x"), (POSITIVE_INT, str(INT_LIMIT + 1)), (POSITIVE_INT, "1e30"), (COUNT_OR_OFF, "-1"),
    (SEED, "-5"), (SEED, str(2**32)), (POSITIVE, "0"), (POSITIVE, "-0.0"), (POSITIVE, "inf"), (POSITIVE, "nan"),
    (NON_NEGATIVE, "-1e-9"), (PORT, "65536"), (Range(float, 0, 1, high_open=True), "1"),
])
def test_what_is_refused_names_the_option_and_the_range(rule, text):
    with pytest.raises(UserError) as caught:
        rule.parse(text, "--x")
    assert str(caught.value).startswith(f"--x: must be {rule.describe()}, got ")


def test_config_values_are_checked_the_same_way_and_booleans_are_not_numbers():
    assert POSITIVE_INT.check(4, "train.n") == 4 and POSITIVE.check(2, "train.lr") == 2.0
    for bad in (True, 0, -3, 1.5, math.nan, math.inf, "3", None):
        with pytest.raises(UserError, match=r"^train\.n: must be a positive integer, got "):
            POSITIVE_INT.check(bad, "train.n")


def test_as_argparse_type_the_line_names_the_option():
    parser = argparse.ArgumentParser(prog="p", exit_on_error=False)
    parser.add_argument("--epochs", type=POSITIVE)
    assert parser.parse_args(["--epochs", "0.5"]).epochs == 0.5
    with pytest.raises(argparse.ArgumentError, match=r"argument --epochs: must be a positive number, got 0$"):
        parser.parse_args(["--epochs", "0"])
