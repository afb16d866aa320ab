"""The search period: ``--start`` / ``--end`` strings -> UTC instants (DESIGN 1 and 3.1).

``--start 2024-01`` means the whole of January 2024 onwards; ``--end`` is inclusive, so ``--end 2024-03``
runs to the last instant of March. Both are UTC calendar dates: a time of day or an offset is refused
rather than guessed.

Rolling windows (cron): a negative ISO-8601 duration, ``--start -P2D``, is that long before *now* (an
instant, not a calendar day): ``-P2D`` two days, ``-PT36H`` 36 hours, ``-P1W``, ``-P1M`` (calendar month,
day clamped), ``-P1Y``. ``--end`` takes the same form. Only whole numbers; a positive duration is refused
(the minus says "back from now").
"""

from __future__ import annotations

import calendar
import datetime as dt
import re

from fusarbatch.errors import UsageError

_PATTERN = re.compile(r"^(?P<year>\d{4})-(?P<month>\d{2})(?:-(?P<day>\d{2}))?$")
_FORMAT = "expected YYYY-MM or YYYY-MM-DD (UTC)"
_DURATION = re.compile(
    r"^(?P<sign>-?)P(?!$)(?:(?P<Y>\d+)Y)?(?:(?P<M>\d+)M)?(?:(?P<W>\d+)W)?(?:(?P<D>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)S)?)?$"
)
_DURATION_FORMAT = "expected an ISO-8601 duration such as P2D, PT36H, P1W, P1M (whole numbers)"


def parse_duration(text: str, *, what: str = "duration") -> tuple[int, dt.timedelta]:
    """``P[nY][nM][nW][nD][T[nH][nM][nS]]`` (optionally with a leading minus) -> ``(months, timedelta)``:
    years and months are calendar months (applied with :func:`shift`), the rest an exact timedelta.

    :returns: ``(months, delta)`` with the sign of the text (both <= 0 for ``-P...``).
    :raises UsageError: not such a duration (the message starts with ``what``).
    """
    match = _DURATION.match(str(text).strip())
    if not match or not any(match[k] for k in "YMWDhms"):
        raise UsageError(f"{what} {text!r}: {_DURATION_FORMAT}")
    n = {k: int(match[k] or 0) for k in "YMWDhms"}
    months = 12 * n["Y"] + n["M"]
    delta = dt.timedelta(weeks=n["W"], days=n["D"], hours=n["h"], minutes=n["m"], seconds=n["s"])
    if match["sign"] == "-":
        return -months, -delta
    return months, delta


def shift(when: dt.datetime, months: int, delta: dt.timedelta) -> dt.datetime:
    """``when`` moved by calendar ``months`` (day clamped to the month's length), then by ``delta``."""
    if months:
        index = when.year * 12 + (when.month - 1) + months
        year, month = divmod(index, 12)
        if year < 1:
            raise UsageError(f"a duration of {-months} month(s) goes before year 1")
        day = min(when.day, calendar.monthrange(year, month + 1)[1])
        when = when.replace(year=year, month=month + 1, day=day)
    return when + delta


def is_relative(value: str | None) -> bool:
    """Whether a ``--start`` / ``--end`` value is a rolling (``-P...``) one."""
    return value is not None and str(value).strip().startswith(("-P", "P"))


def parse_period(
    start: str, end: str | None, *, now: dt.datetime | None = None
) -> tuple[dt.datetime, dt.datetime | None]:
    """Parse ``--start`` and the optional ``--end`` into timezone-aware UTC datetimes.

    - ``YYYY-MM`` as start: the first instant of that month (``2024-01`` -> 2024-01-01T00:00:00Z);
    - ``YYYY-MM-DD`` as start: that day at 00:00:00Z;
    - ``YYYY-MM`` as end: the last instant of that month (``2024-02`` -> 2024-02-29T23:59:59.999999Z);
    - ``YYYY-MM-DD`` as end: the last instant of that day (23:59:59.999999Z);
    - ``end=None``: the period is open (``None`` is returned as the end);
    - ``-P2D`` (either): that long before ``now`` (default: the current time, UTC), to the microsecond.

    :returns: ``(start, end)``, both UTC (``end`` may be ``None``); ``start <= end``.
    :raises UsageError: a value in another format or naming no real date (one line naming the flag and
        the expected format), or a start after the end.
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    first = _parse_one("--start", start, last=False, now=now)
    if end is None:
        return first, None
    last = _parse_one("--end", end, last=True, now=now)
    if first > last:
        raise UsageError(f"--start {start.strip()} is after --end {end.strip()}: swap them")
    return first, last


def parse_end(end: str | None, *, now: dt.datetime | None = None) -> dt.datetime | None:
    """``--end`` alone (see :func:`parse_period`): its last instant, or ``None`` when not given."""
    if end is None:
        return None
    return _parse_one("--end", end, last=True, now=(now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC))


def _parse_one(flag: str, value: str, *, last: bool, now: dt.datetime) -> dt.datetime:
    text = str(value).strip()
    if is_relative(text):
        if not text.startswith("-"):
            raise UsageError(
                f"{flag} {value!r}: a rolling window is a duration back from now, written with a minus: "
                f"-{text} ({_DURATION_FORMAT})"
            )
        months, delta = parse_duration(text, what=flag)
        return shift(now, months, delta)
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
