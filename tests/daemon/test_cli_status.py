"""``tpp-agent status`` with an agent running, and the CLI when the agent serves another configuration than its
own (a --config given is refused, the default file edited since the agent loaded it gets a warning)."""

from __future__ import annotations

import json
import signal

from agent.errors import ExitStatus
from agent.runtime import Runtime
from pkcs11_backends.keys import KeySpec
from tests.conftest import Token
from tests.daemon.conftest import Daemon


def test_status_shows_the_running_agent_its_pool_and_keys(daemon: Daemon, keyed_token: Token) -> None:
    report = json.loads(keyed_token.cli("status", "--json", check=True).stdout)
    agent = report["agent"]
    assert agent["running"] and agent["ready"] and agent["config_matches"] is True
    assert agent["socket"] == str(daemon.socket_path) and "logged in" in agent["detail"]
    assert report["pool"]["state"] == "ready" and report["keys"]["via"] == "agent"
    keys = {key["alias"]: key for key in report["keys"]["keys"]}
    assert set(keys) == {"signing", "ecsign"}
    assert keys["signing"]["label"] == "signing" and keys["signing"]["purpose"] == "jws"
    assert keys["signing"]["uri"].startswith("pkcs11:token=")
    text = keyed_token.cli("status", check=True).stdout
    assert f"running at {daemon.socket_path}, ready" in text and "(read through the agent)" in text
    # The agent names keys by alias; the CLI finds the alias of a key named by its token URI (or label).
    by_uri = keyed_token.cli("keys", "public", keys["ecsign"]["token_uri"], check=True)
    assert by_uri.stdout == keyed_token.cli("keys", "public", "ecsign", check=True).stdout
    assert "through_agent" in by_uri.stderr

    daemon.stop()
    stopped = json.loads(keyed_token.cli("status", "--json", check=True).stdout)
    assert stopped["agent"]["running"] is False and stopped["keys"]["via"] == "token"
    assert {key["alias"] for key in stopped["keys"]["keys"]} >= {"signing", "ecsign", None}  # audit: not configured
    assert "not running" in keyed_token.cli("status", check=True).stdout


def test_the_cli_says_when_the_agent_serves_another_configuration(daemon: Daemon, keyed_token: Token,
                                                                  runtime: Runtime) -> None:
    served = daemon.config_path.read_text()
    runtime.keys.generate("later", KeySpec.parse("ec:p256"))
    daemon.config_path.write_text(served + '\n[keys.later]\nuri = "pkcs11:object=later"\n')

    # The default file, edited since the agent loaded it: the command runs on the agent, with a warning.
    warned = keyed_token.cli("keys", "list")
    assert warned.returncode == 0 and "agent_config_differs" in warned.stderr
    assert "keys only in" in warned.stderr and "later" in warned.stderr and "systemctl reload" in warned.stderr
    # A --config given: that file is not what the agent would use. Refused, with the ways out.
    refused = keyed_token.cli("keys", "list", "--config", str(daemon.config_path))
    assert refused.returncode == ExitStatus.CONFIG and refused.stdout == ""
    assert f"error: the agent running at {daemon.socket_path} serves {daemon.config_path} as it was" \
        in refused.stderr
    assert "hint:" in refused.stderr and "--direct" in refused.stderr
    direct = keyed_token.cli("keys", "list", "--config", str(daemon.config_path), "--direct")
    assert direct.returncode == 0 and "later" in direct.stdout
    report = json.loads(keyed_token.cli("status", "--json", "--config", str(daemon.config_path), check=True).stdout)
    assert report["agent"]["config_matches"] is False and report["keys"]["via"] == "token"

    daemon.proc.send_signal(signal.SIGHUP)  # the agent loads the file as it is now: one configuration again
    daemon.wait_for("READY=1", timeout=30)
    agreed = keyed_token.cli("keys", "list", "--config", str(daemon.config_path))
    assert agreed.returncode == 0 and "agent_config_differs" not in agreed.stderr
    assert "later" in agreed.stdout  # listed by the agent, which now serves it
    report = json.loads(keyed_token.cli("status", "--json", check=True).stdout)
    assert report["agent"]["config_matches"] is True and "later" in {k["alias"] for k in report["keys"]["keys"]}
