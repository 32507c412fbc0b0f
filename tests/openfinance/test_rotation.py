"""A whole rotation of the transport and the signing key through a running agent and its CLI, against two model
banks and the model directory (which issues the successors' certificates through its API), while a client keeps
signing, getting tokens and forwarding: no request fails, the JWKS carries both kids in the overlap, each bank is
registered with the new certificate before it gets it, and from the switch on the bank's TLS server sees only the
new certificate."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from jwcrypto import jwk, jws

from agent import config as config_module
from agent.client import AgentRequestError
from agent.runtime import Runtime
from modelbank import ModelBank
from modelbank.directory import ModelDirectory
from pkcs11_backends.uri import Pkcs11Uri
from tests.daemon.conftest import TPP_AGENT, Daemon, launch, public_dir  # noqa: F401 -- a fixture
from tests.openfinance.bank_world import make_identity

# [rotation] jwks_cache_window of these tests, seconds. A step refused as "too early" must reach the token within
# it of the overlap's start (or the signing switch): one CLI process on a loaded 2-core machine takes a few
# seconds. The steps after the window wait for its end by the state's stamps (wait_window), not a fixed sleep.
WINDOW = 10.0
SCOPE = "accounts"
ORG, SS = "org-0001", "ss-0001"


@dataclasses.dataclass
class Fleet:
    """The TPP (one client id, a transport and a signing key with certificates), its two banks and the
    directory."""

    runtime: Runtime
    banks: dict[str, ModelBank]
    directory: ModelDirectory
    client_id: str
    transport_label: str
    signing_label: str
    config: Path

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TPP_AGENT, *args], capture_output=True, text=True, timeout=120, check=False,
                              input=stdin, env={**os.environ, "TPP_AGENT_CONFIG": str(self.config)})

    def issue(self, csr_pem: str) -> str:
        """A certificate for the CSR from the directory's CA (both banks trust it), handed over as a file: what
        `rotate import` takes, and what a TPP never asks the directory for (another key, another client id)."""
        return next(iter(self.banks.values())).ca.issue_from_csr(csr_pem.encode()).decode()


def wait_window(since: str) -> None:
    """Until WINDOW has passed since the state's stamp ``since`` (ISO 8601): what the agent's check reads."""
    end = datetime.datetime.fromisoformat(since) + datetime.timedelta(seconds=WINDOW)
    time.sleep(max(0.0, (end - datetime.datetime.now(datetime.UTC)).total_seconds()) + 0.05)


def _identity(runtime: Runtime, bank: ModelBank, kind: str, client_id: str) -> str:
    """A key with its certificate, as bank_world makes them; its label (a rotation names keys by label)."""
    label = Pkcs11Uri.parse(make_identity(runtime, bank, kind, client_id)).object
    assert label is not None
    return label


def _config(runtime: Runtime, softhsm_state: Path, state: Path, socket_dir: Path, banks: dict[str, ModelBank],
            directory: ModelDirectory, transport: str, signing: str, database: str | None = None) -> Path:
    token = runtime.config.pkcs11.token
    bank_tables = "".join(
        f'[banks.{name}]\ndiscovery_url = "{bank.discovery_url}"\nissuer = "{bank.issuer}"\n'
        f'ca_bundle = "{bank.ca_bundle}"\nclient_key = "transport"\n\n' for name, bank in banks.items())
    bank_tables += (f'[directory]\ntoken_endpoint = "{directory.token_endpoint}"\napi_url = "{directory.url}"\n'
                    f'organisation_id = "{ORG}"\nsoftware_statement_id = "{SS}"\nclient_id = "{directory.client_id}"\n'
                    f'ca_bundle = "{directory.ca.cert_file}"\nclient_key = "transport"\n\n')
    text = (f'[state]\ndir = "{state}"\n' + (f'database = "{database}"\n' if database else "") + "\n"
            f'[pkcs11]\nmodule = "{config_module.default_module()}"\ntoken = "{token}"\n'
            f'pin_file = "{softhsm_state / "softhsm" / "user.pin"}"\n\n'
            f'[pkcs11.environment]\nSOFTHSM2_CONF = "{softhsm_state / "softhsm" / "softhsm2.conf"}"\n\n'
            f'[keys.transport]\nuri = "pkcs11:token={token};object={transport};type=private"\npurpose = "tls"\n\n'
            f'[keys.signing]\nuri = "pkcs11:token={token};object={signing};type=private"\n\n'
            f'[tokens]\nsigning_key = "signing"\n\n[rotation]\njwks_cache_window = {WINDOW}\n\n' + bank_tables +
            f'[daemon]\nsocket = "{socket_dir}/run/agent.sock"\naudit_file = "{state}/audit.jsonl"\n'
            f'health_interval = 0.5\nbank_workers = 4\n\n[policy]\nadmin_users = ["root"]\n')
    path = state / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture
def fleet(shared_runtime: Runtime, softhsm_state: Path, tmp_path: Path,
          public_dir: Path) -> Iterator[Fleet]:  # noqa: F811
    client_id = str(uuid.uuid4())
    shared = tmp_path / "banks"  # one CA for both banks: the directory's
    with ModelBank(shared) as first, ModelBank(shared) as second, \
            ModelDirectory(tmp_path / "directory", first.ca, organisation_id=ORG, software_statement_id=SS,
                           client_id=client_id) as directory:
        banks = {"mb": first, "mb2": second}
        transport = _identity(shared_runtime, first, "transport", client_id)
        signing = _identity(shared_runtime, first, "signing", client_id)
        state = tmp_path / "tpp"
        state.mkdir()
        config = _config(shared_runtime, softhsm_state, state, public_dir, banks, directory, transport, signing)
        yield Fleet(shared_runtime, banks, directory, client_id, transport, signing, config)


@pytest.fixture
def agent(fleet: Fleet, public_dir: Path) -> Iterator[Daemon]:  # noqa: F811
    daemon = launch(fleet.config, public_dir)
    yield daemon
    daemon.stop()
    daemon.notify.close()


class Load:
    """A client of the agent that keeps signing, getting fresh tokens (a new client assertion each) and forwarding
    to both banks; every request's start time and the interaction id the bank saw are kept."""

    def __init__(self, daemon: Daemon) -> None:
        self.client = daemon.client()
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.forwards: list[tuple[float, str, str]] = []  # (started, bank, interaction id at the bank)
        self.kids: list[tuple[float, str]] = []  # (signed at, kid of the JWS)
        self.signed: list[str] = []  # every JWS, to verify against the JWK its kid names
        self.thread = threading.Thread(target=self._run, name="load")

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)
        self.client.close()

    def _run(self) -> None:
        while not self.stop.is_set():
            for bank in ("mb", "mb2"):
                started = time.monotonic()
                try:
                    compact = self.client.jws("signing", b'{"rotation":"test"}')
                    header = json.loads(base64.urlsafe_b64decode(compact.split(".")[0] + "=="))
                    self.kids.append((started, header["kid"]))
                    self.signed.append(compact)
                    self.client.token(bank, SCOPE, refresh=True)
                    started = time.monotonic()
                    _, payload = self.client.call("POST", f"/v1/banks/{bank}/forward",
                                                  {"method": "GET", "path": "/.well-known/openid-configuration"})
                    answer = json.loads(payload)
                    if answer["status"] != 200:
                        self.failures.append(f"{bank}: forward answered {answer['status']}")
                    self.forwards.append((started, bank, answer["interaction_id"]))
                except AgentRequestError as exc:
                    self.failures.append(f"{bank}: {exc.code}: {exc}")


def _sha256(pem: str) -> str:
    return x509.load_pem_x509_certificate(pem.encode()).fingerprint(hashes.SHA256()).hex()


def _status(fleet: Fleet, key: str) -> dict[str, Any]:
    result = fleet.cli("rotate", "status", key, "--json")
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "through_agent" in result.stderr  # the agent ran the step (and applied it at once)
    return result


def _through_directory(fleet: Fleet, key: str, kind: str) -> dict[str, Any]:
    """`rotate start KEY --directory` through the agent: the successor, the certificate the directory issued for
    its CSR on the token, the overlap started; the import's answer."""
    answer = json.loads(_ok(fleet.cli("rotate", "start", key, "--directory", "--json")).stdout)
    started, imported = answer["started"], answer["imported"]
    assert started["csr"].startswith("-----BEGIN CERTIFICATE REQUEST-----")
    issued = fleet.directory.certificates[imported["directory_certificate"]["id"]]
    assert issued.type == kind and imported["reused"] is False
    assert imported["successor"] == started["successor"] and imported["overlap_started_at"]
    assert imported["certificate"]["sha256"] == _sha256(issued.pem.decode())  # what the directory issued
    found: dict[str, Any] = imported
    return found


def test_a_full_rotation_under_load(fleet: Fleet, agent: Daemon) -> None:
    client = agent.client()
    for name, bank in fleet.banks.items():
        client.register(name)
        bank.tokens.register_client(fleet.client_id, client.jwks())  # what the directory tells the bank
    old_transport = {r.sha256 for bank in fleet.banks.values() for r in bank.registrations}
    assert len(old_transport) == 1
    old_kid = client.jwks()["keys"][0]["kid"]
    token_before = client.token("mb", SCOPE)["access_token"]

    with Load(agent) as load:
        time.sleep(0.5)
        # -- the signing key: the successor, its CSR to the directory, the certificate it issues imported ------
        signing = _through_directory(fleet, "signing", "rtssigning")
        published_keys = {k["kid"]: {m: k[m] for m in ("kty", "n", "e")} for k in client.jwks()["keys"]}
        published = [k["kid"] for k in client.jwks()["keys"]]
        assert len(published) == 2 and published[0] == old_kid  # both kids; the old one still signs
        new_kid = published[1]
        early = fleet.cli("rotate", "switch-signing", "signing")
        assert early.returncode == 75 and "too early" in early.stderr, early.stderr  # EX_TEMPFAIL: retry later
        for bank in fleet.banks.values():
            bank.tokens.register_client(fleet.client_id, client.jwks())  # the banks' caches refresh
        wait_window(signing["overlap_started_at"])
        switch = json.loads(_ok(fleet.cli("rotate", "switch-signing", "signing", "--json")).stdout)
        signing_switched = time.monotonic()
        assert [k["kid"] for k in client.jwks()["keys"]] == [new_kid, old_kid]
        assertion = client.client_assertion("mb")["client_assertion"]  # what the token requests carry now
        assert json.loads(base64.urlsafe_b64decode(assertion.split(".")[0] + "=="))["kid"] == new_kid

        # -- the transport key, bank by bank --------------------------------------------------------------
        transport = _through_directory(fleet, "transport", "rtstransport")
        new_sha = transport["certificate"]["sha256"]
        assert _status(fleet, "transport")["phase"] == "overlap: 0 of 2 bank(s) switched"
        time.sleep(0.5)
        launched = time.monotonic()
        _ok(fleet.cli("rotate", "switch-transport", "transport", "--bank", "mb"))
        switched = {"mb": time.monotonic()}
        assert [r.sha256 for r in fleet.banks["mb"].registrations][-1] == new_sha  # registered before it is used
        assert [r.sha256 for r in fleet.banks["mb2"].registrations] == [*old_transport]  # not yet there
        shown = fleet.cli("registrations", "--json")
        assert shown.returncode == 0, shown.stderr
        registered = {v["bank"]: (v["certificate_sha256"], v["state"]) for v in json.loads(shown.stdout)}
        assert registered == {"mb": (new_sha, "registered"), "mb2": (*old_transport, "registered")}
        time.sleep(0.5)
        rest = _ok(fleet.cli("rotate", "switch-transport", "transport"))  # every bank left: mb2
        switched["mb2"] = time.monotonic()
        assert "bank 'mb2'" in rest.stdout and "every bank switched" in rest.stdout
        time.sleep(0.5)

    assert load.failures == []
    # The kid of every JWS: the old one until the switch, the new one from it on.
    assert {kid for at, kid in load.kids if at > signing_switched} == {new_kid}
    assert old_kid in {kid for _, kid in load.kids}
    for compact in load.signed:  # each signed by the key its kid names, before the switch and after
        header = json.loads(base64.urlsafe_b64decode(compact.split(".")[0] + "=="))
        verifier = jws.JWS()
        verifier.deserialize(compact)
        verifier.verify(jwk.JWK(**published_keys[header["kid"]]))
    # What each bank's TLS server saw: the old certificate until its switch, never after it.
    for name, bank in fleet.banks.items():
        seen = [(at, bank.presented[interaction]) for at, b, interaction in load.forwards if b == name]
        # (a forward started just before the switch's command may reach the bank after it: a second's margin)
        assert {sha for at, sha in seen if at < launched - 1} == old_transport
        assert {sha for at, sha in seen if at > switched[name]} == {new_sha}, name
        assert sum(1 for at, _ in seen if at > switched[name]) > 0
    # The access tokens bound to the old certificate were dropped at the switch: a new one, bound to the new.
    after = client.token("mb", SCOPE)
    # (the load's last token, maybe, issued in an earlier interaction: token_interaction_id names that one)
    issued_in = after["token_interaction_id"]
    assert after["access_token"] != token_before and fleet.banks["mb"].presented[issued_in] == new_sha
    accounts = client.forward("mb", "GET", "/accounts", headers={"Authorization": f"Bearer {after['access_token']}"})
    assert accounts[0] == 200

    # -- retire, status, remove ------------------------------------------------------------------------------
    view = _status(fleet, "signing")
    assert view["phase"] == "signing switched" and view["next"].startswith("tpp-agent rotate retire signing")
    wait_window(switch["signing_switched_at"])
    _ok(fleet.cli("rotate", "retire", "signing"))
    _ok(fleet.cli("rotate", "retire", "transport"))
    assert [k["kid"] for k in client.jwks()["keys"]] == [new_kid]  # the old key is out of the JWKS
    shown = fleet.cli("rotate", "status")
    assert shown.returncode == 0 and f"retired   {fleet.signing_label} " in shown.stdout, shown.stdout
    assert "no rotation under way" in shown.stdout
    removed = _ok(fleet.cli("rotate", "remove-retired", "transport", "--json"))
    assert json.loads(removed.stdout)["removed"][0]["objects"] >= 3  # private, public, certificate
    assert fleet.transport_label not in {k.label for k in fleet.runtime.keys.list()}
    # The directory gets the new certificate from the retire on, in the agent that has run all along.
    listed = _ok(fleet.cli("directory", "certs", "list", "--json"))
    assert {c["type"] for c in json.loads(listed.stdout)["certificates"]} == {"rtssigning", "rtstransport"}
    assert fleet.directory.presented[-1] == new_sha and old_transport.isdisjoint(fleet.directory.presented[-2:])
    # The agent still serves with the new keys, and a restart reads the same from the shared state.
    agent.stop()
    again = launch(fleet.config, agent.socket_path.parent.parent)
    try:
        assert [k["kid"] for k in again.client().jwks()["keys"]] == [new_kid]
        status, _, _ = again.client().forward("mb2", "GET", "/.well-known/openid-configuration")
        assert status == 200 and list(fleet.banks["mb2"].presented.values())[-1] == new_sha
    finally:
        again.stop()
        again.notify.close()
