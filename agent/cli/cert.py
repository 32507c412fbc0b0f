"""``tpp-agent cert``: import the certificate issued for a token key, and show it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from asn1crypto import pem

from agent.cli.context import CliContext
from agent.errors import InputError
from agent.jose import keys as jose_keys
from agent.rotation.view import label_uri, successor_label
from agent.x509.certificates import (
    KeyCertificates,
    days_left,
    import_certificate,
    key_certificates,
    read_certificates,
)
from agent.x509.signatures import same_public_key
from agent.x509.subject import rfc4514
from pkcs11_backends.uri import Pkcs11Uri

_MAX_FILE = 1 << 20


def register(sub: Any) -> None:
    cert = sub.add_parser("cert", help="certificates of token keys")
    actions = cert.add_subparsers(dest="action", metavar="ACTION", required=True)

    imp = actions.add_parser("import", help="store a certificate (and its chain) on the token with its key",
                             description="FILE: PEM, leaf first then its chain, or one DER certificate ('-' for "
                                         "stdin). Older certificates of the key are kept for rotation overlap; "
                                         "the newest is used. --replace removes them.")
    imp.add_argument("--key", required=True, help="pkcs11: URI or configured alias of the key")
    imp.add_argument("--replace", action="store_true", help="remove the key's other certificates")
    imp.add_argument("file", metavar="FILE")
    imp.set_defaults(handler=import_cert)

    show = actions.add_parser("show", help="show a key's certificates and chain")
    show.add_argument("--key", required=True, help="pkcs11: URI or configured alias of the key")
    out = show.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--pem", action="store_true", help="print the certificate in use and its chain as PEM")
    show.set_defaults(handler=show_cert)


def read_input(name: str, what: str = "certificate") -> bytes:
    """A file the operator names ('-': stdin), at most 1 MiB; ``what`` it should be, for the messages."""
    try:
        with (open(sys.stdin.fileno(), "rb", closefd=False) if name == "-" else Path(name).open("rb")) as handle:
            data = handle.read(_MAX_FILE + 1)
    except FileNotFoundError:
        raise InputError(f"{what} file not found: {name}") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a directory, not a {what} file") from None
    except PermissionError:
        raise InputError(f"{what} file not readable: {name}") from None
    if len(data) > _MAX_FILE:
        raise InputError(f"{name} is larger than 1 MiB: not a {what} file")
    return data


def import_cert(args: argparse.Namespace, ctx: CliContext) -> int:
    data = read_input(args.file)
    source = "stdin" if args.file == "-" else args.file
    rotated = _rotation_successor(args.key, ctx, data, source)
    if rotated is not None:
        from agent.cli import rotate  # it imports this module

        print(f"this is the certificate of {rotated!r}'s rotation successor: it starts the overlap "
              f"(as `tpp-agent rotate import {rotated} CERT`)", file=sys.stderr)
        return rotate.import_successor(argparse.Namespace(key=rotated, file=args.file, json=False), ctx, data)
    before = jose_keys.resolved(ctx.runtime.keys, ctx.config, args.key)
    result = import_certificate(ctx.runtime.keys, args.key, data, source, replace=args.replace)
    warning = jose_keys.kid_change(args.key, before, jose_keys.resolved(ctx.runtime.keys, ctx.config, args.key))
    if warning:
        print(warning, file=sys.stderr)
    cert = result.certificate
    if args.json:
        print(json.dumps({"key": args.key, "already_present": result.already_present,
                          "certificate": {**cert.as_dict(), "days_left": round(days_left(cert), 1)},
                          "chain_added": list(result.chain_added), "replaced": result.replaced,
                          "kid_warning": warning or None}, indent=2))
        return 0
    verb = "already on the token" if result.already_present else "imported"
    print(f"{verb}: {cert.subject} for key {cert.label!r}, valid until {cert.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"sha256 {cert.sha256_fingerprint}")
    for label in result.chain_added:
        print(f"stored chain certificate {label!r}")
    if result.replaced:
        print(f"removed {result.replaced} older certificate(s) of this key")
    return 0


def _rotation_successor(key: str, ctx: CliContext, data: bytes, source: str) -> str | None:
    """The alias whose rotation successor this certificate is for, when ``key`` names that alias or successor."""
    states = ctx.core.rotation.states
    if not states:
        return None
    leaf = read_certificates(data, source)[0]
    named = ctx.config.key_named(key)
    for alias, state in states.items():
        successor = successor_label(state)
        if successor is None:
            continue
        uri = label_uri(ctx.config, alias, successor)
        names_it = (named is not None and named.alias == alias) or key in (uri, successor) or \
            (key.startswith("pkcs11:") and Pkcs11Uri.parse(key).object == successor)
        if names_it and same_public_key(leaf.public_key, ctx.runtime.keys.public_key_info(uri)):
            return alias
    return None


def show_cert(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.json and args.pem:
        raise InputError("--json and --pem: give one (the JSON has each certificate's PEM)")
    found = key_certificates(ctx.runtime.keys, args.key)
    if args.json:
        print(json.dumps(_as_json(found), indent=2))
        return 0
    if found.current is None:
        raise InputError(f"key {found.key_label!r} has no certificate",
                         hint="import one with `tpp-agent cert import --key KEY FILE`")
    if args.pem:
        for cert in (found.current, *found.chain):
            sys.stdout.write(pem.armor("CERTIFICATE", cert.der).decode("ascii"))
        return 0
    for number, cert in enumerate(found.certificates):
        role = "in use" if number == 0 else "older (kept for rotation)"
        print(f"certificate {number + 1} ({role})")
        parsed = cert.parsed
        print(f"  subject   {cert.subject}")
        print(f"  issuer    {rfc4514(parsed.issuer)}")
        print(f"  serial    {parsed.serial_number:x}")
        print(f"  valid     {cert.not_before:%Y-%m-%d %H:%M} .. {cert.not_after:%Y-%m-%d %H:%M} UTC "
              f"({days_left(cert):.0f} days left)")
        print(f"  sha256    {cert.sha256_fingerprint}")
    for cert in found.chain:
        print(f"chain: {cert.label!r} {cert.subject} (until {cert.not_after:%Y-%m-%d})")
    return 0


def _as_json(found: KeyCertificates) -> dict[str, object]:
    def entry(cert: Any) -> dict[str, object]:
        return {**cert.as_dict(), "issuer": rfc4514(cert.parsed.issuer),
                "serial": f"{cert.parsed.serial_number:x}", "days_left": round(days_left(cert), 1)}

    return {"key": found.key_label, "certificates": [entry(c) for c in found.certificates],
            "chain": [entry(c) for c in found.chain]}
