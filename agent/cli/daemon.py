"""``tpp-agent serve`` (the daemon) and ``tpp-agent audit verify`` (its audit trail)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent.cli.context import CliContext


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the agent: HTTP/1.1 + JSON on a Unix socket (systemd Type=notify)")
    serve.add_argument("--socket", help="socket path (default: [daemon] socket, else $RUNTIME_DIRECTORY/agent.sock)")
    serve.set_defaults(handler=serve_command)

    audit = sub.add_parser("audit", help="the audit trail of key uses")
    actions = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the hash chain; name every removed or edited line")
    verify.add_argument("--file", help="one audit trail file (default: [daemon] audit_file and the serving "
                                       "processes' own trails beside it, audit.N.jsonl)")
    verify.set_defaults(handler=verify_command)


def serve_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from agent.daemon.main import run

    return run(ctx.config_path, args.socket)


def verify_command(args: argparse.Namespace, ctx: CliContext) -> int:
    from agent import audit

    if args.file:
        paths = [Path(args.file)]
    else:
        base = ctx.sections.daemon.audit_file
        paths = audit.trail_files(base) or [base]  # none yet: verify() says where it looked
    damaged = 0
    for path in paths:
        count, findings = audit.verify(path)
        for finding in findings:
            print(f"{path}:{finding}")
        if findings:
            damaged += 1
            print(f"audit trail {path}: {len(findings)} problem(s) in {count} line(s)", file=sys.stderr)
        else:
            print(f"audit trail {path}: {count} record(s), chain intact")
    return 1 if damaged else 0
