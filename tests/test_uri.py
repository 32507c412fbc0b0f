"""RFC 7512 pkcs11: URIs: examples from the RFC, round-trips, and hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkcs11_backends.errors import UriError
from pkcs11_backends.uri import ObjectType, Pkcs11Uri


def test_rfc7512_examples() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;"
                          "manufacturer=Snake%20Oil,%20Inc.;model=1.0;object=my-certificate;type=cert;"
                          "id=%69%95%3E%5C%F4%BD%EC%91;serial=")
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.object == "my-certificate"
    assert uri.type is ObjectType.CERT
    assert uri.id == bytes.fromhex("69953e5cf4bdec91")
    assert Pkcs11Uri.parse("pkcs11:object=my%2Dkey").object == "my-key"
    assert Pkcs11Uri.parse("pkcs11:").token is None
    assert Pkcs11Uri.parse("pkcs11:object=k?module-path=/usr/lib/softhsm/libsofthsm2.so").module_path \
        == "/usr/lib/softhsm/libsofthsm2.so"


@pytest.mark.parametrize("text,message", [
    ("file:///etc/passwd", "not a pkcs11: URI"),
    ("pkcs11:object", "without '='"),
    ("pkcs11:colour=blue", "unknown pkcs11: URI attribute 'colour'"),
    ("pkcs11:object=a;object=b", "given twice"),
    ("pkcs11:type=wallet", "type must be one of"),
    ("pkcs11:id=%G1", "bad percent-escape"),
    ("pkcs11:object=%FF%FE", "not UTF-8"),
    ("pkcs11:object=k?pin-value=1234", "carries a PIN"),
    ("pkcs11:object=k?pin-source=file:/x", "unsupported pkcs11: URI query attribute"),
])
def test_malformed_uris_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        Pkcs11Uri.parse(text)


labels = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)


@given(token=labels, obj=labels, key_id=st.binary(min_size=1, max_size=20), kind=st.sampled_from(ObjectType))
def test_format_then_parse_round_trips(token: str, obj: str, key_id: bytes, kind: ObjectType) -> None:
    uri = Pkcs11Uri(token=token, object=obj, id=key_id, type=kind)
    assert Pkcs11Uri.parse(str(uri)) == uri


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_uri_error(text: str) -> None:
    for candidate in (text, "pkcs11:" + text):
        with contextlib.suppress(UriError):
            Pkcs11Uri.parse(candidate)
