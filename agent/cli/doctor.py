"""``tpp-agent doctor``: is this installation ready? Exit 0 when no check says FAIL."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import doctor
from agent.cli.context import CliContext


def register(sub: Any) -> None:
    cmd = sub.add_parser("doctor", help="check config, module, token, PIN, OpenSSL and certificates")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(handler=run)


def run(args: argparse.Namespace, ctx: CliContext) -> int:
    checks = doctor.run(ctx)
    failed = any(c.status is doctor.Status.FAIL for c in checks)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": [c.as_dict() for c in checks]}, indent=2))
    else:
        for check in checks:
            print(f"{check.status.value:<5} {check.name:<16} {check.detail}")
            if check.hint and check.status in (doctor.Status.FAIL, doctor.Status.WARN):
                print(f"{'':<22} → {check.hint}")
    return 1 if failed else 0
