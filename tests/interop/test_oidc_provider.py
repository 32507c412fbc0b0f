"""The agent's FAPI 2.0 flows against an independent, OpenID-certified authorization server: panva's oidc-provider.

Real processes: ``node server.mjs`` (tests/interop/oidc_provider, HTTPS with client certificates from the test CA,
FAPI 2.0 profile, PAR and signed request objects required, PKCE S256, private_key_jwt PS256, certificate-bound
tokens, RFC 9207 ``iss``, rich authorization requests, rotated refresh tokens) and ``tpp-agent serve`` on the
session's SoftHSM2 token. Nothing here is the model bank: the one static client is the agent as a bank would
register it (client_id = the transport certificate's CN, jwks = the agent's own /v1/jwks). The customer's browser
is plain HTTPS with cookies through oidc-provider's development login and consent pages.

Skipped when node or the pinned oidc-provider (scripts/bootstrap: ``npm ci`` in tests/interop/oidc_provider) is
absent.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
import select
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import urllib3

from agent import jose
from agent.client import AgentClient, AgentRequestError
from agent.runtime import Runtime
from modelbank import TestCA
from tests.daemon.conftest import Daemon, launch, nobody_rule
from tests.openfinance.conftest import Tpp, issue_identity, signing_key
from tests.openfinance.test_cli_and_demo import cli

HERE = Path(__file__).parent / "oidc_provider"
NODE = shutil.which("node")
if NODE is None:
    pytest.skip("node is not installed: the interop tests run oidc-provider (Node.js)", allow_module_level=True)
NODE_MAJOR = int(subprocess.run([NODE, "--version"], capture_output=True, text=True, timeout=30,
                                check=False).stdout.strip().lstrip("v").split(".")[0] or 0)
if NODE_MAJOR < 18:
    pytest.skip(f"node {NODE_MAJOR} is too old: oidc-provider 8 needs node 18.12 or later", allow_module_level=True)
if not (HERE / "node_modules" / "oidc-provider" / "package.json").is_file():
    pytest.skip("oidc-provider is not installed: run scripts/bootstrap (npm ci in tests/interop/oidc_provider)",
                allow_module_level=True)

BANK = "op"
REDIRECT_URI = "https://tpp.example/consents/callback"
RESOURCE = "https://api.bank.example/open-finance/v2.1"
CONSENT_TYPE = "urn:openfinanceuae:account-access-consent:v2.1"
DETAILS = [{"type": CONSENT_TYPE, "consent": {"Permissions": ["ReadAccountsBasic"],
                                              "ExpirationDateTime": "2027-01-01T00:00:00Z"}}]
STARTUP = 30.0  # seconds for node to load oidc-provider and listen, on a busy 2-core machine


@dataclasses.dataclass
class Site:
    """oidc-provider as the bank of the agent's configuration (tests.openfinance.conftest.BankSite)."""

    issuer: str
    ca: TestCA

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def ca_bundle(self) -> Path:
        return self.ca.cert_file


class AuthorizationServer:
    """``node server.mjs``: listening once it printed its issuer, serving once given the client."""

    def __init__(self, directory: Path, ca: TestCA) -> None:
        server = ca.server_credentials(directory, names=("127.0.0.1",))
        settings = directory / "settings.json"
        settings.write_text(json.dumps({
            "cert": str(server.cert_file), "key": str(server.key_file), "ca": str(ca.cert_file), "host": "127.0.0.1",
            "resource": RESOURCE, "scopes": ["accounts"], "authorization_details_types": [CONSENT_TYPE]}))
        self.directory, self.log = directory, directory / "oidc-provider.log"
        assert NODE is not None
        self.proc = subprocess.Popen([NODE, str(HERE / "server.mjs"), str(settings)], cwd=HERE, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"))
        self.site = Site(str(self._line()["issuer"]), ca)

    def serve(self, client: dict[str, Any]) -> None:
        path = self.directory / "client.json"
        path.write_text(json.dumps(client))
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        assert self._line() == {"ready": True}

    def refusals(self) -> list[dict[str, Any]]:
        """What oidc-provider refused so far, with its own reasons."""
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.stop()
            raise AssertionError(f"oidc-provider did not start:\n{self.log.read_text()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Browser:
    """The customer's browser: HTTPS to the authorization server without a client certificate, its cookies kept,
    its redirects followed while they stay at the issuer; the redirect back to the TPP is returned, not followed."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=str(site.ca_bundle))
        self.cookies: dict[str, str] = {}

    def request(self, method: str, url: str, form: dict[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body, headers["Content-Type"] = urllib.parse.urlencode(form), "application/x-www-form-urlencoded"
        answer = self.http.request(method, url, body=body, headers=headers, redirect=False)
        for value in answer.headers.getlist("Set-Cookie"):
            jar: SimpleCookie = SimpleCookie()
            jar.load(value)
            for name, morsel in jar.items():
                self.cookies[name] = morsel.value
        return answer

    def go(self, method: str, url: str, form: dict[str, str] | None = None) -> tuple[str, str]:
        """Follow redirects within the issuer; ("page", html) or ("redirect", the URL outside it)."""
        for _ in range(10):
            answer = self.request(method, url, form)
            if answer.status not in (302, 303):
                assert answer.status == 200, (answer.status, answer.data[:500])
                return "page", answer.data.decode()
            url = urllib.parse.urljoin(url, answer.headers["Location"])
            if not url.startswith(self.site.issuer + "/"):
                return "redirect", url
            method, form = "GET", None
        raise AssertionError("too many redirects")

    def consent(self, authorization_url: str, *, decline: bool = False) -> str:
        """Log in (any login, any password) and consent, or decline; the redirect back to the TPP."""
        kind, page = self.go("GET", authorization_url)
        for _ in range(3):
            if kind == "redirect":
                return page
            action = urllib.parse.urljoin(self.site.issuer,
                                          html.unescape(_attribute(page, r'<form[^>]*action="([^"]+)"')))
            if decline:
                abort = _attribute(page, r'href="([^"]*/abort)"')
                kind, page = self.go("GET", urllib.parse.urljoin(self.site.issuer, html.unescape(abort)))
                continue
            prompt = _attribute(page, r'name="prompt" value="([^"]+)"')
            form = {"prompt": prompt} | ({"login": "customer-1", "password": "any"} if prompt == "login" else {})
            kind, page = self.go("POST", action, form)
        raise AssertionError(f"no redirect back after login and consent:\n{page[:2000]}")


def _attribute(page: str, pattern: str) -> str:
    found = re.search(pattern, page)
    assert found is not None, (pattern, page[:2000])
    return found.group(1)


@dataclasses.dataclass
class World:
    server: AuthorizationServer
    daemon: Daemon
    config: Path
    client_id: str
    transport_thumbprint: str

    @property
    def site(self) -> Site:
        return self.server.site

    def agent(self) -> AgentClient:
        return self.daemon.client()

    def start(self, **parameters: Any) -> dict[str, Any]:
        """A consent with a refresh token: offline_access with prompt=consent (OIDC Core §11)."""
        return self.agent().par(BANK, "openid accounts offline_access", REDIRECT_URI, authorization_details=DETAILS,
                                prompt="consent", **parameters)

    def complete(self) -> dict[str, Any]:
        return self.agent().consent_callback(BANK, Browser(self.site).consent(self.start()["authorization_url"]))

    def introspect(self, token: str) -> dict[str, Any]:
        """RFC 7662 at the authorization server, authenticated with a client assertion the agent made."""
        made = self.agent().client_assertion(BANK)
        form = {"token": token, "client_id": self.client_id, "client_assertion": made["client_assertion"],
                "client_assertion_type": made["client_assertion_type"]}
        endpoint = self.agent().discovery(BANK)["document"]["introspection_endpoint"]
        status, _, body = self.agent().forward(BANK, "POST", endpoint, {
            "Content-Type": "application/x-www-form-urlencoded"}, urllib.parse.urlencode(form).encode())
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer


@pytest.fixture(scope="module")
def world(shared_runtime: Runtime, softhsm_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("oidc-provider")
    ca = TestCA(directory / "ca", "Interop Test CA")
    server = AuthorizationServer(directory, ca)
    public = Path(tempfile.mkdtemp(prefix="tpp-agent-test-"))
    public.chmod(0o755)
    daemon = None
    try:
        uri, subject, _ = issue_identity(shared_runtime, server.site)
        tpp = Tpp(shared_runtime, uri, subject, tmp_path_factory.mktemp("interop-tpp"), softhsm_state)
        identity = signing_key(tpp, server.site)
        config = tpp.write_config(server.site)
        config.write_text(config.read_text() + identity.keys_toml(tpp) + nobody_rule(
            public, tpp.state_dir / "audit.jsonl", "interop-reader", ["discovery"], banks=[BANK]))
        config.write_text(config.read_text().replace("[banks.mb]", f"[banks.{BANK}]"))
        daemon = launch(config, public)
        server.serve({
            "client_id": identity.client_id, "jwks": daemon.client().jwks(), "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token", "client_credentials"], "response_types": ["code"],
            "token_endpoint_auth_method": "private_key_jwt", "token_endpoint_auth_signing_alg": "PS256",
            "request_object_signing_alg": "PS256", "id_token_signed_response_alg": "PS256",
            "tls_client_certificate_bound_access_tokens": True, "authorization_details_types": [CONSENT_TYPE],
            "scope": "openid offline_access accounts"})
        transport = shared_runtime.keys.info(uri).certificate
        assert transport is not None
        yield World(server, daemon, config, identity.client_id, jose.keys.cert_thumbprint(transport.der))
    finally:
        if daemon is not None:
            daemon.stop()
            daemon.notify.close()
        server.stop()
        shutil.rmtree(public, ignore_errors=True)


def test_discovery_of_a_certified_fapi2_server(world: World) -> None:
    found = world.agent().discovery(BANK, refresh=True)
    document = found["document"]
    assert document["issuer"] == world.site.issuer and document["require_pushed_authorization_requests"]
    assert document["authorization_response_iss_parameter_supported"]
    assert "registration_endpoint" not in document  # a static client: the agent must not need one
    with pytest.raises(AgentRequestError) as unregistrable:
        world.agent().register(BANK)
    assert "has no registration_endpoint" in str(unregistrable.value), unregistrable.value


def test_client_credentials_token_is_bound_to_the_transport_certificate(world: World) -> None:
    token = world.agent().token(BANK, "accounts", refresh=True)
    assert token["token_type"] == "Bearer" and token["scope"] == "accounts"
    seen = world.introspect(token["access_token"])
    assert seen["active"] and seen["client_id"] == world.client_id
    assert seen["cnf"] == {"x5t#S256": world.transport_thumbprint}


def test_consent_is_pushed_authorized_exchanged_and_refreshed_with_rotation(world: World) -> None:
    started = world.start(resource=[RESOURCE], max_age=600)
    redirect = Browser(world.site).consent(started["authorization_url"])
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(redirect).query))
    assert redirect.startswith(REDIRECT_URI + "?") and query["iss"] == world.site.issuer  # RFC 9207
    assert query["state"] == started["state"]

    tokens = world.agent().consent_callback(BANK, redirect)
    claims = tokens["id_token_claims"]
    assert claims["iss"] == world.site.issuer and claims["aud"] == world.client_id and claims["sub"] == "customer-1"
    assert isinstance(claims["auth_time"], int)  # max_age was asked: checked by the agent (OIDC Core §3.1.3.7)
    assert tokens["authorization_details"][0]["consent"]["Status"] == "Authorized"
    assert tokens["refresh_token"] and not tokens["rotated"]
    seen = world.introspect(tokens["access_token"])
    assert seen["active"] and seen["cnf"] == {"x5t#S256": world.transport_thumbprint}

    second = world.agent().consent_refresh(BANK, tokens["refresh_token"])
    assert second["rotated"] and second["refresh_token"] != tokens["refresh_token"]
    assert world.introspect(second["access_token"])["active"]
    with pytest.raises(AgentRequestError) as replayed:
        world.agent().consent_refresh(BANK, tokens["refresh_token"])
    assert replayed.value.code == "invalid_grant", replayed.value
    assert {"event": "grant.error", "error": "invalid_grant", "error_description": "grant request is invalid",
            "detail": "refresh token already used"} in world.server.refusals()
    # oidc-provider treats the replay as theft: the whole grant goes, the newest refresh token too.
    with pytest.raises(AgentRequestError) as after:
        world.agent().consent_refresh(BANK, second["refresh_token"])
    assert after.value.code == "invalid_grant"
    assert not world.introspect(second["access_token"])["active"]


def test_a_tampered_redirect_is_refused_by_the_agent(world: World) -> None:
    redirect = Browser(world.site).consent(world.start()["authorization_url"])
    with pytest.raises(AgentRequestError) as forged_state:
        world.agent().consent_callback(BANK, redirect.replace("state=", "state=x"))
    assert forged_state.value.code == "unknown_state"
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(redirect).query))
    with pytest.raises(AgentRequestError) as mixed_up:
        world.agent().consent_callback(BANK, {**params, "iss": "https://other-bank.example"})
    assert mixed_up.value.code == "issuer_mismatch"
    with pytest.raises(AgentRequestError) as spent:  # a redirect that failed a check is not tried again
        world.agent().consent_callback(BANK, redirect)
    assert spent.value.code == "unknown_state"


def test_a_declined_consent_comes_back_as_a_clear_refusal(world: World) -> None:
    redirect = Browser(world.site).consent(world.start()["authorization_url"], decline=True)
    with pytest.raises(AgentRequestError) as declined:
        world.agent().consent_callback(BANK, redirect)
    assert declined.value.code == "authorization_denied" and "access_denied" in str(declined.value)


def test_a_consent_by_scope_alone_completes(world: World) -> None:
    """No authorization_details asked, none in the token answer (RFC 9396 §7 returns what was requested)."""
    started = world.agent().par(BANK, "openid accounts", REDIRECT_URI)
    tokens = world.agent().consent_callback(BANK, Browser(world.site).consent(started["authorization_url"]))
    assert tokens["authorization_details"] == [] and tokens["id_token_claims"]["sub"] == "customer-1"
    assert tokens["refresh_token"] is None  # no offline_access: oidc-provider issues none, and that is no error
    assert world.introspect(tokens["access_token"])["active"]


@pytest.mark.parametrize("redirect_uri,details,words", [
    ("https://tpp.example/elsewhere", DETAILS, "redirect_uri"),
    (REDIRECT_URI, [{"type": "urn:example:unknown"}], "invalid_authorization_details"),
])
def test_a_par_the_server_refuses_is_one_clear_line(world: World, redirect_uri: str, details: list[dict[str, Any]],
                                                    words: str) -> None:
    with pytest.raises(AgentRequestError) as refused:
        world.agent().par(BANK, "openid accounts", redirect_uri, authorization_details=details)
    message = str(refused.value)
    assert words in message and "x-fapi-interaction-id" in message and "\n" not in message, message


def test_the_cli_gets_a_token_and_starts_completes_and_refreshes_a_consent(world: World, tmp_path: Path) -> None:
    token = cli(world.config, "token", BANK, "--scope", "accounts", "--no-cache", "--show-token", "--json")
    assert token.returncode == 0, token.stderr
    assert world.introspect(json.loads(token.stdout)["access_token"])["cnf"] == {"x5t#S256": world.transport_thumbprint}

    started = cli(world.config, "par", BANK, "--scope", "openid accounts offline_access", "--redirect-uri",
                  REDIRECT_URI, "--prompt", "consent", "--authorization-details", json.dumps(DETAILS), "--json")
    assert started.returncode == 0, started.stderr
    redirect = Browser(world.site).consent(json.loads(started.stdout)["authorization_url"])
    kept = tmp_path / "consent.refresh"
    done = cli(world.config, "consent", "callback", BANK, "--url", redirect, "--refresh-token-file", str(kept))
    assert done.returncode == 0, done.stderr
    assert "Authorized" in done.stdout and "id_token: verified, sub 'customer-1'" in done.stdout
    first = kept.read_text().strip()
    refreshed = cli(world.config, "consent", "refresh", BANK, "--refresh-token-file", str(kept), "--json")
    assert refreshed.returncode == 0 and json.loads(refreshed.stdout)["rotated"], refreshed.stderr
    old = tmp_path / "old.refresh"
    old.write_text(first + "\n")
    replayed = cli(world.config, "consent", "refresh", BANK, "--refresh-token-file", str(old))
    assert replayed.returncode != 0 and "invalid_grant" in replayed.stderr and "Traceback" not in replayed.stderr


def test_a_plain_oauth_consent_without_openid_completes_without_id_token(world: World) -> None:
    started = world.agent().par(BANK, "accounts", REDIRECT_URI, authorization_details=DETAILS)
    assert "scope=" not in started["authorization_url"]  # no openid it did not ask for
    tokens = world.agent().consent_callback(BANK, Browser(world.site).consent(started["authorization_url"]))
    assert tokens["id_token_claims"] is None and tokens["authorization_details"][0]["type"] == CONSENT_TYPE
    with pytest.raises(AgentRequestError) as nonce_without_openid:
        world.agent().par(BANK, "accounts", REDIRECT_URI, nonce="n-1")
    assert nonce_without_openid.value.code == "bad_field" and "add openid" in nonce_without_openid.value.hint
