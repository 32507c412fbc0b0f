"""The operator's shell against the model bank: -q and -v, and a bank's refusal as its own exit status."""

from __future__ import annotations

from agent.errors import ExitStatus
from modelbank import Behaviour, ModelBank
from tests.openfinance.conftest import BANK, Tpp
from tests.openfinance.test_cli_and_demo import cli


def test_quiet_keeps_the_result_and_drops_the_request_lines(tpp: Tpp, bank: ModelBank) -> None:
    config = tpp.write_config(bank)
    normal = cli(config, "discover", BANK, "--refresh")
    quiet = cli(config, "-q", "discover", BANK, "--refresh")
    verbose = cli(config, "--verbose", "discover", BANK, "--refresh")
    assert normal.returncode == quiet.returncode == verbose.returncode == 0, normal.stderr
    assert "http.request" in normal.stderr and "http.request" in verbose.stderr
    assert quiet.stderr == "" and quiet.stdout == normal.stdout


def test_a_bank_refusing_the_registration_exits_76(tpp: Tpp, bank: ModelBank) -> None:
    config = tpp.write_config(bank)
    for status in (400, 401, 403):
        bank.behaviour = Behaviour.failing(str(status))
        refused = cli(config, "register", BANK)
        assert refused.returncode == ExitStatus.PROTOCOL, refused.stderr
        assert f"HTTP {status}" in refused.stderr
    bank.behaviour = Behaviour.failing("500")
    assert cli(config, "register", BANK).returncode == ExitStatus.TEMPFAIL  # maybe recorded: retry later
