"""receive_event names what is wrong with the event key before it looks at any event (in-process, no bank)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent import sections
from agent.audit import AuditTrail
from agent.operations.core import Caller, Core, Operator, execute
from agent.operations.errors import KeyPurposeError, UnknownKeyError
from agent.operations.registry import BY_NAME
from agent.runtime import Runtime

BANK = {"discovery_url": "https://127.0.0.1:9/.well-known/openid-configuration", "issuer": "https://127.0.0.1:9",
        "ca_bundle": "/dev/null", "client_key": "transport"}


def receive(runtime: Runtime, tmp_path: Path, keys: dict[str, Any], tokens: dict[str, Any]) -> None:
    raw = {"state": {"dir": str(tmp_path)}, "banks": {"mb": BANK}, "tokens": {"client_id": "c-1", **tokens},
           "keys": {alias: {"uri": f"pkcs11:object={alias}", **entry} for alias, entry in keys.items()}}
    trail = AuditTrail(tmp_path / "audit.jsonl")
    core = Core(sections.parse(raw, tmp_path / "config.toml"), runtime, lambda: trail)
    execute(core, BY_NAME["receive_event"], Caller(os.getuid(), os.getpid(), "i"), Operator(), {"jwe": "x.y.z.a.b"},
            bank="mb")


def test_no_event_key_configured(shared_runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(UnknownKeyError, match="no encryption key 'encryption' is configured") as refused:
        receive(shared_runtime, tmp_path, {"transport": {}}, {})
    assert "tpp-agent keys generate --purpose encryption" in refused.value.hint


def test_the_default_event_key_of_an_older_configuration_is_a_jws_key(shared_runtime: Runtime,
                                                                       tmp_path: Path) -> None:
    with pytest.raises(KeyPurposeError, match="key 'encryption' is a jws key, not an encryption key"):
        receive(shared_runtime, tmp_path, {"transport": {}, "encryption": {}}, {})
