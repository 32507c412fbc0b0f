"""The configuration loaded whole, once: every section parsed by its layer's one parser, registered here.

``load`` reads the file, parses every section and checks what spans sections (a key's purpose against the banks
that use it and the rules that grant it); it raises one :class:`ConfigProblems` listing every problem found, so
``tpp-agent config check`` prints them all at once and ``serve``, a reload and ``doctor`` refuse a broken file
before anything runs. An unknown section, or an unknown setting inside one, is a problem naming file and key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from agent import config as config_module
from agent.config import Config, KeyConfig, KeyPurpose
from agent.daemon.policy import Policy
from agent.daemon.settings import DaemonSettings
from agent.directory.settings import DirectorySettings
from agent.errors import AgentError, ConfigError
from agent.jose import JoseSettings
from agent.lifecycle.validity import expiry_warning_days
from agent.metrics.settings import MetricsSettings
from agent.openfinance.banks import BankConfig, parse_banks
from agent.openfinance.tokens import TokenSettings
from agent.rotation.settings import RotationSettings
from agent.state import database_url

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class CertificateSettings:
    """``[certificates]``: when a certificate is due for renewal (doctor warns, needs-renewal says so)."""

    expiry_warning_days: int

    @classmethod
    def parse(cls, config: Config) -> CertificateSettings:
        unknown = sorted(set(config.section("certificates")) - {"expiry_warning_days"})
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [certificates] of {config.where}",
                              hint="known settings: expiry_warning_days")
        return cls(expiry_warning_days(config))


def _directory(config: Config) -> DirectorySettings | None:
    """The directory's API settings; a [directory] with participants_url alone serves `banks sync` only."""
    table = config.section("directory")
    if set(table) <= {"participants_url"}:
        url = table.get("participants_url")
        if url is not None and (not isinstance(url, str) or not url.startswith("https://")):
            raise ConfigError(f"[directory] participants_url must be an https:// URL in {config.where}")
        return None
    return DirectorySettings.from_config(config)


# The sections config.parse reads itself (the token and its keys: everything else needs them).
_CORE_SECTIONS = ("state", "pkcs11", "keys")
# Top-level settings that are no section: config.read merges the banks files ``include`` names.
_TOP_LEVEL = ("include",)
# Each section (or part of one) and its one parser, by the Sections field it fills; a section not named here
# is an error.
PARSERS: Mapping[str, tuple[str, Callable[[Config], object]]] = {
    "database": ("state", database_url),
    "daemon": ("daemon", DaemonSettings.parse),
    "banks": ("banks", parse_banks),
    "tokens": ("tokens", TokenSettings.from_config),
    "jose": ("jose", JoseSettings.from_config),
    "certificates": ("certificates", CertificateSettings.parse),
    "directory": ("directory", _directory),
    "metrics": ("metrics", MetricsSettings.parse),
    "rotation": ("rotation", RotationSettings.parse),
    "policy": ("policy", lambda config: Policy.parse(config.section("policy"), config.keys,
                                                     frozenset(config.section("banks")))),
}
KNOWN_SECTIONS = frozenset(_CORE_SECTIONS) | frozenset(_TOP_LEVEL) | frozenset(s for s, _ in PARSERS.values())


class ConfigProblems(ConfigError):
    """Every problem of one configuration file; ``str()`` lists them, one per line."""

    def __init__(self, where: str, problems: list[AgentError]) -> None:
        self.where = where
        self.problems = problems
        lines = [f"{p}" + (f" (hint: {p.hint})" if p.hint and len(problems) > 1 else "") for p in problems]
        message = lines[0] if len(lines) == 1 else f"{len(lines)} problems in {where}:\n  " + "\n  ".join(lines)
        super().__init__(message, problems[0].hint if len(problems) == 1 else "fix each, then run "
                                                                               "`tpp-agent config check`")


@dataclasses.dataclass(frozen=True)
class Sections:
    """The whole configuration, typed: each layer reads its section from here."""

    config: Config  # [state], [pkcs11], [keys] with every key's purpose resolved
    daemon: DaemonSettings
    banks: Mapping[str, BankConfig]
    tokens: TokenSettings
    jose: JoseSettings
    certificates: CertificateSettings
    directory: DirectorySettings | None  # the directory's API (certificates, participants), if configured
    database: str | None  # [state] database: the shared PostgreSQL store, else the state dir's SQLite file
    policy: Policy
    metrics: MetricsSettings  # [metrics]: the TCP listener, if any
    rotation: RotationSettings  # [rotation]: when a rotation's signing switch may happen

    @property
    def path(self) -> Path | None:
        return self.config.path


def load(explicit: str | None = None) -> Sections:
    """The configuration file (``--config``, ``$TPP_AGENT_CONFIG``, /etc/tpp-agent/config.toml or none)."""
    path = config_module.locate(explicit)
    try:
        raw = config_module.read(path)
    except ConfigError as exc:
        raise ConfigProblems(str(path), [exc]) from None
    return parse(raw, path)


def parse(raw: Mapping[str, Any], path: Path | None = None) -> Sections:
    where = str(path) if path else "the built-in defaults"
    problems: list[AgentError] = []
    for name in sorted(set(raw) - KNOWN_SECTIONS):
        problems.append(ConfigError(f"unknown section [{name}] in {where}",
                                    hint=f"sections: {', '.join(sorted(KNOWN_SECTIONS))}"))
    parsed_config = _attempt(problems, lambda: config_module.parse(raw, path))
    skipped: frozenset[str] = frozenset()
    if parsed_config is None:
        # Still check the other sections (every problem at once): with the broken core section left out.
        parsed_config, skipped = _without_broken_core(raw, path)
        if parsed_config is None:
            raise ConfigProblems(where, problems)
    config = parsed_config
    banks = _attempt(problems, lambda: parse_banks(config))
    tokens = _attempt(problems, lambda: TokenSettings.from_config(config))
    if banks is not None:
        config = dataclasses.replace(config, keys=_purposes(config, banks, tokens, problems))
    parsed: dict[str, object] = {"banks": banks, "tokens": tokens}
    for name, (_, parser) in PARSERS.items():
        if name == "policy" and "keys" in skipped:
            continue  # its rules name keys, which did not load: their problems are reported already
        if name not in parsed:
            parsed[name] = _attempt(problems, lambda parser=parser: parser(config))  # type: ignore[misc]
    if problems:
        raise ConfigProblems(where, problems)
    return Sections(config, **parsed)  # type: ignore[arg-type]


def _without_broken_core(raw: Mapping[str, Any], path: Path | None) -> tuple[Config | None, frozenset[str]]:
    for dropped in (("pkcs11",), ("keys",), ("state",), ("pkcs11", "keys"), _CORE_SECTIONS):
        try:
            return config_module.parse({k: v for k, v in raw.items() if k not in dropped}, path), frozenset(dropped)
        except AgentError:
            continue
    return None, frozenset(_CORE_SECTIONS)


def problems_of(explicit: str | None) -> tuple[Path | None, list[AgentError]]:
    """Every problem of a configuration file (none: it loads)."""
    try:
        sections = load(explicit)
    except ConfigProblems as exc:
        return config_module.locate(explicit), exc.problems
    return sections.path, []


def _attempt(problems: list[AgentError], parse_section: Callable[[], T]) -> T | None:
    try:
        return parse_section()
    except AgentError as exc:
        problems.append(exc)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:  # a parser's own bug must not be a traceback
        problems.append(ConfigError(f"cannot parse the configuration: {exc}"))
    return None


def _purposes(config: Config, banks: Mapping[str, BankConfig], tokens: TokenSettings | None,
              problems: list[AgentError]) -> dict[str, KeyConfig]:
    """Each key's purpose: as stated, else tls for a bank's client_key and jws for any other; clashes refused."""
    where = config.where
    transport: dict[str, list[str]] = {}
    for bank in banks.values():
        key = config.key_named(bank.tls.client_key)
        if key is not None:
            transport.setdefault(key.alias, []).append(bank.name)
    resolved: dict[str, KeyConfig] = {}
    by_uri: dict[str, str] = {}
    for alias, key in config.keys.items():
        if key.uri in by_uri:  # two aliases, two purposes, one key: the purposes would mean nothing
            problems.append(ConfigError(f"[keys.{alias}] and [keys.{by_uri[key.uri]}] name the same key {key.uri} "
                                        f"in {where}", hint="give each key one [keys.NAME] entry"))
        by_uri.setdefault(key.uri, alias)
        purpose = key.purpose or (KeyPurpose.TLS if alias in transport else KeyPurpose.JWS)
        if alias in transport and purpose is not KeyPurpose.TLS:
            problems.append(ConfigError(
                f"[keys.{alias}] purpose = {purpose.value!r}, but it is the client_key of "
                f"[banks.{transport[alias][0]}] in {where}: a transport key is for TLS only",
                hint=f"give the banks a key of its own with purpose = \"tls\", or remove purpose from [keys.{alias}]"))
        if key.raw_sign and purpose is not KeyPurpose.JWS:
            problems.append(ConfigError(f"[keys.{alias}] raw_sign = true, but its purpose is {purpose.value!r} in "
                                        f"{where}: only a jws key may make raw signatures",
                                        hint=f"remove raw_sign from [keys.{alias}]"))
        resolved[alias] = dataclasses.replace(key, purpose=purpose)
    if tokens is not None:
        signing = config.key_named(tokens.signing_key)
        if signing is not None and resolved[signing.alias].purpose is not KeyPurpose.JWS:
            problems.append(ConfigError(
                f"[tokens] signing_key {tokens.signing_key!r} is a {resolved[signing.alias].purpose} key in {where}: "
                "client assertions and request objects need a jws key",
                hint="name a key with purpose = \"jws\" (the default) as [tokens] signing_key"))
        # Named: it must fit. The default alias may be some other key of an older configuration: receive_event
        # refuses it then, nothing else does.
        encryption = config.key_named(tokens.encryption_key) if "encryption_key" in config.section("tokens") \
            else None
        if encryption is not None and resolved[encryption.alias].purpose is not KeyPurpose.ENCRYPTION:
            problems.append(ConfigError(
                f"[tokens] encryption_key {tokens.encryption_key!r} is a {resolved[encryption.alias].purpose} key "
                f"in {where}: the bank's events are decrypted with a key of purpose \"encryption\" only",
                hint=f"set purpose = \"encryption\" in [keys.{encryption.alias}] (a key made with `tpp-agent "
                     "keys generate --purpose encryption`), or name another key"))
    return resolved
