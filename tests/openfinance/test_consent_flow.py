"""The consent flow end to end at library level: token keys, the agent's mTLS transport, the strict model bank.

PAR → the authorization endpoint (driven headlessly: the test follows the bank's 302 like a browser) → the
callback → the code exchange → the id_token → refresh with rotation; each negative case of issue 19 against
the bank's real behaviour. The request objects the agent signs are read back by the bank with PyJWT.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.jose.errors import (
    ExpiredError,
    NonceMismatchError,
    SignatureInvalidError,
    UnknownKidError,
)
from agent.openfinance.authorization import ConsentClient, ConsentTokens, StartedConsent
from agent.openfinance.consent import (
    AuthorizationDeniedError,
    CallbackIssuerError,
    PendingAuthorizations,
    UnknownStateError,
    code_exchange_form,
)
from agent.openfinance.flow_state import StatePendingStore
from agent.openfinance.tokens import InvalidGrantError, TokenError
from agent.runtime import Runtime
from agent.state.sqlite import SqliteStore
from modelbank.token_endpoint import x5t_s256
from tests.openfinance.bank_world import REDIRECT_URI, World, open_world, reset_knobs

DETAILS = [{"type": "urn:openfinanceuae:account-access-consent:v2.1",
            "consent": {"Permissions": ["ReadAccountsBasic"], "ExpirationDateTime": "2027-01-01T00:00:00Z"}}]
RESOURCE = "https://api.bank.example/open-finance/account-information/v2.1"


@pytest.fixture(scope="module")
def world(shared_runtime: Runtime, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with open_world(shared_runtime, tmp_path_factory.mktemp("consent-bank")) as opened:
        yield opened


@pytest.fixture(autouse=True)
def strict_bank(world: World) -> Iterator[None]:
    """Each test starts from the bank's normal behaviour and leaves it so."""
    yield
    reset_knobs(world.bank)


def start(consents: ConsentClient, **parameters: Any) -> StartedConsent:
    return consents.par(scope="openid accounts", redirect_uri=REDIRECT_URI, authorization_details=DETAILS,
                        parameters=parameters or None)


def complete(world: World, consents: ConsentClient, **parameters: Any) -> ConsentTokens:
    return consents.callback(world.authorize(start(consents, **parameters)))


def test_consent_flow_end_to_end(world: World) -> None:
    world.bank.tokens.require_resource = True
    consents = world.consents()
    started = start(consents, resource=RESOURCE, prompt="consent", max_age=600, acr_values="urn:openbanking:psd2:sca",
                    claims={"id_token": {"acr": {"essential": True}}})
    # The URL the customer is sent to; the verifier never leaves the agent.
    url = urllib.parse.urlsplit(started.authorization_url)
    query = urllib.parse.parse_qs(url.query)
    assert url.path == "/authorize" and query["client_id"] == [world.client_id]
    assert query["request_uri"] == [started.request_uri] and "code_verifier" not in str(started.as_dict())
    pushed = world.bank.tokens.pushed[started.request_uri].claims
    assert pushed["resource"] == RESOURCE and pushed["max_age"] == 600 and pushed["prompt"] == "consent"
    assert pushed["code_challenge_method"] == "S256" and pushed["state"] == started.state
    assert len(consents.pending) == 1

    tokens = consents.callback(world.authorize(started))
    assert len(consents.pending) == 0
    assert tokens.token_type == "Bearer" and tokens.expires_in == 300 and tokens.refresh_token
    consent = tokens.authorization_details[0]["consent"]
    assert consent["Status"] == "Authorized" and consent["Permissions"] == ["ReadAccountsBasic"]
    claims = tokens.id_token_claims
    assert claims is not None and claims["iss"] == world.bank.issuer and claims["aud"] == [world.client_id]
    # Certificate-bound: the bank recorded the transport certificate's thumbprint, and the token works over it.
    issued = world.bank.tokens.issued[tokens.access_token]
    certificate = world.runtime.keys.info(world.transport_uri).certificate
    assert certificate is not None
    assert issued.consent_id == consent["ConsentId"] and issued.cnf_x5t_s256 == x5t_s256(certificate.der)
    assert world.bearer_works(tokens.access_token)


def test_callback_served_by_another_process_than_the_par(world: World, tmp_path: Path) -> None:
    """Serving processes (and hosts) share the pending authorizations through the state store."""
    par_side = ConsentClient(world.tokens(), world.bank_jwks(),
                             PendingAuthorizations(store=StatePendingStore(SqliteStore(tmp_path / "state.db"))))
    callback_side = ConsentClient(world.tokens(), world.bank_jwks(),
                                  PendingAuthorizations(store=StatePendingStore(SqliteStore(tmp_path / "state.db"))))
    query = world.authorize(start(par_side))
    assert callback_side.callback(query).authorization_details[0]["consent"]["Status"] == "Authorized"
    with pytest.raises(UnknownStateError):
        par_side.callback(query)


def test_par_without_resource_is_refused_by_a_strict_bank(world: World) -> None:
    world.bank.tokens.require_resource = True
    with pytest.raises(TokenError, match="resource is required"):
        start(world.consents())


def test_state_mismatch_is_refused_and_the_real_callback_still_works(world: World) -> None:
    consents = world.consents()
    query = world.authorize(start(consents))
    forged = urllib.parse.urlencode({**dict(urllib.parse.parse_qsl(query)), "state": "not-ours"})
    with pytest.raises(UnknownStateError):
        consents.callback(forged)
    assert consents.callback(query).refresh_token


def test_iss_mismatch_is_refused_and_consumes_the_state(world: World) -> None:
    consents = world.consents()
    query = world.authorize(start(consents))
    mixed_up = urllib.parse.urlencode({**dict(urllib.parse.parse_qsl(query)), "iss": "https://other-bank.example"})
    with pytest.raises(CallbackIssuerError, match="other-bank"):
        consents.callback(mixed_up)
    with pytest.raises(UnknownStateError):
        consents.callback(query)  # a redirect that failed a check is not tried again


def test_missing_iss_is_refused(world: World) -> None:
    consents = world.consents()
    query = dict(urllib.parse.parse_qsl(world.authorize(start(consents))))
    del query["iss"]
    with pytest.raises(CallbackIssuerError, match="no iss"):
        consents.callback(query)


def test_denied_consent_comes_back_as_an_error(world: World) -> None:
    world.bank.authorization.decision = "access_denied"
    consents = world.consents()
    with pytest.raises(AuthorizationDeniedError) as denied:
        complete(world, consents)
    assert denied.value.error == "access_denied" and "did not consent" in denied.value.description
    assert len(consents.pending) == 0


def test_replayed_callback_is_refused_by_the_agent(world: World) -> None:
    consents = world.consents()
    query = world.authorize(start(consents))
    consents.callback(query)
    with pytest.raises(UnknownStateError):
        consents.callback(query)


def test_replayed_code_is_refused_by_the_bank_and_revokes_its_tokens(world: World) -> None:
    consents = world.consents()
    grant = consents.pending.take_callback(world.authorize(start(consents)), "mb")
    first, _ = consents.tokens.exchange(code_exchange_form(grant), "authorization code exchange")
    assert world.bearer_works(first["access_token"])
    with pytest.raises(InvalidGrantError, match="already used"):
        consents.tokens.exchange(code_exchange_form(grant), "authorization code exchange")
    assert not world.bearer_works(first["access_token"])


@pytest.mark.parametrize("change,message", [
    ({"code_verifier": "x" * 43}, "PKCE"),
    ({"redirect_uri": REDIRECT_URI + "/other"}, "redirect_uri"),
])
def test_code_exchange_must_match_the_request(world: World, change: dict[str, str], message: str) -> None:
    consents = world.consents()
    grant = consents.pending.take_callback(world.authorize(start(consents)), "mb")
    with pytest.raises(InvalidGrantError, match=message):
        consents.tokens.exchange({**code_exchange_form(grant), **change}, "authorization code exchange")


def test_wrong_nonce_is_refused(world: World) -> None:
    world.bank.authorization.id_token_nonce = "a-nonce-of-another-request"
    with pytest.raises(NonceMismatchError):
        complete(world, world.consents())


def test_expired_id_token_is_refused(world: World) -> None:
    world.bank.authorization.id_token_lifetime = -60
    with pytest.raises(ExpiredError, match="id_token: expired"):
        complete(world, world.consents())


def test_id_token_with_a_bad_signature_is_refused(world: World) -> None:
    world.bank.authorization.id_token_corrupt = True
    with pytest.raises(SignatureInvalidError):
        complete(world, world.consents())


def test_unknown_kid_costs_exactly_one_jwks_refetch(world: World) -> None:
    keys = world.bank_jwks()
    consents = world.consents(keys)
    complete(world, consents)  # the set is fetched and cached
    before = world.bank.jose.jwks_fetches
    world.bank.authorization.id_token_key = world.bank.jose.unpublished
    with pytest.raises(UnknownKidError, match=world.bank.jose.unpublished.kid):
        complete(world, consents)
    assert world.bank.jose.jwks_fetches == before + 1
    with pytest.raises(UnknownKidError):
        complete(world, consents)  # within the refetch interval: no second GET for a made-up kid
    assert world.bank.jose.jwks_fetches == before + 1


def test_a_rotated_bank_key_is_found_with_one_refetch(world: World) -> None:
    keys = world.bank_jwks()
    consents = world.consents(keys)
    complete(world, consents)
    before = world.bank.jose.jwks_fetches
    world.bank.jose.rotate()
    assert complete(world, consents).id_token_claims is not None
    complete(world, consents)
    assert world.bank.jose.jwks_fetches == before + 1


def test_refresh_rotates_and_a_replayed_old_token_revokes_the_consent(world: World) -> None:
    consents = world.consents()
    first = complete(world, consents)
    assert first.refresh_token is not None
    second = consents.refresh(first.refresh_token)
    assert second.rotated and second.refresh_token not in (None, first.refresh_token)
    assert second.authorization_details[0]["consent"]["Status"] == "Authorized"
    assert world.bearer_works(second.access_token)
    with pytest.raises(InvalidGrantError, match="consent is revoked") as replayed:
        consents.refresh(first.refresh_token)
    assert "consent again" in replayed.value.hint
    assert second.refresh_token is not None
    with pytest.raises(InvalidGrantError):
        consents.refresh(second.refresh_token)  # the whole consent is gone, the newest token too
    assert not world.bearer_works(second.access_token)
