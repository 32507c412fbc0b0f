"""Shared fixtures: a real SoftHSM2 token in a temp dir, a config pointing at it, the CLI.

The PKCS#11 module is loaded once per process (as in production), so one token
directory serves the whole session; each test that needs a clean token gets its
own token label inside it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent import config as config_module
from agent.config import Config
from agent.runtime import Runtime
from pkcs11_backends.module import Module
from pkcs11_backends.provisioning import init_token

REPO = Path(__file__).resolve().parent.parent

# No timed assertions, property tests included: on 2 busy cores one draw can take a second.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
_labels = itertools.count()


@dataclass
class Token:
    state_dir: Path
    label: str
    config_path: Path

    @property
    def softhsm_conf(self) -> Path:
        return self.state_dir / "softhsm" / "softhsm2.conf"

    @property
    def user_pin_file(self) -> Path:
        return self.state_dir / "softhsm" / "user.pin"

    def config(self) -> Config:
        return config_module.load(str(self.config_path))

    def write_config(self, extra: str = "") -> Path:
        self.config_path.write_text(
            f'[state]\ndir = "{self.state_dir}"\n\n'
            f'[pkcs11]\nmodule = "{config_module.default_module()}"\ntoken = "{self.label}"\n'
            f'pin_file = "{self.user_pin_file}"\n'
            f'[pkcs11.environment]\nSOFTHSM2_CONF = "{self.softhsm_conf}"\n\n{extra}'
        )
        return self.config_path

    def cli(self, *args: str, check: bool = False, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real console script in a child process."""
        full_env = {**os.environ, "TPP_AGENT_CONFIG": str(self.config_path), **(env or {})}
        result = subprocess.run([str(Path(sys.executable).parent / "tpp-agent"), *args], capture_output=True,
                                text=True, env=full_env, input=input, timeout=120, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"tpp-agent {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture(scope="session")
def softhsm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SoftHSM2 token directory for the session (tests never touch a system token)."""
    state = tmp_path_factory.mktemp("state")
    _make_token(state, "tpp-agent")
    os.environ["SOFTHSM2_CONF"] = str(state / "softhsm" / "softhsm2.conf")
    return state


def _make_token(state: Path, label: str) -> None:
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                    "--label", label], check=True, capture_output=True, timeout=60)


@pytest.fixture
def token(softhsm_state: Path, tmp_path: Path) -> Token:
    """A fresh, empty token (own label) in the session's SoftHSM2 directory, plus a config for it.

    It is created through this process's module: SoftHSM2 only sees tokens that
    other processes create when it is initialised again.
    """
    label = f"t{next(_labels)}-{os.getpid()}"
    pins = softhsm_state / "softhsm"
    init_token(Module.load(config_module.default_module()), label,
               (pins / "so.pin").read_bytes().strip(), (pins / "user.pin").read_bytes().strip())
    tok = Token(softhsm_state, label, tmp_path / "config.toml")
    tok.write_config()
    return tok


@pytest.fixture
def runtime(token: Token) -> Iterator[Runtime]:
    rt = Runtime(token.config())
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def shared_runtime(softhsm_state: Path) -> Iterator[Runtime]:
    """A runtime on the session's first token (``tpp-agent``), which exists before any OpenSSL engine starts.

    Tests that load keys through libp11's engine use it, with their own key labels:
    the engine only sees tokens that existed when it loaded its first key.
    """
    tok = Token(softhsm_state, "tpp-agent", softhsm_state / "shared-config.toml")
    tok.write_config()
    rt = Runtime(tok.config())
    yield rt
    rt.close()
