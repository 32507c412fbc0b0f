"""Metrics as a user checks them: scraped during real signing, token and forward traffic against the model bank
over mTLS, through the socket (as a user the policy lets scrape), the TCP port and the CLI, and parsed by
prometheus_client's own parser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import values

from agent import config as config_module
from agent.client import AgentRequestError
from agent.errors import ConfigError
from agent.metrics.instruments import Metrics
from agent.metrics.settings import MetricsSettings
from agent.metrics.text import families
from modelbank import ModelBank
from tests.daemon.conftest import NOBODY, TPP_AGENT, Daemon, launch, with_daemon_lines
from tests.daemon.test_policy import as_user
from tests.daemon.test_tokens import MB, Setup, configure_tpp
from tests.openfinance.conftest import Tpp, bank, tpp  # noqa: F401 -- fixtures

SCRAPER = 4545  # a uid in the socket's group that may read the metrics, nothing else
OTHER = 4546  # one that may sign, not read the metrics
GONE = "gone"  # a bank where nothing listens
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def metered(tpp: Tpp, bank: ModelBank, public_dir: Path) -> Iterator[tuple[Setup, int]]:  # noqa: F811
    port, nothing_there = free_port(), f"https://127.0.0.1:{free_port()}"
    config, client_id, transport = configure_tpp(tpp, bank, public_dir, "nobody-signs", ["jws", "public", "forward"],
                                                 keys=["signing"])
    config.write_text(with_daemon_lines(config.read_text(), "processes = 2\n") + (
        f'\n[policy.rules.scraper]\nusers = [{SCRAPER}]\noperations = ["metrics"]\n\n'
        f'[policy.rules.other]\nusers = [{OTHER}]\noperations = ["jws"]\nkeys = ["signing"]\n\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n'
        f'[banks.{GONE}]\ndiscovery_url = "{nothing_there}/.well-known/openid-configuration"\n'
        f'issuer = "{nothing_there}"\nca_bundle = "{bank.ca_bundle}"\nclient_key = "{tpp.key_uri}"\n'))
    daemon = launch(config, public_dir)
    daemon.client().register(MB)  # the bank gives tokens to registered certificates only
    running = Setup(daemon, bank, config, client_id, transport)
    yield running, port
    running.daemon.stop()
    running.daemon.notify.close()


def parse(text: str) -> Samples:
    found: Samples = {}
    for family in families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(daemon: Daemon, uid: int = SCRAPER) -> Samples:
    answer = as_user(daemon, uid, NOBODY, "GET", "/v1/metrics")
    assert answer["status"] == 200, answer
    return parse(str(answer["body"]))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_signing_token_and_forward_traffic_in_every_serving_process(
        metered: tuple[Setup, int]) -> None:
    setup, port = metered
    daemon = setup.daemon
    before = scrape(daemon)
    assert value(before, "tpp_agent_serving_processes") == 2
    assert value(before, "tpp_agent_ready") == 1
    assert value(before, "tpp_agent_token_pool_state", state="ready") == 2
    assert value(before, "tpp_agent_requests_total", operation="register", status="200") + value(
        before, "tpp_agent_requests_total", operation="register", status="201") == 1  # the fixture's registration

    client = setup.client()
    signed = 12
    for number in range(signed):  # one keep-alive connection: the supervisor hands it to one serving process
        client.jws("signing", f"payload {number}".encode())
    for _ in range(signed):  # a connection each: they are spread over both processes
        assert as_user(daemon, OTHER, NOBODY, "POST", "/v1/keys/signing/jws",
                       json.dumps({"payload_b64": "aGk="}))["status"] == 200
    denied = as_user(daemon, OTHER, NOBODY, "GET", "/v1/keys")
    assert denied["status"] == 403
    token = client.token(MB, "accounts")  # a miss: fetched from the bank
    assert client.token(MB, "accounts")["access_token"] == token["access_token"]  # a hit
    status, _, _ = client.forward(MB, "GET", "/accounts", {"Authorization": f"Bearer {token['access_token']}"})
    assert status == 200

    # The other process's state is sampled each second: wait for its audit records to show.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(daemon)
        audited = value(after, "tpp_agent_audit_records_total") - value(before, "tpp_agent_audit_records_total")
        if audited >= 2 * signed + 4 or time.monotonic() > deadline:
            break
        time.sleep(0.3)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("tpp_agent_requests_total", operation="jws", status="200") == 2 * signed
    assert grew("tpp_agent_requests_total", operation="keys", status="403") == 1
    assert grew("tpp_agent_request_duration_seconds_count", operation="jws") == 2 * signed
    assert grew("tpp_agent_request_duration_seconds_sum", operation="jws") > 0
    assert grew("tpp_agent_request_duration_seconds_bucket", operation="jws", le="+Inf") == 2 * signed
    # Token signatures: one per JWS, and the client assertion of the one token fetched.
    assert grew("tpp_agent_hsm_call_duration_seconds_count", call="sign") == 2 * signed + 1
    # Every key use and the refusal are records: 24 JWS, the assertion, two requests with the transport key
    # (token, forward) and the refusal.
    assert audited >= 2 * signed + 4
    assert value(after, "tpp_agent_audit_sync_lag_seconds") >= 0
    assert grew("tpp_agent_token_cache_lookups_total", bank=MB, result="miss") == 1
    assert grew("tpp_agent_token_cache_lookups_total", bank=MB, result="hit") == 1
    assert grew("tpp_agent_bank_request_duration_seconds_count", bank=MB) == 2  # the token request, the forward
    assert grew("tpp_agent_bank_responses_total", bank=MB, status_class="2xx") == 2
    assert value(after, "tpp_agent_token_sessions_max") > 0
    # The transport certificate's end, in the future, from the model bank's CA.
    left = value(after, "tpp_agent_certificate_expires_in_seconds", key="transport")
    assert 0 < left < 400 * 86400
    not_after = value(after, "tpp_agent_certificate_not_after_timestamp_seconds", key="transport")
    assert abs(not_after - time.time() - left) < 60

    # The same numbers on the TCP port, for Prometheus, and through the CLI (as root, an admin).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        tcp = parse(answer.read().decode())
    assert value(tcp, "tpp_agent_requests_total", operation="jws", status="200") >= 2 * signed
    cli = subprocess.run([TPP_AGENT, "--config", str(setup.config), "metrics"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    assert value(parse(cli.stdout), "tpp_agent_serving_processes") == 2
    # --direct: the CLI's own process on the token: the certificates, no requests of its own.
    direct = subprocess.run([TPP_AGENT, "--config", str(setup.config), "--direct", "metrics"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert direct.returncode == 0, direct.stderr
    own = parse(direct.stdout)
    assert abs(value(own, "tpp_agent_certificate_expires_in_seconds", key="transport") - left) < 60
    assert not [name for name, _ in own if name == "tpp_agent_requests_total"]


def test_a_caller_without_the_grant_gets_403_and_no_metrics(metered: tuple[Setup, int]) -> None:
    setup, _ = metered
    refused = as_user(setup.daemon, OTHER, NOBODY, "GET", "/v1/metrics")
    assert refused["status"] == 403
    answer = json.loads(str(refused["body"]))
    assert answer["code"] == "forbidden" and 'operations = ["metrics"]' in answer["hint"]
    assert "tpp_agent" not in str(refused["body"])


def test_bank_failures_are_counted_by_class(metered: tuple[Setup, int]) -> None:
    setup, _ = metered
    before = scrape(setup.daemon)
    with pytest.raises(AgentRequestError) as failed:
        setup.client().forward(GONE, "GET", "/accounts")
    assert failed.value.code == "bank_unreachable"
    after = scrape(setup.daemon)
    assert value(after, "tpp_agent_bank_errors_total", bank=GONE, error="ConnectRefusedError") - value(
        before, "tpp_agent_bank_errors_total", bank=GONE, error="ConnectRefusedError") == 1
    assert value(after, "tpp_agent_bank_request_duration_seconds_count", bank=GONE) == 1
    assert value(after, "tpp_agent_requests_total", operation="forward", status="502") == 1
    # Labels come from the configuration and the code only: no path or caller string became one.
    assert all("/accounts" not in str(labels) for _, labels in after)


def _settings(listen: object, allow_remote: bool | None = None) -> MetricsSettings:
    table: dict[str, object] = {"listen": listen}
    if allow_remote is not None:
        table["allow_remote"] = allow_remote
    return MetricsSettings.parse(config_module.parse({"metrics": table}, None))


def test_the_tcp_listener_is_on_loopback_unless_allowed() -> None:
    assert _settings("127.0.0.1:9464").listen == ("127.0.0.1", 9464)
    assert _settings("[::1]:9464").listen == ("::1", 9464)
    with pytest.raises(ConfigError, match="not a loopback address") as refused:
        _settings("0.0.0.0:9464")
    assert refused.value.hint and "allow_remote" in refused.value.hint
    assert _settings("0.0.0.0:9464", allow_remote=True).listen == ("0.0.0.0", 9464)
    for bad, message in (("localhost:9464", "IP address"), ("127.0.0.1", "address and a port"),
                         ("127.0.0.1:0", "port"), ("127.0.0.1:99999", "port"), (9464, "string")):
        with pytest.raises(ConfigError, match=message):
            _settings(bad)


def test_a_port_in_use_stops_the_start_with_a_config_error(tpp: Tpp, bank: ModelBank,  # noqa: F811
                                                            public_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tpp.write_config(bank)
        config.write_text(config.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
        started = subprocess.run([TPP_AGENT, "--config", str(config), "serve"], capture_output=True, text=True,
                                 timeout=60, check=False)
    assert started.returncode == 78, started.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in started.stderr


def test_a_process_forked_after_its_metrics_were_made_counts_into_its_own_file(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared values read the process id once (not at every increment): a fork must still be noticed, or the
    child would write into its parent's file and the two would overwrite each other's counts."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # Metrics sets it (and the value class): put back after
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    metrics = Metrics(tmp_path)
    metrics.request("sign", 200, 0.001)
    child = os.fork()
    if child == 0:  # the child counts two requests of its own, then leaves without running the parent's cleanup
        try:
            metrics.request("sign", 200, 0.001)
            metrics.request("sign", 200, 0.001)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert {path.name for path in tmp_path.glob("counter_*.db")} == {f"counter_{os.getpid()}.db",
                                                                      f"counter_{child}.db"}
    samples = parse(metrics.render().decode())
    assert value(samples, "tpp_agent_requests_total", operation="sign", status="200") == 3
