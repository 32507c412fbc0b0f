"""Subjects: RFC 4514 parsing, the directory profile, encodings as ``openssl req`` writes them."""

from __future__ import annotations

import subprocess

import pytest
from asn1crypto import csr, x509

from agent.errors import InputError
from agent.x509.subject import directory_subject, parse_subject, rfc4514
from tests.x509_helpers import ARABIC_NAME, CLIENT_ID, ORG_ID


def der_order(name: x509.Name) -> list[tuple[str, str, str]]:
    """(type, ASN.1 string type, value) for each RDN in DER order (single-valued RDNs)."""
    out = []
    for rdn in name.chosen:
        (atv,) = list(rdn)
        value = atv["value"]
        kind = value.name if isinstance(value, x509.DirectoryString) else type(value).__name__
        out.append((atv["type"].native, kind, value.native))
    return out


def test_directory_profile_order_and_encodings() -> None:
    name = directory_subject(ARABIC_NAME, ORG_ID, CLIENT_ID)
    assert der_order(name) == [
        ("country_name", "printable_string", "AE"),
        ("organization_name", "utf8_string", ARABIC_NAME),
        ("organizational_unit_name", "utf8_string", ORG_ID),
        ("common_name", "utf8_string", CLIENT_ID),
    ]


def test_rfc4514_string_is_read_last_to_first() -> None:
    text = f"CN={CLIENT_ID},OU={ORG_ID},O=Acme\\, Inc.,C=AE"
    assert parse_subject(text).dump() == directory_subject("Acme, Inc.", ORG_ID, CLIENT_ID).dump()
    assert rfc4514(parse_subject(text)) == text  # shown as it is typed


def test_same_der_as_openssl_req() -> None:
    """The directory's own recipe is ``openssl req -subj /C=AE/O=…/OU=…/CN=…``: the names must be byte-identical."""
    subj = f"/C=AE/O={ARABIC_NAME}/OU={ORG_ID}/CN={CLIENT_ID}"
    # -keyout /dev/null: the throwaway key of this comparison is never written anywhere.
    out = subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                          "-nodes", "-keyout", "/dev/null", "-utf8", "-subj", subj, "-outform", "DER"],
                         capture_output=True, check=True, timeout=30).stdout
    theirs = csr.CertificationRequest.load(out)["certification_request_info"]["subject"]
    assert directory_subject(ARABIC_NAME, ORG_ID, CLIENT_ID).dump() == theirs.dump()


@pytest.mark.parametrize("text,expected", [
    (r"CN=a\,b\+c\;d\<e\>f\"g\\h\=i", [("common_name", 'a,b+c;d<e>f"g\\h=i')]),
    (r"CN=\ lead and trail\ ", [("common_name", " lead and trail ")]),
    (r"CN=  spaced  ,  O = Org ", [("organization_name", "Org"), ("common_name", "spaced")]),
    (r"CN=caf\C3\A9", [("common_name", "café")]),
    (r"CN=\#not hex", [("common_name", "#not hex")]),
    ("CN=#0C0548656C6C6F", [("common_name", "Hello")]),
    ("2.5.4.3=dotted,2.5.4.6=AE", [("country_name", "AE"), ("common_name", "dotted")]),
    ("commonName=long,organizationIdentifier=OFBAE-123,L=Dubai,ST=Dubai",
     [("state_or_province_name", "Dubai"), ("locality_name", "Dubai"), ("organization_identifier", "OFBAE-123"),
      ("common_name", "long")]),
    ("CN=x,serialNumber=ABC 123", [("serial_number", "ABC 123"), ("common_name", "x")]),
])
def test_rfc4514_values(text: str, expected: list[tuple[str, str]]) -> None:
    got = [(t, v) for t, _, v in der_order(parse_subject(text))]
    assert got == expected


def test_multi_valued_rdn_and_unknown_oid() -> None:
    name = parse_subject("CN=x+UID=y,1.2.3.4=free text,C=AE")
    rdns = list(name.chosen)
    assert [len(list(r)) for r in rdns] == [1, 1, 2]
    assert {atv["type"].native: atv["value"].native for atv in rdns[2]} == {"common_name": "x", "user_id": "y"}
    unknown = next(iter(rdns[1]))
    assert unknown["type"].dotted == "1.2.3.4" and unknown["value"].native == "free text"
    assert rfc4514(name) == "CN=x+UID=y,1.2.3.4=free text,C=AE"


def test_rfc4514_is_what_cryptography_prints() -> None:
    """The agent shows subjects from asn1crypto (CSRs) and from cryptography (the transport): the same text."""
    from cryptography import x509 as cx509
    from cryptography.x509.oid import NameOID

    org = '#Acme, Inc. "+;<>\\ '
    ours = rfc4514(directory_subject(org, ORG_ID, CLIENT_ID))
    theirs = cx509.Name([cx509.NameAttribute(NameOID.COUNTRY_NAME, "AE"),
                         cx509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         cx509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ORG_ID),
                         cx509.NameAttribute(NameOID.COMMON_NAME, CLIENT_ID)]).rfc4514_string()
    assert ours == theirs
    assert parse_subject(ours).dump() == directory_subject(org, ORG_ID, CLIENT_ID).dump()


def test_encodings_follow_openssl_utf8only() -> None:
    name = parse_subject("emailAddress=ops@example.ae,DC=example,serialNumber=42,CN=Zoë,C=AE")
    kinds = {t: k for t, k, _ in der_order(name)}
    assert kinds == {"country_name": "printable_string", "common_name": "utf8_string",
                     "serial_number": "printable_string", "domain_component": "DNSName",
                     "email_address": "EmailAddress"}
    assert x509.Name.load(name.dump()).native["common_name"] == "Zoë"


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("CN", "expected TYPE=VALUE"),
    ("CN=a,,O=b", "empty RDN at position 6"),
    ("CN=a,", "empty RDN"),
    ("=a", "attribute type missing"),
    ("XX=a", "unknown attribute type 'XX'"),
    ("CN=a;O=b", "unescaped ';'"),
    ('CN=say "hi"', "unescaped '\"'"),
    ("CN=a\\", "invalid escape"),
    ("CN=a\\q", "invalid escape"),
    ("CN=\\FF\\FE", "not form UTF-8"),
    ("CN=#0C0", "even number of hex digits"),
    ("CN=#zz", "even number of hex digits"),
    ("CN=#0C05", "not one valid BER element"),
    ("CN=", "CN has an empty value"),
    ("CN=a,C=ae", "two-letter ISO 3166"),
    ("CN=a,C=ARE", "two-letter ISO 3166"),
    ("serialNumber=a_b", "PrintableString"),
    ("emailAddress=é@x", "must be ASCII"),
    ("CN=" + "x" * 65, "at most 64"),
    ("CN=a\\0Ab", "control character"),
])
def test_malformed_subjects_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(")) as caught:
        parse_subject(text)
    assert "\n" not in str(caught.value)
    assert caught.value.hint


@pytest.mark.parametrize("client_id", ["nope", CLIENT_ID[:-1], "{" + CLIENT_ID + "}", CLIENT_ID.replace("-", "")])
def test_directory_profile_needs_a_uuid_client_id(client_id: str) -> None:
    with pytest.raises(InputError, match="is not a UUID"):
        directory_subject("Acme", ORG_ID, client_id)


def test_directory_profile_checks_values() -> None:
    with pytest.raises(InputError, match="O has an empty value"):
        directory_subject(" ", ORG_ID, CLIENT_ID)
    with pytest.raises(InputError, match="O is 65 characters"):
        directory_subject("x" * 65, ORG_ID, CLIENT_ID)
    with pytest.raises(InputError, match="two-letter"):
        directory_subject("Acme", ORG_ID, CLIENT_ID, country="UAE")
