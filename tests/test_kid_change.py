"""`cert import` warns, in one line, when it changes the kid the key signs with (RFC 7638 thumbprint before the
first certificate, x5t#S256 after; a new certificate, a new x5t#S256): a JWKS published before no longer matches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.jose.keys import cert_thumbprint
from tests.conftest import Token
from tests.test_cli_x509 import KEY, public_key_der, write
from tests.x509_helpers import TestCA, pem_of


@pytest.fixture
def key_token(token: Token) -> Token:
    token.cli("keys", "generate", "--label", "transport", "--type", "rsa:2048", check=True)
    token.write_config(f'[keys.transport]\nuri = "{KEY}"\npurpose = "jws"\n')  # a JWKS publishes jws keys only
    return token


def kid(tok: Token) -> str:
    [key] = json.loads(tok.cli("jwks", "--key", "transport", check=True).stdout)["keys"]
    return str(key["kid"])


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def test_the_first_certificate_changes_the_kid_and_says_so(key_token: Token, tmp_path: Path) -> None:
    before = kid(key_token)
    ca = TestCA("Kid CA")
    leaf = ca.issue(public_key_der(key_token))
    bundle = write(tmp_path / "leaf.pem", pem_of(leaf))
    imported = key_token.cli("cert", "import", "--key", KEY, bundle, check=True)
    after = kid(key_token)
    assert after != before and after == cert_thumbprint(leaf.public_bytes(serialization.Encoding.DER))
    [warning] = warnings(imported.stderr)
    assert f"now signs with kid {after!r} (was {before!r})" in warning
    assert f"publish `tpp-agent jwks --key {KEY}` again" in warning and 'kid = "thumbprint"' in warning

    again = key_token.cli("cert", "import", "--key", KEY, bundle, check=True)
    assert warnings(again.stderr) == [] and kid(key_token) == after  # nothing changed: nothing to say

    newer = write(tmp_path / "newer.pem", pem_of(ca.issue(public_key_der(key_token))))
    rotated = key_token.cli("cert", "import", "--key", KEY, newer, "--replace", check=True)
    [warning] = warnings(rotated.stderr)
    assert f"(was {after!r})" in warning and 'kid = "thumbprint"' not in warning


def test_a_configured_kid_does_not_change(key_token: Token, tmp_path: Path) -> None:
    key_token.write_config(f'[keys.transport]\nuri = "{KEY}"\npurpose = "jws"\nkid = "thumbprint"\n')
    before = kid(key_token)
    bundle = write(tmp_path / "leaf.pem", pem_of(TestCA("Kid CA").issue(public_key_der(key_token))))
    imported = key_token.cli("cert", "import", "--key", KEY, bundle, check=True)
    assert warnings(imported.stderr) == [] and kid(key_token) == before

