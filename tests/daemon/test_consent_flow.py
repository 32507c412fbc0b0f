"""The consent flow through the daemon's socket and the CLI, against the strict model bank (issue 19, items 1-2).

One daemon and one bank for the module. root (an admin) starts consents with ``par``; ``nobody`` holds only
``consent_callback`` and ``consent_refresh`` at ``mb``, as a service that completes consents would, and completes
them. The customer's browser is the agent's own ``forward`` (the bank's 302 comes back unfollowed). Every JWS the
agent made for the bank (request objects, client assertions) is read back with jwcrypto.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from jwcrypto import jwk as jwcrypto_jwk
from jwcrypto import jws as jwcrypto_jws

from agent.client import AgentClient
from agent.errors import ExitStatus
from agent.runtime import Runtime
from agent.state import SQLITE_NAME
from modelbank import ModelBank
from tests.daemon.conftest import NOBODY, Daemon, launch
from tests.daemon.test_least_privilege import STRANGER
from tests.daemon.test_policy import as_user
from tests.daemon.test_tokens import configure_tpp
from tests.openfinance.bank_world import reset_knobs
from tests.openfinance.conftest import Tpp, issue_identity
from tests.openfinance.test_cli_and_demo import cli

MB = "mb"
REDIRECT_URI = "https://tpp.example/consents/callback"
RESOURCE = "https://api.bank.example/open-finance/account-information/v2.1"
DETAILS = [{"type": "urn:openfinanceuae:account-access-consent:v2.1",
            "consent": {"Permissions": ["ReadAccountsBasic"], "ExpirationDateTime": "2027-01-01T00:00:00Z"}}]


@dataclass
class Flow:
    daemon: Daemon
    bank: ModelBank
    config: Path
    state_db: Path
    client_id: str
    request_objects: list[str]

    def client(self) -> AgentClient:
        return self.daemon.client()

    def start(self, **parameters: Any) -> dict[str, Any]:
        started = self.client().par(MB, "openid accounts", REDIRECT_URI, authorization_details=DETAILS,
                                    **parameters)
        self.request_objects.append(self.bank.tokens.pushed[started["request_uri"]].request)
        return started

    def authorize(self, started: dict[str, Any]) -> str:
        """The customer's browser: to the authorization URL, and the bank's redirect back (not followed)."""
        status, headers, body = self.client().forward(MB, "GET", started["authorization_url"])
        assert status == 302, body
        location = {k.lower(): v for k, v in headers.items()}["location"]
        assert location.startswith(REDIRECT_URI + "?")
        return location

    def post(self, path: str, body: dict[str, Any], uid: int = NOBODY) -> tuple[int, dict[str, Any]]:
        answer = as_user(self.daemon, uid, NOBODY, "POST", f"/v1/banks/{MB}/consent/{path}", json.dumps(body))
        return int(str(answer["status"])), json.loads(str(answer["body"]))

    def callback(self, url: str, uid: int = NOBODY) -> tuple[int, dict[str, Any]]:
        return self.post("callback", {"url": url}, uid)

    def complete(self, **parameters: Any) -> dict[str, Any]:
        status, answer = self.callback(self.authorize(self.start(**parameters)))
        assert status == 200, answer
        return answer

    def bearer_works(self, access_token: str) -> bool:
        status, _, _ = self.client().forward(MB, "GET", "/accounts", {"Authorization": f"Bearer {access_token}"})
        return status == 200

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.daemon.audit_file.read_text().splitlines()]

    def pending_rows(self) -> list[sqlite3.Row]:
        with sqlite3.connect(self.state_db) as db:
            db.row_factory = sqlite3.Row
            return list(db.execute("SELECT state, bank, owner, data FROM pending_authorizations"))


@pytest.fixture(scope="module")
def flow(shared_runtime: Runtime, softhsm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    public = Path(tempfile.mkdtemp(prefix="tpp-agent-test-"))
    public.chmod(0o755)
    with ModelBank(tmp_path_factory.mktemp("consent-bank")) as bank:
        uri, subject, _ = issue_identity(shared_runtime, bank)
        tpp = Tpp(shared_runtime, uri, subject, tmp_path_factory.mktemp("consent-tpp"), softhsm_state)
        config, client_id, _ = configure_tpp(tpp, bank, public, "completes-consents",
                                             ["consent_callback", "consent_refresh"])
        daemon = launch(config, public)
        try:
            daemon.client().register(MB)
            yield Flow(daemon, bank, config, tpp.state_dir / SQLITE_NAME, client_id, [])
        finally:
            daemon.stop()
            daemon.notify.close()
            shutil.rmtree(public, ignore_errors=True)


@pytest.fixture(autouse=True)
def strict_bank(flow: Flow) -> Iterator[None]:
    """Each test starts from the bank's normal behaviour and leaves it so."""
    yield
    reset_knobs(flow.bank)


def test_a_consent_started_by_one_service_is_completed_and_refreshed_by_another(flow: Flow) -> None:
    flow.bank.tokens.require_resource = True  # a strict RAR bank refuses a PAR without resource
    started = flow.start(resource=[RESOURCE], prompt="consent", max_age=600, acr_values="urn:openbanking:psd2:sca",
                         claims={"id_token": {"acr": {"essential": True}}})
    url = urllib.parse.urlsplit(started["authorization_url"])
    query = urllib.parse.parse_qs(url.query)
    assert url.path == "/authorize" and query["client_id"] == [flow.client_id]
    assert query["request_uri"] == [started["request_uri"]]
    assert set(started) == {"bank", "authorization_url", "request_uri", "expires_in", "state", "interaction_id"}
    # The verifier and nonce stay in the agent's state store, for this bank, owned by the caller that pushed.
    [row] = [r for r in flow.pending_rows() if r["state"] == started["state"]]
    kept = json.loads(row["data"])
    assert (row["bank"], row["owner"]) == (MB, "0") and len(kept["code_verifier"]) == 43
    pushed = flow.bank.tokens.pushed[started["request_uri"]].claims
    assert pushed["resource"] == RESOURCE and pushed["max_age"] == 600 and pushed["nonce"] == kept["nonce"]

    # nobody holds consent_callback only: it completes the consent without forward or client_assertion.
    status, tokens = flow.callback(flow.authorize(started))
    assert status == 200, tokens
    assert not [r for r in flow.pending_rows() if r["state"] == started["state"]]  # single use
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 300 and tokens["refresh_token"]
    consent = tokens["authorization_details"][0]["consent"]
    assert consent["Status"] == "Authorized" and consent["Permissions"] == ["ReadAccountsBasic"]
    claims = tokens["id_token_claims"]
    assert claims["iss"] == flow.bank.issuer and flow.client_id in claims["aud"] and claims["nonce"] == kept["nonce"]
    assert flow.bank.tokens.issued[tokens["access_token"]].consent_id == consent["ConsentId"]
    assert flow.bearer_works(tokens["access_token"])  # certificate-bound to the agent's transport certificate

    # Refresh: the bank rotates; the new refresh token replaces the old one, and the old one is then poison.
    status, second = flow.post("refresh", {"refresh_token": tokens["refresh_token"]})
    assert status == 200 and second["rotated"] and second["refresh_token"] != tokens["refresh_token"]
    assert flow.bearer_works(second["access_token"])
    status, replayed = flow.post("refresh", {"refresh_token": tokens["refresh_token"]})
    assert status == 400 and replayed["code"] == "invalid_grant", replayed
    assert "consent is revoked" in replayed["message"] and "consent again" in replayed["hint"]
    status, after = flow.post("refresh", {"refresh_token": second["refresh_token"]})
    assert status == 400 and after["code"] == "invalid_grant"  # the whole consent went, the newest token too
    assert not flow.bearer_works(second["access_token"])

    # Each step is its own audit record, for its caller; the secrets are in neither the trail nor the log.
    records = flow.audit()
    par_uses = [r for r in records if r["operation"] == "par" and r["uid"] == 0]
    callback_uses = [r for r in records if r["operation"] == "consent_callback"]
    refresh_uses = [r for r in records if r["operation"] == "consent_refresh"]
    assert [r["algorithm"] for r in par_uses[-3:]] == ["PS256", "PS256", "tls-client-auth"]  # request, assertion
    assert {r["uid"] for r in callback_uses + refresh_uses} == {NOBODY}
    assert [r["algorithm"] for r in callback_uses][:2] == ["PS256", "tls-client-auth"]  # assertion, code exchange
    assert [r["algorithm"] for r in refresh_uses] == ["PS256", "tls-client-auth"] * 3
    for text in (flow.daemon.audit_file.read_text(), flow.daemon.stderr()):
        for secret in (kept["code_verifier"], tokens["access_token"], tokens["refresh_token"],
                       second["refresh_token"]):
            assert secret not in text


def test_a_service_with_the_callback_grant_cannot_start_consents_nor_forward(flow: Flow) -> None:
    for target in ("par", "forward", "client-assertion", "token"):
        denied = as_user(flow.daemon, NOBODY, NOBODY, "POST", f"/v1/banks/{MB}/{target}", "{}")
        assert denied["status"] == 403, (target, denied)
    started = flow.start()
    denied = as_user(flow.daemon, STRANGER, NOBODY, "POST", f"/v1/banks/{MB}/consent/callback",
                     json.dumps({"url": flow.authorize(started)}))
    assert denied["status"] == 403
    assert 'operations = ["consent_callback"]' in json.loads(str(denied["body"]))["hint"]
    assert [r for r in flow.pending_rows() if r["state"] == started["state"]]  # a refused caller spoils nothing


def test_state_mismatch_is_refused_and_the_real_redirect_still_completes(flow: Flow) -> None:
    url = flow.authorize(flow.start())
    forged = url.replace("state=", "state=x")
    status, answer = flow.callback(forged)
    assert status == 400 and answer["code"] == "unknown_state", answer
    assert flow.callback(url)[0] == 200
    refused = [r for r in flow.audit() if r.get("result") == "refused: UnknownStateError"]
    assert refused and refused[-1]["uid"] == NOBODY and refused[-1]["key"] == f"bank:{MB}"


def test_iss_mismatch_is_refused_and_spends_the_state(flow: Flow) -> None:
    url = flow.authorize(flow.start())
    parts = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
    status, answer = flow.post("callback", {"params": {**parts, "iss": "https://other-bank.example"}})
    assert status == 400 and answer["code"] == "issuer_mismatch" and "other-bank" in answer["message"]
    status, answer = flow.callback(url)  # a redirect that failed a check is not tried again
    assert status == 400 and answer["code"] == "unknown_state"


def test_a_replayed_redirect_never_reaches_the_bank_again(flow: Flow) -> None:
    url = flow.authorize(flow.start())
    assert flow.callback(url)[0] == 200
    exchanges = len([r for r in flow.bank.requests if r[0] == "POST" and r[1].endswith("/token")])
    status, answer = flow.callback(url)
    assert status == 400 and answer["code"] == "unknown_state"
    assert len([r for r in flow.bank.requests if r[0] == "POST" and r[1].endswith("/token")]) == exchanges


def test_a_redirect_to_another_bank_route_neither_completes_nor_spoils_the_consent(flow: Flow) -> None:
    url = flow.authorize(flow.start())
    denied = as_user(flow.daemon, 0, 0, "POST", "/v1/banks/nosuchbank/consent/callback", json.dumps({"url": url}))
    assert denied["status"] == 404
    assert flow.callback(url)[0] == 200


def test_a_declined_consent_is_a_clear_refusal(flow: Flow) -> None:
    flow.bank.authorization.decision = "access_denied"
    status, answer = flow.callback(flow.authorize(flow.start()))
    assert status == 403 and answer["code"] == "authorization_denied"
    assert "access_denied: the customer did not consent" in answer["message"]


@pytest.mark.parametrize("knob,value,words", [
    ("id_token_nonce", "a-nonce-of-another-request", "nonce is not the one sent"),
    ("id_token_lifetime", -60, "id_token: expired"),
    ("id_token_corrupt", True, "signature does not verify"),
])
def test_an_id_token_that_fails_a_check_withholds_the_tokens(flow: Flow, knob: str, value: object,
                                                             words: str) -> None:
    setattr(flow.bank.authorization, knob, value)
    status, answer = flow.callback(flow.authorize(flow.start()))
    assert status == 502 and answer["code"] == "id_token_refused" and words in answer["message"], answer
    assert "access_token" not in json.dumps(answer)


def test_an_unknown_kid_costs_exactly_one_jwks_refetch(flow: Flow) -> None:
    flow.complete()  # the serving process has the bank's JWKS cached
    before = flow.bank.jose.jwks_fetches
    flow.bank.authorization.id_token_key = flow.bank.jose.unpublished
    status, answer = flow.callback(flow.authorize(flow.start()))
    assert status == 502 and answer["code"] == "id_token_refused"
    assert flow.bank.jose.unpublished.kid in answer["message"]
    assert flow.bank.jose.jwks_fetches == before + 1
    status, _ = flow.callback(flow.authorize(flow.start()))  # a made-up kid again, within the interval: no GET
    assert status == 502 and flow.bank.jose.jwks_fetches == before + 1


def test_bad_callback_inputs_get_one_line_each(flow: Flow) -> None:
    for body, code in (({}, "missing_field"), ({"url": "code=a&code=b&state=s"}, "bad_callback"),
                       ({"url": "?code=abc"}, "bad_callback"), ({"params": {"state": "s", "iss": "x", "a": 1}},
                                                                 "bad_field")):
        status, answer = flow.post("callback", body)
        assert status == 400 and answer["code"] == code, (body, answer)
    status, answer = flow.post("refresh", {"refresh_token": "not-a-token-of-this-bank"})
    assert status == 400 and answer["code"] == "invalid_grant" and "unknown refresh token" in answer["message"]


def test_cli_starts_completes_and_refreshes_keeping_the_refresh_token_in_a_file(flow: Flow, tmp_path: Path) -> None:
    started = cli(flow.config, "par", MB, "--scope", "openid accounts", "--redirect-uri", REDIRECT_URI,
                  "--resource", RESOURCE, "--max-age", "600", "--json")
    assert started.returncode == 0, started.stderr
    answer = json.loads(started.stdout)
    request = flow.bank.tokens.pushed[answer["request_uri"]]
    flow.request_objects.append(request.request)
    [row] = [r for r in flow.pending_rows() if r["state"] == answer["state"]]
    assert json.loads(row["data"])["code_verifier"] not in started.stdout + started.stderr
    url = flow.authorize(answer)
    human = cli(flow.config, "par", MB, "--scope", "openid accounts", "--redirect-uri", REDIRECT_URI)
    assert human.returncode == 0 and "send the customer to: https://" in human.stdout, human.stderr
    assert "code_verifier" not in human.stdout and "consent callback mb --url" in human.stdout

    kept = tmp_path / "consent.refresh"
    lost = cli(flow.config, "consent", "callback", MB, "--url", url)
    assert lost.returncode == ExitStatus.DATAERR and "refresh token would be lost" in lost.stderr
    # The callback runs in this process (--direct) on the agent's shared state store: the PAR was the agent's.
    done = cli(flow.config, "--direct", "consent", "callback", MB, "--url", url, "--refresh-token-file", str(kept))
    assert done.returncode == 0, done.stderr
    assert "Authorized" in done.stdout and f"kept in {kept}" in done.stdout and "Traceback" not in done.stderr
    first = kept.read_text().strip()
    assert kept.stat().st_mode & 0o777 == 0o600 and first not in done.stdout

    old = tmp_path / "old.refresh"
    old.write_text(first + "\n")
    refreshed = cli(flow.config, "consent", "refresh", MB, "--refresh-token-file", str(kept), "--json")
    assert refreshed.returncode == 0, refreshed.stderr
    shown = json.loads(refreshed.stdout)
    assert shown["rotated"] and "refresh_token" not in shown and "access_token" not in shown
    assert kept.read_text().strip() not in ("", first)
    replayed = cli(flow.config, "consent", "refresh", MB, "--refresh-token-file", str(old))
    assert replayed.returncode == ExitStatus.PROTOCOL and "invalid_grant" in replayed.stderr
    assert "Traceback" not in replayed.stderr and old.read_text().strip() == first  # a refusal writes nothing

    again = cli(flow.config, "consent", "callback", MB, "--url", url, "--show-tokens")
    assert again.returncode == ExitStatus.DATAERR and "matches no pending authorization" in again.stderr
    missing = cli(flow.config, "consent", "refresh", MB, "--refresh-token-file", str(tmp_path / "none"))
    assert missing.returncode == ExitStatus.DATAERR and "cannot read" in missing.stderr


def test_the_documented_curl_steps(flow: Flow) -> None:
    """docs/consent-flow.md section 8, as written: PAR, the callback's parameters as an object, refresh."""
    def curl(path: str, body: dict[str, Any]) -> dict[str, Any]:
        raw = subprocess.run(["curl", "-sS", "--unix-socket", str(flow.daemon.socket_path), "-X", "POST",
                              "-H", "Content-Type: application/json", "-d", json.dumps(body),
                              f"http://agent/v1/banks/{MB}/{path}"], capture_output=True, text=True, check=True,
                             timeout=30)
        answer: dict[str, Any] = json.loads(raw.stdout)
        return answer

    started = curl("par", {"scope": "openid accounts", "redirect_uri": REDIRECT_URI, "authorization_details": DETAILS,
                           "resource": [RESOURCE], "prompt": "consent", "max_age": 600})
    flow.request_objects.append(flow.bank.tokens.pushed[started["request_uri"]].request)
    parts = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(flow.authorize(started)).query))
    tokens = curl("consent/callback", {"params": parts})
    assert tokens["authorization_details"][0]["consent"]["Status"] == "Authorized", tokens
    refreshed = curl("consent/refresh", {"refresh_token": tokens["refresh_token"]})
    assert refreshed["rotated"] and refreshed["refresh_token"] != tokens["refresh_token"]


def test_every_jws_the_agent_made_reads_back_with_jwcrypto(flow: Flow) -> None:
    """Request objects and client assertions of this module's flows, against the agent's own JWKS."""
    keyset = jwcrypto_jwk.JWKSet.from_json(json.dumps(flow.client().jwks()))
    made = [*flow.request_objects, *flow.bank.tokens.assertions]
    assert len(flow.request_objects) >= 5 and len(made) > len(flow.request_objects)
    for token in made:
        checked = jwcrypto_jws.JWS()
        checked.deserialize(token)
        header = checked.jose_header
        checked.verify(keyset.get_key(header["kid"]), alg="PS256")
        claims = json.loads(checked.payload)
        assert header["alg"] == "PS256" and claims["iss"] == flow.client_id and claims["aud"] == flow.bank.issuer
