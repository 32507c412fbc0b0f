"""The config loader and the PIN sources: every bad input is a ConfigError/PinSourceError that says what to fix."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import config as config_module
from agent.config import parse, pin_reader, read_pin_file
from agent.errors import ConfigError, PinSourceError


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_defaults_point_at_the_bundled_softhsm_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPP_AGENT_STATE_DIR", str(tmp_path))
    cfg = parse({})
    assert cfg.state_dir == tmp_path
    assert cfg.pkcs11.token == "tpp-agent"
    assert cfg.pkcs11.environment == {"SOFTHSM2_CONF": str(tmp_path / "softhsm" / "softhsm2.conf")}
    assert cfg.pkcs11.default_pin_file == tmp_path / "softhsm" / "user.pin"


@pytest.mark.parametrize("text,message", [
    ("[pkcs11]\nmodul = 'x'\n", "unknown setting"),
    ("[pkcs11]\nmax_sessions = 0\n", "max_sessions"),
    ("[pkcs11]\nopenssl_backend = 'gnutls'\n", "openssl_backend"),
    ("[pkcs11.environment]\nUSER_PIN = '1234'\n", "must not carry a PIN"),
    ("pkcs11 = 3\n", "must be a table"),
    ("[keys.t]\nuri = 'file:/k'\n", "must be a pkcs11: URI"),
    ("[keys.t]\nuri = 'pkcs11:object=t'\nalgorithms = 'PS256'\n", "list of strings"),
    ("[pkcs11\n", "not valid TOML"),
    (b"\xff\xfe[pkcs11]", "not valid TOML|not UTF-8"),
])
def test_bad_config_files_name_the_problem(tmp_path: Path, text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(str(write(tmp_path, text)))


def test_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as info:
        config_module.load(str(tmp_path / "nope.toml"))
    assert "--config" in info.value.hint


def test_pin_file_must_be_private_and_one_line(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(PinSourceError, match="readable by group or others") as info:
        read_pin_file(pin)
    assert info.value.hint == f"chmod 600 {pin}"
    pin.chmod(0o600)
    assert read_pin_file(pin) == b"1234"
    pin.write_text("1234\n5678\n")
    with pytest.raises(PinSourceError, match="exactly one"):
        read_pin_file(pin)
    with pytest.raises(PinSourceError, match="not found"):
        read_pin_file(tmp_path / "absent")


def test_pin_comes_from_the_systemd_credential_when_no_file_is_set(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "tpp-agent-pin").write_text("424242\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = parse({"state": {"dir": str(tmp_path / "state")}, "pkcs11": {"token": "x"}})
    assert pin_reader(cfg.pkcs11)() == b"424242"


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["state", "pkcs11", "keys", "banks", "other"]), toml_values, max_size=4))
def test_any_structure_loads_or_raises_config_error(raw: dict[str, Any]) -> None:
    with contextlib.suppress(ConfigError):
        parse(raw)
