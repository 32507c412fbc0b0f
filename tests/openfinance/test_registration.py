"""Registration with the model bank over mTLS: success, each failure distinct, the log, no repeats."""

from __future__ import annotations

import datetime
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.lifecycle.readiness import transport_certificate_problems
from agent.openfinance.banks import parse_banks
from agent.openfinance.records import FAILED, REGISTERED, UNCERTAIN
from agent.openfinance.registration import (
    BankServerError,
    RegistrationError,
    RegistrationForbiddenError,
    RegistrationOutcomeUnknownError,
    RegistrationRejectedError,
    RegistrationUnauthorizedError,
)
from agent.openfinance.service import OpenFinance
from agent.state import SQLITE_NAME
from agent.transport import errors
from modelbank import Behaviour, ModelBank
from tests.openfinance.conftest import BANK, Tpp, issue_identity


@pytest.mark.parametrize("status", [204, 200, 201])
def test_any_2xx_registers_and_is_logged(service: OpenFinance, bank: ModelBank, tpp: Tpp, status: int) -> None:
    bank.behaviour = Behaviour(registration_status=status)
    result = service.registrar(BANK).register()
    assert result.status == status and result.already is None
    assert [r.subject for r in bank.registrations] == [tpp.subject]
    assert bank.registrations[0].interaction_id == result.interaction_id
    [attempt] = service.records.attempts()
    assert (attempt.bank, attempt.outcome, attempt.status, attempt.interaction_id) == (
        BANK, REGISTERED, status, result.interaction_id)
    assert attempt.endpoint == bank.url + "/tpp-registration"
    assert attempt.cert_sha256 == bank.registrations[0].sha256 and attempt.cert_subject == tpp.subject
    assert attempt.duration_ms is not None and attempt.error is None
    post = [r for r in bank.requests if r[0] == "POST"]
    assert post == [("POST", "/tpp-registration", result.interaction_id)]


def test_success_not_repeated_unless_forced(service: OpenFinance, bank: ModelBank) -> None:
    first = service.registrar(BANK).register()
    second = service.registrar(BANK).register()
    assert second.already is not None and second.interaction_id == first.interaction_id
    assert len(bank.registrations) == 1
    forced = service.registrar(BANK).register(force=True)
    assert forced.already is None and forced.interaction_id != first.interaction_id
    assert len(bank.registrations) == 2 and len(service.records.attempts()) == 2


def test_log_is_wal_with_full_sync_and_keeps_bodies(service: OpenFinance, bank: ModelBank, tpp: Tpp) -> None:
    bank.behaviour = Behaviour(registration_status=400)
    with pytest.raises(RegistrationRejectedError):
        service.registrar(BANK).register()
    db = sqlite3.connect(tpp.state_dir / SQLITE_NAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    body, error = db.execute("SELECT response_body, error FROM registrations").fetchone()
    assert "model bank configured to answer 400" in body and error.startswith("RegistrationRejectedError")


@pytest.mark.parametrize("mode,error", [
    ("400", RegistrationRejectedError),
    ("403", RegistrationForbiddenError),
    ("500", BankServerError),
    ("503", BankServerError),
    ("no-client-auth", RegistrationUnauthorizedError),
])
def test_http_failures_are_distinct_and_agent_stays_usable(service: OpenFinance, bank: ModelBank, mode: str,
                                                           error: type[RegistrationError]) -> None:
    bank.behaviour = Behaviour.failing(mode)
    registrar = service.registrar(BANK)
    with pytest.raises(error) as caught:
        registrar.register()
    exc = caught.value
    assert type(exc) is error
    assert f"bank {BANK!r}" in str(exc) and exc.interaction_id in str(exc) and exc.interaction_id in exc.hint
    assert exc.status == (401 if mode == "no-client-auth" else int(mode))
    [attempt] = service.records.attempts()
    assert attempt.outcome == FAILED and attempt.status == exc.status and attempt.interaction_id == exc.interaction_id

    bank.behaviour = Behaviour()
    if mode == "no-client-auth":
        service.close()  # its pooled connection was made without a certificate request; a new one gets one
    assert registrar.register().status == 204  # same service: still works
    assert [a.outcome for a in service.records.attempts()] == [FAILED, REGISTERED]


def _discovered_then(service: OpenFinance, bank: ModelBank, behaviour: Behaviour) -> None:
    """Fetch discovery normally, then make the bank misbehave for new connections."""
    service.discovery(BANK).get()
    service.close()  # drop pooled connections: the next request needs a new handshake
    bank.behaviour = behaviour


@pytest.mark.parametrize("mode,error", [
    ("unknown-ca", errors.ServerUntrustedError),
    ("expired-server-cert", errors.ServerUntrustedError),
    ("wrong-host", errors.HostnameMismatchError),
    ("untrusted-client", errors.ClientCertUnknownCaError),
])
def test_tls_failures_are_distinct_and_agent_stays_usable(service: OpenFinance, bank: ModelBank, mode: str,
                                                          error: type[errors.TransportError]) -> None:
    _discovered_then(service, bank, Behaviour.failing(mode))
    registrar = service.registrar(BANK)
    with pytest.raises(error) as caught:
        registrar.register()
    exc = caught.value
    assert type(exc) is error and exc.bank == BANK and exc.interaction_id in exc.hint
    [attempt] = service.records.attempts()
    assert attempt.outcome == FAILED and attempt.status is None and attempt.interaction_id == exc.interaction_id
    assert attempt.error is not None and attempt.error.startswith(error.__name__)
    assert not bank.registrations

    bank.behaviour = Behaviour()
    assert registrar.register().status == 204


def test_expired_client_certificate_is_never_presented(tpp: Tpp, bank: ModelBank) -> None:
    uri, _, pem = issue_identity(tpp.runtime, bank, expired=True)
    cert_file = tpp.state_dir / "expired.pem"
    cert_file.write_bytes(pem)
    service = tpp.service(bank, client_key=uri, client_certificate=str(cert_file))
    try:
        with pytest.raises(errors.ClientCertificateValidityError, match=f"bank '{BANK}'.* expired on"):
            service.registrar(BANK).register()
    finally:
        service.close()
    assert not bank.registrations and bank.handshakes == 0 and service.records.attempts() == []


def test_bank_that_never_answers_times_out_once(tpp: Tpp, bank: ModelBank) -> None:
    service = tpp.service(bank, read_timeout=0.5)
    try:
        _discovered_then(service, bank, Behaviour.failing("hang"))
        registrar = service.registrar(BANK)
        with pytest.raises(errors.ReadTimeoutError) as caught:
            registrar.register()
        [attempt] = service.records.attempts()
        assert attempt.outcome == UNCERTAIN and attempt.interaction_id == caught.value.interaction_id
        posts = [r for r in bank.requests if r[0] == "POST"]
        assert len(posts) == 1, "a POST that may have landed is never resent on its own"

        bank.behaviour = Behaviour()
        with pytest.raises(RegistrationOutcomeUnknownError) as unknown:
            registrar.register()  # nor on the operator's plain retry: first ask the bank
        assert caught.value.interaction_id in str(unknown.value) and "--force" in unknown.value.hint
        assert len([r for r in bank.requests if r[0] == "POST"]) == 1
        assert registrar.register(force=True).status == 204
    finally:
        service.close()


def test_readiness_names_the_banks_whose_certificate_cannot_be_presented(tpp: Tpp, bank: ModelBank) -> None:
    uri, _, pem = issue_identity(tpp.runtime, bank, expired=True)
    expired = tpp.state_dir / "expired.pem"
    expired.write_bytes(pem)
    config = tpp.config(bank)
    banks = {**parse_banks(config),
             "old": parse_banks(tpp.config(bank, client_key=uri, client_certificate=str(expired)))[BANK]}
    [problem] = transport_certificate_problems(tpp.runtime, banks)
    assert problem.startswith("bank 'old': the transport certificate CN=") and " is expired on " in problem
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=400)
    assert len(transport_certificate_problems(tpp.runtime, banks, later)) == 2
    assert transport_certificate_problems(tpp.runtime, parse_banks(config)) == []


def test_another_registration_endpoint_is_registered_again(tpp: Tpp, bank: ModelBank) -> None:
    """A bank moved from one registration endpoint to another (sandbox to production, here: to its mTLS alias)
    is registered again with the same certificate; back at the first, the first registration stands."""
    plain = tpp.service(bank)
    aliased = tpp.service(bank, use_mtls_aliases=True)
    try:
        first = plain.registrar(BANK).register()
        moved = aliased.registrar(BANK).register()
        assert moved.already is None and moved.endpoint == bank.url + "/mtls/tpp-registration"
        assert [r.path for r in bank.registrations] == ["/tpp-registration", "/mtls/tpp-registration"]
        back = plain.registrar(BANK).register()
        assert back.already is not None and back.interaction_id == first.interaction_id
        assert aliased.registrar(BANK).register().interaction_id == moved.interaction_id
    finally:
        plain.close()
        aliased.close()
    assert len(bank.registrations) == 2


@pytest.mark.parametrize("days,warned", [(None, False), (400, True)])
def test_the_tls_layer_warns_by_the_configured_threshold(tpp: Tpp, bank: ModelBank, days: int | None,
                                                         warned: bool) -> None:
    config = tpp.write_config(bank)
    if days is not None:
        config.write_text(config.read_text() + f"\n[certificates]\nexpiry_warning_days = {days}\n")
    env = {**os.environ, "TPP_AGENT_CONFIG": str(config)}
    env.pop("SOFTHSM2_CONF", None)
    done = subprocess.run([str(Path(sys.executable).parent / "tpp-agent"), "--direct", "discover", BANK],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    # The certificate has 395 days: due within 400 days, not within the default 30.
    assert ("tls.client_certificate_expiring" in done.stderr) is warned, done.stderr
    if warned:
        assert "expiry_warning_days=400" in done.stderr
