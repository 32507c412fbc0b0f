"""When a certificate may be presented, and when it is due for renewal.

A certificate outside its validity period is never presented to a bank: the TLS layer asks
:func:`validity_problem` when it picks the client certificate and before each request. Renewal is due
``[certificates] expiry_warning_days`` before ``notAfter`` (default 30): ``doctor`` warns then, the TLS layer
logs it, and ``tpp-agent certs needs-renewal`` says so in its exit status.
"""

from __future__ import annotations

import datetime

from cryptography import x509

from agent.compat import not_valid_after, not_valid_before
from agent.config import Config
from agent.errors import ConfigError

DEFAULT_EXPIRY_WARNING_DAYS = 30


def expiry_warning_days(config: Config) -> int:
    value = config.section("certificates").get("expiry_warning_days", DEFAULT_EXPIRY_WARNING_DAYS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"[certificates] expiry_warning_days must be a non-negative integer in {config.path}")
    return value


def validity_problem(cert: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """Why ``cert`` may not be presented now (``"expired on …"``, ``"not valid before …"``), or None."""
    now = now or datetime.datetime.now(datetime.UTC)
    not_before, not_after = not_valid_before(cert), not_valid_after(cert)
    if now > not_after:
        return f"expired on {not_after:%Y-%m-%d %H:%M} UTC"
    if now < not_before:
        return f"not valid before {not_before:%Y-%m-%d %H:%M} UTC"
    return None


def renewal_due(not_after: datetime.datetime, days: float, now: datetime.datetime | None = None) -> bool:
    """Whether a certificate ending at ``not_after`` is within ``days`` of its end (or past it)."""
    now = now or datetime.datetime.now(datetime.UTC)
    return not_after - now <= datetime.timedelta(days=days)
