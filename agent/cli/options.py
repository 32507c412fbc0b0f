"""The options every command takes, before or after its name: ``--config``, ``--direct``, ``--interaction-id``,
``-q``/``-v`` and ``--json``.

``tpp-agent --direct keys list`` and ``tpp-agent keys list --direct`` mean the same. argparse gives a
subcommand's parser a namespace of its own defaults, which would overwrite what was given before the command:
the copies on the subcommands default to SUPPRESS, so that only an option given there sets anything.
``--json`` is on every command that prints a result (all but ``serve``): a command that prints nothing else
prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Iterator
from typing import Any

# Commands that print no result, by their words (``--json`` would promise one).
NO_RESULT = frozenset({("serve",)})


def add_global(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options of every command on ``parser``: the top-level parser (``top``) or a command's."""
    def default(value: object) -> Any:
        return value if top else argparse.SUPPRESS

    taken = parser._option_string_actions  # a command's own option of that name wins (config check --config)
    if "--config" not in taken:
        parser.add_argument("--config", default=default(None),
                            help="TOML config file (default: $TPP_AGENT_CONFIG or /etc/tpp-agent/config.toml)")
    if "--direct" not in taken:
        parser.add_argument("--direct", action="store_true", default=default(False),
                            help="use the token in this process even when an agent is running (needs the PIN)")
    if "--interaction-id" not in taken:
        parser.add_argument("--interaction-id", type=_interaction_id, metavar="UUID", default=default(None),
                            help="the x-fapi-interaction-id of this command (default: a new one): sent to the bank, "
                                 "answered and audited")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_const", dest="log_level", const="warning",
                           default=default(None), help="log only warnings and errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_const", dest="log_level", const="debug",
                           default=default(None), help="log debug lines too")


def _interaction_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value[:60]!r} is not a UUID (RFC 4122)") from None


def add_json(parser: argparse.ArgumentParser, *, top: bool) -> None:
    own = parser._option_string_actions.get("--json")
    if own is not None:  # declared by the command itself (its help text says more): only its default changes
        own.default = False if top else argparse.SUPPRESS
        return
    parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="print the result as one JSON document on stdout")


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command's parser (the leaves of the tree) with the words that select it."""
    found = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not found:
        yield words, parser
        return
    for name, sub in found[0].choices.items():
        yield from commands(sub, (*words, name))


def install(parser: argparse.ArgumentParser) -> None:
    """The global options on the top-level parser and on every command's, ``--json`` where there is a result."""
    add_global(parser, top=True)
    add_json(parser, top=True)
    parser.set_defaults(prints_result=True)
    for words, command in commands(parser):
        add_global(command, top=False)
        if words in NO_RESULT:
            command.set_defaults(prints_result=False)
        else:
            add_json(command, top=False)
