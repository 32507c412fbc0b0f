"""``tpp-agent doctor``: is this installation ready? Exit 0 when no check says FAIL, else the exit status of the
first failing check's kind of failure (a bad config 78, an HSM away 69...: docs/cli.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import doctor
from agent.cli.context import CliContext
from agent.errors import ExitStatus


def register(sub: Any) -> None:
    cmd = sub.add_parser("doctor", help="check config, module, token, PIN, OpenSSL and certificates")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: CliContext) -> int:
    checks = doctor.run(ctx)
    status = doctor.verdict(checks)
    if args.json:
        print(json.dumps({"ok": status is ExitStatus.OK, "exit_status": status,
                          "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            print(f"{check.status.value:<5} {check.name:<16} {check.detail}")
            if check.hint and check.status in (doctor.Status.FAIL, doctor.Status.WARN):
                print(f"{'':<22} → {check.hint}")
    return status
