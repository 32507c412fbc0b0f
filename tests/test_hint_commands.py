"""Every command a hint names (`tpp-agent …` or (tpp-agent …) in a message of agent/ or pkcs11_backends/) is one
the real parser knows, with the options it names; a full command line must parse as it stands."""

from __future__ import annotations

import argparse
import ast
import re
import shlex

import pytest

from agent.cli import build_parser
from tests.conftest import REPO

NAMED = re.compile(r"[`(]tpp-agent ([^`)]+)[`)]")


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def hinted_commands() -> list[tuple[str, str]]:
    """(where, command line after "tpp-agent") for every command named in a string of the code (not docstrings);
    an f-string's replacement fields read as X."""
    commands = set()
    for path in sorted([*(REPO / "agent").rglob("*.py"), *(REPO / "pkcs11_backends").rglob("*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(str(part.value) if isinstance(part, ast.Constant) else "X" for part in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
            else:
                continue
            for match in NAMED.finditer(text):
                commands.add((f"{path.relative_to(REPO)}:{node.lineno}", match.group(1)))
    return sorted(commands)


class _Refused(Exception):
    pass


def _strict(parser: argparse.ArgumentParser) -> None:
    """Usage errors raise instead of exiting, in the parser and every subcommand's."""
    def error(message: str) -> None:
        raise _Refused(message)

    parser.error = error  # type: ignore[method-assign,assignment]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _strict(sub)


def _subcommand(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The innermost parser the leading words select, and the words left."""
    while words:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices:
            break
        if words[0] not in choices:
            raise _Refused(f"no command {words[0]!r} (commands: {', '.join(choices)})")
        parser, words = choices[words[0]], words[1:]
    return parser, words


def test_the_code_names_commands_in_its_hints() -> None:
    assert len(hinted_commands()) >= 10  # the scanner finds them (a regex that matches nothing proves nothing)


@pytest.mark.parametrize(("where", "command"), hinted_commands())
def test_every_command_a_hint_names_parses(where: str, command: str) -> None:
    words = [word for word in shlex.split(command) if word != "..."]
    words = words[:next((i for i, word in enumerate(words) if word[:1] in "|>"), len(words))]  # `… > file`
    parser = build_parser()
    _strict(parser)
    try:
        inner, rest = _subcommand(parser, words)
        for word in rest:
            if word.startswith("-"):
                assert word.split("=")[0] in inner._option_string_actions, f"{where}: {inner.prog} has no {word}"
        try:
            parser.parse_args(words)
        except _Refused as exc:
            # A hint may name a command without what it always needs (`tpp-agent cert import --replace`).
            if "arguments are required" not in str(exc):
                raise
    except _Refused as exc:
        pytest.fail(f"{where}: `tpp-agent {command}`: {exc}")
