"""``tpp-agent keys``: generate, list and show the public half of key pairs on the token.

``list`` and ``public`` go through a running agent (see agent/cli/context.py); there ``list`` shows the
configured keys the user's policy lets it see. ``generate`` always works on the token directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from agent.cli.context import CliContext
from agent.errors import InputError
from pkcs11_backends.decryption import generate_encryption_key
from pkcs11_backends.keys import KeySpec, KeyStore


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="key pairs on the token")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)

    gen = actions.add_parser("generate", help="generate a key pair on the token")
    gen.add_argument("--label", required=True, help="CKA_LABEL of both halves")
    gen.add_argument("--type", default="rsa:2048", help="rsa:2048 (default), rsa:3072, rsa:4096, ec:p256, ec:p384")
    gen.add_argument("--id", help="CKA_ID as hex (default: 8 random bytes)")
    gen.add_argument("--purpose", choices=("sign", "encryption"), default="sign",
                     help="sign (default: signs, for jws and tls keys) or encryption (decrypt-only RSA: the key "
                          "the bank's events are encrypted to; configure it with purpose = \"encryption\")")
    gen.add_argument("--json", action="store_true", help="print the new key as JSON")
    gen.set_defaults(handler=generate)

    lst = actions.add_parser("list", help="list the key pairs on the token")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=list_keys)

    pub = actions.add_parser("public", help="print a key's public half as PEM")
    pub.add_argument("key", metavar="KEY", help="pkcs11: URI or configured alias")
    pub.set_defaults(handler=public)


def generate(args: argparse.Namespace, ctx: CliContext) -> int:
    spec = KeySpec.parse(args.type)
    key_id = None
    if args.id is not None:
        try:
            key_id = bytes.fromhex(args.id)
        except ValueError:
            raise InputError(f"--id must be hex digits, got {args.id!r}") from None
        if not key_id:
            raise InputError("--id must not be empty")
    store = ctx.runtime.keys
    # PIN and duplicates first: the progress line only starts for work that will be done.
    store.check_free(args.label, key_id)
    make = generate_encryption_key if args.purpose == "encryption" else KeyStore.generate
    kind = "encryption key" if args.purpose == "encryption" else "key"
    info = _with_progress(f"generating {spec} {kind} {args.label!r} on the token",
                          lambda: make(store, args.label, spec, key_id))
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
    else:
        print(f"generated {spec} key {info.label!r} id={info.id.hex()}")
        print(info.uri)
    return 0


def list_keys(args: argparse.Namespace, ctx: CliContext) -> int:
    found = ctx.backend.list_keys()
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    if not found:
        print("no keys on the token (create one with `tpp-agent keys generate --label NAME`)")
        return 0
    print(f"{'LABEL':<20} {'TYPE':<9} {'ID':<18} {'CERTIFICATE':<28} URI")
    for key in found:
        print(f"{key['label']:<20} {key['type']:<9} {key['id']:<18} {_cert_column(key):<28} {key['uri']}")
    return 0


def _cert_column(key: dict[str, Any]) -> str:
    cert = key["certificate"]
    return "none" if cert is None else "expires " + str(cert["not_after"])[:10]


def public(args: argparse.Namespace, ctx: CliContext) -> int:
    armored = ctx.backend.public_pem(args.key)
    if args.json:
        print(json.dumps({"key": args.key, "pem": armored}, indent=2))
    else:
        sys.stdout.write(armored)
    return 0


def _with_progress(message: str, work: Any) -> Any:
    """Run ``work`` while a terminal shows the elapsed time (RSA 4096 can take seconds on a real HSM)."""
    done = threading.Event()
    started = time.monotonic()
    live = sys.stderr.isatty()

    def ticker() -> None:
        while not done.wait(0.25):
            sys.stderr.write(f"\r{message}… {time.monotonic() - started:4.1f}s")
            sys.stderr.flush()

    thread = threading.Thread(target=ticker, daemon=True)
    if live:
        thread.start()
    else:
        sys.stderr.write(f"{message}…\n")
    try:
        return work()
    finally:
        done.set()
        if live:
            thread.join()
            sys.stderr.write(f"\r{message}… done in {time.monotonic() - started:.1f}s\n")
