"""A bank's OpenID discovery document: fetched over the bank's mTLS transport, its issuer
checked, kept in ``STATE_DIR/discovery/NAME.json`` with its fetch time, fetched again
when older than the bank's ``discovery_ttl``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent import files, log
from agent.errors import AgentError
from agent.openfinance.banks import BankConfig
from agent.openfinance.client import BankHttp, BankResponse
from agent.transport.errors import (
    BankTimeoutError,
    ConnectFailedError,
    ConnectionLostError,
    RequestDeadlineError,
    answer_summary,
    refusal_hint,
)

ENDPOINTS = ("registration_endpoint", "token_endpoint", "pushed_authorization_request_endpoint")
# Only the issuer: each endpoint is looked for when used (MissingEndpointError). An authorization server
# without registration_endpoint (RECOMMENDED only, OIDC Discovery §3; static clients) is a bank all the same.
_REQUIRED = ("issuer",)
# A GET of the document is safe to repeat: after a network failure or a 5xx/429, try again after
# these pauses (then give up with the last error). TLS failures are not retried: they do not pass;
# nor is a bank that did not finish its answer within request_timeout: it would hold a bank worker
# three times as long.
RETRY_DELAYS = (0.25, 1.0)
_RETRIED_ERRORS = (ConnectFailedError, BankTimeoutError, ConnectionLostError)
_NOT_RETRIED_ERRORS = (RequestDeadlineError,)

_logger = log.get_logger("openfinance.discovery")


class DiscoveryError(AgentError):
    hint = "check discovery_url in [banks.NAME] and that the bank serves its OpenID discovery document"


class IssuerMismatchError(DiscoveryError):
    hint = ("the document does not belong to the bank configured: compare issuer in [banks.NAME] with the "
            "directory's entry for this bank; a wrong URL or an impostor gives this")


class MissingEndpointError(DiscoveryError):
    pass


@dataclasses.dataclass(frozen=True)
class DiscoveryDocument:
    bank: str
    url: str
    fetched_at: datetime.datetime
    document: Mapping[str, Any]

    @property
    def issuer(self) -> str:
        return str(self.document["issuer"])

    def age(self, now: datetime.datetime | None = None) -> datetime.timedelta:
        return (now or _now()) - self.fetched_at

    def endpoint(self, name: str, use_mtls_aliases: bool) -> str:
        """An endpoint's URL; its ``mtls_endpoint_aliases`` entry when asked for and present (RFC 8705 §5)."""
        aliases = self.document.get("mtls_endpoint_aliases")
        if use_mtls_aliases and isinstance(aliases, Mapping) and isinstance(aliases.get(name), str):
            return str(aliases[name])
        value = self.document.get(name)
        if not isinstance(value, str) or not value:
            raise MissingEndpointError(f"bank {self.bank!r}: the discovery document has no {name}",
                                       hint=f"ask the bank; the document was fetched from {self.url}")
        return value

    def as_dict(self) -> dict[str, Any]:
        return {"bank": self.bank, "url": self.url, "fetched_at": self.fetched_at.isoformat(),
                "document": dict(self.document)}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Discovery:
    def __init__(self, bank: BankConfig, state_dir: Path, http: BankHttp) -> None:
        self.bank = bank
        self.http = http
        self.cache_file = state_dir / "discovery" / f"{bank.name}.json"
        # The file as last read, by identity (another process may replace it): every forwarded call asks.
        self._read: tuple[tuple[int, int, int], DiscoveryDocument] | None = None

    def get(self, refresh: bool = False) -> DiscoveryDocument:
        """The cached document if fresh and from the configured URL, else a newly fetched one."""
        cached = None if refresh else self.cached()
        if cached is not None and cached.url == self.bank.discovery_url and cached.issuer == self.bank.issuer \
                and cached.age().total_seconds() < self.bank.discovery_ttl:
            return cached
        return self.fetch()

    def cached(self) -> DiscoveryDocument | None:
        try:
            stat = os.stat(self.cache_file)
            identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if self._read is not None and self._read[0] == identity:
                return self._read[1]
            raw = json.loads(self.cache_file.read_text(encoding="utf-8"))
            document = DiscoveryDocument(raw["bank"], raw["url"], datetime.datetime.fromisoformat(raw["fetched_at"]),
                                         raw["document"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: fetching again is always safe
        self._read = (identity, document)
        return document

    def fetch(self) -> DiscoveryDocument:
        bank = self.bank
        response = self._get()
        where = f"bank {bank.name!r}: {bank.discovery_url} (x-fapi-interaction-id {response.interaction_id})"
        if response.status != 200:
            said = answer_summary(response.body)
            raise DiscoveryError(f"{where} answered HTTP {response.status}{': ' + said if said else ''}, not the "
                                 "discovery document", hint=refusal_hint(response.status, response.body))
        try:
            document = json.loads(response.body)
        except ValueError:
            raise DiscoveryError(f"{where} did not return JSON") from None
        if not isinstance(document, dict):
            raise DiscoveryError(f"{where} returned JSON that is not an object")
        for field in _REQUIRED:
            if not isinstance(document.get(field), str) or not document[field]:
                raise DiscoveryError(f"{where} returned a document without {field}")
        if document["issuer"] != bank.issuer:
            raise IssuerMismatchError(
                f"{where}: issuer is {document['issuer']!r}, expected {bank.issuer!r}")
        result = DiscoveryDocument(bank.name, bank.discovery_url, _now(), document)
        self._store(result)
        return result

    def _get(self) -> BankResponse:
        for pause in (*RETRY_DELAYS, None):
            try:
                response = self.http.request("GET", self.bank.discovery_url, headers={"Accept": "application/json"},
                                             limit="max_discovery_bytes")
            except _RETRIED_ERRORS as exc:
                if pause is None or isinstance(exc, _NOT_RETRIED_ERRORS):
                    raise
                failure = f"{type(exc).__name__}: {exc.detail}"
                interaction_id = exc.interaction_id
            else:
                if pause is None or (response.status < 500 and response.status != 429):
                    return response
                failure, interaction_id = f"HTTP {response.status}", response.interaction_id
            _logger.warning("discovery.retry", bank=self.bank.name, failure=failure, interaction_id=interaction_id,
                            pause_s=pause)
            time.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _store(self, doc: DiscoveryDocument) -> None:
        # Write-then-rename: a reader sees the old document or the new one, never half.
        os.close(files.open_dir(self.cache_file.parent))  # 0700 whatever the umask, not a link
        fd, tmp = tempfile.mkstemp(dir=self.cache_file.parent, prefix=f".{self.bank.name}.", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc.as_dict(), handle, indent=2, sort_keys=True)
        os.replace(tmp, self.cache_file)
