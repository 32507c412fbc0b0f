"""HSM faults seen through the running daemon: the token directory moved away and back while
requests flow, and a C_Sign that hangs. The process is never restarted."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.client import AgentClient, AgentRequestError
from modelbank import ModelBank
from modelbank.server import Behaviour
from tests.conftest import Token
from tests.daemon.conftest import Daemon, daemon_config, keyed_token, launch, public_dir  # noqa: F401 -- fixtures
from tests.faults.bank_daemon import BANK, daemon_on, isolated_tpp
from tests.faults.conftest import Shim


def shim_daemon_config(token: Token, public_dir: Path, shim: Shim, pkcs11_lines: str = "") -> Path:  # noqa: F811
    """The daemon's test config with the fault-injection module in front of SoftHSM2."""
    environment = "".join(f'{k} = "{v}"\n' for k, v in shim.environment().items())
    path = token.write_config(daemon_config(token, public_dir))
    config = path.read_text().replace("[pkcs11]\n", "[pkcs11]\n" + pkcs11_lines).replace(
        f'module = "{shim.environment()["TPP_SHIM_TARGET"]}"', f'module = "{shim.path}"')
    path.write_text(config.replace("[pkcs11.environment]\n", "[pkcs11.environment]\n" + environment))
    return path


def eventually(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{check.__name__} did not hold within {timeout}s")
        time.sleep(0.1)


def refused(call: Callable[[], object]) -> AgentRequestError:
    with pytest.raises(AgentRequestError) as caught:
        call()
    return caught.value


def is_ready(client: AgentClient) -> bool:
    try:
        return bool(client.ready()["ready"])
    except AgentRequestError:
        return False


@pytest.fixture
def bank(tmp_path: Path) -> Iterator[ModelBank]:
    # Every answer closes its connection: each forward needs a fresh handshake with the token key.
    with ModelBank(tmp_path / "bank", behaviour=Behaviour(keep_alive=False)) as running:
        yield running


def test_token_away_and_back_signing_and_bank_calls_resume_in_the_same_process(
        tmp_path: Path, public_dir: Path, bank: ModelBank) -> None:  # noqa: F811
    tpp = isolated_tpp(tmp_path / "tpp", bank)
    daemon = daemon_on(tpp, bank, public_dir)
    try:
        client = daemon.client()
        path = bank.discovery_url[len(bank.issuer):]
        assert client.forward(BANK, "GET", path)[0] == 200
        assert len(client.sign("signing", b"before", "ES256")) == 64
        handshakes = bank.handshakes

        tpp.tokens.rename(tpp.tokens.with_name("tokens.away"))
        eventually(lambda: not is_ready(client))
        not_ready = refused(client.ready)
        assert not_ready.status == 503 and not_ready.code == "not_ready"
        for call in (lambda: client.sign("signing", b"away", "ES256"), lambda: client.forward(BANK, "GET", path)):
            started = time.monotonic()
            error = refused(call)
            assert time.monotonic() - started < 5  # fails fast, not after a TLS or HSM time-out
            assert error.status == 503 and error.code == "token_unavailable" and error.interaction_id
            assert "unavailable" in str(error)
        assert bank.handshakes == handshakes  # nothing reached the bank with a dead key

        tpp.tokens.with_name("tokens.away").rename(tpp.tokens)
        eventually(lambda: is_ready(client))
        assert len(client.sign("signing", b"after", "ES256")) == 64
        for _ in range(3):
            status, _, body = client.forward(BANK, "GET", path)
            assert status == 200 and json.loads(body)["issuer"] == bank.issuer
        assert bank.handshakes == handshakes + 3  # three new handshakes, each signed on the token again
        assert daemon.proc.poll() is None
        log = daemon.stderr()
        assert '"event": "transport_renewed"' in log  # the module was re-initialised, the TLS key reloaded
    finally:
        daemon.stop()
        daemon.notify.close()


def test_hung_sign_through_the_daemon_is_bounded_stops_the_watchdog_and_resumes(
        keyed_token: Token, public_dir: Path, shim: Shim) -> None:  # noqa: F811
    path = shim_daemon_config(keyed_token, public_dir, shim, "call_timeout = 0.5\n")
    # One worker: everything after the hang is served only if the stuck worker was replaced.
    path.write_text(path.read_text().replace("workers = 4", "workers = 1"))
    daemon: Daemon = launch(path, public_dir, env={"WATCHDOG_USEC": "600000"})
    try:
        client = daemon.client()
        daemon.wait_for("WATCHDOG=1", timeout=10)
        shim.set(hang_sign=1)
        started = time.monotonic()
        hung = refused(lambda: client.sign("ecsign", b"hangs", "ES256"))
        assert time.monotonic() - started < 5
        assert hung.status == 503 and hung.code == "token_unavailable" and "did not answer within 0.5s" in str(hung)
        again = refused(lambda: client.sign("ecsign", b"refused", "ES256"))
        assert "not answering" in str(again)
        eventually(lambda: not is_ready(client))

        # While the call hangs no WATCHDOG=1 goes out (systemd would restart a wedged agent).
        with contextlib.suppress(AssertionError):
            daemon.wait_for("WATCHDOG=1", timeout=0.5)  # one may already be on its way
        with pytest.raises(AssertionError, match="no WATCHDOG=1"):
            daemon.wait_for("WATCHDOG=1", timeout=2)

        shim.set()
        daemon.wait_for("WATCHDOG=1", timeout=10)
        eventually(lambda: is_ready(client))
        assert len(client.sign("ecsign", b"after", "ES256")) == 64
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
        daemon.notify.close()
