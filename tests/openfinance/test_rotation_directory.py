"""A rotation's certificate from the directory's API (`rotate start KEY --directory`, `rotate request KEY`) when
the directory refuses (4xx), fails (5xx), answers too late or issues a certificate for another key: one error
line saying what to do, nothing on the token, the rotation where it was, and `rotate request` again works; a
retry after a lost answer takes the certificate the directory made instead of asking for a second one. Through
the CLI on the token, and through a running agent's socket and the CLI that goes through it."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.audit import trail_files
from agent.client import AgentRequestError
from agent.errors import ExitStatus
from agent.x509.certificates import key_certificates
from tests.daemon.conftest import Daemon, public_dir  # noqa: F401 -- a fixture
from tests.openfinance.test_rotation import Fleet, agent, fleet  # noqa: F401 -- fixtures

_CREATE = "/certificates/rts"  # the CSR's POST (…/certificates/rtssigning, …/rtstransport), not the token's


def _status(fleet: Fleet, key: str) -> dict[str, Any]:  # noqa: F811
    shown = fleet.cli("rotate", "status", key, "--json")
    assert shown.returncode == 0, shown.stderr
    found: dict[str, Any] = json.loads(shown.stdout)
    return found


def _refused(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)
    return errors[0]


def _unchanged(fleet: Fleet, key: str, successor: str) -> None:  # noqa: F811
    """Where a failed request leaves the rotation: the successor made, no certificate on it, request it again."""
    view = _status(fleet, key)
    assert view["phase"] == "successor made, its certificate not imported", view
    assert view["next"] == f"tpp-agent rotate request {key}"
    [made] = [k for k in view["keys"] if k["role"] == "successor"]
    assert made["label"] == successor and made["on_token"] and made["certificate"] is None


def test_the_directory_failing_leaves_the_rotation_where_it_was_and_a_retry_works(fleet: Fleet) -> None:  # noqa: F811
    directory = fleet.directory
    successor = f"{fleet.signing_label}.2"
    retry = "run `tpp-agent rotate request signing` again"
    _refused(fleet.cli("rotate", "request", "signing"), 1, "no rotation of key 'signing' is under way")

    # A refusal (4xx) of the CSR: the directory's words, the successor kept, the way on.
    directory.fail_next(400, where=_CREATE)
    line = _refused(fleet.cli("rotate", "start", "signing", "--directory"), ExitStatus.PROTOCOL, retry)
    assert "the directory refused to make a signing certificate: HTTP 400: Injected" in line, line
    assert "model directory told to answer 400" in line
    _unchanged(fleet, "signing", successor)
    assert directory.certificates == {}

    # A failure (5xx), then a certificate for another key (refused before anything is stored).
    directory.fail_next(503, where=_CREATE)
    line = _refused(fleet.cli("rotate", "request", "signing"), ExitStatus.TEMPFAIL, retry)
    assert "the directory failed to make a signing certificate: HTTP 503" in line, line
    _unchanged(fleet, "signing", successor)
    directory.issue_for_other_key = True
    line = _refused(fleet.cli("rotate", "request", "signing"), ExitStatus.PROTOCOL, "nothing was imported", retry)
    assert "is for another key, not the CSR's" in line, line
    _unchanged(fleet, "signing", successor)
    [foreign] = directory.certificates

    # The directory makes the certificate but answers after the agent stopped waiting: the outcome unknown here.
    config = fleet.config.read_text()
    fleet.config.write_text(config.replace("[directory]\n", "[directory]\nread_timeout = 1.5\n", 1))
    directory.stall_next(5, where=_CREATE)
    line = _refused(fleet.cli("rotate", "request", "signing"), ExitStatus.TEMPFAIL, retry)
    assert "bank 'directory'" in line and "x-fapi-interaction-id" in line, line
    _unchanged(fleet, "signing", successor)
    [made] = [name for name in directory.certificates if name != foreign]

    # The retry finds that certificate (no second CSR) and imports it: the overlap starts.
    posts = [r for r in directory.requests if r[0] == "POST" and _CREATE in r[1]]
    done = fleet.cli("rotate", "request", "signing", "--json")
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert imported["reused"] is True and imported["directory_certificate"]["id"] == made
    assert imported["successor"] == successor and imported["signing_switch_after"]
    assert [r for r in directory.requests if r[0] == "POST" and _CREATE in r[1]] == posts
    stored = key_certificates(fleet.runtime.keys, f"pkcs11:object={successor};type=private").current
    assert stored is not None and stored.der == directory.certificates[made].certificate.public_bytes(Encoding.DER)
    assert _status(fleet, "signing")["phase"] == "overlap: the JWKS carries both kids"
    _refused(fleet.cli("rotate", "request", "signing"), 1, "is imported already")


def test_through_the_socket_and_the_cli_through_the_agent(fleet: Fleet, agent: Daemon) -> None:  # noqa: F811
    directory = fleet.directory
    client = agent.client()
    with pytest.raises(AgentRequestError) as early:
        client.call("POST", "/v1/keys/transport/rotation/request", {})
    assert early.value.status == 409 and early.value.code == "rotation_step"
    _, body = client.call("POST", "/v1/keys/transport/rotation", {})
    successor = json.loads(body)["successor"]

    for status, code in ((403, "directory_refused"), (500, "directory_failed")):
        directory.fail_next(status, where=_CREATE)
        with pytest.raises(AgentRequestError) as failed:
            client.call("POST", "/v1/keys/transport/rotation/request", {})
        assert (failed.value.status, failed.value.code) == (502, code), failed.value
        assert f"HTTP {status}: Injected" in str(failed.value)
        assert "run `tpp-agent rotate request transport` again" in failed.value.hint
        _unchanged(fleet, "transport", successor)
    with pytest.raises(AgentRequestError) as refused:  # a jws key's subject is not a transport key's to choose
        client.call("POST", "/v1/keys/transport/rotation/request", {"subject": "CN=someone,C=AE"})
    assert refused.value.code == "rotation_step" and "repeats the current certificate's subject" in str(refused.value)

    directory.fail_next(404, where=_CREATE)  # the CLI finds the agent and goes through it
    through = fleet.cli("rotate", "request", "transport")
    assert "through_agent" in through.stderr, through.stderr
    _refused(through, ExitStatus.PROTOCOL, "the directory refused to make a transport certificate: HTTP 404")
    _unchanged(fleet, "transport", successor)
    assert directory.certificates == {}

    done = fleet.cli("rotate", "request", "transport")
    assert done.returncode == 0 and "through_agent" in done.stderr, done.stderr
    [issued] = directory.certificates.values()
    assert done.stdout.startswith(f"the directory issued rtstransport certificate {issued.id}\nimported: ")
    assert "next: `tpp-agent rotate switch-transport transport`" in done.stdout
    assert _status(fleet, "transport")["phase"] == "overlap: 0 of 2 bank(s) switched"
    # Each request to the directory used the current transport key, audited as the admin's rotation step.
    audit = [json.loads(line) for path in trail_files(fleet.config.parent / "audit.jsonl")
             for line in path.read_text().splitlines()]  # every serving process's trail
    uses = [r for r in audit if r.get("algorithm") == "tls-client-auth" and r["operation"] == "rotate"]
    assert uses and all(r["uid"] == 0 for r in uses)
