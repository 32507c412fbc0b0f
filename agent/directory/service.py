"""The directory as a running agent (or the operator's CLI) uses it: one mTLS transport with the ``[directory]``
settings, built on first use, every request sent with the transport key recorded in the audit trail.

    directory = Directory(runtime, config, observer)
    directory.client.certificates()         # agent/directory/client.py: token, CSR upload, download, revoke
    directory.close()
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.config import Config
from agent.directory.client import DirectoryClient
from agent.directory.settings import DirectorySettings
from agent.runtime import Runtime
from agent.transport.client import AnswerLimit, BankTransport, Response, open_transport

if TYPE_CHECKING:
    from agent.openfinance.service import BankCallObserver

NAME = "directory"  # what the audit trail and the logs call it, where they name a bank


class Directory:
    def __init__(self, runtime: Runtime, config: Config, observer: BankCallObserver) -> None:
        self.runtime = runtime
        self.config = config
        self.observer = observer
        # Each with the key it was made for: a transport rotation's retire makes the alias name the successor.
        self._transport: tuple[str, BankTransport] | None = None
        self._client: tuple[str, DirectoryClient] | None = None
        self._lock = threading.Lock()  # daemon workers share one transport and one client

    @functools.cached_property
    def settings(self) -> DirectorySettings:
        return DirectorySettings.from_config(self.config)

    def key(self) -> str:
        """The key presented to the directory now: ``client_key`` as this process's rotation view resolves it."""
        client_key = self.settings.tls.client_key
        return self.runtime.keys.aliases.get(client_key, client_key)

    @property
    def client(self) -> DirectoryClient:
        """One client per key: its ``directory:software`` token, bound to the key's certificate, is reused until it
        expires or the key is rotated."""
        key = self.key()
        with self._lock:
            if self._client is None or self._client[0] != key:
                self._client = (key, DirectoryClient(self.settings, _Audited(self)))
            return self._client[1]

    def transport(self) -> BankTransport:
        self.runtime.pool.ensure_ready()
        key = self.key()
        with self._lock:
            made = self._transport
            if made is not None and (made[0] != key or
                                     made[1].tls.module_generation != self.runtime.module.generation):
                made[1].close()  # another key now, or its key's handles died with C_Finalize (OpenFinance.transport)
                made = None
            if made is None:
                made = self._transport = (key, open_transport(self.runtime, self.settings.tls))
            return made[1]

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport[1].close()
                self._transport = None


class _Audited:
    """The directory's transport as of each request, every request told to the observer (a transport key use)."""

    def __init__(self, owner: Directory) -> None:
        self.owner = owner

    def request(self, method: str, url: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None,
                limit: AnswerLimit = "max_response_bytes") -> Response:
        from agent.openfinance.service import BankCall

        owner = self.owner
        key = owner.key()
        # The body (a CSR, a revoke reason, a client_credentials form) holds no secret: the audit record keeps it.
        try:
            response = owner.transport().request(method, url, body=body, headers=headers,
                                                 interaction_id=interaction_id, limit=limit)
        except Exception as exc:
            owner.observer.bank_call(BankCall(NAME, key, method, url, body, interaction_id,
                                              f"error: {type(exc).__name__}"))
            raise
        owner.observer.bank_call(BankCall(NAME, key, method, url, body, response.interaction_id,
                                          f"http {response.status}"))
        return response
