"""``tpp-agent rotate``: rotate a transport, signing or encryption key with an overlap, step by step
(docs/rotation.md).

Each step is an operation (agent/operations/rotation.py): through the running agent when there is one (it applies
the switch at once, and the other agents follow the shared state), else on the token in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from asn1crypto import pem

from agent.cli.cert import read_input
from agent.cli.context import CliContext
from agent.cli.csr import check_writable, write_new
from agent.errors import InputError
from agent.x509.certificates import read_certificates

ACTIONS = ("start", "import", "request", "switch-signing", "switch-transport", "retire", "remove-retired", "status")
_VALUED_OPTIONS = frozenset({"--config"})  # the global options that take a value (the next word)


def shorthand(argv: list[str]) -> list[str]:
    """``tpp-agent rotate KEY`` is ``tpp-agent rotate start KEY``: the one command that begins a rotation."""
    words = iter(enumerate(argv))
    for index, word in words:
        if word in _VALUED_OPTIONS:
            next(words, None)
        elif not word.startswith("-"):
            after = argv[index + 1] if index + 1 < len(argv) else None
            if word == "rotate" and after is not None and not after.startswith("-") and after not in ACTIONS:
                return [*argv[:index + 1], "start", *argv[index + 1:]]
            return argv
    return argv


def register(sub: Any) -> None:
    rotate = sub.add_parser("rotate", help="rotate a key: successor, overlap, switch, retire",
                            description="A rotation, step by step: start (successor key and CSR; "
                                        "`rotate KEY` for short), import (its "
                                        "certificate: the overlap starts, the JWKS carries both kids) or "
                                        "request (the same, the certificate issued by the directory's API; "
                                        "`start --directory` does both), "
                                        "switch-signing (jws keys, after [rotation] jwks_cache_window) or "
                                        "switch-transport (tls keys, bank by bank), retire (an encryption key's "
                                        "switch), remove-retired (an encryption key's after [rotation] "
                                        "encryption_drain_window). "
                                        "`status` shows where each key stands.")
    actions = rotate.add_subparsers(dest="action", metavar="ACTION", required=True)

    def action(name: str, summary: str, handler: Any, *, key: bool = True) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=summary, description=summary)
        if key:
            parser.add_argument("key", metavar="KEY", help="configured alias of the key")
        parser.add_argument("--json", action="store_true")
        parser.set_defaults(handler=handler)
        return parser

    def csr_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--subject", help="RFC 4514 subject of the CSR (jws keys only; default: the current "
                                              "certificate's)")
        parser.add_argument("--alg", help="CSR signature algorithm (rsa-pkcs1, rsa-pss, ecdsa)")
        return parser

    start = csr_options(action("start", "generate the successor key next to KEY's current one, and its CSR",
                               start_rotation))
    start.add_argument("--out", type=Path, help="write the CSR here instead of stdout")
    start.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    start.add_argument("--directory", action="store_true",
                       help="then `request`: the CSR to the directory ([directory]), its certificate imported")

    csr_options(action("request", "send the successor's CSR to the directory and import the certificate it "
                                  "issues: the overlap starts", request_certificate))

    imp = action("import", "import the successor's certificate: the overlap starts", import_successor)
    imp.add_argument("file", metavar="CERT", nargs="?", help="PEM (leaf first, then its chain) or DER; '-' for "
                                                             "stdin; an encryption key's successor may go without")

    action("switch-signing", "sign with the successor (a jws key), once the JWKS cache window has passed",
           switch_signing)
    transport = action("switch-transport", "register the successor's certificate at a bank, then present it there",
                       switch_transport)
    transport.add_argument("--bank", action="append", help="this bank (repeatable; default: every bank not "
                                                           "switched yet)")
    action("retire", "retire the old key (kept on the token, out of the JWKS)", retire)
    remove = action("remove-retired", "remove KEY's retired keys from this host's token", remove_retired)
    remove.add_argument("--label", help="only this retired key")
    status = action("status", "where the rotation of each key stands", show_status, key=False)
    status.add_argument("key", metavar="KEY", nargs="?", help="only this key")
    assert set(actions.choices) == set(ACTIONS), "shorthand() must know every action"


def _print(args: argparse.Namespace, result: Any, *lines: str) -> int:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in lines:
            print(line)
    return 0


def _csr_body(args: argparse.Namespace) -> dict[str, str]:
    return {name: value for name, value in (("subject", args.subject), ("alg", args.alg)) if value is not None}


def start_rotation(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.out is not None:
        check_writable(args.out, args.force)
    body = _csr_body(args)
    made = ctx.backend.run("rotate_start", body, key=args.key)
    if made["csr"] is None:  # an encryption key: its decrypt-only successor cannot sign a CSR
        unwritten = f" (nothing written to {args.out})" if args.out is not None else ""
        print(f"successor {made['successor']!r} ({made['type']}) of encryption key {args.key!r} made next to "
              f"{made['current']!r}: decrypt-only, so no CSR{unwritten}", file=sys.stderr)
        print(f"next: `tpp-agent rotate import {args.key}` publishes it (or `tpp-agent rotate import {args.key} "
              "CERT` with a certificate issued for its public key)", file=sys.stderr)
        return _print(args, made) if args.json else 0
    if args.out is not None:
        write_new(args.out, made["csr"], args.force)
    elif not args.json and not args.directory:
        sys.stdout.write(made["csr"])
    print(f"successor {made['successor']!r} ({made['type']}) of key {args.key!r} made next to {made['current']!r}; "
          f"CSR for {made['subject']} signed with {made['alg']}{' to ' + str(args.out) if args.out else ''}",
          file=sys.stderr)
    if not args.directory:
        print(f"next: `tpp-agent rotate request {args.key}` (the directory's API), or `tpp-agent rotate import "
              f"{args.key} CERT` with the certificate the directory issued", file=sys.stderr)
        return _print(args, made) if args.json else 0
    # The request's own refusal says that the successor is kept and that `rotate request KEY` takes it on.
    done = ctx.backend.run("rotate_request", body, key=args.key)
    if args.json:
        return _print(args, {"started": made, "imported": done})
    _print_imported(args.key, done)
    return 0


def request_certificate(args: argparse.Namespace, ctx: CliContext) -> int:
    done = ctx.backend.run("rotate_request", _csr_body(args), key=args.key)
    if args.json:
        return _print(args, done)
    _print_imported(args.key, done)
    return 0


def import_successor(args: argparse.Namespace, ctx: CliContext, data: bytes | None = None) -> int:
    """``data``: the file read already (``cert import`` hands over a successor's certificate)."""
    body: dict[str, Any] = {}
    if data is not None or args.file is not None:
        data = read_input(args.file) if data is None else data
        source = "stdin" if args.file == "-" else args.file
        # The agent takes PEM text: a DER file is armored here (the same certificate).
        certs = read_certificates(data, source)
        body["pem"] = "".join(pem.armor("CERTIFICATE", cert.dump()).decode("ascii") for cert in certs)
    done = ctx.backend.run("rotate_import", body, key=args.key)
    if args.json:
        return _print(args, done)
    _print_imported(args.key, done)
    return 0


def _print_imported(key: str, done: dict[str, Any]) -> None:
    cert = done["certificate"]
    issued = done.get("directory_certificate")
    if issued is not None:
        how = "taken" if done["reused"] else "issued"
        print(f"the directory {how} {issued['type']} certificate {issued['id']}")
    if cert is None:
        verb = "published already" if done["already_present"] else "published"
        print(f"{verb}: {done['successor']!r} without a certificate (its kid: its JWK thumbprint)")
    else:
        verb = "already on the token" if done["already_present"] else "imported"
        print(f"{verb}: {cert['subject']} for {done['successor']!r}, valid until {cert['not_after'][:16]} UTC")
    print(f"overlap since {done['overlap_started_at']}")
    if done["signing_switch_after"]:
        print(f"the JWKS carries both kids; `tpp-agent rotate switch-signing {key}` after "
              f"{done['signing_switch_after']}")
    elif done.get("retire_after"):
        print(f"the JWKS carries both encryption keys, both decrypt; `tpp-agent rotate retire {key}` "
              f"(the switch) after {done['retire_after']}")
    else:
        print(f"next: `tpp-agent rotate switch-transport {key}` (bank by bank)")


def switch_signing(args: argparse.Namespace, ctx: CliContext) -> int:
    done = ctx.backend.run("rotate_switch_signing", key=args.key)
    return _print(args, done, f"{args.key!r} signs with {done['signing']!r} (kid {done['kid']}) since "
                              f"{done['signing_switched_at']}",
                  f"next: `tpp-agent rotate retire {args.key}` after {done['retire_after']}")


def switch_transport(args: argparse.Namespace, ctx: CliContext) -> int:
    banks = args.bank
    if not banks:
        view = _status(ctx, args.key)
        successor = next((k["label"] for k in view["keys"] if k["role"] == "successor"), None)
        banks = [b["bank"] for b in view.get("banks", []) if b["key"] != successor]
        if not banks:
            return _print(args, [], f"no bank of {args.key!r} is left to switch")
    results = []
    for bank in banks:  # one at a time: a bank that refuses stops here, the ones before stay switched
        done = ctx.backend.run("rotate_switch_transport", {"bank": bank}, key=args.key)
        results.append(done)
        if not args.json:
            print(f"bank {bank!r}: registered ({done['registration'].get('status') or 'already'}), gets the "
                  f"certificate of {done['successor']!r} since {done['switched_at']}")
    left = results[-1]["banks_left"]
    return _print(args, results, f"left to switch: {', '.join(left)}" if left
                  else f"every bank switched; next: `tpp-agent rotate retire {args.key}`")


def retire(args: argparse.Namespace, ctx: CliContext) -> int:
    done = ctx.backend.run("rotate_retire", key=args.key)
    drain = ([f"{done['retired']!r} still decrypts (events encrypted to it before); `tpp-agent rotate remove-retired "
              f"{args.key}` after {done['remove_after']}"] if done.get("remove_after") else [])
    return _print(args, done, f"{args.key!r} is {done['current']!r} now; {done['retired']!r} retired (kept on the "
                              "token)", *drain, done["config_hint"])


def remove_retired(args: argparse.Namespace, ctx: CliContext) -> int:
    done = ctx.backend.run("rotate_remove_retired", {"label": args.label} if args.label else {}, key=args.key)
    return _print(args, done, *(f"{r['label']!r}: {r['objects']} object(s) removed from this host's token"
                                if r["objects"] else f"{r['label']!r}: not on this host's token (removed before)"
                                for r in done["removed"]))


def _status(ctx: CliContext, key: str | None) -> dict[str, Any]:
    view: dict[str, Any] = ctx.backend.run("rotate_status")
    if key is None:
        return view
    found: dict[str, Any] | None = next((k for k in view["keys"] if k["key"] == key), None)
    if found is None:
        known = ", ".join(k["key"] for k in view["keys"]) or "none"
        raise InputError(f"no rotatable key {key!r} (tls and jws keys: {known})")
    return found


def show_status(args: argparse.Namespace, ctx: CliContext) -> int:
    view = _status(ctx, args.key)
    entries = [view] if args.key else view["keys"]
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    if not entries:
        print("no tls or jws keys configured")
    for entry in entries:
        print(f"{entry['key']} ({entry['purpose']}): {entry['phase']}")
        for key in entry["keys"]:
            cert = key["certificate"]
            where = "" if key["on_token"] else " (not on this token)"
            what = f"{cert['subject']} until {cert['not_after'][:10]}" if cert else "no certificate"
            kid = f" kid {key['kid']}" if key.get("kid") else ""
            drain = f" (decrypts until removed; remove after {key['remove_after']})" if key.get("remove_after") else ""
            print(f"  {key['role']:<9} {key['label']:<24} {what}{kid}{where}{drain}")
        if entry.get("signing"):
            print(f"  signing   {entry['signing']}")
        for bank in entry.get("banks", []):
            since = f" since {bank['switched_at']}" if bank["switched_at"] else ""
            print(f"  bank      {bank['bank']:<24} gets {bank['key']}{since}")
        print(f"  next      {entry['next']}")
    return 0
