"""The settings of signed and encrypted messages: ``[tokens] encryption_key`` and ``[banks.NAME] jwks_ttl``."""

from __future__ import annotations

from typing import Any

import pytest

from agent import sections
from agent.openfinance.banks import DEFAULT_JWKS_TTL

BANK = {"discovery_url": "https://bank.example/.well-known/openid-configuration", "issuer": "https://bank.example",
        "ca_bundle": "/dev/null", "client_key": "transport"}


def parse(keys: dict[str, Any], tokens: dict[str, Any] | None = None, **bank: Any) -> sections.Sections:
    raw: dict[str, Any] = {"keys": {alias: {"uri": f"pkcs11:object={alias}", **entry} for alias, entry in keys.items()},
                           "banks": {"mb": {**BANK, **bank}}}
    if tokens is not None:
        raw["tokens"] = tokens
    return sections.parse(raw)


def test_the_event_key_must_be_an_encryption_key() -> None:
    with pytest.raises(sections.ConfigProblems, match=r"\[tokens\] encryption_key 'events' is a jws key"):
        parse({"transport": {}, "events": {}}, {"encryption_key": "events"})
    # The default alias, a jws key of a configuration older than events: it loads (receive_event refuses it).
    assert parse({"transport": {}, "encryption": {}}).config.keys["encryption"].purpose == "jws"
    loaded = parse({"transport": {}, "encryption": {"purpose": "encryption"}})
    assert loaded.tokens.encryption_key == "encryption"


@pytest.mark.parametrize("ttl", [0, -1, 86401, True, "300"])
def test_jwks_ttl_is_a_bounded_number_of_seconds(ttl: object) -> None:
    with pytest.raises(sections.ConfigProblems, match="jwks_ttl must be a number of seconds from 1 to 86400"):
        parse({"transport": {}}, jwks_ttl=ttl)


def test_jwks_ttl_defaults_to_five_minutes() -> None:
    assert parse({"transport": {}}).banks["mb"].jwks_ttl == DEFAULT_JWKS_TTL == 300
    assert parse({"transport": {}}, jwks_ttl=60).banks["mb"].jwks_ttl == 60
