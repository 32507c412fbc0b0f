"""Bank configuration and discovery against the model bank, over mTLS with a token key."""

from __future__ import annotations

import datetime
import json

import pytest

from agent import config as config_module
from agent.errors import ConfigError
from agent.openfinance.banks import UnknownBankError, find_bank, parse_banks
from agent.openfinance.discovery import DiscoveryDocument, DiscoveryError, IssuerMismatchError
from agent.openfinance.service import OpenFinance
from modelbank import Behaviour, ModelBank
from modelbank.server import DISCOVERY_PATH
from tests.openfinance.conftest import BANK, Tpp


def test_discovery_fetches_checks_issuer_and_caches(service: OpenFinance, bank: ModelBank) -> None:
    discovery = service.discovery(BANK)
    doc = discovery.get()
    assert doc.issuer == bank.issuer
    assert doc.endpoint("registration_endpoint", False) == bank.url + "/tpp-registration"
    stored = json.loads(discovery.cache_file.read_text())
    assert stored["document"]["issuer"] == bank.issuer and stored["url"] == bank.discovery_url
    assert datetime.datetime.fromisoformat(stored["fetched_at"]) == doc.fetched_at
    assert all(iid for _, _, iid in bank.requests), "every request carries x-fapi-interaction-id"

    again = service.discovery(BANK).get()
    assert again.fetched_at == doc.fetched_at and len(bank.requests) == 1, "a fresh cached document is reused"


def test_stale_document_is_fetched_again(service: OpenFinance, bank: ModelBank) -> None:
    discovery = service.discovery(BANK)
    first = discovery.get()
    stored = json.loads(discovery.cache_file.read_text())
    stored["fetched_at"] = (first.fetched_at - datetime.timedelta(minutes=16)).isoformat()  # default TTL: 15 min
    discovery.cache_file.write_text(json.dumps(stored))
    second = discovery.get()
    assert second.fetched_at > first.fetched_at and len(bank.requests) == 2
    assert discovery.get(refresh=True).fetched_at > second.fetched_at and len(bank.requests) == 3


def test_configured_ttl_and_changed_url_refetch(tpp: Tpp, bank: ModelBank) -> None:
    service = tpp.service(bank, discovery_ttl=3600)
    try:
        first = service.discovery(BANK).get()
        stored = json.loads(service.discovery(BANK).cache_file.read_text())
        stored["fetched_at"] = (first.fetched_at - datetime.timedelta(minutes=30)).isoformat()
        stored["url"] = "https://old.invalid/.well-known/openid-configuration"
        service.discovery(BANK).cache_file.write_text(json.dumps(stored))
        assert service.discovery(BANK).get().url == bank.discovery_url  # fetched again: the URL changed
        assert len(bank.requests) == 2
    finally:
        service.close()


def test_issuer_mismatch_is_refused_and_not_cached(service: OpenFinance, bank: ModelBank) -> None:
    bank.behaviour = Behaviour.failing("wrong-issuer")
    discovery = service.discovery(BANK)
    with pytest.raises(IssuerMismatchError, match=r"issuer is 'https://impostor.invalid', expected") as caught:
        discovery.get()
    assert "x-fapi-interaction-id" in str(caught.value) and caught.value.hint
    assert not discovery.cache_file.exists()
    bank.behaviour = Behaviour()
    assert discovery.get().issuer == bank.issuer


def test_mtls_aliases_picked_when_configured_and_present(tpp: Tpp, bank: ModelBank) -> None:
    service = tpp.service(bank, use_mtls_aliases=True)
    try:
        doc = service.discovery(BANK).get()
        assert doc.endpoint("registration_endpoint", True) == bank.url + "/mtls/tpp-registration"
        assert doc.endpoint("token_endpoint", False) == bank.url + "/token"
    finally:
        service.close()
    without = DiscoveryDocument("b", "https://x", doc.fetched_at,
                                {k: v for k, v in doc.document.items() if k != "mtls_endpoint_aliases"})
    assert without.endpoint("registration_endpoint", True) == bank.url + "/tpp-registration"


@pytest.mark.parametrize("table,message", [
    ({"issuer": "https://x"}, "lacks discovery_url"),
    ({"discovery_url": "http://x/.well-known/openid-configuration", "issuer": "https://x", "ca_bundle": "ca.pem"},
     "must be an https:// URL"),
    ({"discovery_url": "https://x/d", "issuer": "https://x", "ca_bundle": "ca.pem", "use_mtls_alias": True},
     "unknown setting"),
    ({"discovery_url": "https://x/d", "issuer": "https://x", "ca_bundle": "ca.pem", "discovery_ttl": -1},
     "discovery_ttl must be a positive"),
    ({"discovery_url": "https://x/d", "issuer": "https://x"}, "needs ca_bundle"),
])
def test_bank_config_errors_are_clear(table: dict[str, object], message: str) -> None:
    config = config_module.parse({"banks": {"b1": table}})
    with pytest.raises(ConfigError, match=message):
        find_bank(parse_banks(config), "b1")


def test_unknown_bank_names_the_configured_ones() -> None:
    config = config_module.parse({"banks": {"alpha": {"discovery_url": "https://a/d", "issuer": "https://a",
                                                      "ca_bundle": "ca.pem"}}})
    with pytest.raises(UnknownBankError, match=r"no bank 'beta'.*configured: alpha"):
        find_bank(parse_banks(config), "beta")


def test_a_5xx_storm_is_ridden_out_with_back_off_and_a_longer_one_fails_clearly(service: OpenFinance,
                                                                                 bank: ModelBank) -> None:
    bank.discovery_failures = 2  # fewer than the retries: the caller never sees them
    assert service.discovery(BANK).get(refresh=True).issuer == bank.issuer
    gets = [r for r in bank.requests if r[1] == DISCOVERY_PATH]
    assert len(gets) == 3 and len({r[2] for r in gets}) == 3  # each attempt its own interaction id

    bank.discovery_failures = 10
    with pytest.raises(DiscoveryError) as caught:
        service.discovery(BANK).get(refresh=True)
    last = [r for r in bank.requests if r[1] == DISCOVERY_PATH][-1]
    assert "HTTP 503" in str(caught.value) and last[2] in str(caught.value)
    assert len([r for r in bank.requests if r[1] == DISCOVERY_PATH]) == 6  # bounded: 3 attempts, no more
    assert bank.discovery_failures == 7
