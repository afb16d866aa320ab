"""The search period: ``--start`` / ``--end`` strings -> UTC instants (DESIGN 1 and 3.1).

``--start 2024-01`` means the whole of January 2024 onwards; ``--end`` is inclusive, so ``--end 2024-03``
runs to the last instant of March. Both are UTC calendar dates: a time of day or an offset is refused
rather than guessed.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re

from fusarbatch.errors import UsageError

_PATTERN = re.compile(r"^(?P<year>\d{4})-(?P<month>\d{2})(?:-(?P<day>\d{2}))?$")
_FORMAT = "expected YYYY-MM or YYYY-MM-DD (UTC)"


def parse_period(start: str, end: str | None) -> tuple[dt.datetime, dt.datetime | None]:
    """Parse ``--start`` and the optional ``--end`` into timezone-aware UTC datetimes.

    - ``YYYY-MM`` as start: the first instant of that month (``2024-01`` -> 2024-01-01T00:00:00Z);
    - ``YYYY-MM-DD`` as start: that day at 00:00:00Z;
    - ``YYYY-MM`` as end: the last instant of that month (``2024-02`` -> 2024-02-29T23:59:59.999999Z);
    - ``YYYY-MM-DD`` as end: the last instant of that day (23:59:59.999999Z);
    - ``end=None``: the period is open (``None`` is returned as the end).

    :returns: ``(start, end)``, both UTC (``end`` may be ``None``); ``start <= end``.
    :raises UsageError: a value in another format or naming no real date (one line naming the flag and
        the expected format), or a start after the end.
    """
    first = _parse_one("--start", start, last=False)
    if end is None:
        return first, None
    last = _parse_one("--end", end, last=True)
    if first > last:
        raise UsageError(f"--start {start.strip()} is after --end {end.strip()}: swap them")
    return first, last


def _parse_one(flag: str, value: str, *, last: bool) -> dt.datetime:
    text = str(value).strip()
    match = _PATTERN.match(text)
    if not match:
        raise UsageError(f"{flag} {value!r}: {_FORMAT}")
    year, month = int(match["year"]), int(match["month"])
    if year < 1 or not 1 <= month <= 12:
        raise UsageError(f"{flag} {value!r}: {_FORMAT}")
    if match["day"] is None:
        day = calendar.monthrange(year, month)[1] if last else 1
    else:
        day = int(match["day"])
        if not 1 <= day <= calendar.monthrange(year, month)[1]:
            raise UsageError(f"{flag} {value!r}: no such day; {_FORMAT}")
    if last:
        return dt.datetime(year, month, day, 23, 59, 59, 999999, tzinfo=dt.UTC)
    return dt.datetime(year, month, day, tzinfo=dt.UTC)
