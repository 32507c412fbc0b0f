"""The admin CLI, ``tpp-agent``: one module per command group, registered below.

Every failure the agent or the PKCS#11 layer can name is printed as one line
``error: …`` plus a ``hint: …`` line, with exit status 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from collections.abc import Sequence

from agent import __version__, audit, hardening, log
from agent.cli import banks, cert, config, csr, daemon, doctor, jose, keys, lifecycle, tokens
from agent.cli.context import CliContext
from agent.errors import EX_CONFIG, AgentError, ConfigError
from pkcs11_backends.errors import Pkcs11Error

COMMAND_GROUPS = (keys, csr, cert, doctor, config, banks, jose, tokens, daemon, lifecycle)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpp-agent", description="HSM-backed keys, CSRs and mTLS for UAE Open Finance")
    parser.add_argument("--config", help="TOML config file (default: $TPP_AGENT_CONFIG or /etc/tpp-agent/config.toml)")
    parser.add_argument("--direct", action="store_true",
                        help="use the token in this process even when an agent is running (needs the PIN)")
    parser.add_argument("--version", action="version", version=f"tpp-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    hardening.no_core_dumps()  # before anything reads a PIN or a token
    args = build_parser().parse_args(argv)
    log.configure("console")  # log lines (requests, interaction ids) on stderr; results on stdout
    context = CliContext(args.config, direct=args.direct)
    try:
        try:
            # Key uses in this process are the operator's, for this command (see agent/cli/context.py).
            with audit.on_behalf_of(os.getuid(), os.getpid(), args.command, str(uuid.uuid4())):
                code: int = args.handler(args, context)
        finally:
            context.close()  # may fail too: the audit trail's last sync ([daemon] audit_sync = "interval")
        return code
    except (AgentError, Pkcs11Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        # The daemon's unit does not restart on 78: a bad configuration stays bad until someone edits it.
        return EX_CONFIG if args.command == "serve" and isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
