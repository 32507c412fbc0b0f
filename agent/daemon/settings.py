"""The ``[daemon]`` section: socket, limits, health checks, audit trail."""

from __future__ import annotations

import dataclasses
import grp
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.daemon.limits import Limits
from agent.errors import ConfigError

_KNOWN = {"socket", "socket_group", "socket_mode", "workers", "bank_workers", "max_connections", "max_request_bytes",
          "request_timeout", "idle_timeout", "health_interval", "audit_file", "audit_sync",
          "audit_sync_interval_ms", "log_level", "processes", "busy_poll_us", "request_log",
          "connections_per_uid", "in_flight_per_uid", "cpu_affinity",
          "audit_checkpoint_key", "audit_checkpoint_seconds"}
AUDIT_SYNC_MODES = ("always", "interval")
REQUEST_LOG_MODES = ("all", "failures")
CPU_AFFINITY_MODES = ("auto", "none")


def default_socket() -> Path:
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY")  # systemd's RuntimeDirectory=
    return Path(runtime_dir.split(":")[0]) / "agent.sock" if runtime_dir else Path("/run/tpp-agent/agent.sock")


@dataclasses.dataclass(frozen=True)
class DaemonSettings:
    socket: Path
    socket_gid: int | None
    socket_mode: int
    limits: Limits
    health_interval: float
    audit_file: Path
    audit_sync_interval: float | None  # seconds between background syncs; None: each record synced on its own
    log_level: str
    processes: int = 1
    # The token key that signs the trail's checkpoints (agent/audit.py); required on the token once named here.
    audit_checkpoint_key: str = "audit"
    audit_checkpoint_required: bool = False
    audit_checkpoint_interval: float = 60.0
    # Each serving process on its own share of the CPUs (agent/daemon/processes.py says why); "none": the kernel's.
    cpu_affinity: bool = True

    @classmethod
    def parse(cls, config: Config, socket_override: str | None = None) -> DaemonSettings:
        section = config.section("daemon")
        unknown = sorted(set(section) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [daemon]",
                              hint=f"known settings: {', '.join(sorted(_KNOWN))}")
        base = config.path.parent if config.path else Path.cwd()
        socket = Path(socket_override or _text(section, "socket", str(default_socket())))
        group = section.get("socket_group")
        gid: int | None = None
        if group is not None:
            try:
                gid = group if isinstance(group, int) else grp.getgrnam(str(group)).gr_gid
            except KeyError:
                raise ConfigError(f"[daemon] socket_group: no group {group!r} on this host") from None
        mode_text = _text(section, "socket_mode", "0660")
        try:
            mode = int(mode_text, 8)
        except ValueError:
            raise ConfigError(f"[daemon] socket_mode must be octal like \"0660\", got {mode_text!r}") from None
        if mode & 0o007:
            raise ConfigError("[daemon] socket_mode must give others no access", hint='use "0660" or "0600"')
        processes = _processes(section)
        workers, max_workers = _workers(section, processes, config.pkcs11.max_sessions)
        limits = Limits(
            max_connections=_number(section, "max_connections", 256, int, low=1, high=100_000),
            workers=workers,
            max_workers=max_workers,
            bank_workers=_number(section, "bank_workers", 8, int, low=1, high=256),
            max_request_bytes=_number(section, "max_request_bytes", 1 << 20, int, low=1024, high=1 << 30),
            request_timeout=_number(section, "request_timeout", 10.0, float, low=0.1, high=3600),
            idle_timeout=_number(section, "idle_timeout", 60.0, float, low=0.1, high=86400),
            busy_poll=_number(section, "busy_poll_us", 50, int, low=0, high=1000) / 1e6,
            log_successes=_choice(section, "request_log", REQUEST_LOG_MODES,
                                  '"all": a log line per request; "failures": only for requests answered 4xx/5xx '
                                  "and bank calls that failed or were answered 4xx/5xx (every key use is in the "
                                  "audit trail either way)") == "all",
            connections_per_uid=_number(section, "connections_per_uid", 64, int, low=1, high=100_000),
            in_flight_per_uid=_number(section, "in_flight_per_uid", 0, int, low=0, high=256),
        )
        audit = Path(_text(section, "audit_file", str(config.state_dir / "audit.jsonl"))).expanduser()
        return cls(socket, gid, mode, limits, _number(section, "health_interval", 10.0, float, low=0.1, high=3600),
                   audit if audit.is_absolute() else base / audit, _audit_sync_interval(section),
                   _text(section, "log_level", "info"), processes, _text(section, "audit_checkpoint_key", "audit"),
                   "audit_checkpoint_key" in section,
                   _number(section, "audit_checkpoint_seconds", 60.0, float, low=1, high=86400),
                   _choice(section, "cpu_affinity", CPU_AFFINITY_MODES,
                           '"auto": each serving process runs on its own share of the CPUs (when there are at '
                           'least as many as processes); "none": the kernel places them') == "auto")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))  # the CPUs this process may run on (affinity, cpusets)


def _processes(section: Mapping[str, Any]) -> int:
    value = section.get("processes", "auto")
    if value == "auto":
        return _cpus()
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ConfigError(f"[daemon] processes must be \"auto\" or a whole number from 1 to 64, got {value!r}",
                          hint='"auto" runs one serving process per CPU')
    return value


def _workers(section: Mapping[str, Any], processes: int, sessions: int) -> tuple[int, int | None]:
    """``workers`` and ``max_workers`` of :class:`Limits`. By default ("auto") the CPUs, shared among the
    serving processes, while requests compute (a local token's work is CPU work), and up to the token's sessions
    while they block (a network HSM's round trips, audit syncs): see :mod:`agent.daemon.sizing`. The ceiling
    is the sessions plus the CPUs' share: a worker holds a session only inside its token call, so with as many
    workers as sessions a session idles while its worker parses, audits and answers; ``base`` more keep every
    session busy meanwhile (the others wait for one). A number: that many workers, always."""
    base = max(1, _cpus() // processes)
    value = section.get("workers", "auto")
    if value == "auto":
        return base, sessions + base
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ConfigError(f"[daemon] workers must be \"auto\" or a whole number from 1 to 256, got {value!r}",
                          hint='"auto" (the default): the CPUs while requests compute, up to [pkcs11] '
                               "max_sessions while they wait on the token")
    return value, None


def _audit_sync_interval(section: Mapping[str, Any]) -> float | None:
    mode = _choice(section, "audit_sync", AUDIT_SYNC_MODES,
                   '"always": each record is on disk before the answer; "interval": synced every '
                   "audit_sync_interval_ms (a power cut may lose the last interval's records)")
    interval_ms: float = _number(section, "audit_sync_interval_ms", 20.0, float, low=1, high=1000)
    if mode == "always":
        if "audit_sync_interval_ms" in section:
            raise ConfigError('[daemon] audit_sync_interval_ms applies only with audit_sync = "interval"',
                              hint='set audit_sync = "interval" too, or remove audit_sync_interval_ms')
        return None
    return interval_ms / 1000


def _choice(section: Mapping[str, Any], name: str, modes: tuple[str, ...], hint: str) -> str:
    """One of ``modes`` (the first by default), else a ConfigError naming them."""
    mode = _text(section, name, modes[0])
    if mode not in modes:
        raise ConfigError(f"[daemon] {name} must be one of {', '.join(map(repr, modes))}, got {mode!r}", hint=hint)
    return mode


def _text(section: Mapping[str, Any], name: str, default: str) -> str:
    value = section.get(name, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"[daemon] {name} must be a non-empty string")
    return value


def _number(section: Mapping[str, Any], name: str, default: Any, kind: type, *, low: float, high: float) -> Any:
    value = section.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"[daemon] {name} must be a {'whole ' if kind is int else ''}number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"[daemon] {name} must be from {low:g} to {high:g}, got {value}")
    return kind(value)
