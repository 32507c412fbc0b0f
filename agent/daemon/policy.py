"""Who may do what over the socket: the peer's uid/gid from ``SO_PEERCRED`` against ``[policy]``.

::

    [policy]
    admin_users = ["root"]          # admins may do everything, and only they may create CSRs
    admin_groups = ["tpp-admin"]

    [policy.rules.payments]         # one named rule per client service
    users = ["payments", 1001]      # names or numeric ids
    groups = ["tpp-clients"]
    operations = ["keys", "public", "sign", "jws", "forward", "token"]
    keys = ["signing"]              # configured key aliases, or "*"
    banks = ["modelbank"]           # configured banks, or "*"
    scopes = ["accounts"]           # the scopes token and par may ask for (default: any)

Nothing is allowed unless a rule says so. A refusal names the rule that is missing. The operations are those of
:mod:`agent.operations`; a rule granting one on a key whose purpose forbids it is a configuration error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import grp
import json
import pwd
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.config import KeyConfig
from agent.errors import ConfigError
from agent.operations.errors import PolicyDenied
from agent.operations.spec import Access, Resource

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python does not name it
_MAX_GROUPS = 65536  # the kernel's NGROUPS_MAX
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)  # one handle for the process (immutable)


@functools.cache  # the registry is fixed at import: asked on every request
def _operations(access: Access) -> frozenset[str]:
    from agent.operations.registry import SPECS  # the registry imports the layers that import this module

    return frozenset(spec.operation.value for spec in SPECS if spec.access is access)


__all__ = ["Peer", "Policy", "PolicyDenied", "Rule"]


@dataclasses.dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, conn: socket.socket) -> Peer:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return cls(uid, gid, pid, frozenset({gid, *_peer_groups(conn)}))

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def toml_user(self) -> str:
        """The peer as a ``users`` entry that names it: its name, or its bare uid if it has no passwd entry."""
        try:
            return json.dumps(pwd.getpwuid(self.uid).pw_name)
        except KeyError:
            return str(self.uid)

    def describe(self) -> str:
        return f"uid {self.uid} ({self.user}) pid {self.pid}"


def _peer_groups(conn: socket.socket) -> list[int]:
    """The peer's supplementary groups as the kernel saw them at connect time, however many there are.

    Through libc: Python's ``getsockopt`` caps its buffer at 1024 bytes (256 groups), and the kernel answers
    ERANGE, with the size it needs, to a buffer too small for them.
    """
    size = ctypes.c_uint32(4 * 64)
    while True:
        buffer = ctypes.create_string_buffer(size.value)
        if _libc.getsockopt(conn.fileno(), socket.SOL_SOCKET, _SO_PEERGROUPS, buffer, ctypes.byref(size)) == 0:
            return list(struct.unpack(f"{size.value // 4}I", buffer.raw[:size.value - size.value % 4]))
        if ctypes.get_errno() != errno.ERANGE or size.value > 4 * _MAX_GROUPS:
            return []
        size = ctypes.c_uint32(max(size.value, len(buffer) * 2))


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    uids: frozenset[int]
    gids: frozenset[int]
    operations: frozenset[str]
    keys: frozenset[str]
    banks: frozenset[str]
    scopes: frozenset[str] | None = None  # None: any scope

    def matches(self, peer: Peer) -> bool:
        return peer.uid in self.uids or bool(peer.groups & self.gids)

    def grants(self, operation: str, key: str | None, bank: str | None) -> bool:
        return (operation in self.operations
                and (key is None or key in self.keys or "*" in self.keys)
                and (bank is None or bank in self.banks or "*" in self.banks))


@dataclasses.dataclass(frozen=True)
class Policy:
    admin_uids: frozenset[int]
    admin_gids: frozenset[int]
    rules: tuple[Rule, ...]

    @classmethod
    def parse(cls, section: Mapping[str, Any], keys: Mapping[str, KeyConfig] | None = None,
              banks: frozenset[str] | None = None) -> Policy:
        """``keys`` and ``banks`` (the configured ones): a rule must name those, and grant nothing on a key that
        the key's purpose forbids."""
        _known(section, {"admin_users", "admin_groups", "rules"}, "policy")
        rules_raw = section.get("rules", {})
        if not isinstance(rules_raw, Mapping):
            raise ConfigError("[policy.rules] must be a table of named rules, e.g. [policy.rules.payments]")
        grantable, admin_only = _operations(Access.RULE), _operations(Access.ADMIN)
        rules = []
        for name, entry in rules_raw.items():
            where = f"policy.rules.{name}"
            if not isinstance(entry, Mapping):
                raise ConfigError(f"[{where}] must be a table")
            _known(entry, {"users", "groups", "operations", "keys", "banks", "scopes"}, where)
            operations = frozenset(_strings(entry.get("operations", []), f"{where}.operations"))
            if operations & admin_only:
                raise ConfigError(f"[{where}] grants {', '.join(sorted(operations & admin_only))}, "
                                  "which only admins may do", hint="list the user in [policy] admin_users instead")
            unknown = operations - grantable
            if unknown:
                raise ConfigError(f"[{where}] has unknown operation(s) {', '.join(sorted(unknown))}",
                                  hint=f"operations: {', '.join(sorted(grantable))}")
            rule_keys = frozenset(_strings(entry.get("keys", []), f"{where}.keys"))
            rule_banks = frozenset(_strings(entry.get("banks", []), f"{where}.banks"))
            _configured(rule_keys, keys, "key", where)
            _configured(rule_banks, banks, "bank", where)
            if keys is not None:
                _purposes_allow(operations, rule_keys, keys, where)
            scopes = (frozenset(_strings(entry["scopes"], f"{where}.scopes")) if "scopes" in entry else None)
            rules.append(Rule(name, _uids(entry.get("users", []), where), _gids(entry.get("groups", []), where),
                              operations, rule_keys, rule_banks, scopes))
        return cls(_uids(section.get("admin_users", []), "policy.admin_users"),
                   _gids(section.get("admin_groups", []), "policy.admin_groups"), tuple(rules))

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in self.admin_uids or bool(peer.groups & self.admin_gids)

    def knows(self, peer: Peer) -> bool:
        """Whether any rule, or the admin list, names ``peer``: a stranger gets the server's smallest quota, and
        learns no more than yes or no from ``ready``."""
        return self.is_admin(peer) or any(rule.matches(peer) for rule in self.rules)

    def allows(self, peer: Peer, operation: str, key: str | None = None, bank: str | None = None) -> bool:
        if self.is_admin(peer):
            return True
        if operation in _operations(Access.ADMIN):
            return False
        return any(rule.matches(peer) and rule.grants(operation, key, bank) for rule in self.rules)

    def scopes(self, peer: Peer, operation: str, bank: str) -> frozenset[str] | None:
        """The scopes ``operation`` may ask ``bank`` for on behalf of ``peer``; None: any."""
        if self.is_admin(peer):
            return None
        allowed: set[str] = set()
        for rule in self.rules:
            if rule.matches(peer) and rule.grants(operation, None, bank):
                if rule.scopes is None:
                    return None
                allowed |= rule.scopes
        return frozenset(allowed)

    def check(self, peer: Peer, operation: str, key: str | None = None, bank: str | None = None) -> None:
        if self.allows(peer, operation, key, bank):
            return
        target = "".join(f" {what} {name!r}" for what, name in (("on key", key), ("at bank", bank)) if name)
        if operation in _operations(Access.ADMIN):
            raise PolicyDenied(f"{peer.describe()} may not {operation}: it is an admin operation and no "
                               "[policy] admin_users/admin_groups entry names this user or its groups",
                               hint=f"add {peer.toml_user} to [policy] admin_users")
        mine = [rule.name for rule in self.rules if rule.matches(peer)]
        near = f" (rules for this user: {', '.join(mine)})" if mine else " (no rule names this user or its groups)"
        snippet = f'users = [{peer.toml_user}], operations = ["{operation}"]'
        snippet += f', keys = ["{key}"]' if key else ""
        snippet += f', banks = ["{bank}"]' if bank else ""
        raise PolicyDenied(f"{peer.describe()} may not {operation}{target}: missing rule "
                           f"[policy.rules.*] granting {operation!r}{target}{near}",
                           hint=f"add a rule to the config: [policy.rules.NAME] {snippet}")

    def permitted(self, peer: Peer, operation: str, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if self.allows(peer, operation, key=key)]


def _configured(names: frozenset[str], configured: Iterable[str] | None, kind: str, where: str) -> None:
    if configured is None:
        return
    missing = sorted(names - set(configured) - {"*"})
    if missing:
        raise ConfigError(f"[{where}] names {kind} {missing[0]!r}, which is not configured",
                          hint=f"configured {kind}s: {', '.join(sorted(configured)) or 'none'}")


def _purposes_allow(operations: frozenset[str], names: frozenset[str], keys: Mapping[str, KeyConfig],
                    where: str) -> None:
    """A rule that names a key and an operation the key's purpose forbids is a mistake to say at load."""
    from agent.operations.registry import SPECS

    for operation in sorted(operations):
        specs = [s for s in SPECS if s.operation.value == operation and s.resource is Resource.KEY]
        for alias in sorted(names - {"*"}):
            key = keys[alias]
            if key.purpose is None or not specs:
                continue
            reasons = [s.refusal(key.purpose, key.raw_sign) for s in specs]
            if all(reasons):
                raise ConfigError(f"[{where}] grants {operation!r} on key {alias!r}, but {reasons[0]}",
                                  hint=f"remove {operation!r} or {alias!r} from the rule"
                                       + (f", or set raw_sign = true in [keys.{alias}]"
                                          if "raw_sign" in str(reasons[0]) else ""))


def _known(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [{where}]",
                          hint=f"known settings: {', '.join(sorted(known))}")


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of names")
    return value


def _ids(value: object, where: str) -> list[str | int]:
    if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where} must be a list of names or numeric ids")
    return value


def _uids(value: object, where: str) -> frozenset[int]:
    return _numeric(value, where, "user", "uid", lambda name: pwd.getpwnam(name).pw_uid)


def _gids(value: object, where: str) -> frozenset[int]:
    return _numeric(value, where, "group", "gid", lambda name: grp.getgrnam(name).gr_gid)


def _numeric(value: object, where: str, kind: str, id_name: str, lookup: Callable[[str], int]) -> frozenset[int]:
    """Names or numeric ids → ids; a name unknown on this host is a config error, not a silent gap.

    A quoted number that names no one (``"4242"``) is that id, as chown(1) reads it: a uid without a passwd
    entry (a container's, a DynamicUser's) has no name to write."""
    result = set()
    for item in _ids(value, where):
        try:
            result.add(item if isinstance(item, int) else lookup(item))
        except KeyError:
            if isinstance(item, str) and item.isascii() and item.isdigit():
                result.add(int(item))
                continue
            raise ConfigError(f"{where}: no {kind} {item!r} on this host",
                              hint=f"create it or use a numeric {id_name}") from None
    return frozenset(result)
