"""p11-kit remoting: ``p11-kit server`` in front of a real module, its users on ``p11-kit-client.so``.

The shape of a network HSM: the module the agent loads is a thin RPC client, the keys
live in another process. With SoftHSM2 behind it:

    with p11kit_server(target="/usr/lib/softhsm/libsofthsm2.so", token="tpp-agent",
                       home=Path("/tmp/x"), environment={"SOFTHSM2_CONF": ...}) as server:
        server.module        # p11-kit-client.so
        server.environment   # {"P11_KIT_SERVER_ADDRESS": "unix:path=..."}
        server.restart()     # the module-neutral fault: the remote end goes away and comes back

Usable outside pytest (bench): ``python -m tests.modules.p11kit TARGET TOKEN DIR`` serves until
interrupted. The server is our child, stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.modules.common import Service, first_existing, need, serve_until_interrupted, wait_until

CLIENT_CANDIDATES = ("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
                     "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so")


def client_module() -> str:
    return first_existing(CLIENT_CANDIDATES, "p11-kit-client.so is not installed (p11-kit-modules)")


@dataclass
class P11KitServer:
    module: str
    socket: Path
    environment: dict[str, str]
    _service: Service

    def restart(self) -> None:
        """Stop the server and start it again: every client's remote state is gone."""
        self._service.stop()
        self.start()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self._service.start()
        wait_until(self.socket.exists, "p11-kit server", self._service)

    def stop(self) -> None:
        self._service.stop()


@contextlib.contextmanager
def p11kit_server(target: str, token: str, home: Path,
                  environment: Mapping[str, str] | None = None) -> Iterator[P11KitServer]:
    """Serve token ``token`` of module ``target`` on a socket under ``home``.

    ``environment`` is what the target module needs (SOFTHSM2_CONF...): the server
    process gets it, the clients do not need it.
    """
    need("p11-kit", target)
    module = client_module()
    home.mkdir(parents=True, exist_ok=True)
    socket = home / "p11-kit.socket"
    service = Service(["p11-kit", "server", "--foreground", f"--provider={target}", f"--name={socket}",
                       f"pkcs11:token={token}"], home / "p11-kit-server.log",
                      env={**os.environ, **(environment or {})})
    server = P11KitServer(module, socket, {"P11_KIT_SERVER_ADDRESS": f"unix:path={socket}"}, service)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m tests.modules.p11kit TARGET_MODULE TOKEN DIR", file=sys.stderr)
        return 2
    target, token, home = argv
    return serve_until_interrupted(p11kit_server(target, token, Path(home).resolve(), os.environ),
                                   lambda server: {"module": server.module, **server.environment})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
