"""``tpp-agent jwks`` and ``sign-jws`` as a user runs them (real console script, real token)."""

from __future__ import annotations

import json

import jwt

from agent.errors import ExitStatus
from tests.jose.conftest import JoseToken


def test_jwks_and_sign_jws_from_stdin(jose_token: JoseToken) -> None:
    cli = jose_token.token.cli
    keyset = jwt.PyJWKSet.from_dict(json.loads(cli("jwks", "--key", "signing", "--key", "es", check=True).stdout))
    assert len(keyset.keys) == 2
    for key_name in ("signing", "es"):
        token = cli("sign-jws", "--key", key_name, "--payload", "-", "--header", '{"typ":"JOSE"}',
                    input='{"amount":"10.00"}', check=True).stdout.strip()
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "JOSE"
        key = keyset[header["kid"]]
        assert jwt.api_jws.decode(token, key.key, algorithms=[key.algorithm_name]) == b'{"amount":"10.00"}'


def test_sign_jws_errors_are_one_line_with_a_hint(jose_token: JoseToken) -> None:
    cli = jose_token.token.cli
    refused = cli("sign-jws", "--key", "signing", "--alg", "RS256", "--payload", "-", input="{}")
    assert refused.returncode == ExitStatus.DATAERR and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        "error: key 'signing' may not sign with RS256 (allowed: PS256)",
        "hint: add 'RS256' to [keys.signing] algorithms if the bank really requires it",
    ]
    missing = cli("sign-jws", "--key", "signing", "--payload", "/nonexistent/payload.json")
    assert missing.returncode == ExitStatus.DATAERR
    assert "error: --payload: cannot read /nonexistent/payload.json" in missing.stderr
    bad_header = cli("sign-jws", "--key", "es", "--payload", "-", "--header", "[1]", input="{}")
    assert bad_header.returncode == ExitStatus.DATAERR and "error: --header must be a JSON object" in bad_header.stderr
    unknown = cli("jwks", "--key", "nope")
    # JOSE keys are configured ones (each with its purpose): the error lists them.
    assert unknown.returncode == ExitStatus.NOINPUT and unknown.stderr.splitlines() == [
        "error: no key 'nope' is configured", "hint: configured keys: bare, es, es384, signing"]
