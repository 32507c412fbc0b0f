"""``tpp-agent config check``: load the whole configuration and print every problem in it at once."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import sections
from agent.cli.context import CliContext
from agent.errors import ExitStatus


def register(sub: Any) -> None:
    config = sub.add_parser("config", help="the configuration file")
    actions = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="check every section and setting; print each problem; exit 78 if any")
    check.add_argument("--config", dest="check_file", metavar="FILE",
                       help="the file to check (default: the one the agent uses: --config, $TPP_AGENT_CONFIG...)")
    check.set_defaults(handler=check_command)


def check_command(args: argparse.Namespace, ctx: CliContext) -> int:
    path, problems = sections.problems_of(args.check_file or ctx.config_path)
    where = str(path) if path else "the built-in defaults"
    status = ExitStatus.CONFIG if problems else ExitStatus.OK
    if args.json:
        print(json.dumps({"file": str(path) if path else None, "ok": not problems, "exit_status": status,
                          "problems": [{"problem": str(p), "hint": p.hint} for p in problems]}, indent=2))
        return status
    for problem in problems:
        print(f"{where}: {problem}")
        if problem.hint:
            print(f"  hint: {problem.hint}")
    if problems:
        print(f"{len(problems)} problem(s) in {where}")
        return status
    print(f"{where}: every section and setting is valid")
    return 0
