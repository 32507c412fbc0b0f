"""``[rotation]``: how long banks may cache the TPP's JWKS, which decides when signing may switch, and how long a
retired encryption key is kept for the events encrypted to it that may still arrive."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from agent.config import Config
from agent.errors import ConfigError

DEFAULT_JWKS_CACHE_WINDOW = 900  # seconds: the ecosystem's banks cache a JWKS for 5 minutes; three times that
# Seconds: an event is accepted up to 24 h before its exp (agent.openfinance.events.DEFAULT_MAX_LIFETIME), so one
# encrypted to the old key just before the banks' caches moved on may arrive that late; an hour on top.
DEFAULT_ENCRYPTION_DRAIN_WINDOW = 25 * 3600
_KNOWN = ("jwks_cache_window", "encryption_drain_window")


@dataclasses.dataclass(frozen=True)
class RotationSettings:
    jwks_cache_window: float = DEFAULT_JWKS_CACHE_WINDOW
    encryption_drain_window: float = DEFAULT_ENCRYPTION_DRAIN_WINDOW

    @classmethod
    def parse(cls, config: Config) -> RotationSettings:
        table = config.section("rotation")
        unknown = sorted(set(table) - set(_KNOWN))
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [rotation] of {config.where}",
                              hint=f"known settings: {', '.join(_KNOWN)}")
        window = _seconds(config, table, "jwks_cache_window", default=DEFAULT_JWKS_CACHE_WINDOW, most=7 * 86400,
                          what="how long the banks may cache the application's JWKS (default 900)")
        drain = _seconds(config, table, "encryption_drain_window", default=DEFAULT_ENCRYPTION_DRAIN_WINDOW,
                         most=30 * 86400,
                         what="how long a retired encryption key is kept for events still in flight (default 90000)")
        return cls(window, drain)


def _seconds(config: Config, table: Mapping[str, Any], name: str, *, default: float, most: int, what: str) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 <= value <= most:
        raise ConfigError(f"[rotation] {name} must be seconds from 0 to {most} in {config.where}", hint=what)
    return float(value)
