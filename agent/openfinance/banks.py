"""``[banks.NAME]`` tables: where a bank's discovery document lives and how to reach it.

    [banks.modelbank]
    discovery_url = "https://127.0.0.1:8443/.well-known/openid-configuration"
    issuer = "https://127.0.0.1:8443"              # as the directory lists it
    use_mtls_aliases = true                        # prefer mtls_endpoint_aliases (default false)
    discovery_ttl = 900                            # seconds a fetched document is used (default 15 min)
    jwks_ttl = 300                                 # seconds the bank's JWKS is used (default 5 min)
    api_origins = ["https://api.modelbank.ae"]     # more hosts `forward` may call (default: the endpoints'
                                                   # of discovery: registration, token, PAR, mTLS aliases)
    ca_bundle = "/etc/tpp-agent/ca/al-tareq.pem"   # transport settings, read by agent.transport's
    client_key = "transport"                       # TlsSettings: CAs, our key, timeouts…

An unknown key is an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import ConfigError
from agent.transport.tls import TlsSettings

DEFAULT_DISCOVERY_TTL = 15 * 60.0  # the directory's own caching period
DEFAULT_JWKS_TTL = 5 * 60.0  # the ecosystem's caching period for a bank's JWKS
_OWN = {"discovery_url", "issuer", "use_mtls_aliases", "discovery_ttl", "api_origins", "jwks_ttl"}
_KNOWN = _OWN | {f.name for f in dataclasses.fields(TlsSettings)} - {"bank"}


class UnknownBankError(ConfigError):
    pass


@dataclasses.dataclass(frozen=True)
class BankConfig:
    name: str
    discovery_url: str
    issuer: str
    tls: TlsSettings
    use_mtls_aliases: bool = False
    discovery_ttl: float = DEFAULT_DISCOVERY_TTL
    api_origins: tuple[str, ...] = ()  # https://host[:port] the forward call may reach besides discovery's
    jwks_ttl: float = DEFAULT_JWKS_TTL


def parse_banks(config: Config) -> dict[str, BankConfig]:
    where = str(config.path) if config.path else "the configuration"
    base = config.path.parent if config.path else Path.cwd()
    banks: dict[str, BankConfig] = {}
    for name, table in config.section("banks").items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"[banks.{name}] must be a table in {where}")
        banks[name] = _parse_bank(name, table, base, where)
    return banks


def find_bank(banks: Mapping[str, BankConfig], name: str) -> BankConfig:
    if name not in banks:
        known = ", ".join(sorted(banks)) or "none"
        raise UnknownBankError(f"no bank {name!r} in the configuration (configured: {known})",
                               hint=f"add a [banks.{name}] table with discovery_url, issuer and ca_bundle")
    return banks[name]


def _parse_bank(name: str, table: Mapping[str, Any], base: Path, where: str) -> BankConfig:
    section = f"[banks.{name}]"
    unknown = sorted(set(table) - _KNOWN)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in {section} of {where}",
                          hint=f"known settings: {', '.join(sorted(_KNOWN))}")
    for required in ("discovery_url", "issuer"):
        if required not in table:
            raise ConfigError(f"{section} lacks {required} in {where}",
                              hint="a bank needs discovery_url, issuer and ca_bundle (from the directory)")
    discovery_url = _https_url(table, "discovery_url", section, where)
    issuer = _https_url(table, "issuer", section, where)
    use_aliases = table.get("use_mtls_aliases", False)
    if not isinstance(use_aliases, bool):
        raise ConfigError(f"{section} use_mtls_aliases must be true or false in {where}")
    ttl = table.get("discovery_ttl", DEFAULT_DISCOVERY_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl < 10 ** 9:
        raise ConfigError(f"{section} discovery_ttl must be a positive number of seconds in {where}")
    jwks_ttl = table.get("jwks_ttl", DEFAULT_JWKS_TTL)
    if isinstance(jwks_ttl, bool) or not isinstance(jwks_ttl, int | float) or not 1 <= jwks_ttl <= 86400:
        raise ConfigError(f"{section} jwks_ttl must be a number of seconds from 1 to 86400 in {where}")
    origins = table.get("api_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        raise ConfigError(f"{section} api_origins must be a list of https://host[:port] origins in {where}")
    return BankConfig(
        name=name,
        discovery_url=discovery_url,
        issuer=issuer,
        tls=TlsSettings.from_table(name, table, base),
        use_mtls_aliases=use_aliases,
        discovery_ttl=float(ttl),
        jwks_ttl=float(jwks_ttl),
        api_origins=tuple(_origin_of(o, f"{section} api_origins", where) for o in origins),
    )


def https_origin(url: str) -> str | None:
    """``https://host[:port]`` (host in lower case) of an https URL with no user part; None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        return None
    if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
        return None
    return f"https://{parts.netloc.lower()}"


def _https_url(table: Mapping[str, Any], key: str, section: str, where: str) -> str:
    url = _text(table, key, section, where)
    if https_origin(url) is None:
        raise ConfigError(f"{section} {key} must be an https:// URL in {where}, got {url[:200]!r}")
    return url


def _origin_of(url: str, what: str, where: str) -> str:
    origin = https_origin(url)
    if origin is None or url.rstrip("/").lower() != origin:
        raise ConfigError(f"{what} must hold origins like \"https://api.bank.ae\" (no path) in {where}, "
                          f"got {url[:200]!r}")
    return origin


def _text(table: Mapping[str, Any], key: str, section: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{section} {key} must be a non-empty string in {where}")
    return value
