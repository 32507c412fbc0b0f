"""Configuration: one TOML file, typed sections, defaults that fit the bundled SoftHSM2 set-up.

The file is named by ``--config``, else ``$TPP_AGENT_CONFIG``, else
``/etc/tpp-agent/config.toml`` if it exists; with none, the defaults point at the
token that ``softhsm/make-token`` creates under the state directory.
"""

from __future__ import annotations

import dataclasses
import enum
import getpass
import glob
import hashlib
import json
import math
import os
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, PinSourceError

SYSTEM_CONFIG = Path("/etc/tpp-agent/config.toml")
DEFAULT_TOKEN_LABEL = "tpp-agent"
DEFAULT_PIN_CREDENTIAL = "tpp-agent-pin"
_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)


def default_state_dir() -> Path:
    explicit = os.environ.get("TPP_AGENT_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("STATE_DIRECTORY") or os.environ.get("XDG_STATE_HOME")
    return Path(base) / "tpp-agent" if base else Path.home() / ".local" / "state" / "tpp-agent"


def default_module() -> str:
    return next((p for p in _MODULE_CANDIDATES if os.path.exists(p)), _MODULE_CANDIDATES[0])


@dataclasses.dataclass(frozen=True)
class Pkcs11Config:
    module: str
    token: str
    pin_file: Path | None
    default_pin_file: Path
    pin_credential: str
    max_sessions: int
    call_timeout: float | None
    openssl_backend: str
    environment: Mapping[str, str]
    init_args: str | None = None  # the module's C_Initialize string (pReserved), for modules that need one


class KeyPurpose(enum.StrEnum):
    """What a configured key is for; each key is used for its purpose only (see agent/operations/)."""

    TLS = "tls"  # TLS client authentication by the transport stack; never a signature for a caller
    JWS = "jws"  # JWS, client assertions, request objects; raw signatures only with raw_sign = true
    ENCRYPTION = "encryption"  # JWE decryption; never a signature
    AUDIT = "audit"  # the audit trail's checkpoints; never usable by a caller


@dataclasses.dataclass(frozen=True)
class KeyConfig:
    alias: str
    uri: str
    algorithms: tuple[str, ...]
    kid: str | None
    # None until agent.sections resolves the default: tls for a bank's client_key, else jws.
    purpose: KeyPurpose | None = None
    raw_sign: bool = False  # may make raw signatures (POST /v1/keys/ALIAS/sign) of caller-chosen bytes


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path | None
    state_dir: Path
    pkcs11: Pkcs11Config
    keys: Mapping[str, KeyConfig]
    raw: Mapping[str, Any]

    @property
    def aliases(self) -> dict[str, str]:
        return {alias: key.uri for alias, key in self.keys.items()}

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "the built-in defaults"

    def section(self, name: str) -> Mapping[str, Any]:
        """A top-level table, for the one parser that agent.sections registers for it."""
        value = self.raw.get(name, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"[{name}] must be a table in {self.where}")
        return value

    @property
    def digest(self) -> str:
        """SHA-256 of the settings as read (included banks files merged): equal in two processes that run one
        configuration, whatever file names they were given; the CLI compares its own with a running agent's."""
        text = json.dumps(self.raw, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def key_named(self, name: str) -> KeyConfig | None:
        """The ``[keys.ALIAS]`` entry for an alias, or for a URI written exactly as a configured one."""
        found = self.keys.get(name)
        return found or next((k for k in self.keys.values() if k.uri == name), None)


def locate(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("TPP_AGENT_CONFIG")
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.exists() else None


def load(explicit: str | None = None) -> Config:
    """The token and key sections only; agent.sections.load reads the whole file (what serve and the CLI use)."""
    path = locate(explicit)
    return parse(read(path), path)


def read(path: Path | None) -> dict[str, Any]:
    """The file's TOML tables (none: no file, the built-in defaults)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}",
                              hint="pass --config PATH or set TPP_AGENT_CONFIG") from None
        except PermissionError:
            raise ConfigError(f"config file not readable: {path}", hint="check its owner and mode") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory", hint="pass --config FILE") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        raw = _with_included_banks(raw, path)
        _reject_non_finite(raw, "", str(path))
    return raw


def _reject_non_finite(table: Mapping[str, Any], prefix: str, where: str) -> None:
    """TOML has nan and inf literals; no setting of the agent means them (a timeout of nan never ends)."""
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} = {value} in {where} is not a finite number", hint="give a finite number")
        if isinstance(value, Mapping):
            _reject_non_finite(value, f"{name}.", where)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    _reject_non_finite(item, f"{name}.", where)
                elif isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{name} in {where} holds {item}, not a finite number")


def _with_included_banks(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``include = ["banks.d/*.toml", …]``: banks files (``tpp-agent banks sync --write``) merged into [banks].

    A path without a wildcard must exist; a pattern may match nothing. An included file holds [banks.NAME]
    tables only, and a bank is defined in one place: the same name twice is an error, not an override.
    """
    include = raw.get("include")
    if include is None:
        return raw
    if not isinstance(include, list) or not all(isinstance(item, str) and item for item in include):
        raise ConfigError(f"include must be a list of banks file paths in {path}")
    banks = dict(raw.get("banks", {})) if isinstance(raw.get("banks", {}), Mapping) else {}
    origin = dict.fromkeys(banks, str(path))
    for item in include:
        pattern = path.parent / Path(item).expanduser()
        files = sorted(pattern.parent.glob(pattern.name)) if glob.has_magic(item) else [pattern]
        for file in files:
            try:
                with file.open("rb") as handle:
                    included = tomllib.load(handle)
            except FileNotFoundError:
                raise ConfigError(f"banks file {file} (include of {path}) not found",
                                  hint="write it with `tpp-agent banks sync --participants … --write FILE`, "
                                       "or drop it from include") from None
            except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"banks file {file} (include of {path}) cannot be read: {exc}") from None
            others = sorted(set(included) - {"banks"})
            if others or not isinstance(included.get("banks", {}), Mapping):
                raise ConfigError(f"banks file {file} (include of {path}) may hold only [banks.NAME] tables, "
                                  f"found {', '.join(others) or 'banks that is not a table'}")
            for name, table in included.get("banks", {}).items():
                if name in banks:
                    raise ConfigError(f"[banks.{name}] is defined twice: in {origin[name]} and in {file}",
                                      hint="keep one; a bank configured by hand belongs in one file only")
                banks[name], origin[name] = table, str(file)
    return {**raw, "banks": banks}


def parse(raw: Mapping[str, Any], path: Path | None = None) -> Config:
    where = str(path) if path else "the built-in defaults"
    base = path.parent if path else Path.cwd()
    state = raw.get("state", {})
    _expect_table(state, "state", where)
    _reject_unknown(state, {"dir", "database"}, "state", where)  # database: agent.state reads it
    state_dir = _path(state.get("dir"), base, "state.dir", where) or default_state_dir()

    p11 = raw.get("pkcs11", {})
    _expect_table(p11, "pkcs11", where)
    _reject_unknown(p11, {"module", "token", "pin_file", "pin_credential", "max_sessions", "call_timeout",
                          "openssl_backend", "environment", "init_args"}, "pkcs11", where)
    environment = p11.get("environment", {})
    _expect_table(environment, "pkcs11.environment", where)
    if not all(isinstance(v, str) for v in environment.values()):
        raise ConfigError(f"[pkcs11.environment] values must be strings in {where}")
    if any(("PIN" in k.upper()) for k in environment):
        raise ConfigError(f"[pkcs11.environment] must not carry a PIN ({where})", hint="use pin_file")
    max_sessions = p11.get("max_sessions", 8)
    if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or not 1 <= max_sessions <= 256:
        raise ConfigError(f"[pkcs11] max_sessions must be an integer from 1 to 256 in {where}")
    call_timeout = p11.get("call_timeout", 10.0)
    if isinstance(call_timeout, bool) or not isinstance(call_timeout, int | float) or not 0 <= call_timeout <= 3600:
        raise ConfigError(f"[pkcs11] call_timeout must be seconds from 0 (no limit) to 3600 in {where}")
    backend = p11.get("openssl_backend", "auto")
    if backend not in ("auto", "engine", "provider"):
        raise ConfigError(f"[pkcs11] openssl_backend must be auto, engine or provider in {where}")
    if "environment" not in p11 and "module" not in p11:
        environment = {"SOFTHSM2_CONF": str(state_dir / "softhsm" / "softhsm2.conf")}
    pkcs11 = Pkcs11Config(
        module=_string(p11.get("module", default_module()), "pkcs11.module", where),
        token=_string(p11.get("token", DEFAULT_TOKEN_LABEL), "pkcs11.token", where),
        pin_file=_path(p11.get("pin_file"), base, "pkcs11.pin_file", where),
        default_pin_file=state_dir / "softhsm" / "user.pin",
        pin_credential=_string(p11.get("pin_credential", DEFAULT_PIN_CREDENTIAL), "pkcs11.pin_credential", where),
        max_sessions=max_sessions,
        call_timeout=float(call_timeout) or None,
        openssl_backend=backend,
        environment=dict(environment),
        init_args=_init_args(p11.get("init_args"), where),
    )

    keys_raw = raw.get("keys", {})
    _expect_table(keys_raw, "keys", where)
    keys: dict[str, KeyConfig] = {}
    for alias, entry in keys_raw.items():
        _expect_table(entry, f"keys.{alias}", where)
        _reject_unknown(entry, {"uri", "algorithms", "kid", "purpose", "raw_sign"}, f"keys.{alias}", where)
        uri = _string(entry.get("uri"), f"keys.{alias}.uri", where)
        if not uri.startswith("pkcs11:"):
            raise ConfigError(f"[keys.{alias}] uri must be a pkcs11: URI in {where}")
        algorithms = entry.get("algorithms", [])
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise ConfigError(f"[keys.{alias}] algorithms must be a list of strings in {where}")
        kid = entry.get("kid")
        kid_text = _string(kid, f"keys.{alias}.kid", where) if kid is not None else None
        purpose = entry.get("purpose")
        if purpose is not None and purpose not in tuple(KeyPurpose):
            raise ConfigError(f"[keys.{alias}] purpose must be one of {', '.join(p.value for p in KeyPurpose)} "
                              f"in {where}, got {purpose!r}",
                              hint="tls: a bank's client_key; jws: signs JWS and JWTs; encryption; audit")
        raw_sign = entry.get("raw_sign", False)
        if not isinstance(raw_sign, bool):
            raise ConfigError(f"[keys.{alias}] raw_sign must be true or false in {where}")
        keys[alias] = KeyConfig(alias, uri, tuple(algorithms), kid_text,
                                KeyPurpose(purpose) if purpose is not None else None, raw_sign)
    return Config(path, state_dir, pkcs11, keys, raw)


def _init_args(value: object, where: str) -> str | None:
    if value is None:
        return None
    text = _string(value, "pkcs11.init_args", where)
    if "\0" in text or len(text.encode("utf-8")) > 4096:
        raise ConfigError(f"[pkcs11] init_args must be text of at most 4096 bytes without NUL in {where}")
    return text


def _expect_table(value: object, name: str, where: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table in {where}")


def _reject_unknown(table: Mapping[str, Any], known: set[str], name: str, where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [{name}] of {where}",
                          hint=f"known settings: {', '.join(sorted(known))}")


def _string(value: object, name: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string in {where}")
    return value


def _path(value: object, base: Path, name: str, where: str) -> Path | None:
    if value is None:
        return None
    text = _string(value, name, where)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~user" for a user this host does not have
        raise ConfigError(f"{name} = {text!r} in {where}: no such user's home directory",
                          hint="write the path out in full") from None
    return path if path.is_absolute() else base / path


# -- PIN sources ---------------------------------------------------------------

def pin_reader(config: Pkcs11Config, interactive: bool = False) -> Callable[[], bytes]:
    """A callable that reads the user PIN when the token needs it, never earlier.

    Order: ``pin_file``; else the systemd credential ``$CREDENTIALS_DIRECTORY/<pin_credential>``;
    else the bundled set-up's PIN file, if it exists; else, for an operator at a
    terminal, a prompt. Never argv, never the environment.
    """
    if config.pin_file is not None:
        pin_file = config.pin_file
        return lambda: read_pin_file(pin_file)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        credential = Path(creds) / config.pin_credential
        return lambda: read_pin_file(credential, check_mode=False)
    if config.default_pin_file.exists():
        default = config.default_pin_file
        return lambda: read_pin_file(default)
    if interactive and sys.stdin.isatty():
        return lambda: getpass.getpass("User PIN: ").encode("utf-8")

    def missing() -> bytes:
        raise PinSourceError("no PIN source: no pin_file configured, no systemd credential, no terminal")

    return missing


def read_pin_file(path: Path, check_mode: bool = True) -> bytes:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise PinSourceError(f"PIN file not found: {path}") from None
    except PermissionError:
        raise PinSourceError(f"PIN file not readable: {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise PinSourceError(f"PIN file is not a regular file: {path}")
    if check_mode and info.st_mode & 0o077:
        raise PinSourceError(f"PIN file {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o})",
                             hint=f"chmod 600 {path}")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise PinSourceError(f"PIN file not readable: {path}") from None
    pin = data.rstrip(b"\r\n")
    if not pin or b"\n" in pin:
        raise PinSourceError(f"PIN file {path} must hold exactly one non-empty line")
    return pin
