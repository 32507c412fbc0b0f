"""Hostile input to subject parsing and certificate import: a clear InputError or success, never a
crash, and a refused import leaves the token exactly as it was."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import InputError
from agent.runtime import Runtime
from agent.x509.certificates import import_certificate
from agent.x509.subject import parse_subject, rfc4514
from pkcs11_backends.errors import Pkcs11Error
from pkcs11_backends.keys import KeySpec
from tests.test_x509_certificates import certificate_objects
from tests.x509_helpers import TestCA, pem_of, spki_der

SUBJECT_PIECES = st.sampled_from(["CN", "OU", "O", "C", "L", "ST", "2.5.4.3", "1.2.3", "cn", "X", "=", ",", "+",
                                  "\\", "\\,", "\\2C", "#04", "#", " ", "\"", "AE", "Org, Inc.", "\x00", "é"])


@given(st.lists(SUBJECT_PIECES | st.text(max_size=12), max_size=14).map("".join))
@settings(max_examples=300)
def test_subject_parser_accepts_or_says_why(text: str) -> None:
    try:
        name = parse_subject(text)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert parse_subject(text).dump() == name.dump()  # the same text always gives the same DER
        shown = rfc4514(name)  # what was accepted is shown as RFC 4514, and that reads back as itself
        assert rfc4514(parse_subject(shown)) == shown and "\n" not in shown


def _garbled(pem: bytes) -> st.SearchStrategy[bytes]:
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    return st.one_of(
        st.binary(max_size=400),
        st.binary(max_size=200).map(lambda b: b"-----BEGIN CERTIFICATE-----\n" + base64.b64encode(b) +
                                    b"\n-----END CERTIFICATE-----\n"),
        st.tuples(st.integers(0, len(der) - 1), st.integers(1, 255)).map(
            lambda p: der[:p[0]] + bytes([der[p[0]] ^ p[1]]) + der[p[0] + 1:]),  # one byte flipped
        st.integers(1, len(der) - 1).map(lambda n: der[:n]),  # truncated
        st.integers(10, len(pem) - 10).map(lambda n: pem[:n]),  # truncated PEM
    )


def test_garbled_certificates_are_refused_and_the_token_is_unchanged(runtime: Runtime) -> None:
    key = str(runtime.keys.generate("fuzz", KeySpec.parse("ec:p256")).uri)
    good = pem_of(TestCA().issue(spki_der(runtime, key)))
    results: list[str] = []

    @given(_garbled(good))
    @settings(max_examples=120)
    def attempt(data: bytes) -> None:
        before = certificate_objects(runtime)
        try:
            import_certificate(runtime.keys, key, data, "fuzz.pem")
        except (InputError, Pkcs11Error) as exc:
            assert str(exc)
            assert certificate_objects(runtime) == before  # nothing half-written
            results.append("refused")
        else:  # a flipped byte in a signature-irrelevant spot may still be a valid certificate for the key
            results.append("imported")

    attempt()
    assert "refused" in results
