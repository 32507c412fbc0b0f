"""Wall-clock timestamps for records and log lines: ISO 8601, UTC, microseconds.

Every signature stamps its audit record and its log line, so the date and time to the
second are formatted once per second and only the microseconds per call (a third of
``datetime.now(UTC).isoformat()``'s cost).
"""

from __future__ import annotations

import time

# (second, its "YYYY-MM-DDTHH:MM:SS"): one tuple, replaced whole, so threads never see a half-updated pair
_cached: list[tuple[int, str]] = [(-1, "")]


def utc_iso(suffix: str = "+00:00") -> str:
    """Now as ``2026-11-24T16:18:08.123456`` + ``suffix`` (``+00:00``, as ``isoformat()`` writes UTC, or ``Z``)."""
    second, micro = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _cached[0]
    if cached[0] != second:
        cached = _cached[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}{suffix}"
