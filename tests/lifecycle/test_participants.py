"""The directory's participants list: parsed tolerantly of extra fields and strictly of required ones; matched to
the configured banks by issuer; written as a banks file that the configuration includes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_module
from agent.errors import ConfigError
from agent.lifecycle import participants
from agent.lifecycle.participants import ParticipantsError
from agent.openfinance.banks import parse_banks
from tests.lifecycle.participants_data import organisation, server

BANK_ONE, BANK_TWO = "https://auth.bank-one.example", "https://auth.bank-two.example"


def _document() -> list[dict[str, Any]]:
    return [
        organisation("org-1", "Bank One PJSC", [server("Bank One", BANK_ONE, "as-1"),
                                                server("Bank One Business", BANK_ONE + "/business", "as-2")]),
        organisation("org-2", "Bank Two", [server("Bank Two", BANK_TWO, "as-3"),
                                           server("Bank Two Old", BANK_TWO + "/old", "as-4", Status="Inactive")]),
        organisation("org-3", "A TPP", []),
        organisation("org-4", "Gone Bank", [server("Gone", "https://gone.example", "as-5")], Status="Withdrawn"),
    ]


def test_every_active_authorisation_server_of_every_active_organisation() -> None:
    servers = participants.parse(json.dumps(_document()).encode(), "participants.json")
    assert [(s.organisation_id, s.server_id, s.name, s.issuer) for s in servers] == [
        ("org-1", "as-1", "Bank One", BANK_ONE), ("org-1", "as-2", "Bank One Business", BANK_ONE + "/business"),
        ("org-2", "as-3", "Bank Two", BANK_TWO)]
    assert servers[0].discovery_url == BANK_ONE + "/.well-known/openid-configuration"
    [resource] = servers[0].api_resources
    assert (resource.family, resource.version, resource.endpoints) == ("accounts", "1.0",
                                                                       (BANK_ONE + "/open-finance/accounts",))


@pytest.mark.parametrize("mangle,message", [
    (lambda d: {"organisations": d}, "not the directory's participants list: it is a JSON dict"),
    (lambda d: [*d[:1], "text"], "organisation 2 is not a JSON object"),
    (lambda d: [{**d[0], "OrganisationId": None}], "organisation 1: OrganisationId must be a non-empty string"),
    (lambda d: [{k: v for k, v in d[0].items() if k != "AuthorisationServers"}],
     "organisation org-1 (Bank One PJSC): AuthorisationServers must be an array, and is missing"),
    (lambda d: [{**d[0], "AuthorisationServers": [{**d[0]["AuthorisationServers"][0], "Issuer": ""}]}],
     "authorisation server 1: Issuer must be a non-empty string"),
    (lambda d: [{**d[0], "AuthorisationServers": [{**d[0]["AuthorisationServers"][0],
                                                   "OpenIDDiscoveryDocument": "http://bank/.well-known/x"}]}],
     "OpenIDDiscoveryDocument must be an https:// URL, got 'http://bank/.well-known/x'"),
    (lambda d: [{**d[0], "AuthorisationServers": [{**d[0]["AuthorisationServers"][0],
                                                   "ApiResources": [{"ApiFamilyType": "x", "ApiVersion": True}]}]}],
     "ApiVersion must be a string or a number"),
])
def test_a_document_not_of_the_directorys_shape_is_a_clear_error(mangle: Any, message: str) -> None:
    with pytest.raises(ParticipantsError) as caught:
        participants.parse(json.dumps(mangle(_document())).encode(), "p.json")
    assert message in str(caught.value) and str(caught.value).startswith("p.json")
    assert "participants JSON" in caught.value.hint


def test_not_json_and_too_large() -> None:
    with pytest.raises(ParticipantsError, match=r"p\.html is not JSON"):
        participants.parse(b"<html>login</html>", "p.html")
    with pytest.raises(ParticipantsError, match="larger than 32 MiB"):
        participants.parse(b" " * (participants.MAX_BYTES + 1), "big")


def _config(tmp_path: Path, include: str, tables: str = "") -> config_module.Config:
    path = tmp_path / "config.toml"
    path.write_text(f'include = {include}\n[state]\ndir = "{tmp_path / "state"}"\n{tables}')
    return config_module.load(str(path))


def test_the_banks_file_is_included_and_matched_by_issuer(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here")
    servers = participants.parse(json.dumps(_document()).encode(), "p.json")
    named = participants.bank_names(servers, taken=["bank-two"])
    assert list(named) == ["bank-one", "bank-one-business", "bank-two-as3"]
    (tmp_path / "banks.toml").write_text(participants.banks_file(named, str(ca), "p.json"))
    config = _config(tmp_path, '["banks.toml"]', '[banks.mine]\ndiscovery_url = "https://mine.example/d"\n'
                               f'issuer = "https://mine.example"\nca_bundle = "{ca}"\n')
    banks = parse_banks(config)
    assert sorted(banks) == ["bank-one", "bank-one-business", "bank-two-as3", "mine"]
    assert banks["bank-one"].issuer == BANK_ONE and banks["bank-one"].tls.ca_bundle == ca
    diff = participants.difference(servers, banks)
    assert [b.name for b in diff.unlisted] == ["mine"] and not diff.added and not diff.changed
    assert not diff.in_sync and len(diff.unchanged) == 3


def test_include_errors(tmp_path: Path) -> None:
    (tmp_path / "banks.toml").write_text('[banks.mine]\ndiscovery_url = "https://x.example/d"\nissuer = "x"\n')
    with pytest.raises(ConfigError, match=r"\[banks.mine\] is defined twice: in .*config.toml and in .*banks.toml"):
        _config(tmp_path, '["banks.toml"]', '[banks.mine]\nissuer = "y"\n')
    with pytest.raises(ConfigError, match=r"banks file .*missing\.toml .* not found") as missing:
        _config(tmp_path, '["missing.toml"]')
    assert "banks sync" in missing.value.hint
    (tmp_path / "other.toml").write_text('[daemon]\nsocket = "/tmp/x"\n')
    with pytest.raises(ConfigError, match=r"may hold only \[banks\.NAME\] tables, found daemon"):
        _config(tmp_path, '["other.toml"]')
    with pytest.raises(ConfigError, match="include must be a list of banks file paths"):
        _config(tmp_path, '"banks.toml"')
    assert _config(tmp_path, '["banks.d/*.toml"]').section("banks") == {}
