"""Mutual TLS to the banks with the transport key on the token.

* ``tls.py``: :class:`TlsSettings` (``[banks.NAME]``), :func:`build_context` → :class:`TlsContext`
  (pyOpenSSL context: FAPI TLS policy, CA bundle, token key, matching certificate).
* ``pool.py``: :class:`BankSslContext`, urllib3's view of it (host check in OpenSSL, session
  resumption, handshake counters), and the connection pool that honours the bank's idle limits.
* ``client.py``: :class:`BankTransport` (pooled keep-alive HTTP, interaction ids, one log line per
  request; a total deadline, a size limit on answers, a limit on requests in flight per bank)
  and :func:`open_transport`.
* ``headers.py``: the header fields a request may carry (RFC 9110 tokens and field values).
* ``exchange.py``: one attempt at a request as the socket layer sees it, and the watchdog that
  cuts it at its deadline.
* ``errors.py``: the failures, each with its own class and hint.
"""

from agent.transport.client import BankTransport, Response, classify, open_transport
from agent.transport.headers import INTERACTION_HEADER
from agent.transport.tls import FAPI_TLS12_CIPHERS, TlsContext, TlsSettings, build_context

__all__ = ["FAPI_TLS12_CIPHERS", "INTERACTION_HEADER", "BankTransport", "Response", "TlsContext", "TlsSettings",
           "build_context", "classify", "open_transport"]
