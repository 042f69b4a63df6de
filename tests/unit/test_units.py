"""Sizes and parameter counts as users write them in config, bodies and the CLI."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramancer.units import MAX_SIZE, format_size, parse_param_count, parse_size


@pytest.mark.parametrize(
    ("given_value", "expected"),
    [
        (0, 0),
        (512, 512),
        ("512MiB", 512 * 1024**2),
        ("24GiB", 24 * 1024**3),
        ("1.5GB", 1_500_000_000),
        (" 2 kib ", 2048),
        (3.9, 3),
        (MAX_SIZE, MAX_SIZE),
    ],
)
def test_sizes_people_write(given_value: object, expected: int) -> None:
    assert parse_size(given_value) == expected


@pytest.mark.parametrize(
    "bad",
    [
        -1,
        True,
        "12 parsecs",
        "GiB",
        "",
        float("inf"),
        float("nan"),
        -0.5,
        "1e400",
        "9" * 400,
        2**63,
        "9EiB",
        None,
        [1],
    ],
)
def test_bad_sizes_are_value_errors_that_say_the_form(bad: object) -> None:
    with pytest.raises(ValueError, match=r"size|expected|negative"):
        parse_size(bad)


def test_an_oversized_value_is_shortened_in_the_message() -> None:
    with pytest.raises(ValueError) as err:
        parse_size("9" * 400)
    assert len(str(err.value)) < 120


@given(st.integers(min_value=0, max_value=MAX_SIZE))
def test_integers_round_trip(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n
    assert parse_size(f"{n}B") == n


def test_format_and_param_counts() -> None:
    assert format_size(1536) == "1.5 KiB"
    assert format_size(10) == "10 B"
    assert parse_param_count("7B") == 7_000_000_000
    assert parse_param_count("350M") == 350_000_000
    with pytest.raises(ValueError, match="parameter count"):
        parse_param_count("seven")


def test_a_huge_size_string_is_refused_without_being_echoed() -> None:
    given = "9" * 1_000_000
    with pytest.raises(ValueError) as info:
        parse_size(given)
    assert "1000000 characters" in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(ValueError) as info:
        parse_size("x" * 65)
    assert len(str(info.value)) < 200
    assert parse_size(" " * 50 + "1GiB") == 1024**3


def test_counts_are_singular_for_one_only() -> None:
    from vramancer.units import count_of

    assert [count_of(n, "block") for n in (0, 1, 2)] == ["0 blocks", "1 block", "2 blocks"]
    assert count_of(1, "entry", "entries") == "1 entry"
    assert count_of(3, "entry", "entries") == "3 entries"
