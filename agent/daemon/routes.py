"""The socket's API: each route is a method and a path mapped to one operation (agent/operations/registry.py).

``{alias}`` in a path names the operation's key, ``{bank}`` its bank. The router (agent/daemon/routing.py) serves
these; the CLI finds here how to ask a running agent for an operation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from agent.daemon.http import Response
from agent.metrics import CONTENT_TYPE
from agent.operations.registry import BY_NAME
from agent.operations.spec import Access, Spec

_CACHE_SIZE = 1024  # distinct (method, path) pairs: every key and bank alias, with room for junk


def _json(result: Any) -> Response:
    return Response.json(200, result)


def _pem_or_json(result: dict[str, Any]) -> Response:
    if set(result) == {"pem"}:
        return Response(200, result["pem"].encode("ascii"), content_type="application/x-pem-file")
    return Response.json(200, result)


def _metrics_text(result: str) -> Response:
    return Response(200, result.encode("utf-8"), content_type=CONTENT_TYPE)


@dataclasses.dataclass(frozen=True)
class Route:
    """``METHOD /path/{param}`` → an operation; ``{alias}`` names its key, ``{bank}`` its bank."""

    method: str
    pattern: str
    spec: Spec[Any]
    from_query: bool = False  # the input is the query string (GET), not a JSON body
    render: Callable[[Any], Response] = _json
    media_types: tuple[str, ...] = ("application/json",)  # what render answers with (docs/openapi.json)

    @property
    def prefix(self) -> str:
        return self.pattern.split("{", 1)[0]

    def target(self, key: str | None, bank: str | None) -> str:
        """The path for a key or bank."""
        return self.pattern.replace("{alias}", quote(key or "", safe="")).replace("{bank}", quote(bank or "", safe=""))

    def compiled(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.pattern) + "$")


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/health", BY_NAME["health"]),
    Route("GET", "/v1/ready", BY_NAME["ready"]),
    Route("GET", "/v1/keys", BY_NAME["keys"]),
    Route("GET", "/v1/keys/{alias}/public", BY_NAME["public"], from_query=True, render=_pem_or_json,
          media_types=("application/json", "application/x-pem-file")),
    Route("GET", "/v1/jwks", BY_NAME["jwks"]),
    Route("POST", "/v1/keys/{alias}/jws", BY_NAME["jws"]),
    Route("POST", "/v1/keys/{alias}/sign", BY_NAME["sign"]),
    Route("POST", "/v1/keys/{alias}/csr", BY_NAME["csr"]),
    Route("GET", "/v1/banks/{bank}/discovery", BY_NAME["discovery"], from_query=True),
    Route("POST", "/v1/banks/{bank}/registration", BY_NAME["register"]),
    Route("POST", "/v1/banks/{bank}/client-assertion", BY_NAME["client_assertion"]),
    Route("POST", "/v1/banks/{bank}/token", BY_NAME["token"]),
    Route("POST", "/v1/banks/{bank}/par", BY_NAME["par"]),
    Route("POST", "/v1/banks/{bank}/forward", BY_NAME["forward"]),
    Route("POST", "/v1/banks/{bank}/consent/callback", BY_NAME["consent_callback"]),
    Route("POST", "/v1/banks/{bank}/consent/refresh", BY_NAME["consent_refresh"]),
    Route("POST", "/v1/banks/{bank}/verify", BY_NAME["verify"]),
    Route("POST", "/v1/banks/{bank}/signed-body", BY_NAME["signed_body"]),
    Route("POST", "/v1/banks/{bank}/personal-data", BY_NAME["encrypt_personal_data"]),
    Route("POST", "/v1/banks/{bank}/events", BY_NAME["receive_event"]),
    Route("GET", "/v1/metrics", BY_NAME["metrics"], render=_metrics_text, media_types=(CONTENT_TYPE,)),
    Route("GET", "/v1/rotation", BY_NAME["rotate_status"]),
    Route("POST", "/v1/keys/{alias}/rotation", BY_NAME["rotate_start"]),
    Route("POST", "/v1/keys/{alias}/rotation/certificate", BY_NAME["rotate_import"]),
    Route("POST", "/v1/keys/{alias}/rotation/request", BY_NAME["rotate_request"]),
    Route("POST", "/v1/keys/{alias}/rotation/switch-signing", BY_NAME["rotate_switch_signing"]),
    Route("POST", "/v1/keys/{alias}/rotation/switch-transport", BY_NAME["rotate_switch_transport"]),
    Route("POST", "/v1/keys/{alias}/rotation/retire", BY_NAME["rotate_retire"]),
    Route("POST", "/v1/keys/{alias}/rotation/remove-retired", BY_NAME["rotate_remove_retired"]),
    Route("POST", "/v1/registrations", BY_NAME["register_all"]),
    Route("GET", "/v1/directory/certificates", BY_NAME["directory_certificates"]),
    Route("POST", "/v1/directory/certificates", BY_NAME["directory_create"]),
    Route("POST", "/v1/directory/certificates/import", BY_NAME["directory_import"]),
    Route("POST", "/v1/directory/certificates/revoke", BY_NAME["directory_revoke"]),
)

BY_OPERATION: dict[str, Route] = {route.spec.name: route for route in ROUTES}


@dataclasses.dataclass(frozen=True)
class Match:
    """What a (method, path) resolves to: a route, or the methods the path accepts (405), or nothing (404)."""

    route: Route | None
    params: Mapping[str, str]
    allowed: tuple[str, ...] = ()

    @property
    def remote(self) -> bool:
        """The operation may call a bank, so the request goes to the bank workers."""
        return self.route is not None and self.route.spec.calls_bank

    @property
    def routine(self) -> bool:
        """Not an administrator's operation (which may generate a key on the token): quick enough for the server's
        I/O thread to answer itself. Unknown paths are answered at once."""
        return self.route is None or self.route.spec.access is not Access.ADMIN


class RouteTable:
    """Which route a (method, path) is: asked by the server (which workers?) and the router (which operation?)."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._compiled = [(route.prefix, route, route.compiled()) for route in routes]
        # Resolved once per (method, path), as clients repeat the same few; bounded, as paths are the caller's.
        self._matches: dict[tuple[str, str], Match] = {}

    def match(self, method: str, path: str) -> Match:
        key = (method, path)
        found = self._matches.get(key)
        if found is None:
            found = self._resolve(method, path)
            if len(self._matches) >= _CACHE_SIZE:
                self._matches.clear()
            self._matches[key] = found
        return found

    def _resolve(self, method: str, path: str) -> Match:
        allowed: list[str] = []
        for prefix, route, pattern in self._compiled:
            if not path.startswith(prefix):
                continue
            found = pattern.match(path)
            if found is None:
                continue
            if route.method == method:
                return Match(route, found.groupdict())
            allowed.append(route.method)
        return Match(None, {}, tuple(allowed))
