"""Banks as a running agent sees them: one pooled mTLS transport per bank, built on first
use, and the discovery, registration and registration log that run over it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping

from agent import log
from agent.config import Config
from agent.openfinance.banks import BankConfig, get_bank
from agent.openfinance.discovery import Discovery
from agent.openfinance.records import RegistrationLog
from agent.openfinance.registration import Identity, Registrar
from agent.runtime import Runtime
from agent.transport.client import BankTransport, Response, open_transport

_logger = log.get_logger("openfinance")


class OpenFinance:
    """``config`` (default: the runtime's) names the banks and the state dir; the token is the runtime's."""

    def __init__(self, runtime: Runtime, config: Config | None = None) -> None:
        self.runtime = runtime
        self.config = config or runtime.config
        self._transports: dict[str, BankTransport] = {}
        self._lock = threading.Lock()  # daemon workers share one OpenFinance

    @functools.cached_property
    def records(self) -> RegistrationLog:
        return RegistrationLog(self.config.state_dir)

    def bank(self, name: str) -> BankConfig:
        return get_bank(self.config, name)

    def transport(self, name: str) -> BankTransport:
        """The bank's transport; rebuilt when the PKCS#11 module was re-initialised since it was made.

        A token that is away fails here, fast, with the pool's ``TokenUnavailableError``,
        not later as a TLS handshake error that would send the operator to the bank.
        """
        self.runtime.pool.ensure_ready()
        with self._lock:
            transport = self._transports.get(name)
            if transport is not None and transport.tls.module_generation != self.runtime.module.generation:
                # Its key's handles died with C_Finalize: a new handshake with it could only fail, or
                # worse, reach whatever session or object now has the same handle number.
                _logger.info("transport_renewed", bank=name, reason="PKCS#11 module re-initialised")
                transport.close()
                transport = None
            if transport is None:
                transport = self._transports[name] = open_transport(self.runtime, self.bank(name).tls)
            return transport

    def discovery(self, name: str) -> Discovery:
        # A fresh cached document needs no connection, so no PIN and no handshake either.
        return Discovery(self.bank(name), self.config.state_dir, _OnFirstUse(self, name))

    def registrar(self, name: str) -> Registrar:
        transport = self.transport(name)
        identity = Identity(transport.tls.certificate_sha256, transport.tls.certificate.subject.rfc4514_string())
        return Registrar(self.bank(name), self.discovery(name), transport, self.records, identity)

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()


class _OnFirstUse:
    """A bank's transport, opened when the first request goes out."""

    def __init__(self, owner: OpenFinance, bank: str) -> None:
        self.owner = owner
        self.bank = bank

    def request(self, method: str, url: str, *, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, interaction_id: str | None = None) -> Response:
        return self.owner.transport(self.bank).request(method, url, body=body, headers=headers,
                                                       interaction_id=interaction_id)
