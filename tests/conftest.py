"""Shared fixtures: a real PKCS#11 token in a temp dir, a config pointing at it, the CLI.

The module is chosen by ``--module`` or ``TPP_TEST_MODULE`` (``softhsm2``, the default;
``tpm2``: tpm2-pkcs11 on swtpm behind tpm2-abrmd; ``p11kit``: SoftHSM2 behind ``p11-kit
server``, the agent on ``p11-kit-client.so``), each provisioned its own way by
``tests/modules``. The module is loaded once per process (as in production), so one
token serves the whole session. On SoftHSM2 each test that needs a clean token gets
its own token label; a module that cannot make tokens freely gives every test the one
pre-provisioned token, and what a test created on it is destroyed after the test.
Tests that need SoftHSM2 itself (its token directory, its config file) are marked
``softhsm2_only``; ``core`` marks the operator flow run on every module.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pkcs11
import pytest
from hypothesis import HealthCheck, settings

from agent import config as config_module
from agent.config import Config
from agent.runtime import Runtime
from pkcs11_backends.keys import KeySpec
from pkcs11_backends.module import Module, TokenSelector
from pkcs11_backends.provisioning import init_token
from pkcs11_backends.returns import ReturnValue
from pkcs11_backends.sessions import session_handle
from pkcs11_backends.signing import Capabilities
from tests.modules.common import ModuleUnavailable
from tests.modules.nss import nss_module
from tests.modules.p11kit import p11kit_server
from tests.modules.tpm2 import tpm2_module

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.pg"]  # postgres_server: a real PostgreSQL server for the shared-state tests

# No timed assertions, property tests included: on 2 busy cores one draw can take a second.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")
_labels = itertools.count()
MODULES = ("softhsm2", "tpm2", "p11kit", "nss")
# The operator flow that `make test` runs on every module of the matrix (-m core): keys
# generated (RSA and EC) and signing, CSRs verified by openssl, certificate import, mTLS
# with the token key (Python server and nginx), the daemon's JWS; and recovery after the
# module's far end restarts. `python -m tests.matrix` makes those runs (the tpm2 entry file by
# file: see docs/platforms.md).
CORE = ("tests/test_keys.py", "tests/test_x509_csr.py", "tests/test_x509_certificates.py",
        "tests/transport/test_mtls.py", "tests/transport/test_nginx.py", "tests/daemon/test_jose_api.py",
        "tests/faults/test_module_restart.py", "tests/test_module_matrix.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--module", choices=MODULES, default=os.environ.get("TPP_TEST_MODULE", "softhsm2"),
                     help="the PKCS#11 module the suite runs on (default: $TPP_TEST_MODULE or softhsm2)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "core: the operator flow, run on every module of the matrix")
    config.addinivalue_line("markers", "softhsm2_only: relies on SoftHSM2 itself (token directory, config file)")
    if config.getoption("--module") not in MODULES:
        raise pytest.UsageError(f"TPP_TEST_MODULE must be one of {', '.join(MODULES)}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    core = pytest.mark.core
    for item in items:
        if item.nodeid.split("::", 1)[0] in CORE:
            item.add_marker(core)
    module = config.getoption("--module")
    if module == "softhsm2":
        return
    skip = pytest.mark.skip(reason=f"relies on SoftHSM2 itself; the suite runs on {module}")
    for item in items:
        if item.get_closest_marker("softhsm2_only"):
            item.add_marker(skip)


@dataclass
class ModuleUnderTest:
    """The module the session runs on, provisioned: where it is, what it needs, its token and PINs."""

    name: str
    path: str
    environment: dict[str, str]
    label: str  # the token made for the session
    user_pin_file: Path
    so_pin_file: Path
    makes_tokens: bool  # C_InitToken on a free slot gives a new token at once (SoftHSM2)
    restart: Callable[[], None] | None = None  # the module-neutral fault: the remote end or broker restarts
    init_args: str | None = None  # [pkcs11] init_args: what its C_Initialize needs (NSS)
    softhsm_home: Path | None = None
    extra: dict[str, object] = field(default_factory=dict)


# The session's module: Token objects are made by many fixtures and helpers, and every
# one of them must write configs for the same module (one per process, as in production).
_session_module: list[ModuleUnderTest] = []


def session_module() -> ModuleUnderTest:
    if not _session_module:
        raise RuntimeError("the test_module fixture has not run")
    return _session_module[0]


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
        return session_module().user_pin_file

    def config(self) -> Config:
        return config_module.load(str(self.config_path))

    def pkcs11_table(self) -> str:
        return pkcs11_table(self.label)

    def write_config(self, extra: str = "") -> Path:
        self.config_path.write_text(f'[state]\ndir = "{self.state_dir}"\n\n{self.pkcs11_table()}\n{extra}')
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


def load_module(module: ModuleUnderTest) -> Module:
    """The session's module in this process, initialised as the agent initialises it (with its init_args)."""
    return Module.load(module.path, module.init_args.encode("utf-8") if module.init_args is not None else None)


@functools.cache
def _capabilities(path: str, label: str) -> Capabilities:
    return Capabilities.probe(load_module(session_module()).find_token(TokenSelector(label=label)), path)


@pytest.fixture(autouse=True)
def _key_type_offered(request: pytest.FixtureRequest) -> None:
    """A test parametrized by ``spec`` (rsa:4096...) is skipped on a module that says it cannot make that key."""
    callspec = getattr(request.node, "callspec", None)
    text = callspec.params.get("spec") if callspec is not None else None
    if not isinstance(text, str) or not _session_module or _session_module[0].makes_tokens:
        return
    module = _session_module[0]
    spec = KeySpec.parse(text)
    if not _capabilities(module.path, module.label).can_generate(spec.kind, spec.bits):
        pytest.skip(f"{module.name} cannot generate {spec} key pairs (its mechanism info says so)")


def pkcs11_table(label: str) -> str:
    """``[pkcs11]`` and ``[pkcs11.environment]`` for token ``label`` of the session's module."""
    module = session_module()
    environment = "".join(f'{name} = "{value}"\n' for name, value in module.environment.items())
    init_args = f"init_args = {json.dumps(module.init_args)}\n" if module.init_args else ""
    return (f'[pkcs11]\nmodule = "{module.path}"\ntoken = "{label}"\npin_file = "{module.user_pin_file}"\n'
            f'{init_args}[pkcs11.environment]\n{environment}')


@pytest.fixture(scope="session")
def softhsm_state(test_module: ModuleUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's state directory (on SoftHSM2, its token directory is under it: no system token is touched)."""
    return test_module.softhsm_home or tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def test_module(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleUnderTest]:
    """The module of ``--module``, started and provisioned for the session; its services stop with it."""
    name = request.config.getoption("--module")
    with contextlib.ExitStack() as stack:
        try:
            module = _provision(name, tmp_path_factory.mktemp(name), stack)
        except ModuleUnavailable as exc:
            pytest.exit(f"module {name} cannot start: {exc}", returncode=3)
        os.environ.update(module.environment)  # the module reads it in this process too
        _session_module.append(module)
        try:
            yield module
        finally:
            _session_module.clear()


def _provision(name: str, home: Path, stack: contextlib.ExitStack) -> ModuleUnderTest:
    label = "tpp-agent"
    if name == "tpm2":
        tpm = stack.enter_context(tpm2_module(home, label))
        return ModuleUnderTest(name, tpm.module, tpm.environment, label, home / "user.pin", home / "so.pin", False,
                          tpm.restart_broker, extra={"tpm2": tpm})
    if name == "nss":
        nss = stack.enter_context(nss_module(home, label))
        return ModuleUnderTest(name, nss.module, {}, label, nss.user_pin_file, nss.so_pin_file, False,
                               init_args=nss.init_args, extra={"nss": nss})
    _make_token(home, label)
    pins = home / "softhsm"
    softhsm = {"SOFTHSM2_CONF": str(pins / "softhsm2.conf")}
    if name == "softhsm2":
        return ModuleUnderTest(name, config_module.default_module(), softhsm, label, pins / "user.pin",
                          pins / "so.pin", True, softhsm_home=home)
    server = stack.enter_context(p11kit_server(config_module.default_module(), label, home / "p11-kit", softhsm))
    return ModuleUnderTest(name, server.module, server.environment, label, pins / "user.pin", pins / "so.pin", False,
                      server.restart, softhsm_home=home)


def _make_token(state: Path, label: str) -> None:
    subprocess.run([sys.executable, str(REPO / "softhsm" / "make_token.py"), "--state-dir", str(state),
                    "--label", label], check=True, capture_output=True, timeout=60)


def new_token(module: ModuleUnderTest, prefix: str = "t") -> str:
    """A new empty token's label (SoftHSM2), made through this process's module.

    SoftHSM2 only sees tokens that other processes create when it is initialised again.
    """
    label = f"{prefix}{next(_labels)}-{os.getpid()}"
    init_token(load_module(module), label, module.so_pin_file.read_bytes().strip(),
               module.user_pin_file.read_bytes().strip())
    return label


@contextlib.contextmanager
def restored(module: ModuleUnderTest, label: str) -> Iterator[None]:
    """Destroy, afterwards, every object the body created on token ``label`` (a token that cannot be made anew)."""
    before = _objects(module, label, destroy_except=None)
    yield
    _objects(module, label, destroy_except=before)


def _objects(module: ModuleUnderTest, label: str, destroy_except: set[int] | None) -> set[int]:
    loaded = load_module(module)
    token = loaded.find_token(TokenSelector(label=label))
    with token.open(rw=True) as session:
        # Login is per application: ALREADY_LOGGED_IN means a pool of this process holds it.
        rv = loaded.native.login(session_handle(session), module.user_pin_file.read_bytes().strip())
        assert rv in (ReturnValue.OK, ReturnValue.USER_ALREADY_LOGGED_IN), ReturnValue.name_of(rv)
        found = {int(cast(Any, obj).handle): obj for obj in session.get_objects()}
        if destroy_except is not None:
            for _ in range(2):  # tpm2-pkcs11 may refuse one half of a pair until the other is gone
                for obj in list(session.get_objects()):
                    if int(cast(Any, obj).handle) not in destroy_except:
                        with contextlib.suppress(pkcs11.PKCS11Error):
                            obj.destroy()
            left = {int(cast(Any, obj).handle) for obj in session.get_objects()} - destroy_except
            assert not left, f"objects the test made on {label} could not be destroyed: {sorted(left)}"
        handles = set(found)
        if rv == ReturnValue.OK:
            loaded.native.logout(session_handle(session))
    return handles


@pytest.fixture
def token(test_module: ModuleUnderTest, softhsm_state: Path, tmp_path: Path) -> Iterator[Token]:
    """A token with nothing of another test on it, plus a config for it (see the module docstring)."""
    if test_module.makes_tokens:
        tok = Token(softhsm_state, new_token(test_module), tmp_path / "config.toml")
        tok.write_config()
        yield tok
        return
    tok = Token(softhsm_state, test_module.label, tmp_path / "config.toml")
    tok.write_config()
    with restored(test_module, tok.label):
        yield tok


@pytest.fixture
def runtime(token: Token) -> Iterator[Runtime]:
    rt = Runtime(token.config())
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def shared_runtime(test_module: ModuleUnderTest, softhsm_state: Path) -> Iterator[Runtime]:
    """A runtime on the session's first token (``tpp-agent``), shared by tests with their own key labels.

    Tests that load keys through libp11's engine mostly use it: a token made later costs the engine a new
    context (see ``EngineBackend``), which the tests need not pay again and again.
    """
    tok = Token(softhsm_state, test_module.label, softhsm_state / "shared-config.toml")
    tok.write_config()
    rt = Runtime(tok.config())
    yield rt
    rt.close()

