"""The directory's certificate API for one software statement, over mTLS with the transport key.

    client = DirectoryClient(settings, transport)          # transport: agent.transport's, or any BankHttp
    issued = client.create_certificate("rtstransport", csr_pem)
    pem = client.download(issued)                           # then agent.x509.certificates.import_certificate
    client.revoke(old, "superseded")

Every call gets a ``client_credentials`` token first (``tls_client_auth``, scope ``directory:software``), kept
until shortly before it expires. An answer that is not 2xx is a :class:`DirectoryRefusedError` (4xx) or a
:class:`DirectoryServerError` (5xx) with the directory's own words and the interaction id; an answer of the
wrong shape is a :class:`DirectoryAnswerError`. A certificate the directory returns for a key other than the
CSR's is refused (:class:`DirectoryCertificateMismatchError`) before anyone could import it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.directory.settings import DirectorySettings
from agent.errors import AgentError, InputError
from agent.openfinance.client import BankHttp, BankResponse
from agent.transport.errors import answer_summary

SCOPE = "directory:software"
# The directory's {type} path segments for what a CSR makes, by the names its web pages give them (Raidiam
# Connect's SoftwareStatementCertificateOrKeyType: rtstransport, rtssigning, sigkey, enckey; sigkey is a JWK
# upload, not a CSR). Either name is accepted.
CERTIFICATE_KINDS = {"transport": "rtstransport", "signing": "rtssigning", "encryption": "enckey"}
CERTIFICATE_TYPES = tuple(CERTIFICATE_KINDS.values())
REVOKE_REASONS = ("unspecified", "keycompromise", "superseded", "cessationofoperation", "privilegewithdrawn")
_TOKEN_MARGIN = 30.0  # seconds before expiry a token is replaced
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


class DirectoryError(AgentError):
    hint = "check [directory] in the configuration and the application's status in the directory"


class DirectoryRefusedError(DirectoryError):
    """The directory answered 4xx."""

    def __init__(self, what: str, response: BankResponse) -> None:
        self.status = response.status
        super().__init__(f"the directory refused to {what}: HTTP {response.status}{_detail(response.body)} "
                         f"(x-fapi-interaction-id {response.interaction_id})",
                         hint=_REFUSAL_HINTS.get(response.status, "read the directory's answer; nothing was "
                                                                  "changed on this side"))


class DirectoryServerError(DirectoryError):
    """The directory answered 5xx: it may or may not have done it."""

    def __init__(self, what: str, response: BankResponse) -> None:
        self.status = response.status
        super().__init__(f"the directory failed to {what}: HTTP {response.status}{_detail(response.body)} "
                         f"(x-fapi-interaction-id {response.interaction_id})",
                         hint="try again later; list the certificates first (one may have been made) and quote the "
                              "interaction id to the directory's support")


class DirectoryAnswerError(DirectoryError):
    hint = "the URL may not be the directory's API: check api_url and token_endpoint in [directory]"


class DirectoryCertificateMismatchError(DirectoryError):
    hint = ("nothing was imported; revoke that certificate in the directory (reason unspecified) and send the CSR "
            "again")


_REFUSAL_HINTS = {
    400: "the request was malformed for the directory: check the CSR (tpp-agent csr) and the certificate type",
    401: "the directory did not accept the client: check client_id in [directory] and that the transport "
         "certificate is the application's (tls_client_auth)",
    403: "the directory knows the client but refuses this: check organisation_id, software_statement_id and the "
         "application's roles",
    404: "no such organisation, software statement or certificate: check [directory] and the certificate id",
}


def _detail(body: bytes) -> str:
    summary = answer_summary(body)
    return f": {summary}" if summary else ""


@dataclasses.dataclass(frozen=True)
class DirectoryCertificate:
    """A ``CertificateOrKey`` of the software statement, as far as the lifecycle reads it."""

    id: str
    type: str
    status: str
    x5t_s256: str | None
    signed_cert_path: str | None
    expires: str | None
    revoke_reason: str | None
    raw: Mapping[str, Any]

    @classmethod
    def parse(cls, value: object) -> DirectoryCertificate:
        if not isinstance(value, Mapping) or not isinstance(value.get("CertificateOrKeyId"), str) \
                or not isinstance(value.get("CertificateOrKeyType"), str):
            raise DirectoryAnswerError("the directory's answer is not a certificate (no CertificateOrKeyId/Type)")

        def optional(key: str) -> str | None:
            found = value.get(key)
            return found if isinstance(found, str) else None

        return cls(value["CertificateOrKeyId"], value["CertificateOrKeyType"], optional("Status") or "",
                   optional("x5t#S256"), optional("SignedCertPath"), optional("ExpiryDateTime"),
                   optional("RevokeReason"), value)

    def as_dict(self) -> dict[str, Any]:
        leaf = self.leaf()
        return {"id": self.id, "type": self.type, "status": self.status, "x5t#S256": self.x5t_s256,
                "expires": self.expires, "revoke_reason": self.revoke_reason, "signed_cert_path": self.signed_cert_path,
                "subject": leaf.subject.rfc4514_string() if leaf is not None else None}

    def leaf(self) -> x509.Certificate | None:
        """The certificate from the answer's ``x5c``, when it carries one."""
        chain = self.raw.get("x5c")
        if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
            return None
        try:
            return x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
        except ValueError:
            raise DirectoryAnswerError(f"certificate {self.id}: x5c[0] is not a base64 DER certificate") from None


class DirectoryClient:
    def __init__(self, settings: DirectorySettings, http: BankHttp) -> None:
        self.settings = settings
        self.http = http
        self._token: tuple[str, float] | None = None
        self._lock = threading.Lock()  # one token request at a time; callers share the token

    # -- token -------------------------------------------------------------------------------------
    def access_token(self) -> str:
        with self._lock:
            if self._token is not None and self._token[1] > time.monotonic():
                return self._token[0]
            form = urllib.parse.urlencode({"grant_type": "client_credentials", "client_id": self.settings.client_id,
                                           "scope": SCOPE}).encode()
            response = self.http.request("POST", self.settings.token_endpoint, body=form, headers={
                "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
            answer = self._json(f"get a {SCOPE} token", response)
            token, lifetime = (answer.get("access_token"), answer.get("expires_in", 60)) \
                if isinstance(answer, dict) else (None, None)
            if not isinstance(token, str) or not token or isinstance(lifetime, bool) \
                    or not isinstance(lifetime, int | float):
                raise DirectoryAnswerError(f"{self.settings.token_endpoint} answered without an access_token")
            self._token = (token, time.monotonic() + max(0.0, float(lifetime) - _TOKEN_MARGIN))
            return token

    # -- certificates ------------------------------------------------------------------------------
    def certificates(self) -> list[DirectoryCertificate]:
        answer = self._call("list the software statement's certificates", "GET", self._path())
        if not isinstance(answer, list):
            raise DirectoryAnswerError("the directory's certificate list is not a JSON array")
        return [DirectoryCertificate.parse(entry) for entry in answer]

    def certificate(self, kind: str, certificate_id: str) -> DirectoryCertificate:
        return DirectoryCertificate.parse(self._call(f"show {kind} certificate {certificate_id}", "GET",
                                                     self._path(certificate_type(kind), _segment(certificate_id))))

    def issued_for(self, kind: str, public_key_info: bytes) -> DirectoryCertificate | None:
        """The active certificate of ``kind`` the directory holds for the key (its SubjectPublicKeyInfo, DER),
        if any: what a CSR sent before made, when its answer was lost."""
        wanted = certificate_type(kind)
        for found in self.certificates():
            leaf = found.leaf() if found.type == wanted and found.status.lower() != "revoked" else None
            if leaf is not None and leaf.public_key().public_bytes(*_SPKI) == public_key_info:
                return found
        return None

    def create_certificate(self, kind: str, csr_pem: str) -> DirectoryCertificate:
        """A new certificate of ``kind`` for the CSR; refused if the directory's is for another key."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
        except ValueError:
            raise InputError("not a PEM certificate signing request", hint="make one with `tpp-agent csr`") \
                from None
        created = DirectoryCertificate.parse(self._call(
            f"make a {kind} certificate", "POST", self._path(certificate_type(kind)), body=csr_pem.encode("ascii"),
            content_type="application/x-pem-file"))
        leaf = created.leaf()
        if leaf is not None:
            _same_key(leaf, csr.public_key(), created.id)
        return created

    def download(self, certificate: DirectoryCertificate, csr_pem: str | None = None) -> bytes:
        """The issued certificate's PEM (from its ``SignedCertPath``), checked against the answer's thumbprint
        and, given the CSR, against its key."""
        url = certificate.signed_cert_path
        if url is None or urllib.parse.urlsplit(url).scheme != "https":
            raise DirectoryAnswerError(f"certificate {certificate.id} has no https:// SignedCertPath to download")
        response = self._authorised("download certificate " + certificate.id, "GET", url, accept="*/*")
        try:
            leaf = x509.load_pem_x509_certificate(response.body)
        except ValueError:
            raise DirectoryAnswerError(f"{url} did not return a PEM certificate") from None
        thumbprint = base64.urlsafe_b64encode(hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER))
                                              .digest()).rstrip(b"=").decode("ascii")
        if certificate.x5t_s256 is not None and thumbprint != certificate.x5t_s256:
            raise DirectoryCertificateMismatchError(
                f"the certificate downloaded from {url} is not certificate {certificate.id} (x5t#S256 differs)")
        if csr_pem is not None:
            _same_key(leaf, x509.load_pem_x509_csr(csr_pem.encode("ascii")).public_key(), certificate.id)
        return response.body

    def revoke(self, kind: str, certificate_id: str, reason: str) -> None:
        if reason not in REVOKE_REASONS:
            raise InputError(f"revoke reason {reason!r} is not one of {', '.join(REVOKE_REASONS)}",
                                 hint="superseded, after a rotation; keycompromise if the key may be known")
        self._call(f"revoke {kind} certificate {certificate_id}", "PUT",
                   self._path(certificate_type(kind), _segment(certificate_id)),
                   body=json.dumps({"RevokeReason": reason}).encode(), content_type="application/json")

    # -- plumbing ----------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        s = self.settings
        return "/".join((s.api_url, "organisations", _segment(s.organisation_id), "softwarestatements",
                         _segment(s.software_statement_id), "certificates", *parts))

    def _call(self, what: str, method: str, url: str, body: bytes | None = None,
              content_type: str | None = None) -> Any:
        return self._json(what, self._authorised(what, method, url, body, content_type=content_type))

    def _authorised(self, what: str, method: str, url: str, body: bytes | None = None, *,
                    content_type: str | None = None, accept: str = "application/json") -> BankResponse:
        headers = {"Authorization": f"Bearer {self.access_token()}", "Accept": accept}
        if content_type is not None:
            headers["Content-Type"] = content_type
        response = self.http.request(method, url, body=body, headers=headers)
        _raise_for(what, response)
        return response

    def _json(self, what: str, response: BankResponse) -> Any:
        _raise_for(what, response)
        if not response.body:
            return None
        try:
            return json.loads(response.body)
        except ValueError:
            raise DirectoryAnswerError(f"the directory's answer to {what} is not JSON "
                                       f"(x-fapi-interaction-id {response.interaction_id})") from None


def _raise_for(what: str, response: BankResponse) -> None:
    if 200 <= response.status < 300:
        return
    if response.status >= 500:
        raise DirectoryServerError(what, response)
    if response.status >= 400:
        raise DirectoryRefusedError(what, response)
    raise DirectoryAnswerError(f"the directory answered HTTP {response.status} to {what}")


def certificate_type(kind: str) -> str:
    """The directory's path segment for ``kind`` (``transport`` or ``rtstransport``, ...)."""
    found = CERTIFICATE_KINDS.get(kind, kind)
    if found not in CERTIFICATE_TYPES:
        names = ", ".join(f"{name} ({segment})" for name, segment in CERTIFICATE_KINDS.items())
        raise InputError(f"certificate type {kind!r} is not one of {names}",
                             hint="transport for the transport key, signing for the signing key, encryption for "
                                  "the encryption key")
    return found



def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _same_key(leaf: x509.Certificate, public_key: Any, certificate_id: str) -> None:
    if leaf.public_key().public_bytes(*_SPKI) != public_key.public_bytes(*_SPKI):
        raise DirectoryCertificateMismatchError(
            f"the directory's certificate {certificate_id} ({leaf.subject.rfc4514_string()}) is for another key, "
            "not the CSR's")
