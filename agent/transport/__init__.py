"""Mutual TLS to the banks with the transport key on the token.

* ``tls.py``: :class:`TlsSettings` (``[banks.NAME]``), :func:`build_context` → :class:`TlsContext`
  (pyOpenSSL context: FAPI TLS policy, CA bundle, token key, matching certificate).
* ``pool.py``: :class:`BankSslContext`, urllib3's view of it (host check in OpenSSL, session
  resumption, handshake counters).
* ``client.py``: :class:`BankTransport` (pooled keep-alive HTTP, interaction ids, one log line per
  request) and :func:`open_transport`.
* ``errors.py``: the failures, each with its own class and hint.
"""

from agent.transport.client import INTERACTION_HEADER, BankTransport, Response, classify, open_transport
from agent.transport.tls import FAPI_TLS12_CIPHERS, TlsContext, TlsSettings, build_context

__all__ = ["FAPI_TLS12_CIPHERS", "INTERACTION_HEADER", "BankTransport", "Response", "TlsContext", "TlsSettings",
           "build_context", "classify", "open_transport"]
