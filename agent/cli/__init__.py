"""The admin CLI, ``tpp-agent``: one module per command group, registered below.

Every failure the agent or the PKCS#11 layer can name is printed as one line
``error: …`` plus a ``hint: …`` line; the exit status says which kind of failure it was
(agent/errors.py ``EXIT_STATUS``, docs/cli.md), usage errors exit 64 (EX_USAGE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from agent import __version__, audit, hardening, log
from agent import config as config_module
from agent.cli import (
    banks,
    cert,
    config,
    consent,
    csr,
    daemon,
    directory,
    doctor,
    jose,
    keys,
    lifecycle,
    messages,
    metrics,
    options,
    rotate,
    status,
    tokens,
)
from agent.cli.context import CliContext
from agent.errors import AgentError, ConfigError, ExitStatus, exit_status
from pkcs11_backends.errors import Pkcs11Error

COMMAND_GROUPS = (keys, csr, cert, doctor, config, banks, jose, tokens, consent, messages, daemon, lifecycle, status,
                  metrics, rotate, directory)


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with EX_USAGE (64) on a usage error instead of 2; subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(ExitStatus.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpp-agent", description="HSM-backed keys, CSRs and mTLS for UAE Open Finance")
    parser.add_argument("--version", action="version", version=f"tpp-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    options.install(parser)  # --config, --direct, -q/-v, --json: before the command or after it
    return parser


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion (bash: /usr/share/bash-completion/completions/tpp-agent) when the shell asks for it."""
    if "_ARGCOMPLETE" not in os.environ:
        return  # not imported otherwise: every command would pay for it
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)  # prints the completions and exits


def main(argv: Sequence[str] | None = None) -> int:
    hardening.no_core_dumps()  # before anything reads a PIN or a token
    try:
        return _run(argv)
    except BrokenPipeError:
        # `tpp-agent keys list | head -1`: the reader has what it wanted. Later writes (the exit's flush) go nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.BROKEN_PIPE


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    _complete(parser)
    try:
        args = parser.parse_args(rotate.shorthand(list(sys.argv[1:] if argv is None else argv)))
    finally:
        sys.stdout.flush()  # --help and --version print and exit here: a closed pipe shows now, not at exit
    if args.json and not args.prints_result:
        parser.error(f"{args.command} prints no result: --json is for the commands that print one")
    # log lines (requests, interaction ids) on stderr; results on stdout
    log.configure("console", args.log_level or "info")
    context = CliContext(args.config, direct=args.direct, interaction_id=args.interaction_id)
    try:
        try:
            # Key uses in this process are the operator's, for this command (see agent/cli/context.py).
            with audit.on_behalf_of(os.getuid(), os.getpid(), args.command, context.interaction_id):
                code: int = args.handler(args, context)
                sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        finally:
            context.close()  # may fail too: the audit trail's last sync ([daemon] audit_sync = "interval")
        return code
    except (AgentError, Pkcs11Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        hint = exc.hint
        if config_module.locate(args.config) is None and isinstance(exc, Pkcs11Error | ConfigError):
            # The built-in defaults name a system token and state dir a new user does not have yet: the
            # module's own complaint (CKR_GENERAL_ERROR...) would send them looking in the wrong place.
            hint = (f"no configuration file was found (--config, $TPP_AGENT_CONFIG, {config_module.SYSTEM_CONFIG}), "
                    "so the built-in defaults were used: write one (see config.example.toml, or `make demo` makes "
                    "one) and pass --config FILE or set TPP_AGENT_CONFIG")
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        bank_id = getattr(exc, "bank_interaction_id", None)  # the bank's own id, beside ours (docs/api.md)
        if bank_id:
            print(f"the bank answered with x-fapi-interaction-id {bank_id}", file=sys.stderr)
        # The daemon's unit does not restart on 78: a bad configuration stays bad until someone edits it.
        return exit_status(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
