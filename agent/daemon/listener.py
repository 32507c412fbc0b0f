"""The listening Unix socket: a directory only the agent owns, mode 0660, a configured group.

A socket file left by a dead agent is replaced; a live one (something answers)
or a path owned by another user is refused, so two agents never share a socket
and nobody can plant one for us.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from agent.errors import AgentError


class SocketSetupError(AgentError):
    hint = "use a socket path in a directory owned by the agent's user, e.g. RuntimeDirectory=tpp-agent"


def bind_unix(path: Path, gid: int | None, mode: int) -> socket.socket:
    directory = path.parent
    _prepare_directory(directory, gid, path.name)
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # the file is born 0600; chmod widens it only after chown
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(1024)
    return sock


def _prepare_directory(directory: Path, gid: int | None, socket_name: str) -> None:
    if not directory.exists():
        try:
            directory.mkdir(mode=0o750, parents=True)
        except OSError as exc:
            raise SocketSetupError(f"cannot create socket directory {directory}: {exc.strerror}") from None
        if gid is not None:
            os.chown(directory, -1, gid)
        os.chmod(directory, 0o750)  # noqa: S103 -- the socket group must be able to reach the socket
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise SocketSetupError(f"socket directory {directory} is not a directory")
    # A shared directory (/tmp, /var/tmp, /dev/shm: sticky, or writable by all) is not ours to tighten: the
    # socket needs a directory of its own, which the agent creates 0750.
    shared = bool(info.st_mode & (stat.S_ISVTX | stat.S_IWOTH))
    own_directory = (f"set [daemon] socket to a path in a directory of the agent's own, e.g. "
                     f"{directory / 'tpp-agent' / socket_name} (created mode 0750), or RuntimeDirectory=tpp-agent")
    if info.st_uid != os.geteuid():
        raise SocketSetupError(f"socket directory {directory} is owned by uid {info.st_uid}, not by the agent "
                               f"(uid {os.geteuid()})", hint=own_directory)
    if info.st_mode & 0o022:
        raise SocketSetupError(f"socket directory {directory} is writable by group or others "
                               f"(mode {stat.S_IMODE(info.st_mode):o})",
                               hint=own_directory if shared else f"chmod 0750 {directory}")


def _remove_stale(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket", hint="remove it or choose another socket path")
    if info.st_uid != os.geteuid():
        raise SocketSetupError(f"socket {path} is owned by uid {info.st_uid}, not by the agent")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead agent's socket
        return
    except OSError:
        pass
    finally:
        probe.close()
    raise SocketSetupError(f"another agent is already serving {path}", hint="stop it first (systemctl stop tpp-agent)")
