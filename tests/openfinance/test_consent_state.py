"""The consent flow's state machine on values (sans-I/O): pending authorizations, callbacks, token answers."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import pytest

from agent.jose.errors import ClaimRejectedError, NonceMismatchError, WrongAudienceError
from agent.openfinance.consent import (
    AuthorizationDeniedError,
    CallbackExpiredError,
    CallbackIssuerError,
    ConsentFlowError,
    MalformedCallbackError,
    PendingAuthorization,
    PendingAuthorizations,
    TokenAnswer,
    TokenAnswerError,
    UnknownStateError,
    authorization_url,
    check_id_token_claims,
    code_exchange_form,
    refresh_form,
)

ISSUER = "https://bank.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def pending(flows: PendingAuthorizations, state: str = "s1") -> PendingAuthorization:
    return flows.new(bank="mb", issuer=ISSUER, client_id="c", state=state, nonce="n", code_verifier="v" * 43,
                     redirect_uri="https://tpp.example/cb", request_uri="urn:r", scope="openid accounts",
                     max_age=None)


def test_callback_passes_once_and_gives_the_exchange_form() -> None:
    flows = PendingAuthorizations()
    pending(flows)
    grant = flows.take_callback(f"?code=abc&state=s1&iss={urllib.parse.quote(ISSUER)}", "mb")
    assert code_exchange_form(grant) == {"grant_type": "authorization_code", "code": "abc",
                                         "redirect_uri": "https://tpp.example/cb", "code_verifier": "v" * 43}
    assert "v" * 43 not in repr(grant)  # the verifier and code never show in logs of the object
    with pytest.raises(UnknownStateError):
        flows.take_callback({"code": "abc", "state": "s1", "iss": ISSUER}, "mb")


def test_full_redirect_url_is_accepted() -> None:
    flows = PendingAuthorizations()
    pending(flows)
    url = "https://tpp.example/cb?" + urllib.parse.urlencode({"code": "c", "state": "s1", "iss": ISSUER})
    assert flows.take_callback(url, "mb").code == "c"


def test_pending_authorizations_expire() -> None:
    clock = Clock()
    flows = PendingAuthorizations(lifetime=600, clock=clock)
    pending(flows)
    clock.now += 601
    with pytest.raises(CallbackExpiredError):
        flows.take_callback({"code": "c", "state": "s1", "iss": ISSUER}, "mb")


def test_pending_authorizations_are_bounded_oldest_first() -> None:
    flows = PendingAuthorizations(max_pending=3)
    for i in range(5):
        pending(flows, f"s{i}")
    assert len(flows) == 3
    with pytest.raises(UnknownStateError):
        flows.take("s0", "mb")
    assert flows.take("s4", "mb").state == "s4"


def test_a_state_cannot_be_pending_twice() -> None:
    flows = PendingAuthorizations()
    pending(flows)
    with pytest.raises(ConsentFlowError, match="already pending"):
        pending(flows)


@pytest.mark.parametrize("query,error,message", [
    ({"code": "c", "state": "s1", "iss": "https://evil.example"}, CallbackIssuerError, "evil"),
    ({"code": "c", "state": "s1"}, CallbackIssuerError, "no iss"),
    ({"state": "s1", "iss": ISSUER}, MalformedCallbackError, "neither code nor error"),
    ({"code": "c", "iss": ISSUER}, MalformedCallbackError, "no state"),
    ("code=a&code=b&state=s1", MalformedCallbackError, "repeated"),
    ("x" * 9000, MalformedCallbackError, "longer"),
])
def test_bad_callbacks(query: Any, error: type[Exception], message: str) -> None:
    flows = PendingAuthorizations()
    pending(flows)
    with pytest.raises(error, match=message):
        flows.take_callback(query, "mb")


def test_an_error_redirect_from_another_issuer_is_refused_as_such() -> None:
    flows = PendingAuthorizations()
    pending(flows)
    with pytest.raises(CallbackIssuerError):
        flows.take_callback({"error": "access_denied", "state": "s1", "iss": "https://evil.example"}, "mb")


def test_error_callback_is_reported_and_consumes_the_state() -> None:
    flows = PendingAuthorizations()
    pending(flows)
    with pytest.raises(AuthorizationDeniedError) as denied:
        flows.take_callback({"error": "access_denied", "error_description": "no", "state": "s1", "iss": ISSUER}, "mb")
    assert (denied.value.error, denied.value.description) == ("access_denied", "no")
    assert len(flows) == 0


def test_authorization_url_keeps_the_endpoints_query() -> None:
    url = authorization_url("https://bank.example/auth?tenant=retail", "client 1", "urn:x:1")
    parts = urllib.parse.urlsplit(url)
    assert parts.path == "/auth"
    assert urllib.parse.parse_qs(parts.query) == {"tenant": ["retail"], "client_id": ["client 1"],
                                                  "request_uri": ["urn:x:1"], "response_type": ["code"],
                                                  "scope": ["openid"]}
    plain = authorization_url("https://bank.example/auth", "c", "urn:x:1", openid=False)
    assert urllib.parse.parse_qs(urllib.parse.urlsplit(plain).query) == {"client_id": ["c"], "request_uri": ["urn:x:1"]}


GOOD = {"access_token": "a", "token_type": "Bearer", "expires_in": 600, "refresh_token": "r",
        "authorization_details": [{"type": "t", "consent": {"Status": "Authorized"}}]}


def test_token_answer() -> None:
    answer = TokenAnswer.parse(GOOD)
    assert answer.refresh_token == "r" and answer.authorization_details[0]["consent"]["Status"] == "Authorized"
    assert "'a'" not in repr(answer) and "'r'" not in repr(answer)


@pytest.mark.parametrize("change", [{"token_type": "DPoP"}, {"expires_in": "600"}, {"authorization_details": []},
                                    {"access_token": ""}, {"refresh_token": 5}])
def test_bad_token_answers(change: dict[str, Any]) -> None:
    with pytest.raises(TokenAnswerError):
        TokenAnswer.parse({**GOOD, **change})


def test_refresh_form_needs_a_token() -> None:
    assert refresh_form("r1") == {"grant_type": "refresh_token", "refresh_token": "r1"}
    with pytest.raises(TokenAnswerError):
        refresh_form(" ")


def test_id_token_claims() -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "u", "aud": ["c"], "iat": now, "exp": now + 60, "nonce": "n", "auth_time": now}
    assert check_id_token_claims(claims, client_id="c", nonce="n", max_age=60)["sub"] == "u"
    with pytest.raises(NonceMismatchError):
        check_id_token_claims(claims, client_id="c", nonce="other")
    with pytest.raises(WrongAudienceError, match="azp"):
        check_id_token_claims({**claims, "aud": ["c", "d"]}, client_id="c", nonce="n")
    with pytest.raises(ClaimRejectedError, match="max_age"):
        check_id_token_claims({**claims, "auth_time": now - 1000}, client_id="c", nonce="n", max_age=60)
    with pytest.raises(ClaimRejectedError, match="'sub'"):
        check_id_token_claims({k: v for k, v in claims.items() if k != "sub"}, client_id="c", nonce="n")


def test_token_answer_without_details_when_none_were_asked() -> None:
    bare = {k: v for k, v in GOOD.items() if k != "authorization_details"}
    assert TokenAnswer.parse(bare, details_required=False).authorization_details == []
    assert TokenAnswer.parse({**bare, "authorization_details": []}, details_required=False).authorization_details == []
    with pytest.raises(TokenAnswerError):
        TokenAnswer.parse(bare)
    with pytest.raises(TokenAnswerError):  # present, they must still be objects
        TokenAnswer.parse({**bare, "authorization_details": ["x"]}, details_required=False)
