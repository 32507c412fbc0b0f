"""Where a CLI command's operations run: in this process on the token, or in the running agent.

Both run the same operations (agent/operations/registry.py) by name and return the same plain data (what the
daemon answers as JSON), so each command has one formatter and prints the same thing either way.
:meth:`CliContext.backend` picks one (see agent/cli/context.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlencode

from asn1crypto import pem

from agent.client import AgentClient, AgentRequestError
from agent.daemon.http import INTERACTION_HEADER
from agent.daemon.routes import BY_OPERATION
from agent.errors import AgentError
from agent.operations.core import Caller, Core, Operator, execute
from agent.operations.registry import BY_NAME
from pkcs11_backends.errors import Pkcs11Error


class Backend(Protocol):
    @property
    def via(self) -> str: ...  # "token" or "agent at SOCKET"

    def run(self, operation: str, body: Mapping[str, Any] | None = None, *, key: str | None = None,
            bank: str | None = None) -> Any: ...

    def list_keys(self) -> list[dict[str, Any]]: ...

    def public_pem(self, key: str) -> str: ...

    def close(self) -> None: ...


class Direct:
    """On the token, in this process, for the operator (needs the PIN and the token to itself).

    The operations run here exactly as in the agent, key purposes included; signatures and bank requests are
    recorded in the audit trail (``audit`` is called on first use: reading keys needs no audit trail).
    """

    via = "token"

    def __init__(self, core: Core, interaction_id: str) -> None:
        self.core = core
        self.runtime = core.runtime
        self.interaction_id = interaction_id

    def run(self, operation: str, body: Mapping[str, Any] | None = None, *, key: str | None = None,
            bank: str | None = None) -> Any:
        caller = Caller(os.getuid(), os.getpid(), self.interaction_id)
        return execute(self.core, BY_NAME[operation], caller, Operator(), body or {}, key=self._alias(key), bank=bank)

    def _alias(self, key: str | None) -> str | None:
        """A key named by its configured URI, or by the label of the token key an alias names, is that alias
        (the operations name keys by alias)."""
        if key is None:
            return None
        configured = self.core.config.key_named(key)
        if configured is not None:
            return configured.alias
        store = self.runtime.keys
        try:
            named = store.info(key).uri
        except (AgentError, Pkcs11Error):
            return key  # the operation says what is wrong with the name, as for any unknown alias
        return next((alias for alias in self.core.config.keys if store.info(alias).uri == named), key)

    def list_keys(self) -> list[dict[str, Any]]:
        """The token's inventory (configured or not): provisioning needs to see new keys."""
        return [key.as_dict() for key in self.runtime.keys.list()]

    def public_pem(self, key: str) -> str:
        if self.core.config.key_named(key) is not None:
            return str(self.run("public", key=key)["pem"])
        # A key not configured yet (generated, its CSR to be made): its public half is no secret.
        armored: bytes = pem.armor("PUBLIC KEY", self.runtime.keys.public_key_info(key).dump())
        return armored.decode("ascii")

    def close(self) -> None:
        pass  # the core is the context's


@dataclasses.dataclass
class ThroughAgent:
    """Over the running agent's socket: no PIN here, the agent's policy decides, its audit trail records."""

    client: AgentClient
    interaction_id: str  # sent with each request: the agent runs the operation under it
    aliases: frozenset[str] = frozenset()  # the CLI's configured aliases (the agent's, or it warned: context.py)

    @property
    def via(self) -> str:
        return f"agent at {self.client.socket_path}"

    def run(self, operation: str, body: Mapping[str, Any] | None = None, *, key: str | None = None,
            bank: str | None = None) -> Any:
        route = BY_OPERATION[operation]
        target = route.target(self._alias(key) if key is not None else None, bank)
        headers = {INTERACTION_HEADER: self.interaction_id}
        if route.from_query:
            query = {name: str(value).lower() if isinstance(value, bool) else value
                     for name, value in (body or {}).items()}
            _, payload = self.client.call(route.method, target + ("?" + urlencode(query) if query else ""),
                                          headers=headers)
        else:
            _, payload = self.client.call(route.method, target, dict(body or {}), headers=headers)
        if payload.startswith(b"-----BEGIN "):
            return {"pem": payload.decode("ascii")}
        if not payload.startswith((b"{", b"[")):  # a text answer (the metrics), as the operation returns it
            return payload.decode("utf-8")
        return json.loads(payload)

    def _alias(self, key: str) -> str:
        """The agent names keys by alias: a configured URI, a token URI or a label is the alias of that key."""
        if key in self.aliases:
            return key
        try:
            listed = self.run("keys")["keys"]
        except AgentRequestError:  # a caller that may not list keys names them by alias
            return key
        found = [k["alias"] for k in listed if key in (k["uri"], k["token_uri"], k["label"])]
        return found[0] if len(found) == 1 else key  # else the agent's answer says what is wrong with it

    def list_keys(self) -> list[dict[str, Any]]:
        # The agent lists the configured keys this user may see, in the token listing's shape and order.
        found = [{"label": k["label"], "id": k["id"], "type": k["type"], "uri": k["token_uri"],
                  "certificate": k["certificate"]} for k in self.run("keys")["keys"]]
        return sorted(found, key=lambda k: (k["label"], bytes.fromhex(k["id"])))

    def public_pem(self, key: str) -> str:
        return str(self.run("public", key=key)["pem"])

    def close(self) -> None:
        self.client.close()
