"""Where a CLI command's key and bank operations run: in this process on the token, or in the running agent.

Both return the same plain data (what the daemon answers as JSON), so each command has one formatter and
prints the same thing either way. :meth:`CliContext.backend` picks one (see agent/cli/context.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from asn1crypto import pem

from agent import jose
from agent.audit import AuditedBankCalls, AuditedKeyStore
from agent.client import AgentClient
from agent.openfinance.service import OpenFinance
from agent.runtime import Runtime


class Backend(Protocol):
    @property
    def via(self) -> str: ...  # "token" or "agent at SOCKET"

    def list_keys(self) -> list[dict[str, Any]]: ...

    def public_pem(self, key: str) -> str: ...

    def jwks(self, keys: Sequence[str]) -> dict[str, Any]: ...

    def sign_jws(self, key: str, payload: bytes, alg: str | None, header: Mapping[str, Any] | None) -> str: ...

    def discover(self, bank: str, refresh: bool) -> dict[str, Any]: ...

    def register(self, bank: str, force: bool) -> dict[str, Any]: ...

    def client_assertion(self, bank: str) -> dict[str, Any]: ...

    def token(self, bank: str, scope: str, refresh: bool) -> dict[str, Any]: ...

    def par(self, bank: str, scope: str, redirect_uri: str, *, authorization_details: list[dict[str, Any]] | None,
            state: str | None, nonce: str | None) -> dict[str, Any]: ...

    def close(self) -> None: ...


class Direct:
    """On the token, in this process (needs the PIN and the token to itself).

    Signatures and bank requests go through ``signer`` (called on first use: reading keys needs no audit
    trail), which records each one in the audit trail.
    """

    via = "token"

    def __init__(self, runtime: Runtime, signer: Callable[[], AuditedKeyStore]) -> None:
        self.runtime = runtime
        self._signer = signer

    @functools.cached_property
    def signer(self) -> AuditedKeyStore:
        return self._signer()

    @functools.cached_property
    def banks(self) -> OpenFinance:
        return OpenFinance(self.runtime, keys=self.signer, observer=AuditedBankCalls(self.signer.audit))

    def list_keys(self) -> list[dict[str, Any]]:
        return [key.as_dict() for key in self.runtime.keys.list()]

    def public_pem(self, key: str) -> str:
        armored: bytes = pem.armor("PUBLIC KEY", self.runtime.keys.public_key_info(key).dump())
        return armored.decode("ascii")

    def jwks(self, keys: Sequence[str]) -> dict[str, Any]:
        return jose.jwks(self.runtime.keys, self.runtime.config, keys)

    def sign_jws(self, key: str, payload: bytes, alg: str | None, header: Mapping[str, Any] | None) -> str:
        return jose.sign_jws(self.signer, self.runtime.config, key, payload, alg=alg, header=header)

    def discover(self, bank: str, refresh: bool) -> dict[str, Any]:
        discovery = self.banks.discovery(bank)
        before = discovery.cached()
        doc = discovery.get(refresh=refresh)
        return {**doc.as_dict(), "fetched_now": before is None or doc.fetched_at != before.fetched_at,
                "cache_file": str(discovery.cache_file), "use_mtls_aliases": discovery.bank.use_mtls_aliases}

    def register(self, bank: str, force: bool) -> dict[str, Any]:
        return dict(self.banks.registrar(bank).register(force=force).as_dict())

    def client_assertion(self, bank: str) -> dict[str, Any]:
        tokens = self.banks.tokens(bank)
        return {"bank": bank, "client_id": tokens.client_id, "client_assertion": tokens.client_assertion(),
                "client_assertion_type": jose.CLIENT_ASSERTION_TYPE}

    def token(self, bank: str, scope: str, refresh: bool) -> dict[str, Any]:
        return self.banks.tokens(bank).token(scope, refresh=refresh).as_dict()

    def par(self, bank: str, scope: str, redirect_uri: str, *, authorization_details: list[dict[str, Any]] | None,
            state: str | None, nonce: str | None) -> dict[str, Any]:
        return self.banks.tokens(bank).push_authorization(
            scope=scope, redirect_uri=redirect_uri, authorization_details=authorization_details, state=state,
            nonce=nonce).as_dict()

    def close(self) -> None:
        if "banks" in self.__dict__:
            self.banks.close()


@dataclasses.dataclass
class ThroughAgent:
    """Over the running agent's socket: no PIN here, the agent's policy decides, its audit trail records."""

    client: AgentClient

    @property
    def via(self) -> str:
        return f"agent at {self.client.socket_path}"

    def list_keys(self) -> list[dict[str, Any]]:
        # The agent lists the configured keys this user may see, in the token listing's shape and order.
        found = [{"label": k["label"], "id": k["id"], "type": k["type"], "uri": k["token_uri"],
                  "certificate": k["certificate"]} for k in self.client.list_keys()]
        return sorted(found, key=lambda k: (k["label"], bytes.fromhex(k["id"])))

    def public_pem(self, key: str) -> str:
        return self.client.public_key_pem(key)

    def jwks(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return self.client.jwks()
        return {"keys": [self.client.public_jwk(key) for key in keys]}

    def sign_jws(self, key: str, payload: bytes, alg: str | None, header: Mapping[str, Any] | None) -> str:
        return self.client.jws(key, payload, alg, header)

    def discover(self, bank: str, refresh: bool) -> dict[str, Any]:
        return self.client.discovery(bank, refresh)

    def register(self, bank: str, force: bool) -> dict[str, Any]:
        return self.client.register(bank, force)

    def client_assertion(self, bank: str) -> dict[str, Any]:
        return self.client.client_assertion(bank)

    def token(self, bank: str, scope: str, refresh: bool) -> dict[str, Any]:
        return self.client.token(bank, scope, refresh)

    def par(self, bank: str, scope: str, redirect_uri: str, *, authorization_details: list[dict[str, Any]] | None,
            state: str | None, nonce: str | None) -> dict[str, Any]:
        return self.client.par(bank, scope, redirect_uri, authorization_details=authorization_details, state=state,
                               nonce=nonce)

    def close(self) -> None:
        self.client.close()
