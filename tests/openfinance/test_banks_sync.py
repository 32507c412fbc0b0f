"""``tpp-agent banks sync``: the directory's participants list (over HTTPS from the model directory, or a file)
compared with the configured banks, and written as a banks file the configuration includes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.lifecycle.download import DownloadError, fetch
from modelbank import ModelBank
from modelbank.directory import ModelDirectory
from tests.lifecycle.participants_data import organisation, server
from tests.openfinance.conftest import BANK, Tpp

NEW_BANK = "https://auth.new-bank.example"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TPP_AGENT_CONFIG": str(config)}
    return subprocess.run([str(Path(sys.executable).parent / "tpp-agent"), *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


@pytest.fixture
def directory(bank: ModelBank, tmp_path: Path) -> Iterator[ModelDirectory]:
    with ModelDirectory(tmp_path / "directory", bank.ca, organisation_id="o", software_statement_id="s",
                        client_id="c") as running:
        running.participants = [
            organisation("org-mb", "Model Bank PJSC", [{**server("Model Bank", bank.issuer, "as-mb"),
                                                        "OpenIDDiscoveryDocument": bank.discovery_url}]),
            organisation("org-new", "New Bank", [server("New Bank", NEW_BANK, "as-new")])]
        yield running


def test_sync_shows_the_difference_then_writes_the_banks_file(tpp: Tpp, bank: ModelBank,
                                                              directory: ModelDirectory) -> None:
    config = tpp.write_config(bank)
    url, ca = directory.participants_url, str(bank.ca.cert_file)
    unnamed = cli(config, "banks", "sync")
    assert unnamed.returncode == 1 and "error: no participants list named: give --participants" in unnamed.stderr
    shown = cli(config, "banks", "sync", "--participants", url, "--cacert", ca)
    assert shown.returncode == 1, shown.stderr
    assert shown.stdout.splitlines() == [f"+ New Bank (New Bank): issuer {NEW_BANK}"]

    banks_file = tpp.state_dir / "banks.toml"
    written = cli(config, "banks", "sync", "--participants", url, "--cacert", ca, "--write", str(banks_file))
    assert written.returncode == 0, written.stderr
    assert f"wrote 1 bank(s) to {banks_file}" in written.stdout
    text = banks_file.read_text()
    assert '[banks."new-bank"]' in text and f'issuer = "{NEW_BANK}"' in text and "# APIs: accounts 1.0" in text
    assert f'ca_bundle = "{bank.ca_bundle}"' in text  # the one the configured banks share

    config.write_text(f"include = [{json.dumps(str(banks_file))}]\n" + config.read_text() +
                      f"\n[directory]\nparticipants_url = {json.dumps(url)}\n")
    again = cli(config, "banks", "sync", "--cacert", ca, "--json")  # the URL from [directory]
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert answer["in_sync"] is True and sorted(answer["unchanged"]) == [BANK, "new-bank"]

    # The directory moves the model bank's discovery document: a change, shown, not written over by hand.
    directory.participants[0]["AuthorisationServers"][0]["OpenIDDiscoveryDocument"] = bank.url + "/v2/discovery"
    moved = cli(config, "banks", "sync", "--participants", url, "--cacert", ca)
    assert moved.returncode == 1
    assert f"~ {BANK}: discovery_url {bank.discovery_url} -> {bank.url}/v2/discovery" in moved.stdout


def test_bad_participants_are_clear_errors_and_write_nothing(tpp: Tpp, bank: ModelBank,
                                                             directory: ModelDirectory) -> None:
    config = tpp.write_config(bank)
    target = tpp.state_dir / "banks.toml"
    bad = tpp.state_dir / "participants.json"
    bad.write_text(json.dumps({"data": []}))
    for source, message in (
            (str(bad), "is not the directory's participants list: it is a JSON dict"),
            (str(tpp.state_dir / "missing.json"), "participants file not found"),
            ("http://127.0.0.1/participants", "only https:// URLs or file paths"),
            (directory.url + "/nothing-here", "answered HTTP 401"),
            (directory.participants_url, "certificate verify failed")):
        args = ["--cacert", str(bank.ca.cert_file)] if "certificate" not in message else []
        result = cli(config, "banks", "sync", "--participants", source, "--write", str(target), *args)
        assert result.returncode == 1 and message in result.stderr, (source, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert not target.exists()


def test_a_download_is_capped(bank: ModelBank, directory: ModelDirectory) -> None:
    directory.participants = [organisation(f"org-{i}", "Bank", []) for i in range(100)]
    with pytest.raises(DownloadError, match="sent more than 1,000 bytes: not the document expected"):
        fetch(directory.participants_url, limit=1000, cafile=str(bank.ca.cert_file))
    assert len(json.loads(fetch(directory.participants_url, limit=1 << 20, cafile=str(bank.ca.cert_file)))) == 100
