"""parse_period: month/day precision, inclusive end, UTC, one-line usage errors."""

from __future__ import annotations

import datetime as dt

import pytest

from fusarbatch.catalog.dates import parse_period
from fusarbatch.errors import UsageError

UTC = dt.UTC


def test_month_start_is_first_instant_and_open_end():
    start, end = parse_period("2024-01", None)
    assert start == dt.datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
    assert start.utcoffset() == dt.timedelta(0)
    assert end is None


def test_day_start_is_midnight_utc():
    start, _ = parse_period("2024-03-15", None)
    assert start == dt.datetime(2024, 3, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        ("2024-02", dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC)),  # leap year
        ("2023-02", dt.datetime(2023, 2, 28, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2024-12", dt.datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2024-04", dt.datetime(2024, 4, 30, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2024-04-10", dt.datetime(2024, 4, 10, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_end_is_inclusive_last_instant(end, expected):
    start, last = parse_period("2020-01", end)
    assert start == dt.datetime(2020, 1, 1, tzinfo=UTC)
    assert last == expected
    assert last.tzinfo is not None and last.utcoffset() == dt.timedelta(0)


def test_same_month_start_and_end_is_the_whole_month():
    start, end = parse_period("2024-03", "2024-03")
    assert end - start == dt.timedelta(days=31) - dt.timedelta(microseconds=1)


def test_day_start_inside_month_end():
    start, end = parse_period("2024-03-31", "2024-03")
    assert start == dt.datetime(2024, 3, 31, tzinfo=UTC)
    assert end == dt.datetime(2024, 3, 31, 23, 59, 59, 999999, tzinfo=UTC)


def test_surrounding_whitespace_is_ignored():
    assert parse_period(" 2024-01 ", None)[0] == dt.datetime(2024, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    [
        "2024-13",
        "2024-00",
        "2024-1",
        "24-01",
        "2024/01",
        "2024-02-30",
        "2023-02-29",
        "2024-01-01T00:00",
        "2024-01-01Z",
        "",
        "January",
        "0000-01",
        "2024-1-05",
    ],
)
def test_bad_start_is_one_line_naming_flag_and_format(bad):
    with pytest.raises(UsageError) as info:
        parse_period(bad, None)
    message = str(info.value)
    assert message.startswith(f"--start {bad!r}")
    assert "YYYY-MM or YYYY-MM-DD (UTC)" in message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_bad_end_names_end():
    with pytest.raises(UsageError, match=r"^--end '2024-3': expected YYYY-MM or YYYY-MM-DD \(UTC\)$"):
        parse_period("2024-01", "2024-3")


def test_start_after_end_says_swap():
    with pytest.raises(UsageError) as info:
        parse_period("2024-05", "2024-03")
    assert str(info.value) == "--start 2024-05 is after --end 2024-03: swap them"


def test_start_day_after_end_day_in_same_month():
    with pytest.raises(UsageError, match="--start 2024-03-20 is after --end 2024-03-19"):
        parse_period("2024-03-20", "2024-03-19")
