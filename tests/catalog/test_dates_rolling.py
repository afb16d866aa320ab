"""Rolling windows for cron: ``--start -P2D`` is an ISO-8601 duration back from now (issue 5)."""

from __future__ import annotations

import datetime as dt

import pytest

from fusarbatch.catalog.dates import is_relative, parse_duration, parse_end, parse_period, shift
from fusarbatch.errors import UsageError

UTC = dt.UTC
NOW = dt.datetime(2024, 3, 31, 12, 30, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        ("-P2D", dt.datetime(2024, 3, 29, 12, 30, 15, tzinfo=UTC)),
        ("-PT36H", dt.datetime(2024, 3, 30, 0, 30, 15, tzinfo=UTC)),
        ("-P1W", dt.datetime(2024, 3, 24, 12, 30, 15, tzinfo=UTC)),
        ("-P1M", dt.datetime(2024, 2, 29, 12, 30, 15, tzinfo=UTC)),  # 31 March -> 29 February (leap)
        ("-P1Y1M", dt.datetime(2023, 2, 28, 12, 30, 15, tzinfo=UTC)),
        ("-P1DT2H3M4S", dt.datetime(2024, 3, 30, 10, 27, 11, tzinfo=UTC)),
        ("-PT90M", dt.datetime(2024, 3, 31, 11, 0, 15, tzinfo=UTC)),
        (" -P2D ", dt.datetime(2024, 3, 29, 12, 30, 15, tzinfo=UTC)),
    ],
)
def test_rolling_start_is_that_long_before_now(start, expected):
    first, end = parse_period(start, None, now=NOW)
    assert first == expected and end is None and first.tzinfo is not None


def test_rolling_end_and_mixed_forms():
    first, last = parse_period("-P7D", "-P1D", now=NOW)
    assert last - first == dt.timedelta(days=6)
    first, last = parse_period("2024-03", "-P1D", now=NOW)
    assert first == dt.datetime(2024, 3, 1, tzinfo=UTC) and last == dt.datetime(
        2024, 3, 30, 12, 30, 15, tzinfo=UTC
    )
    assert parse_end("-PT1H", now=NOW) == dt.datetime(2024, 3, 31, 11, 30, 15, tzinfo=UTC)
    assert parse_end(None) is None
    with pytest.raises(UsageError, match="is after --end"):
        parse_period("-P1D", "-P2D", now=NOW)


def test_now_defaults_to_the_current_time():
    before = dt.datetime.now(UTC)
    first, _ = parse_period("-P2D", None)
    after = dt.datetime.now(UTC)
    assert before - dt.timedelta(days=2) <= first <= after - dt.timedelta(days=2)


@pytest.mark.parametrize("bad", ["-P", "-PT", "-P2", "-P1.5D", "-PT1D", "-P2DT", "-2D", "-P-2D", "-p2d"])
def test_bad_durations_name_the_flag(bad):
    with pytest.raises(UsageError) as info:
        parse_period(bad, None, now=NOW)
    message = str(info.value)
    assert message.startswith("--start") and "\n" not in message and info.value.exit_code == 2


def test_positive_duration_says_write_a_minus():
    with pytest.raises(UsageError, match=r"written with a minus: -P2D"):
        parse_period("P2D", None, now=NOW)


def test_calendar_dates_are_not_relative_and_durations_parse():
    assert not is_relative("2024-01") and is_relative("-P2D") and is_relative("P2D") and not is_relative(None)
    assert parse_duration("P1Y2M") == (14, dt.timedelta(0))
    assert parse_duration("-P1DT1S") == (0, -dt.timedelta(days=1, seconds=1))
    assert shift(dt.datetime(2024, 1, 31, tzinfo=UTC), 1, dt.timedelta(0)) == dt.datetime(
        2024, 2, 29, tzinfo=UTC
    )
