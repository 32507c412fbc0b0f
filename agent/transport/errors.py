"""Transport errors: each failure a user can act on has its own class and hint.

Everything raised while talking to a bank is a :class:`TransportError` that names
the bank, the URL and the ``x-fapi-interaction-id`` of the attempt (so the bank's
support can find it), and says what to check. Setting up a TLS context fails
with a :class:`TlsSetupError` instead (configuration, not the network), e.g.
:class:`ClientCertificateValidityError` for a client certificate that is expired or not yet valid.

    TransportError
    ├── TlsError
    │   ├── ServerUntrustedError          the bank's certificate does not chain to our CA bundle
    │   ├── HostnameMismatchError         the bank's certificate is for another host name
    │   ├── ClientCertRejectedError       the bank refused our client certificate
    │   │   ├── ClientCertExpiredError    … because it has expired
    │   │   ├── ClientCertRevokedError    … because it was revoked
    │   │   └── ClientCertUnknownCaError  … because the bank does not trust its issuer
    │   └── HandshakeFailedError          no common protocol/suite, or another TLS failure
    ├── ClientCertNotPresentedError       our certificate is outside its validity period: nothing sent
    ├── ConnectFailedError                no TCP connection (DNS, network)
    │   └── ConnectRefusedError           nothing listens on the bank's port
    ├── BankTimeoutError
    │   ├── ConnectTimeoutError           no TCP/TLS connection in time
    │   ├── ReadTimeoutError              connected, but no answer in time
    │   └── RequestDeadlineError          no whole answer within the request's total deadline
    ├── ConnectionLostError               the connection broke mid-request
    ├── ResponseTooLargeError             the answer is larger than the bank's limit
    └── BankBusyError                     the bank has as many requests in flight as it may
"""

from __future__ import annotations

import html
import json
import re

from agent.errors import AgentError


class TlsSetupError(AgentError):
    """The TLS context for a bank cannot be built (configuration or token content)."""

    hint = "check the bank's [banks.NAME] settings and the key and certificate on the token"


class KeyCertificateMismatchError(TlsSetupError):
    hint = ("the client certificate was not issued for this key: import the certificate issued from this key's CSR "
            "(`tpp-agent cert import --key KEY FILE`), or point client_certificate at the right PEM")


class ClientCertificateMissingError(TlsSetupError):
    hint = "import the transport certificate onto the token next to the key, or set client_certificate to a PEM file"


class ClientCertificateValidityError(TlsSetupError):
    """The client certificate is expired or not yet valid: it is never presented."""

    hint = ("import a current transport certificate (`tpp-agent cert import --key KEY FILE`; "
            "`tpp-agent certs needs-renewal --key KEY` says when one is due), or check the system clock")


class CaBundleError(TlsSetupError):
    hint = "set ca_bundle in [banks.NAME] to a PEM file with the ecosystem's root and issuing CAs"


class TransportError(AgentError):
    """A request to a bank failed below HTTP. ``hint`` names the bank and the interaction id."""

    what_to_check = "check the bank's URL and that it is up"

    def __init__(self, detail: str, *, bank: str, url: str, interaction_id: str) -> None:
        self.bank = bank
        self.url = url
        self.interaction_id = interaction_id
        self.detail = detail
        super().__init__(
            f"bank {bank!r}: {detail} ({url}, x-fapi-interaction-id {interaction_id})",
            hint=f"{self.what_to_check} (bank {bank!r}, x-fapi-interaction-id {interaction_id})",
        )


class TlsError(TransportError):
    what_to_check = "check the TLS set-up of both sides"


class ServerUntrustedError(TlsError):
    what_to_check = ("the bank's server certificate does not chain to ca_bundle: check that ca_bundle holds the "
                     "ecosystem's root and issuing CAs, and that the URL is the bank's")


class HostnameMismatchError(TlsError):
    what_to_check = ("the bank's certificate does not name the host in the URL: check the discovery URL or "
                     "endpoint alias (a typo, an IP address instead of the name, a proxy)")


class ClientCertRejectedError(TlsError):
    what_to_check = ("the bank refused our transport certificate: check that it is the one registered in the "
                     "directory for this application, and that the bank has registered it")


class ClientCertExpiredError(ClientCertRejectedError):
    what_to_check = "our transport certificate has expired: issue a new one in the directory and import it"


class ClientCertNotPresentedError(TransportError):
    what_to_check = ("our transport certificate is outside its validity period, so nothing was sent: import a "
                     "current one (tpp-agent cert import), or check the system clock")


class ClientCertRevokedError(ClientCertRejectedError):
    what_to_check = "our transport certificate was revoked: issue a new one in the directory and import it"


class ClientCertUnknownCaError(ClientCertRejectedError):
    what_to_check = ("the bank does not trust the issuer of our transport certificate: use a certificate issued "
                     "by the ecosystem's directory CA (sandbox and production CAs differ)")


class HandshakeFailedError(TlsError):
    what_to_check = ("no TLS agreement with the bank: check the TLS versions and cipher suites (tls12_ciphers) "
                     "and that the bank asks for a client certificate we have")


class ConnectFailedError(TransportError):
    what_to_check = "check the host name in the URL, DNS and the network path to the bank"


class ConnectRefusedError(ConnectFailedError):
    what_to_check = "nothing accepts connections at the bank's address: check the URL's host and port"


class BankTimeoutError(TransportError):
    what_to_check = "the bank is slow or unreachable"


class ConnectTimeoutError(BankTimeoutError):
    what_to_check = "no connection in time: check the network path and firewall to the bank, or raise connect_timeout"


class ReadTimeoutError(BankTimeoutError):
    what_to_check = ("the bank accepted the request but did not answer in time: ask the bank about this "
                     "interaction id before retrying a non-idempotent request, or raise read_timeout")


class ConnectionLostError(TransportError):
    what_to_check = "the connection broke mid-request: retry; if it persists ask the bank about this interaction id"


class RequestDeadlineError(BankTimeoutError):
    what_to_check = ("the bank did not send its whole answer within request_timeout: ask the bank about this "
                     "interaction id before retrying a non-idempotent request, or raise request_timeout")


class ResponseTooLargeError(TransportError):
    what_to_check = ("the bank's answer is larger than the agent accepts: raise max_response_bytes (or, for the "
                     "discovery document, max_discovery_bytes) in [banks.NAME] if the bank really sends that much")


class BankBusyError(TransportError):
    what_to_check = ("the agent already has max_in_flight requests under way at this bank (a slow bank holds them): "
                     "retry in a moment, or raise max_in_flight in [banks.NAME]")


# An HTTP answer that is not the bank's own: a TLS terminator in front of it (nginx answers 400 with the title
# "400 The SSL certificate error" or "400 No required SSL certificate was sent") refused our client certificate
# after the handshake. Matched on the page's title, which such front ends all set.
_CERTIFICATE_REFUSAL = re.compile(r"\b(ssl|tls|client)\s+certificate\b", re.IGNORECASE)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
CLIENT_CERTIFICATE_REFUSED = (
    "a TLS front end refused our client certificate (the handshake passed; it answered instead of the bank): "
    "check that the transport certificate is the one the bank trusts (issued by the ecosystem's directory CA for "
    "this environment, not expired or revoked), and that client_key names the key it belongs to")


def answer_summary(body: bytes, limit: int = 300) -> str:
    """A failed answer's own words, short and on one line: a JSON error document's message, an HTML page's
    title, else the body's first line."""
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if isinstance(document, dict):
        parts = [str(document[k]) for k in ("errorCode", "error", "errorMessage", "error_description", "message")
                 if document.get(k)]
        if parts:
            return " — ".join(parts)[:limit]
    title = _TITLE.search(body)
    if title:
        text = html.unescape(title.group(1).decode("utf-8", errors="replace"))
        return " ".join(text.split())[:limit]
    first = body.decode("utf-8", errors="replace").strip().splitlines()
    return first[0][:limit] if first else ""


def refusal_hint(status: int, body: bytes) -> str | None:
    """:data:`CLIENT_CERTIFICATE_REFUSED` when a 4xx answer is a front end's client-certificate refusal."""
    if 400 <= status < 500 and _CERTIFICATE_REFUSAL.search(answer_summary(body)):
        return CLIENT_CERTIFICATE_REFUSED
    return None
