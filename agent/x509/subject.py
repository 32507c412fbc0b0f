"""Certificate subjects: RFC 4514 strings and the trust framework directory's profile.

Order. An RFC 4514 string lists the RDNs *last to first*: ``CN=…,OU=…,O=…,C=AE``
is the DER sequence C, O, OU, CN (the order ``openssl req -subj /C=AE/O=…/OU=…/CN=…``
writes, and the order cryptography's ``rfc4514_string()`` prints back reversed).
:func:`parse_subject` follows the RFC, so the directory profile written as RFC 4514 is
``CN=<client id>,OU=<org id>,O=<legal name>,C=AE``. :func:`rfc4514` prints a name back the
same way, and it is the one form in which the agent shows any subject or issuer (what
``--subject`` takes, so that a shown subject can be pasted back).

Encodings follow ``openssl req`` with the default ``string_mask = utf8only``:
countryName, serialNumber and dnQualifier are PrintableString, emailAddress and
domainComponent IA5String, every other attribute UTF8String (so Arabic or accented
legal names round-trip unchanged). Values longer than the RFC 5280 upper bounds are
refused, as ``openssl req`` refuses them.
"""

from __future__ import annotations

import re
from typing import Any

from asn1crypto import core, x509

from agent.errors import InputError

SUBJECT_HINT = ("write the subject as RFC 4514, most specific RDN first, e.g. "
                "CN=<client id>,OU=<org id>,O=Acme\\, Inc.,C=AE (escape , + \" \\ < > ; with a backslash)")

# RFC 4514 section 3 names plus the usual OpenSSL short names.
_SHORT_NAMES = {
    "cn": "common_name", "c": "country_name", "l": "locality_name", "st": "state_or_province_name",
    "street": "street_address", "o": "organization_name", "ou": "organizational_unit_name",
    "dc": "domain_component", "uid": "user_id", "sn": "surname", "gn": "given_name", "e": "email_address",
    "email": "email_address", "jurisdictionc": "incorporation_country",
    "jurisdictionst": "incorporation_state_or_province", "jurisdictionl": "incorporation_locality",
}
_LONG_NAMES = {name.replace("_", ""): name for name in x509.NameType._map.values()}
_LONG_NAMES.update({"organizationalunitname": "organizational_unit_name", "stateorprovincename":
                    "state_or_province_name", "userid": "user_id"})
_DISPLAY = {"common_name": "CN", "country_name": "C", "locality_name": "L", "state_or_province_name": "ST",
            "street_address": "STREET", "organization_name": "O", "organizational_unit_name": "OU",
            "domain_component": "DC", "user_id": "UID", "email_address": "emailAddress",
            "serial_number": "serialNumber", "organization_identifier": "organizationIdentifier"}

_PRINTABLE = {"country_name", "incorporation_country", "serial_number", "dn_qualifier"}
_PRINTABLE_CHARS = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]*")
# RFC 5280 appendix A upper bounds (and PKCS#9's for emailAddress, as OpenSSL uses).
_UPPER_BOUNDS = {"common_name": 64, "organization_name": 64, "organizational_unit_name": 64, "title": 64,
                 "serial_number": 64, "locality_name": 128, "state_or_province_name": 128, "email_address": 128,
                 "postal_code": 40, "pseudonym": 128, "country_name": 2, "incorporation_country": 2}
_SPECIALS = ' "#+,;<=>\\'
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def directory_subject(org_name: str, org_id: str, client_id: str, country: str = "AE") -> x509.Name:
    """The directory's CSR profile: C=AE, O=<legal name>, OU=<organisation id>, CN=<client id>, in that order."""
    if not _UUID.fullmatch(client_id.strip()):
        raise InputError(f"client id {client_id!r} is not a UUID",
                         hint="use the Client ID the directory shows for the application, e.g. "
                              "3fa85f64-5717-4562-b3fc-2c963f66afa6")
    attributes = (("country_name", country), ("organization_name", org_name),
                  ("organizational_unit_name", org_id), ("common_name", client_id.strip()))
    return _name([[_attribute(kind, value)] for kind, value in attributes])


def parse_subject(text: str) -> x509.Name:
    """An RFC 4514 string as a Name whose DER order is the string's reverse (see the module doc)."""
    rdns = _Parser(text).parse()
    return _name([[_attribute(kind, value) for kind, value in rdn] for rdn in reversed(rdns)])


# The attribute names RFC 4514 section 3 defines, as cryptography's rfc4514_string() prints them (the transport
# layer shows subjects with it): every other type goes as its dotted OID, which parse_subject() reads too.
_RFC4514_NAMES = {"common_name": "CN", "locality_name": "L", "state_or_province_name": "ST",
                  "organization_name": "O", "organizational_unit_name": "OU", "country_name": "C",
                  "street_address": "STREET", "domain_component": "DC", "user_id": "UID"}


def rfc4514(name: x509.Name) -> str:
    """``name`` as RFC 4514, most specific RDN first (what ``--subject`` takes), written as cryptography's
    ``rfc4514_string()`` writes it: the one form in which the agent shows a subject or an issuer."""
    return ",".join("+".join(_rfc4514_attribute(atv) for atv in rdn) for rdn in reversed(list(name.chosen)))


def _rfc4514_attribute(atv: x509.NameTypeAndValue) -> str:
    kind = atv["type"].native
    label = _RFC4514_NAMES.get(kind) or atv["type"].dotted
    text = atv["value"].native
    if isinstance(text, str):
        try:
            _check_text(kind, text)
        except InputError:
            pass  # not text parse_subject() takes back (a control character, an empty value): as hex
        else:
            return f"{label}={_escape(text)}"
    return f"{label}=#{atv['value'].dump().hex()}"  # its DER (RFC 4514 section 2.4)


def _escape(text: str) -> str:
    out = []
    for i, char in enumerate(text):
        special = char in '\\"+,;<>' or (char in "# " and i == 0) or (char == " " and i == len(text) - 1)
        out.append("\\" + char if special else char)
    return "".join(out)


def _name(rdns: list[list[x509.NameTypeAndValue]]) -> x509.Name:
    return x509.Name(name="", value=x509.RDNSequence([x509.RelativeDistinguishedName(rdn) for rdn in rdns]))


def _label(kind: str) -> str:
    return _DISPLAY.get(kind, kind)


def _attribute(kind: str, value: str | bytes) -> x509.NameTypeAndValue:
    """One attribute; ``value`` is text, or the BER encoding given as ``#hex``."""
    spec = x509.NameTypeAndValue._oid_specs.get(kind)
    if isinstance(value, bytes):
        try:
            parsed: Any = (spec or core.Asn1Value).load(value, strict=True)
            text = parsed.native
        except (ValueError, TypeError) as exc:
            raise InputError(f"the #hex value of {_label(kind)} is not one valid BER element: {exc}",
                             hint=SUBJECT_HINT) from None
        if isinstance(text, str):
            _check_text(kind, text)
        return x509.NameTypeAndValue({"type": kind, "value": parsed})
    _check_text(kind, value)
    if spec is x509.DirectoryString:
        choice = "printable_string" if kind in _PRINTABLE else "utf8_string"
        return x509.NameTypeAndValue({"type": kind, "value": x509.DirectoryString(name=choice, value=value)})
    if spec is None:  # an OID we have no syntax for: UTF8String, as OpenSSL does
        return x509.NameTypeAndValue({"type": kind, "value": core.UTF8String(value)})
    return x509.NameTypeAndValue({"type": kind, "value": value})


def _check_text(kind: str, value: str) -> None:
    label = _label(kind)
    if not value.strip():
        raise InputError(f"{label} has an empty value", hint=SUBJECT_HINT)
    if _CONTROL.search(value):
        raise InputError(f"{label} contains a control character", hint=SUBJECT_HINT)
    if kind in ("country_name", "incorporation_country") and not re.fullmatch(r"[A-Z]{2}", value):
        raise InputError(f"{label} must be a two-letter ISO 3166 country code in capitals, got {value!r}",
                         hint="the directory profile uses C=AE")
    if kind in _PRINTABLE and not _PRINTABLE_CHARS.fullmatch(value):
        raise InputError(f"{label} {value!r} has characters a PrintableString cannot hold",
                         hint="use letters, digits, spaces and ' ( ) + , - . / : = ? only")
    if kind in ("email_address", "domain_component") and not value.isascii():
        raise InputError(f"{label} {value!r} must be ASCII", hint=SUBJECT_HINT)
    bound = _UPPER_BOUNDS.get(kind)
    if bound is not None and len(value) > bound:
        raise InputError(f"{label} is {len(value)} characters long; X.509 (RFC 5280) allows at most {bound}",
                         hint="shorten it as the directory shows it (openssl req refuses it too)")


class _Parser:
    """RFC 4514 ``distinguishedName``; tolerates spaces around ``,`` ``+`` ``=`` as RFC 2253 readers do."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, problem: str) -> InputError:
        # repr() keeps a hostile subject (line breaks, control characters) on one line of the error.
        return InputError(f"malformed subject {self.text!r}: {problem}", hint=SUBJECT_HINT)

    def parse(self) -> list[list[tuple[str, str | bytes]]]:
        if not self.text.strip():
            raise self.fail("it is empty")
        rdns: list[list[tuple[str, str | bytes]]] = [[]]
        while True:
            kind = self._type()
            value = self._hex() if self._peek() == "#" else self._string()
            rdns[-1].append((kind, value))
            if self.pos >= len(self.text):
                return rdns
            separator = self.text[self.pos]
            self.pos += 1
            if separator == ",":
                rdns.append([])

    def _peek(self) -> str:
        self._skip_spaces()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def _type(self) -> str:
        self._skip_spaces()
        start = self.pos
        end = self.text.find("=", start)
        if end < 0 or any(c in self.text[start:end] for c in ",+"):
            stop = min((i for i in (self.text.find(",", start), self.text.find("+", start)) if i >= 0),
                       default=len(self.text))
            piece = self.text[start:stop].strip()
            raise self.fail(f"expected TYPE=VALUE at position {start + 1}, found {piece!r}" if piece
                            else f"empty RDN at position {start + 1}")
        name = self.text[start:end].strip()
        self.pos = end + 1
        if not name:
            raise self.fail(f"attribute type missing before '=' at position {end + 1}")
        if _OID.fullmatch(name):
            return str(x509.NameType.map(name))  # the asn1crypto name if known, else the dotted OID
        kind = _SHORT_NAMES.get(name.lower()) or _LONG_NAMES.get(name.lower())
        if kind is None:
            raise self.fail(f"unknown attribute type {name!r}",)
        return kind

    def _hex(self) -> bytes:
        start = self.pos + 1
        self.pos = start
        while self.pos < len(self.text) and self.text[self.pos] not in ",+":
            self.pos += 1
        digits = self.text[start:self.pos].rstrip(" ")
        if not digits or len(digits) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", digits):
            raise self.fail(f"'#' at position {start} must be followed by an even number of hex digits")
        return bytes.fromhex(digits)

    def _string(self) -> str:
        value = bytearray()
        keep = 0  # unescaped trailing spaces are not part of the value
        text = self.text
        while self.pos < len(text) and text[self.pos] not in ",+":
            char = text[self.pos]
            if char == "\\":
                escaped = text[self.pos + 1:self.pos + 3]
                if escaped[:1] and escaped[0] in _SPECIALS:
                    value += escaped[0].encode()
                    self.pos += 2
                elif re.fullmatch(r"[0-9A-Fa-f]{2}", escaped):
                    value.append(int(escaped, 16))
                    self.pos += 3
                else:
                    raise self.fail(f"invalid escape at position {self.pos + 1}: "
                                    "a backslash must precede a special character or two hex digits")
                keep = len(value)
                continue
            if char in '";<>':
                raise self.fail(f"unescaped {char!r} at position {self.pos + 1}: write it as \\{char}")
            value += char.encode("utf-8")
            if char != " ":
                keep = len(value)
            self.pos += 1
        try:
            return bytes(value[:keep]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("the \\XX escapes do not form UTF-8 text") from None
