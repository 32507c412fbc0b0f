"""State files and directories, opened safely: no symbolic link followed, modes that ignore the umask.

The state directory belongs to the agent's user, yet root runs the CLI on it too (``--direct``, ``audit
verify``, ``doctor``). A symbolic link that user planted (``audit.jsonl`` → ``/etc/passwd``) must not make root
append to another file: the last component of every path is opened with ``O_NOFOLLOW``, files relative to a
descriptor of their directory (``dir_fd``), itself opened without following a link and refused when every user
may write to it. What the agent creates (audit records, bank answers) is for the agent alone: files are made
0600 and directories 0700, whatever umask the process inherited (``os.open``'s mode is masked by it; an
``fchmod`` is not).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from agent.errors import AgentError

FILE_MODE = 0o600
DIR_MODE = 0o700


class UnsafePathError(AgentError):
    hint = "remove the link or fix the directory's mode (the agent's state is for the agent's user alone)"


def open_dir(path: Path, *, create: bool = True, mode: int = DIR_MODE) -> int:
    """A descriptor of directory ``path``, made (with its missing parents) with ``mode`` if ``create``.

    Raises :class:`UnsafePathError` if ``path`` is a symbolic link or a directory every user may write to
    without the sticky bit, ``FileNotFoundError`` if it is missing and not ``create``.
    """
    created = False
    if create and not os.path.lexists(path):
        if path.parent != path:
            os.close(open_dir(path.parent, create=True, mode=mode))
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile: check it as found
            os.mkdir(path, mode)
            created = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePathError(f"{path} is a symbolic link, not a directory") from None
        raise
    try:
        found = os.fstat(fd)
        if created:
            os.fchmod(fd, mode)
        elif found.st_mode & stat.S_IWOTH and not found.st_mode & stat.S_ISVTX:
            raise UnsafePathError(f"every user may write to {path} (mode {stat.S_IMODE(found.st_mode):o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, flags: int, mode: int = FILE_MODE) -> int:
    """Open ``name`` inside the directory ``dir_fd`` (no link followed); with ``O_CREAT``, a file this user
    creates or owns ends up with no more permissions than ``mode``. Raises :class:`UnsafePathError` for a link
    or anything but a regular file with one name."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{name} is a symbolic link") from None
        raise
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
            # A second name could be a hard link to a file elsewhere that this process may write.
            raise UnsafePathError(f"{name} is not a regular file with a single name")
        if flags & os.O_CREAT and found.st_uid == os.geteuid() and stat.S_IMODE(found.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(found.st_mode) & mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_in(path: Path, flags: int, mode: int = FILE_MODE, *, create_dir: bool = True) -> int:
    """:func:`open_file` for ``path``, relative to its directory opened with :func:`open_dir`."""
    dir_fd = open_dir(path.parent, create=create_dir)
    try:
        return open_file(dir_fd, path.name, flags, mode)
    finally:
        os.close(dir_fd)
