"""``tpp-agent status``: one summary of this host — the agent, its session pool, the keys with their
certificates, the banks with their registration state, and any key rotation under way.

It works with no agent running: the keys are then read on the token in this process (the PIN is needed, as for
``keys list --direct``). With an agent running (and serving this configuration), the keys and the pool's health
are the agent's, through its socket. The banks' registration state is read here, as ``tpp-agent registrations``
reads it (the token's transport certificate, the registration log). Each part that cannot be read says why;
the others are still shown. Exit 0 unless the configuration cannot be loaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from typing import Any, TypeVar

from agent.cli.backend import Direct
from agent.cli.context import CliContext, ConfigMismatchError
from agent.client import AgentClient, AgentRequestError, AgentUnavailableError, UntrustedAgentError
from agent.config import SYSTEM_CONFIG
from agent.errors import AgentError
from agent.lifecycle.registrations import bank_registration
from agent.openfinance.records import RegistrationLog
from agent.state import open_state
from agent.state.rotation import RotationLog, RotationState
from pkcs11_backends.errors import Pkcs11Error

T = TypeVar("T")
_NO_FILE = f"no file found (--config, $TPP_AGENT_CONFIG, {SYSTEM_CONFIG}): the built-in defaults"
_PROBE_TIMEOUT = 2.0


def register(sub: Any) -> None:
    status = sub.add_parser("status", help="summary: agent, pool, keys and certificates, banks, rotations",
                            description="One summary of this host: is the agent running and ready, the session "
                                        "pool's health, each configured key (alias, label, purpose, URI) with its "
                                        "certificate's days left, each bank's registration state, and the key "
                                        "rotations under way. Works with no agent running.")
    status.set_defaults(handler=show)


def _part(read: Callable[[], T]) -> tuple[T | None, str | None]:
    """(what was read, None) or (None, why it could not be)."""
    try:
        return read(), None
    except (AgentError, Pkcs11Error) as exc:
        return None, str(exc)


def gather(ctx: CliContext, now: datetime.datetime | None = None) -> dict[str, Any]:
    now = now or datetime.datetime.now(datetime.UTC)
    sections = ctx.sections
    agent = _agent(ctx)
    keys, keys_error, via = _keys(ctx, agent)
    served_pool = agent.pop("pool", None)
    pool = served_pool if via == "agent" else _part(lambda: _local_pool(ctx))[0]
    for key in keys or []:
        cert = key.get("certificate")
        if cert is not None:
            left = datetime.datetime.fromisoformat(str(cert["not_after"])) - now
            cert["days_left"] = round(left.total_seconds() / 86400, 1)
    banks, banks_error = _part(lambda: _banks(ctx))
    rotations, rotations_error = _part(lambda: _rotations(ctx))
    return {"config": str(sections.path) if sections.path else None, "agent": agent, "pool": pool,
            "keys": {"via": via, "keys": keys, "error": keys_error},
            "banks": {"banks": banks, "error": banks_error},
            "rotations": {"rotations": rotations, "error": rotations_error}}


def _agent(ctx: CliContext) -> dict[str, Any]:
    """Whether an agent answers on the configured socket, and what it tells this user about itself."""
    path = ctx.sections.daemon.socket
    found: dict[str, Any] = {"socket": str(path), "running": False, "ready": False, "detail": None,
                             "config_matches": None}
    if not path.exists():
        found["detail"] = "no socket: the agent is not running"
        return found
    client = AgentClient(path, timeout=_PROBE_TIMEOUT)
    try:
        client.health()
        found["running"] = True
        answer = client.ready()
    except UntrustedAgentError as exc:
        found["detail"] = f"not the agent: {exc}"
        return found
    except AgentUnavailableError as exc:
        found["detail"] = str(exc)
        return found
    except AgentRequestError as exc:  # not ready (503), with why for a caller a rule names
        found["detail"] = str(exc)
        return found
    finally:
        client.close()
    found["ready"] = bool(answer.get("ready"))
    found["detail"] = answer.get("detail")
    if "config_digest" in answer:
        found["config_matches"] = answer["config_digest"] == ctx.config.digest
        found["config_file"] = answer.get("config_file")
    if "pool" in answer:
        found["pool"] = answer["pool"]
    return found


def _keys(ctx: CliContext, agent: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None, str]:
    """The configured keys, from the agent when it serves this configuration, else from the token here."""
    use_agent = agent["ready"] and not ctx.direct and agent["config_matches"] is not False
    if use_agent:
        try:
            return ctx.backend.run("keys")["keys"], None, "agent"
        except ConfigMismatchError:
            pass  # the configuration changed between the probe and the call: read the token
        except (AgentError, Pkcs11Error) as exc:
            return None, str(exc), "agent"
    listed, error = _part(lambda: _token_keys(ctx))
    return listed, error, "token"


def _token_keys(ctx: CliContext) -> list[dict[str, Any]]:
    """The configured keys, then the token's other key pairs (no alias yet: generated, not configured)."""
    configured: list[dict[str, Any]] = Direct(ctx.core, ctx.interaction_id).run("keys")["keys"]
    named = {key["token_uri"] for key in configured}
    others = [{"alias": None, "uri": str(info.uri), "type": str(info.spec), "purpose": None, "label": info.label,
               "id": info.id.hex(), "token_uri": str(info.uri),
               "certificate": info.certificate.as_dict() if info.certificate else None}
              for info in ctx.runtime.keys.list() if str(info.uri) not in named]
    return configured + others


def _local_pool(ctx: CliContext) -> dict[str, Any]:
    health = ctx.runtime.pool.health
    return {"state": health.state.value, "detail": health.detail, "recoveries": health.recoveries}


def _banks(ctx: CliContext) -> list[dict[str, Any]]:
    records = RegistrationLog(open_state(ctx.config))
    return [bank_registration(ctx.runtime, bank, records).as_dict() for bank in ctx.sections.banks.values()]


def _rotations(ctx: CliContext) -> list[dict[str, Any]]:
    log = RotationLog(open_state(ctx.config))
    found = [log.get(alias) for alias in ctx.config.keys]
    return [_rotation(state) for state in found if state is not None]


def _rotation(state: RotationState) -> dict[str, Any]:
    return {"key": state.key_alias, "keys": [{"label": k.label, "role": k.role, "since": k.since} for k in state.keys],
            "overlap_started_at": state.overlap_started_at, "signing_switched_at": state.signing_switched_at,
            "banks": {bank: {"key_label": switch.key_label, "switched_at": switch.switched_at}
                      for bank, switch in state.banks.items()},
            "version": state.version, "updated_at": state.updated_at, "updated_by": state.updated_by}


def show(args: argparse.Namespace, ctx: CliContext) -> int:
    report = gather(ctx)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"config     {report['config'] or _NO_FILE}")
    print(f"agent      {_agent_line(report['agent'])}")
    pool = report["pool"]
    print(f"pool       {pool['state']}: {pool['detail']} ({pool['recoveries']} recoveries)" if pool else
          "pool       not known (the token was not opened)")
    keys = report["keys"]
    print(f"keys       (read {'through the agent' if keys['via'] == 'agent' else 'on the token in this process'})")
    if keys["error"]:
        print(f"  cannot list them: {keys['error']}")
    elif not keys["keys"]:
        print("  none (create one with `tpp-agent keys generate --label NAME`)")
    else:
        print(f"  {'ALIAS':<14} {'LABEL':<16} {'PURPOSE':<10} {'CERTIFICATE':<24} URI")
        for key in keys["keys"]:
            print(f"  {key['alias'] or '-':<14} {key['label']:<16} {key['purpose'] or '-':<10} "
                  f"{_cert_column(key):<24} {key['uri']}")
        if any(key["alias"] is None for key in keys["keys"]):
            print("  (-: on the token, not configured: name it in a [keys.ALIAS] table to use it)")
    banks = report["banks"]
    print("banks")
    if banks["error"]:
        print(f"  cannot read them: {banks['error']}")
    elif not banks["banks"]:
        print("  none configured ([banks.NAME] in the configuration)")
    for bank in banks["banks"] or []:
        print(f"  {bank['bank']:<14} {bank['state']:<24} {bank['endpoint'] or '-'}")
        if bank["problem"]:
            print(f"  {'':<14} → {bank['problem']}")
    rotations = report["rotations"]
    if rotations["error"]:
        print(f"rotations  cannot read them: {rotations['error']}")
    elif not rotations["rotations"]:
        print("rotations  none under way")
    else:
        print("rotations")
        for rotation in rotations["rotations"]:
            print(f"  {rotation['key']:<14} {_rotation_line(rotation)}")
    return 0


def _agent_line(agent: dict[str, Any]) -> str:
    if not agent["running"]:
        return f"not running ({agent['detail']}; socket {agent['socket']})"
    state = "ready" if agent["ready"] else "NOT ready"
    line = f"running at {agent['socket']}, {state}" + (f": {agent['detail']}" if agent["detail"] else "")
    if agent["config_matches"] is False:
        line += f"\n           serves {agent.get('config_file') or 'built-in defaults'}, which differs from this " \
                "configuration: reload it (systemctl reload tpp-agent)"
    return line


def _cert_column(key: dict[str, Any]) -> str:
    cert = key.get("certificate")
    if cert is None:
        return "none"
    left = cert["days_left"]
    return f"{str(cert['not_after'])[:10]} ({left:.0f} days)" if left >= 0 else f"EXPIRED {str(cert['not_after'])[:10]}"


def _rotation_line(rotation: dict[str, Any]) -> str:
    roles = ", ".join(f"{k['role']} {k['label']!r}" for k in rotation["keys"])
    steps = [f"overlap since {rotation['overlap_started_at']}" if rotation["overlap_started_at"] else None,
             f"signing switched {rotation['signing_switched_at']}" if rotation["signing_switched_at"] else None,
             f"{len(rotation['banks'])} bank(s) switched" if rotation["banks"] else None]
    return "; ".join([roles, *[s for s in steps if s]])
