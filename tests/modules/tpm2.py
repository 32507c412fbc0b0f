"""tpm2-pkcs11 on a software TPM: swtpm, a private D-Bus session bus, tpm2-abrmd, a tpm2-pkcs11 store.

    with tpm2_module(Path("/tmp/x")) as tpm:
        tpm.environment      # what a process needs to reach the token (TPM2_PKCS11_STORE, TPM2_PKCS11_TCTI...)
        tpm.restart_broker() # the module-neutral fault: the TPM connection drops and comes back

Usable outside pytest (bench, by hand): ``python -m tests.modules.tpm2 DIR`` starts it and
prints the environment until interrupted. Every process is ours, stopped by pid.

tpm2-abrmd (not the swtpm TCTI directly) stands between the TPM and its users because
swtpm serves one connection at a time, and the agent's CLI, the daemon's serving processes
and tpm2_ptool each hold one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from softhsm.make_token import write_secret
from tests.modules.common import (
    ModuleUnavailable,
    Service,
    first_existing,
    free_port_pair,
    need,
    port_open,
    serve_until_interrupted,
    wait_until,
)

MODULE_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
                     "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
                     "/usr/lib/x86_64-linux-gnu/libtpm2_pkcs11.so.1",
                     "/usr/lib/aarch64-linux-gnu/libtpm2_pkcs11.so.1")
# abrmd's own default is 27 connections; each process using tpm2-pkcs11 holds one or two.
MAX_CONNECTIONS = 64
# Every key tpm2-pkcs11 has used stays loaded per connection; abrmd's default (27) is too few for the suite.
MAX_TRANSIENTS = 100  # its upper bound


def module_path() -> str:
    return first_existing(MODULE_CANDIDATES, "tpm2-pkcs11 is not installed (libtpm2-pkcs11-1)")


@dataclass
class Tpm2:
    home: Path
    label: str
    so_pin: bytes
    user_pin: bytes
    module: str
    environment: dict[str, str]
    _swtpm: Service
    _bus: Service
    _broker: Service
    _broker_argv: list[str] = field(default_factory=list)

    @property
    def user_pin_file(self) -> Path:
        return self.home / "user.pin"

    def ptool(self, *args: str) -> subprocess.CompletedProcess[str]:
        """tpm2_ptool on this store (its PINs go through argv: test use only)."""
        env = {**os.environ, **self.environment}
        result = subprocess.run(["tpm2_ptool", *args, f"--path={self.environment['TPM2_PKCS11_STORE']}"],
                                capture_output=True, text=True, env=env, timeout=120, check=False)
        if result.returncode != 0:
            raise ModuleUnavailable(f"tpm2_ptool {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")
        return result

    def add_vendor_key(self, key_label: str, algorithm: str = "rsa2048") -> None:
        """A key made with the vendor's tool (its CKA_ID is ASCII hex), as an operator would."""
        self.ptool("addkey", f"--label={self.label}", f"--key-label={key_label}",
                   f"--userpin={self.user_pin.decode()}", f"--algorithm={algorithm}")

    def restart_broker(self) -> None:
        """Stop tpm2-abrmd and start it again: every TPM connection of every process drops."""
        self._broker.stop()
        self._start_broker()

    def _start_broker(self, tries: int = 2) -> None:
        """Once more if it does not answer: in one full make test it stayed silent for 20 s; run again, it answered
        at once."""
        for attempt in range(tries):
            self._broker.start()
            try:
                wait_until(lambda: _broker_answers(self.environment), "tpm2-abrmd", self._broker)
                return
            except ModuleUnavailable:
                self._broker.stop()
                if attempt == tries - 1:
                    raise

    def stop(self) -> None:
        for service in (self._broker, self._bus, self._swtpm):
            service.stop()


def _broker_answers(environment: dict[str, str]) -> bool:
    env = {**os.environ, **environment}
    result = subprocess.run(["tpm2_getcap", "properties-fixed"], capture_output=True, env=env, timeout=30,
                            check=False)
    return result.returncode == 0


def _start_swtpm(home: Path, tries: int = 10) -> tuple[Service, int]:
    """swtpm on a free loopback port and the next one (its control channel, where the swtpm TCTI expects it)."""
    for attempt in range(tries):
        port = free_port_pair()
        swtpm = Service(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={home / 'tpmstate'}",
                         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                         "--flags", "not-need-init,startup-clear"], home / "swtpm.log")
        swtpm.start()
        try:
            wait_until(lambda: port_open(port), "swtpm", swtpm)  # noqa: B023 (called before the next round)
        except ModuleUnavailable:
            swtpm.stop()
            # Another process took one of the two ports between the probe and swtpm's bind: try two others.
            if attempt == tries - 1 or "Address already in use" not in swtpm.last_line():
                raise
            continue
        return swtpm, port
    raise AssertionError("unreachable: the last try raises")


@contextlib.contextmanager
def tpm2_module(home: Path, label: str = "tpp-agent") -> Iterator[Tpm2]:
    """Start swtpm, a bus and tpm2-abrmd under ``home``; create a token ``label`` with random PINs."""
    need("swtpm", "tpm2-abrmd", "tpm2_ptool", "tpm2_getcap", "dbus-daemon")
    module = module_path()
    home.mkdir(parents=True, exist_ok=True)
    (home / "tpmstate").mkdir(exist_ok=True)
    (home / "store").mkdir(exist_ok=True)
    pins = home / "so.pin", home / "user.pin"
    so_pin, user_pin = (write_secret(path) for path in pins)
    swtpm, port = _start_swtpm(home)  # from here on, nothing fails before the try that stops it
    bus_address = f"unix:path={home / 'bus'}"
    bus = Service(["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={bus_address}"],
                  home / "dbus.log")
    environment = {
        "DBUS_SESSION_BUS_ADDRESS": bus_address,
        "TPM2_PKCS11_STORE": str(home / "store"),
        "TPM2_PKCS11_TCTI": "tabrmd:bus_type=session",
        "TPM2TOOLS_TCTI": "tabrmd:bus_type=session",
        "TSS2_LOG": "all+NONE",  # the TSS would print every refused command on stderr
        "TPM2_PKCS11_LOG_LEVEL": "0",  # and so would tpm2-pkcs11 (a refused key template, see keys.py)
    }
    broker = Service(["tpm2-abrmd", "--session", "--allow-root", "--flush-all",
                      f"--max-connections={MAX_CONNECTIONS}", f"--max-transients={MAX_TRANSIENTS}",
                      f"--tcti=swtpm:host=127.0.0.1,port={port}"],
                     home / "abrmd.log", env={**os.environ, **environment})
    tpm = Tpm2(home, label, so_pin, user_pin, module, environment, swtpm, bus, broker)
    try:
        bus.start()
        wait_until((home / "bus").exists, "dbus-daemon", bus)
        tpm._start_broker()
        if not list((home / "store").iterdir()):
            tpm.ptool("init")
            tpm.ptool("addtoken", "--pid=1", f"--label={label}", f"--sopin={so_pin.decode()}",
                      f"--userpin={user_pin.decode()}")
        yield tpm
    finally:
        tpm.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.modules.tpm2 DIR", file=sys.stderr)
        return 2
    return serve_until_interrupted(tpm2_module(Path(argv[0]).resolve()), lambda tpm: {
        "module": tpm.module, "token": tpm.label, "pin_file": str(tpm.user_pin_file), **tpm.environment})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
