"""Bank endpoints and CSRs through the daemon, against the model bank over real mTLS."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from modelbank import ModelBank
from pkcs11_backends.keys import KeySpec
from tests.daemon.conftest import NOBODY, Daemon, launch, nobody_rule
from tests.daemon.test_policy import as_user
from tests.openfinance.conftest import Tpp, bank, tpp  # noqa: F401 -- fixtures

MB = "mb"


@pytest.fixture
def bank_daemon(tpp: Tpp, bank: ModelBank, public_dir: Path) -> Iterator[Daemon]:  # noqa: F811
    config = tpp.write_config(bank)
    base = config.read_text()
    signing = tpp.runtime.keys.generate(f"signing-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
    extra = (f'\n[keys.transport]\nuri = "{tpp.key_uri}"\nalgorithms = ["PS256"]\n\n'
             f'[keys.signing]\nuri = "{signing.uri}"\n\n') + nobody_rule(
        public_dir, tpp.state_dir / "audit.jsonl", "nobody-forwards", ["forward", "discovery"], banks=[MB])
    config.write_text(base + extra)
    daemon = launch(config, public_dir)
    yield daemon
    daemon.stop()
    daemon.notify.close()


def test_a_bank_that_answers_slowly_holds_no_signing_worker(tpp: Tpp, bank: ModelBank,  # noqa: F811
                                                             public_dir: Path) -> None:
    config = tpp.write_config(bank)
    rules = nobody_rule(public_dir, tpp.state_dir / "audit.jsonl", "nobody-forwards", ["forward"], banks=[MB])
    signing = tpp.runtime.keys.generate(f"signing-{uuid.uuid4().hex[:10]}", KeySpec.parse("rsa:2048"))
    config.write_text(config.read_text() + f'\n[keys.transport]\nuri = "{tpp.key_uri}"\nalgorithms = ["PS256"]\n\n'
                      f'[keys.signing]\nuri = "{signing.uri}"\nalgorithms = ["PS256"]\nraw_sign = true\n\n'
                      + rules.replace("[daemon]\n", "[daemon]\nworkers = 1\nbank_workers = 2\n"))
    entered, release = threading.Event(), threading.Event()

    def hold(_: object) -> None:
        entered.set()
        release.wait(20)

    bank.on_registration = hold
    daemon = launch(config, public_dir)
    try:
        registering = threading.Thread(target=lambda: daemon.client().register(MB))
        registering.start()
        assert entered.wait(10)  # the registration is at the bank, which does not answer yet
        # The one signing worker is free: the bank call waits on a bank worker.
        assert len(daemon.client().sign("signing", b"meanwhile", "PS256")) == 256
        assert registering.is_alive()
        release.set()
        registering.join(20)
        assert [r.interaction_id for r in bank.registrations]
    finally:
        release.set()
        daemon.stop()
        daemon.notify.close()


def test_discovery_registration_and_forward_through_the_socket(bank_daemon: Daemon, bank: ModelBank) -> None:  # noqa: F811
    client = bank_daemon.client()
    document = client.discovery(MB)
    assert document["bank"] == MB and document["document"]["issuer"] == bank.issuer
    registered = client.register(MB)
    assert registered["bank"] == MB and registered["status"] in (200, 201, 204)

    discovery_path = bank.discovery_url[len(bank.issuer):]
    status, headers, body = client.forward(MB, "GET", discovery_path)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["issuer"] == bank.issuer
    # Every request sent with the transport key is a use of it, audited like a signature.
    audit = [json.loads(line) for line in bank_daemon.audit_file.read_text().splitlines()]
    bank_calls = [(r["operation"], r["result"]) for r in audit if r["algorithm"] == "tls-client-auth"]
    # Each names the host it went to.
    assert bank_calls == [("discovery", f"http 200 from {bank.issuer}"),
                          ("register", f"http {registered['status']} from {bank.issuer}"),
                          ("forward", f"http 200 from {bank.issuer}")]


def test_forward_is_no_open_proxy(bank_daemon: Daemon) -> None:
    cases = [({"method": "GET", "url": "https://example.org/"}, "host_not_allowed"),
             ({"method": "GET", "url": "https://user@127.0.0.1/"}, "host_not_allowed"),
             ({"method": "GET", "path": "//example.org/x"}, "bad_path"),
             ({"method": "GET", "path": "/x", "url": "https://example.org/"}, "missing_field"),
             ({"method": "CONNECT", "path": "/x"}, "bad_field")]
    for body, code in cases:
        result = as_user(bank_daemon, 0, 0, "POST", f"/v1/banks/{MB}/forward", json.dumps(body))
        assert result["status"] == 400 and json.loads(str(result["body"]))["code"] == code, body
    unknown = as_user(bank_daemon, 0, 0, "POST", "/v1/banks/elsewhere/forward", json.dumps(cases[2][0]))
    assert unknown["status"] == 404 and json.loads(str(unknown["body"]))["code"] == "unknown_bank"


def test_policy_for_banks_and_admin_only_csr(bank_daemon: Daemon) -> None:
    denied = as_user(bank_daemon, NOBODY, NOBODY, "POST", f"/v1/banks/{MB}/registration", "{}")
    assert denied["status"] == 403 and "'register' at bank 'mb'" in json.loads(str(denied["body"]))["message"]
    subject = json.dumps({"subject": "CN=2f0c8e8e-9a0e-4d6e-8f53-0a7b7c1d2e3f,OU=org-0001,O=Test TPP,C=AE"})
    refused = as_user(bank_daemon, NOBODY, NOBODY, "POST", "/v1/keys/transport/csr", subject)
    assert refused["status"] == 403 and "admin operation" in json.loads(str(refused["body"]))["message"]
    # The transport key's CSR is the operator's step on the host, never a socket call (not even an admin's).
    transport = as_user(bank_daemon, 0, 0, "POST", "/v1/keys/transport/csr", subject)
    assert transport["status"] == 403 and json.loads(str(transport["body"]))["code"] == "key_purpose"
    made = as_user(bank_daemon, 0, 0, "POST", "/v1/keys/signing/csr", subject)
    assert made["status"] == 200
    request = x509.load_pem_x509_csr(json.loads(str(made["body"]))["pem"].encode())
    assert request.is_signature_valid and "OU=org-0001" in request.subject.rfc4514_string()


def test_forward_reaches_only_the_endpoints_discovery_names(bank_daemon: Daemon, bank: ModelBank) -> None:  # noqa: F811
    # A bank's document may hold any URL (service_documentation, op_policy_uri...): another bank's host there
    # must not become a host the caller may reach through this bank.
    named = bank.discovery_document
    elsewhere = "https://127.0.0.2:4443"
    bank.discovery_document = lambda: {**named(), "service_documentation": f"{elsewhere}/tpp-registration",  # type: ignore[method-assign]
                                       "op_policy_uri": f"{elsewhere}/policy"}
    bank_daemon.client().discovery(MB, refresh=True)
    for url in (f"{elsewhere}/tpp-registration", f"{elsewhere}/policy"):
        answer = as_user(bank_daemon, 0, 0, "POST", f"/v1/banks/{MB}/forward", json.dumps({"method": "GET",
                                                                                           "url": url}))
        error = json.loads(str(answer["body"]))
        assert answer["status"] == 400 and error["code"] == "host_not_allowed", answer
        assert elsewhere not in error["hint"] and bank.issuer in error["hint"]
    # The token endpoint is named: reachable.
    status, _, _ = bank_daemon.client().forward(MB, "GET", f"{bank.issuer}/token")
    assert status == 404  # the bank's own answer to a GET there, not the agent's refusal
