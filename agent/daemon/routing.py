"""Routes and error mapping: each endpoint checks the policy, does one thing, answers JSON.

Errors carry a stable ``code`` (clients branch on it), a ``message``, a ``hint``
and the ``interaction_id`` that the request log line also carries.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from agent.audit import AuditError
from agent.daemon.app import Agent
from agent.daemon.http import HttpError, Request, Response
from agent.daemon.policy import PolicyDenied
from agent.errors import AgentError, ConfigError, InputError
from agent.jose import AlgorithmNotAllowedError, ClaimsError, JoseError
from agent.openfinance.banks import UnknownBankError
from agent.openfinance.discovery import DiscoveryError
from agent.openfinance.registration import RegistrationError, RegistrationOutcomeUnknownError
from agent.openfinance.tokens import TokenError
from agent.transport.errors import BankBusyError, BankTimeoutError, ResponseTooLargeError, TransportError
from pkcs11_backends.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    MechanismError,
    PinError,
    Pkcs11Error,
    TokenUnavailableError,
)

Route = Callable[[Agent, Request, dict[str, str]], Response]
# (literal prefix, method, pattern, endpoint, remote): the prefix spares most of the regular expressions.
_ROUTES: list[tuple[str, str, re.Pattern[str], Route, bool]] = []
_CACHE_SIZE = 1024  # distinct (method, path) pairs: every key and bank alias, with room for junk


@dataclasses.dataclass(frozen=True)
class Match:
    """What a (method, path) resolves to: an endpoint, or the methods the path accepts (405), or nothing (404)."""

    endpoint: Route | None
    params: dict[str, str]
    remote: bool  # the endpoint calls a bank, so the request goes to the bank workers
    allowed: tuple[str, ...] = ()


def route(method: str, pattern: str, *, remote: bool = False) -> Callable[[Route], Route]:
    """``remote``: the endpoint calls a bank, so its requests go to the bank workers."""
    compiled = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")
    prefix = pattern.split("{", 1)[0]

    def register(func: Route) -> Route:
        _ROUTES.append((prefix, method, compiled, func, remote))
        _matches.clear()
        return func

    return register


# Both the server (which workers?) and the handler (which endpoint?) ask, for every request: resolved once per
# (method, path), as clients repeat the same few.
_matches: dict[tuple[str, str], Match] = {}


def match(method: str, path: str) -> Match:
    key = (method, path)
    found = _matches.get(key)
    if found is None:
        found = _resolve(method, path)
        if len(_matches) >= _CACHE_SIZE:
            _matches.clear()
        _matches[key] = found
    return found


def _resolve(method: str, path: str) -> Match:
    allowed: list[str] = []
    for prefix, wanted, pattern, endpoint, remote in _ROUTES:
        if not path.startswith(prefix):
            continue
        found = pattern.match(path)
        if found is None:
            continue
        if wanted == method:
            return Match(endpoint, found.groupdict(), remote)
        allowed.append(wanted)
    return Match(None, {}, False, tuple(allowed))


def remote(request: Request) -> bool:
    """Whether the request calls a bank (the server's ``remote``)."""
    return match(request.method, request.path).remote


def handler(agent: Agent) -> Callable[[Request], Response]:
    def handle(request: Request) -> Response:
        found = match(request.method, request.path)
        if found.endpoint is None:
            if found.allowed:
                raise HttpError(405, "method_not_allowed", f"{request.path} accepts {', '.join(found.allowed)}",
                                headers=(("Allow", ", ".join(found.allowed)),))
            raise HttpError(404, "not_found", f"no endpoint {request.path}", "see GET /v1/health, /v1/keys")
        try:
            return found.endpoint(agent, request, dict(found.params))  # a copy: the match is shared
        except HttpError:
            raise
        except PolicyDenied as exc:
            raise HttpError(403, "forbidden", str(exc), exc.hint) from None
        except (Pkcs11Error, AgentError) as exc:
            raise http_error(exc) from None

    return handle


def http_error(exc: Pkcs11Error | AgentError) -> HttpError:
    hint = exc.hint or ""
    if isinstance(exc, KeyNotFoundError | AmbiguousKeyError):
        return HttpError(404 if isinstance(exc, KeyNotFoundError) else 409, "key_not_found", str(exc), hint)
    if isinstance(exc, MechanismError):
        return HttpError(400, "unsupported_algorithm", str(exc), hint)
    if isinstance(exc, PinError):
        return HttpError(503, "token_login_refused", str(exc), hint)
    if isinstance(exc, TokenUnavailableError):
        return HttpError(503, "token_unavailable", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, AuditError):
        return HttpError(500, "audit_unavailable", str(exc), hint)
    if isinstance(exc, UnknownBankError):
        return HttpError(404, "unknown_bank", str(exc), hint)
    if isinstance(exc, ConfigError):
        return HttpError(500, "config_error", str(exc), hint)
    if isinstance(exc, BankBusyError):
        return HttpError(503, "bank_busy", str(exc), hint, (("Retry-After", "1"),))
    if isinstance(exc, BankTimeoutError):
        return HttpError(504, "bank_timeout", str(exc), hint)
    if isinstance(exc, ResponseTooLargeError):
        return HttpError(502, "bank_answer_too_large", str(exc), hint)
    if isinstance(exc, TransportError):
        return HttpError(502, "bank_unreachable", str(exc), hint)
    if isinstance(exc, DiscoveryError):
        return HttpError(502, "discovery_failed", str(exc), hint)
    if isinstance(exc, RegistrationOutcomeUnknownError):
        return HttpError(409, "registration_outcome_unknown", str(exc), hint)
    if isinstance(exc, RegistrationError):
        return HttpError(502, "registration_failed", str(exc), hint)
    if isinstance(exc, TokenError):
        return HttpError(502, "bank_refused", str(exc), hint)
    if isinstance(exc, AlgorithmNotAllowedError):
        return HttpError(403, "algorithm_not_allowed", str(exc), hint)
    if isinstance(exc, ClaimsError):
        return HttpError(400, "claims_refused", str(exc), hint)
    if isinstance(exc, JoseError):
        return HttpError(400, "jose_refused", str(exc), hint)
    if isinstance(exc, InputError):
        return HttpError(400, "bad_input", str(exc), hint)
    return HttpError(500, "internal_error", str(exc), hint)
