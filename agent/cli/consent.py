"""``tpp-agent consent callback | refresh``: complete a consent from the bank's redirect, and refresh its tokens.

``tpp-agent par`` (agent/cli/tokens.py) starts the consent; the agent keeps its PKCE verifier, state and nonce.
Tokens are secrets: the refresh token goes to ``--refresh-token-file`` (0600, replaced atomically, written
before anything is printed: a rotated refresh token that is lost loses the consent), and both tokens are
printed only with ``--show-tokens``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from agent import files
from agent.cli.context import CliContext
from agent.errors import InputError

_TOKEN_FILE_HELP = "file keeping the consent's refresh token (written 0600, replaced atomically)"


def register(sub: Any) -> None:
    consent = sub.add_parser("consent", help="complete a consent (after par) and refresh its tokens")
    commands = consent.add_subparsers(dest="consent_command", metavar="COMMAND", required=True)

    callback = commands.add_parser("callback", help="complete a consent from the bank's redirect back")
    callback.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    callback.add_argument("--url", required=True, metavar="URL",
                          help="the redirect URL (or its query string) as received, or - to read it from stdin")
    callback.add_argument("--refresh-token-file", type=Path, metavar="FILE", help=_TOKEN_FILE_HELP)
    callback.add_argument("--show-tokens", action="store_true", help="also print the access and refresh tokens")
    callback.add_argument("--json", action="store_true")
    callback.set_defaults(handler=complete)

    refresh = commands.add_parser("refresh", help="new tokens for a consent (refresh_token grant); the new "
                                                  "refresh token replaces the old one in the file")
    refresh.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    refresh.add_argument("--refresh-token-file", type=Path, required=True, metavar="FILE", help=_TOKEN_FILE_HELP)
    refresh.add_argument("--show-tokens", action="store_true", help="also print the access and refresh tokens")
    refresh.add_argument("--json", action="store_true")
    refresh.set_defaults(handler=refresh_tokens)


def complete(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.refresh_token_file is None and not args.show_tokens:
        raise InputError("the consent's refresh token would be lost: nowhere to keep it",
                         hint="give --refresh-token-file FILE (or --show-tokens to print it)")
    if args.refresh_token_file is not None:
        _check_writable(args.refresh_token_file)
    url = sys.stdin.read().strip() if args.url == "-" else args.url
    answer = ctx.backend.run("consent_callback", {"url": url}, bank=args.bank)
    return _show(args, answer)


def refresh_tokens(args: argparse.Namespace, ctx: CliContext) -> int:
    token = _read_token(args.refresh_token_file)
    _check_writable(args.refresh_token_file)
    answer = ctx.backend.run("consent_refresh", {"refresh_token": token}, bank=args.bank)
    return _show(args, answer)


def _show(args: argparse.Namespace, answer: dict[str, Any]) -> int:
    """Keep the refresh token first, then print (tokens only when asked)."""
    if args.refresh_token_file is not None and answer.get("refresh_token"):
        try:
            _write_token(args.refresh_token_file, answer["refresh_token"])
        except InputError:
            # The bank has retired the old one: printing the new one is the only way left to keep the consent.
            kept = answer["refresh_token"]
            print(json.dumps({"bank": answer["bank"], "refresh_token": kept}) if args.json
                  else f"refresh_token: {kept}")
            raise
        answer["refresh_token_file"] = str(args.refresh_token_file)
    if not args.show_tokens:
        answer.pop("access_token")
        answer.pop("refresh_token")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    details = answer["authorization_details"]
    consent = details[0].get("consent", {}) if details else {}
    print(f"{answer['token_type']} token for {answer['bank']}: consent {consent.get('ConsentId', '?')} "
          f"{consent.get('Status', '?')}, scope {answer['scope'] or '-'!r}, expires in {answer['expires_in']} s")
    claims = answer.get("id_token_claims")
    if claims:
        print(f"  id_token: verified, sub {claims.get('sub')!r}, acr {claims.get('acr', '-')!r}")
    if "refresh_token_file" in answer:
        print(f"  refresh token {'(new) ' if answer['rotated'] else ''}kept in {answer['refresh_token_file']}")
    print(f"  x-fapi-interaction-id: {answer['interaction_id']}")
    if args.show_tokens:
        print(f"  access_token: {answer['access_token']}")
        print(f"  refresh_token: {answer['refresh_token']}")
    return 0


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--refresh-token-file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}",
                         hint="give the file that `tpp-agent consent callback BANK --url URL "
                              "--refresh-token-file FILE` wrote") from None
    if not token:
        raise InputError(f"--refresh-token-file: {path} is empty")
    return token


def _check_writable(path: Path) -> None:
    """Before the bank is asked: afterwards, a file that cannot be written costs the consent."""
    try:
        os.close(files.open_dir(path.parent, create=False))
    except OSError as exc:
        raise InputError(f"--refresh-token-file: cannot use the directory of {path}: {exc.strerror}") from None
    if path.is_dir():
        raise InputError(f"--refresh-token-file: {path} is a directory", hint="name a file in it, e.g. "
                         f"{path / 'consent.refresh'}")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"--refresh-token-file: {path} cannot be written by this user",
                         hint="choose a file in a directory this user may write to")


def _write_token(path: Path, token: str) -> None:
    """Write-then-rename in the file's directory: the file holds the old token or the new one, never half."""
    dir_fd = files.open_dir(path.parent, create=False)
    temporary = f".{path.name}.{secrets.token_hex(4)}"
    try:
        fd = files.open_file(dir_fd, temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
        raise InputError(f"--refresh-token-file: cannot write {path}: {exc.strerror}",
                         hint="the new refresh token is printed above: save it now, the bank retired the old one"
                         ) from None
    finally:
        os.close(dir_fd)
