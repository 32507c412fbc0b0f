"""``[rotation]``: how long banks may cache the TPP's JWKS, which decides when signing may switch."""

from __future__ import annotations

import dataclasses
import math

from agent.config import Config
from agent.errors import ConfigError

DEFAULT_JWKS_CACHE_WINDOW = 900  # seconds: the ecosystem's banks cache a JWKS for 5 minutes; three times that


@dataclasses.dataclass(frozen=True)
class RotationSettings:
    jwks_cache_window: float = DEFAULT_JWKS_CACHE_WINDOW

    @classmethod
    def parse(cls, config: Config) -> RotationSettings:
        table = config.section("rotation")
        unknown = sorted(set(table) - {"jwks_cache_window"})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [rotation] of {config.where}",
                              hint="known settings: jwks_cache_window")
        window = table.get("jwks_cache_window", DEFAULT_JWKS_CACHE_WINDOW)
        if isinstance(window, bool) or not isinstance(window, int | float) or not math.isfinite(window) \
                or not 0 <= window <= 7 * 86400:
            raise ConfigError(f"[rotation] jwks_cache_window must be seconds from 0 to 604800 in {config.where}",
                              hint="how long the banks may cache the application's JWKS (default 900)")
        return cls(float(window))
