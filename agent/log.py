"""Logging for the whole agent: structlog, configured here and nowhere else.

    from agent import log
    log.configure("json")          # the daemon: one JSON object per line
    log.configure("console")       # the CLI: human-readable lines on stderr
    logger = log.get_logger("transport")
    logger.info("http.request", method="GET", url=url, status=200)

Every event passes the redaction processor: values under keys that can carry
secrets (PIN, Authorization, client assertions, bodies…) never reach a sink.

When stderr is the journal (systemd sets ``JOURNAL_STREAM`` to its device and inode), each line starts with
its syslog priority, ``<3>`` for an error … ``<7>`` for debug (sd-daemon(3)): journald files it under that
priority (``journalctl -p warning``) and strips the prefix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

from agent.clock import utc_iso

REDACTED = "[redacted]"
SECRET_KEYS = frozenset({
    "pin", "user_pin", "so_pin", "password", "passphrase", "secret", "authorization", "proxy-authorization",
    "cookie", "set-cookie", "assertion", "client_assertion", "request", "body", "response_body", "access_token",
    "refresh_token", "id_token", "private_key",
})

_SECRET_NAMES = frozenset(k.replace("_", "-") for k in SECRET_KEYS)  # every log line checks each of its keys

Mode = Literal["json", "console"]
_PLAIN = frozenset({str, int, float, bool, type(None)})  # nothing inside to scrub


@functools.lru_cache(maxsize=1024)  # a few dozen distinct keys, on every line
def _is_secret(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("_", "-") in _SECRET_NAMES


def _scrub(value: object) -> object:
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace the values of secret-bearing keys, also inside nested mappings (headers)."""
    for key, value in event.items():  # values replaced in place: the dict's size never changes
        if _is_secret(key):
            event[key] = REDACTED
        elif type(value) not in _PLAIN:
            event[key] = _scrub(value)
    return event


# One encoder for every line (json.dumps with options builds a new one per call); anything it cannot encode is
# logged as its repr rather than lost.
_JSON = json.JSONEncoder(sort_keys=True, default=repr)


def _json_line(event: Mapping[str, Any], **_: Any) -> str:
    return _JSON.encode(event)


def timestamp(_logger: object, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """``timestamp``: ISO 8601 UTC with microseconds (as structlog's ``TimeStamper(fmt="iso", utc=True)``)."""
    event["timestamp"] = utc_iso("Z")
    return event


# syslog(3) priorities of structlog's level names.
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2,
                   "fatal": 2}


class JournalPriority:
    """Wraps the renderer: its line, prefixed with the event's syslog priority for journald."""

    def __init__(self, renderer: structlog.typing.Processor) -> None:
        self.renderer = renderer

    def __call__(self, logger: object, method: str, event: MutableMapping[str, Any]) -> str:
        priority = SYSLOG_PRIORITY.get(str(event.get("level", method)), 6)
        line = self.renderer(logger, method, event)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"


def processors(mode: Mode, journal: bool = False) -> list[structlog.typing.Processor]:
    chain: list[structlog.typing.Processor] = [structlog.processors.add_log_level, timestamp, redact]
    renderer: structlog.typing.Processor
    if mode == "json":
        chain.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_json_line)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    chain.append(JournalPriority(renderer) if journal else renderer)
    return chain


def is_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal's stream socket that systemd connected (``JOURNAL_STREAM=dev:ino``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


def configure(mode: Mode = "console", level: str = "info", stream: TextIO | None = None,
              final: bool = False) -> None:
    """``final``: no later reconfiguration (the daemon), so loggers may be built once instead of on every call."""
    stream = stream or sys.stderr
    sink = _sink(stream)
    structlog.configure(
        processors=processors(mode, journal=is_journal(stream)),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *_: sink,
        cache_logger_on_first_use=final,
    )


class LineWriter:
    """Each line in one ``write(2)`` on the descriptor: the serving processes share stderr, so a line is never
    split by another process's; and a line skips the text layer's buffer, flush and lock (one per request)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "backslashreplace")
        while data:  # a pipe or socket may take part of a long line
            try:
                data = data[os.write(self._fd, data):]
            except InterruptedError:
                continue
            except OSError:
                return  # stderr is gone (the journal stopped): losing the line must not fail the request
    debug = info = warning = warn = error = critical = exception = fatal = msg


def _sink(stream: TextIO) -> structlog.typing.WrappedLogger:
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests)
        return structlog.WriteLogger(stream)
    stream.flush()  # what the text layer holds goes first
    return LineWriter(fd)


def get_logger(name: str) -> Any:
    """A bound logger tagged with the component's name (structlog's types are loose: Any)."""
    return structlog.get_logger(component=name)
