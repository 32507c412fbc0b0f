"""The two systemd protocols a service speaks without libsystemd: sd_notify and socket activation.

* ``sd_notify``: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``
  (a path, or an abstract name written with a leading ``@``).
* Socket activation: systemd passes listening sockets from fd 3 on and says how
  many in ``$LISTEN_FDS``, for the process named by ``$LISTEN_PID``.

Both are silent no-ops when the variables are absent, so the daemon runs the same
way by hand, under systemd, and in tests.
"""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to the service manager, if there is one."""

    def __init__(self, address: str | None = None, connected: socket.socket | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        # Abstract sockets start with a NUL byte; systemd writes that as '@'.
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self._socket: socket.socket | None = connected
        if connected is not None:
            self._address = None  # a serving process reports to its supervisor, which tells systemd
        elif self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str) -> bool:
        """``notify(READY="1", STATUS="…")``; returns whether a manager was told."""
        if self._socket is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode("utf-8")
        try:
            if self._address is None:
                self._socket.send(message)
            else:
                # Never wait for the manager: a supervisor blocked here (its queue full, nobody reading) would
                # stop handing connections to its serving processes. A message it has no room for is dropped.
                self._socket.sendto(message, socket.MSG_DONTWAIT, self._address)
        except OSError:
            # The manager went away, is not reading (EAGAIN), or the socket is not ours to use: keep serving.
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str = "draining in-flight requests") -> bool:
        return self.notify(STOPPING="1", STATUS=status)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half the configured timeout), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000 / 2


def listen_sockets(unset_environment: bool = True) -> list[socket.socket]:
    """The listening sockets systemd handed over (``LISTEN_FDS``), as socket objects.

    The variables are removed so that a child process never believes the fds are its own.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
