"""Who may do what: clients running as other users (setuid children) against [policy]."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent.daemon.policy import Peer, Policy, PolicyDenied
from agent.errors import ConfigError, ExitStatus
from tests.conftest import Token
from tests.daemon.conftest import NOBODY, Daemon, start_daemon

# A stdlib-only client: it runs as users that own nothing in the test's directories.
_RAW_CLIENT = r"""
import json, socket, sys
path, method, target, body = sys.argv[1:5]
try:
    s = socket.socket(socket.AF_UNIX); s.connect(path)
except OSError as exc:
    print(json.dumps({"connect_error": exc.__class__.__name__})); sys.exit()
data = body.encode()
s.sendall(f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)
raw = b""
while chunk := s.recv(65536):
    raw += chunk
head, _, payload = raw.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": payload.decode()}))
"""


def as_user(daemon: Daemon, uid: int, gid: int, method: str, target: str, body: str = "") -> dict[str, object]:
    # The raw client needs only the standard library: run the interpreter behind the venv, whose own path
    # may lie where other users cannot go (a checkout under /root).
    client = [os.path.realpath(sys.executable), "-c", _RAW_CLIENT, str(daemon.socket_path), method, target, body]
    result = subprocess.run(client, user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=30,
                            check=True, cwd="/")
    out: dict[str, object] = json.loads(result.stdout)
    return out


SIGN = json.dumps({"alg": "PS256", "data_b64": "aGVsbG8="})


def test_socket_and_directory_modes(daemon: Daemon) -> None:
    sock, directory = daemon.socket_path.stat(), daemon.socket_path.parent.stat()
    assert oct(sock.st_mode & 0o777) == "0o660" and sock.st_gid == NOBODY
    assert oct(directory.st_mode & 0o777) == "0o750" and directory.st_uid == 0


def test_allowed_user_signs_and_sees_only_its_keys(daemon: Daemon) -> None:
    signed = as_user(daemon, NOBODY, NOBODY, "POST", "/v1/keys/signing/sign", SIGN)
    assert signed["status"] == 200, signed
    listed = as_user(daemon, NOBODY, NOBODY, "GET", "/v1/keys")
    assert [k["alias"] for k in json.loads(str(listed["body"]))["keys"]] == ["signing"]
    audit = [json.loads(line) for line in daemon.audit_file.read_text().splitlines()]
    assert audit[-1]["uid"] == NOBODY and audit[-1]["operation"] == "sign" and audit[-1]["result"] == "ok"


def test_denied_key_names_the_missing_rule(daemon: Daemon) -> None:
    denied = as_user(daemon, NOBODY, NOBODY, "POST", "/v1/keys/ecsign/sign", SIGN)
    assert denied["status"] == 403
    error = json.loads(str(denied["body"]))
    assert error["code"] == "forbidden"
    assert "uid 65534 (nobody)" in error["message"] and "'sign' on key 'ecsign'" in error["message"]
    assert "rules for this user: nobody-signs" in error["message"]
    assert 'keys = ["ecsign"]' in error["hint"] and error["interaction_id"]


def test_user_without_any_rule_is_denied_even_with_socket_access(daemon: Daemon) -> None:
    denied = as_user(daemon, 4242, NOBODY, "POST", "/v1/keys/signing/sign", SIGN)
    error = json.loads(str(denied["body"]))
    assert denied["status"] == 403 and "no rule names this user" in error["message"]
    assert as_user(daemon, 4242, NOBODY, "GET", "/v1/health")["status"] == 200


def test_user_outside_the_socket_group_cannot_connect(daemon: Daemon) -> None:
    assert as_user(daemon, 4243, 4243, "GET", "/v1/health") == {"connect_error": "PermissionError"}


def test_policy_config_errors() -> None:
    with pytest.raises(ConfigError, match="only admins"):
        Policy.parse({"rules": {"r": {"users": [1], "operations": ["csr"]}}})
    with pytest.raises(ConfigError, match="unknown operation"):
        Policy.parse({"rules": {"r": {"users": [1], "operations": ["sing"]}}})
    with pytest.raises(ConfigError, match="no user 'no-such-user'"):
        Policy.parse({"admin_users": ["no-such-user"]})
    policy = Policy.parse({"admin_groups": [10], "rules": {"all": {"groups": [20], "operations": ["sign"],
                                                                    "keys": ["*"]}}})
    member = Peer(uid=1000, gid=5, pid=1, groups=frozenset({5, 20}))
    policy.check(member, "sign", key="anything")
    with pytest.raises(PolicyDenied, match="admin operation"):
        policy.check(member, "csr")
    policy.check(Peer(uid=1001, gid=10, pid=1, groups=frozenset({10})), "csr")


def test_refuses_a_socket_directory_owned_by_someone_else(keyed_token: Token, public_dir: Path) -> None:
    (public_dir / "run").mkdir(mode=0o750)
    os.chown(public_dir / "run", NOBODY, NOBODY)
    daemon = start_daemon(keyed_token, public_dir, wait_ready=False)
    assert daemon.proc.wait(60) == ExitStatus.CONFIG  # a socket path to fix: systemd does not restart on it
    assert "owned by uid 65534" in daemon.stderr()


def test_the_hint_for_a_uid_without_a_passwd_entry_is_a_rule_the_loader_takes() -> None:
    """A container's or DynamicUser's uid has no name: the 403 hint names it as a bare uid, and that loads."""
    with pytest.raises(KeyError):
        pwd.getpwuid(4242)
    peer = Peer(uid=4242, gid=4242, pid=1, groups=frozenset({4242}))
    rules = {"other": {"users": ["nobody"], "operations": ["sign"], "keys": ["*"]}}
    with pytest.raises(PolicyDenied) as denied:
        Policy.parse({"rules": rules}).check(peer, "sign", key="signing")
    hint = str(denied.value.hint)
    assert "users = [4242]" in hint, hint
    snippet = hint.split("[policy.rules.NAME] ", 1)[1]
    rule = tomllib.loads("[policy.rules.fixed]\n" + snippet.replace("], ", "]\n"))["policy"]["rules"]["fixed"]
    Policy.parse({"rules": {**rules, "fixed": rule}}).check(peer, "sign", key="signing")

    with pytest.raises(PolicyDenied) as admin_only:
        Policy.parse({}).check(peer, "csr")
    assert admin_only.value.hint == "add 4242 to [policy] admin_users"
    Policy.parse({"admin_users": [4242]}).check(peer, "csr")
    # Written as a string (as the hint once said), a number that names no user is that uid too.
    Policy.parse({"admin_users": ["4242"]}).check(peer, "csr")
    with pytest.raises(ConfigError, match="no user 'no-such-user'"):
        Policy.parse({"admin_users": ["no-such-user"]})
