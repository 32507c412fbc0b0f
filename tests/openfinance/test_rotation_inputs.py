"""Rotation steps out of turn or with the wrong certificate: each a one-line error with its exit status, the
state unchanged; and two hosts taking a step at once on one database: one does it, the other is told."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from agent.x509.csr import build_csr
from agent.x509.subject import directory_subject
from pkcs11_backends.keys import KeySpec
from tests.daemon.conftest import TPP_AGENT, Daemon, launch, public_dir  # noqa: F401 -- a fixture
from tests.daemon.test_policy import as_user
from tests.openfinance.test_rotation import WINDOW, Fleet, _config, fleet, wait_window  # noqa: F401 -- a fixture
from tests.pg import PostgresServer


def _fails(result: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    assert result.returncode == status, (result.returncode, result.stderr)
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    return result.stderr


def _phase(fleet: Fleet, key: str) -> str:  # noqa: F811
    result = fleet.cli("rotate", "status", key, "--json")
    assert result.returncode == 0, result.stderr
    return str(json.loads(result.stdout)["phase"])


def _certificate_for_another_key(fleet: Fleet, tmp_path: Path) -> Path:  # noqa: F811
    other = fleet.runtime.keys.generate(f"other-{uuid.uuid4().hex[:8]}", KeySpec.parse("rsa:2048"))
    subject = directory_subject("Test TPP L.L.C.", "org-0001", fleet.client_id)
    path = tmp_path / "other.pem"
    path.write_text(fleet.issue(build_csr(fleet.runtime.keys, str(other.uri), subject).pem))
    return path


def test_steps_out_of_turn_and_wrong_certificates(fleet: Fleet, tmp_path: Path, public_dir: Path) -> None:  # noqa: F811
    cert = tmp_path / "successor.pem"
    cert.write_text("placeholder")
    current = tmp_path / "current.pem"
    current.write_text(fleet.cli("cert", "show", "--key", "signing", "--pem").stdout)
    _fails(fleet.cli("rotate", "import", "transport", str(current)), 1, "no rotation of key 'transport' is under way",
           "hint: start one with `tpp-agent rotate start transport`")
    _fails(fleet.cli("rotate", "switch-signing", "signing"), 1, "no rotation of key 'signing' is under way")
    _fails(fleet.cli("rotate", "switch-transport", "transport", "--bank", "mb"), 1, "no rotation")
    _fails(fleet.cli("rotate", "remove-retired", "signing"), 1, "has no retired key")
    _fails(fleet.cli("rotate", "start", "nosuch"), 66, "no key 'nosuch' is configured")
    _fails(fleet.cli("rotate", "start", "transport", "--subject", "CN=someone,C=AE"), 1,
           "repeats the current certificate's subject")
    assert _phase(fleet, "signing") == "no rotation under way"

    started = fleet.cli("rotate", "signing", "--json")  # `rotate KEY`: rotate start KEY
    assert started.returncode == 0, started.stderr
    made = json.loads(started.stdout)
    assert made["successor"] == f"{fleet.signing_label}.2" and made["current"] == fleet.signing_label
    _fails(fleet.cli("rotate", "start", "signing"), 1, "a rotation of key 'signing' is under way",
           f"successor '{fleet.signing_label}.2'")
    # A certificate for another key, the current key's own, and no certificate at all: refused, nothing changed.
    _fails(fleet.cli("rotate", "import", "signing", str(_certificate_for_another_key(fleet, tmp_path))), 65,
           f"is for another key, not '{fleet.signing_label}.2'")
    _fails(fleet.cli("rotate", "import", "signing", str(current)), 65, "is the current key's")
    _fails(fleet.cli("rotate", "import", "signing", str(cert)), 65, "neither a PEM nor a DER")
    _fails(fleet.cli("rotate", "switch-signing", "signing"), 1, "is not imported yet",
           "`tpp-agent rotate import signing CERT`")
    assert _phase(fleet, "signing") == "successor made, its certificate not imported"

    # The successor's certificate through `cert import` is the rotation's import: the overlap starts.
    cert.write_text(fleet.issue(made["csr"]))
    imported = fleet.cli("cert", "import", "--key", "signing", str(cert))
    assert imported.returncode == 0 and "starts the overlap" in imported.stderr, imported.stderr
    # First after the import: "too early" holds for WINDOW after the overlap started, the other checks for ever.
    _fails(fleet.cli("rotate", "switch-signing", "signing"), 75, "too early", f"jwks_cache_window = {WINDOW:g} s")
    view = json.loads(fleet.cli("rotate", "status", "signing", "--json").stdout)
    assert view["phase"] == "overlap: the JWKS carries both kids"
    _fails(fleet.cli("rotate", "retire", "signing"), 1, f"still signs with '{fleet.signing_label}'",
           "`tpp-agent rotate switch-signing signing`")
    _fails(fleet.cli("rotate", "switch-transport", "signing", "--bank", "mb"), 1, "is not a transport key")
    _fails(fleet.cli("rotate", "switch-signing", "transport"), 1, "is a transport key")
    _fails(fleet.cli("rotate", "request", "signing"), 1, "is imported already: the overlap started at")
    wait_window(view["overlap_started_at"])
    assert fleet.cli("rotate", "switch-signing", "signing").returncode == 0
    _fails(fleet.cli("rotate", "switch-signing", "signing"), 1, "switched to", "already")

    # A transport successor certified for another client id: banks would see another application.
    started = fleet.cli("rotate", "start", "transport", "--json")
    assert started.returncode == 0, started.stderr
    successor = json.loads(started.stdout)["uri"]
    stranger = directory_subject("Test TPP L.L.C.", "org-0001", str(uuid.uuid4()))
    wrong = tmp_path / "wrong-cn.pem"
    wrong.write_text(fleet.issue(build_csr(fleet.runtime.keys, successor, stranger).pem))
    _fails(fleet.cli("rotate", "import", "transport", str(wrong)), 65, "banks would see another application")
    _fails(fleet.cli("rotate", "switch-transport", "transport", "--bank", "elsewhere"), 78, "no bank 'elsewhere'")
    _fails(fleet.cli("rotate", "switch-transport", "transport", "--bank", "mb"), 1, "is not imported yet")

    # Through the socket: the same refusals, as 409 with their codes (and Retry-After for a window).
    daemon = launch(fleet.config, public_dir)
    try:
        again = as_user(daemon, 0, 0, "POST", "/v1/keys/signing/rotation/switch-signing")
        assert again["status"] == 409 and json.loads(str(again["body"]))["code"] == "rotation_step", again
        early = as_user(daemon, 0, 0, "POST", "/v1/keys/transport/rotation/retire")
        assert early["status"] == 409 and "not imported yet" in json.loads(str(early["body"]))["message"]
        unknown = as_user(daemon, 0, 0, "POST", "/v1/keys/transport/rotation/switch-transport",
                          json.dumps({"bank": "elsewhere"}))
        assert unknown["status"] == 404 and json.loads(str(unknown["body"]))["code"] == "unknown_bank", unknown
    finally:
        daemon.stop()
        daemon.notify.close()


def _host_b(fleet: Fleet, tmp_path: Path, softhsm_state: Path, public_dir: Path, database: str) -> Fleet:  # noqa: F811
    """A second host: its own state dir and its own copy of the HSM (as a fleet's HSMs clone keys), one database."""
    hsm = tmp_path / "host-b-hsm"
    shutil.copytree(softhsm_state / "softhsm", hsm / "softhsm")
    conf = hsm / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(softhsm_state / "softhsm"), str(hsm / "softhsm")))
    state = tmp_path / "host-b"
    state.mkdir()
    config = _config(fleet.runtime, hsm, state, public_dir / "b", fleet.banks, fleet.directory, fleet.transport_label,
                     fleet.signing_label, database)
    return Fleet(fleet.runtime, fleet.banks, fleet.directory, fleet.client_id, fleet.transport_label,
                 fleet.signing_label, config)


def _race(*commands: tuple[Fleet, list[str]]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([TPP_AGENT, "--direct", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "TPP_AGENT_CONFIG": str(host.config)})
             for host, args in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def test_two_hosts_take_steps_at_once(fleet: Fleet, tmp_path: Path, softhsm_state: Path,  # noqa: F811
                                      public_dir: Path, postgres_server: PostgresServer) -> None:  # noqa: F811
    database = postgres_server.create_database()
    host_a = Fleet(fleet.runtime, fleet.banks, fleet.directory, fleet.client_id, fleet.transport_label,
                   fleet.signing_label, _config(fleet.runtime, softhsm_state, fleet.config.parent, public_dir,
                                                fleet.banks, fleet.directory, fleet.transport_label,
                                                fleet.signing_label, database))
    overlap: dict[str, str] = {}
    for key in ("signing", "transport"):  # host A makes the successors, certified by the directory; then its HSM
        made = host_a.cli("rotate", "start", key, "--directory", "--json")  # is cloned to host B
        assert made.returncode == 0, made.stderr
        overlap[key] = json.loads(made.stdout)["imported"]["overlap_started_at"]
    for name in host_a.banks:
        assert host_a.cli("--direct", "register", name).returncode == 0
    host_b = _host_b(fleet, tmp_path, softhsm_state, public_dir, database)
    assert json.loads(host_b.cli("rotate", "status", "signing", "--json").stdout)["phase"] == \
        "overlap: the JWKS carries both kids"  # host B reads host A's rotation from the shared state
    wait_window(overlap["signing"])

    # Both switch signing at once: one does, the other is told it was done (or changed under it), nothing else.
    switch = ["rotate", "switch-signing", "signing"]
    results = _race((host_a, switch), (host_b, switch))
    assert sorted(r.returncode for r in results)[0] == 0, [r.stderr for r in results]
    [loser] = [r for r in results if r.returncode != 0]
    assert loser.returncode in (1, 75) and ("already" in loser.stderr or "changed since it was read" in
                                            loser.stderr), loser.stderr
    # Each switches another bank at once: both switches stand (merged, not overwritten).
    results = _race((host_a, ["rotate", "switch-transport", "transport", "--bank", "mb"]),
                    (host_b, ["rotate", "switch-transport", "transport", "--bank", "mb2"]))
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    view = json.loads(host_a.cli("rotate", "status", "transport", "--json").stdout)
    assert view["phase"] == "every bank switched" and all(b["switched_at"] for b in view["banks"])
    successor = f"{fleet.transport_label}.2"
    assert {b["key"] for b in view["banks"]} == {successor}
    # Each bank got the successor's certificate registered once for the fleet, then presented it.
    for bank in fleet.banks.values():
        assert len({r.sha256 for r in bank.registrations}) == 2
