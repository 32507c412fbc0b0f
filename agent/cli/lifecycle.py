"""``tpp-agent registrations | certs needs-renewal | banks sync``: the certificate lifecycle, as the operator
runs it on this host.

All three read local state and the token in this process (no daemon operation: they change nothing the agent
serves; ``banks sync --write`` writes a banks file, which a running agent reads at its next reload).

``certs needs-renewal`` exits like ``step certificate needs-renewal``: **0 when a renewal is due**, 1 when
none is, and 2 when it could not tell (an error), so ``tpp-agent certs needs-renewal && renew`` in a timer
renews only when due and never on an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent.cli.context import CliContext
from agent.errors import AgentError, InputError
from agent.lifecycle import participants
from agent.lifecycle.download import fetch
from agent.lifecycle.registrations import UNKNOWN, bank_registration
from agent.lifecycle.validity import renewal_due
from agent.openfinance.records import RegistrationLog
from agent.state import open_state
from agent.x509.certificates import days_left, key_certificates
from pkcs11_backends.errors import Pkcs11Error

RENEW, NO_RENEWAL, UNDECIDED = 0, 1, 2


def register(sub: Any) -> None:
    lst = sub.add_parser("registrations", help="per bank: is the transport certificate registered at its endpoint?",
                         description="For each configured bank: the transport certificate it would be sent, the "
                                     "registration endpoint of its cached discovery document, and whether that "
                                     "certificate is registered there. --attempts lists every attempt instead.")
    lst.add_argument("--bank", help="only this bank")
    lst.add_argument("--attempts", action="store_true", help="every registration attempt, oldest first")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=list_registrations)

    certs = sub.add_parser("certs", help="certificate lifecycle: renewal checks")
    actions = certs.add_subparsers(dest="action", metavar="ACTION", required=True)
    renewal = actions.add_parser(
        "needs-renewal", help="exit 0 if a certificate is due for renewal, 1 if not, 2 on error",
        description="Checks the certificate in use of --key (default: every key on the token that has one). Due: "
                    "within --days of its end (default [certificates] expiry_warning_days), or already expired. "
                    "Exit status as `step certificate needs-renewal`: 0 due, 1 not due, 2 could not tell.")
    renewal.add_argument("--key", help="pkcs11: URI or configured alias of the key (default: every key)")
    renewal.add_argument("--days", type=float, help="threshold in days (default: [certificates] expiry_warning_days)")
    renewal.add_argument("--json", action="store_true")
    renewal.set_defaults(handler=needs_renewal)

    banks = sub.add_parser("banks", help="the banks the configuration names, and the directory's")
    bank_actions = banks.add_subparsers(dest="action", metavar="ACTION", required=True)
    sync = bank_actions.add_parser(
        "sync", help="compare the configured banks with the directory's participants list",
        description="Reads the participants list (a URL or a file), shows what differs from the configured banks "
                    "(matched by issuer) and, with --write, writes every listed bank not configured elsewhere into "
                    "a banks file for the configuration's include = [...]. Exit 0 when in sync or written, 1 when "
                    "they differ and nothing was written.")
    sync.add_argument("--participants", metavar="URL|FILE",
                      help="https:// URL of the directory's participants endpoint, or a downloaded copy "
                           "(default: [directory] participants_url)")
    sync.add_argument("--cacert", help="CA file to verify the participants URL (default: the system store)")
    sync.add_argument("--write", metavar="FILE", help="write the banks file (replaced whole)")
    sync.add_argument("--ca-bundle", help="ca_bundle of the written banks (default: the one the configured "
                                          "banks share)")
    sync.add_argument("--json", action="store_true")
    sync.set_defaults(handler=sync_banks)


# -- registrations ---------------------------------------------------------------------------------

def list_registrations(args: argparse.Namespace, ctx: CliContext) -> int:
    records = RegistrationLog(open_state(ctx.config))
    if args.attempts:
        return _print_attempts(records, args)
    banks = dict(ctx.sections.banks)
    if args.bank is not None:
        banks = {args.bank: _bank(banks, args.bank)}
    views = [bank_registration(ctx.runtime, ctx.core.rotation.as_presented(bank), records) for bank in banks.values()]
    if args.json:
        print(json.dumps([v.as_dict() for v in views], indent=2))
        return 0
    if not views:
        print("no banks configured")
        return 0
    print(f"{'BANK':<16} {'STATE':<24} {'CERT SHA-256':<16} ENDPOINT / DETAIL")
    for view in views:
        cert = (view.certificate_sha256 or "-")[:16]
        print(f"{view.bank:<16} {view.state:<24} {cert:<16} {view.endpoint or '-'}")
        attempt = view.attempt
        if attempt is not None:
            print(f"{'':<16} {'':<24} {'':<16} {attempt.attempted_at} x-fapi-interaction-id {attempt.interaction_id}")
        if view.problem and (view.state == UNKNOWN or "never presented" in view.problem):
            print(f"{'':<16} → {view.problem}")
    return 0


def _bank(banks: dict[str, Any], name: str) -> Any:
    if name not in banks:
        raise InputError(f"no bank {name!r} in the configuration (configured: {', '.join(sorted(banks)) or 'none'})")
    return banks[name]


def _print_attempts(records: RegistrationLog, args: argparse.Namespace) -> int:
    attempts = records.attempts(args.bank)
    if args.json:
        print(json.dumps([a.as_dict() for a in attempts], indent=2))
        return 0
    if not attempts:
        print("no registration attempts yet (register with `tpp-agent register BANK`)")
        return 0
    print(f"{'TIME (UTC)':<20} {'BANK':<12} {'OUTCOME':<11} {'HTTP':<4} {'INTERACTION ID':<36} {'CERT SHA-256':<16} "
          "DETAIL")
    for a in attempts:
        when = datetime.datetime.fromisoformat(a.attempted_at).strftime("%Y-%m-%d %H:%M:%S")
        detail = (a.error or "").split(" (")[0] or a.endpoint
        print(f"{when:<20} {a.bank:<12} {a.outcome:<11} {a.status or '-'!s:<4} {a.interaction_id:<36} "
              f"{a.cert_sha256[:16]:<16} {detail}")
    return 0


# -- certs needs-renewal ---------------------------------------------------------------------------

def needs_renewal(args: argparse.Namespace, ctx: CliContext) -> int:
    try:
        return _needs_renewal(args, ctx)
    except (AgentError, Pkcs11Error) as exc:
        # Not the CLI's usual status 1: that means "not due" here, and an error must never read as that.
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return UNDECIDED


def _needs_renewal(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.days is not None and not 0 <= args.days <= 3650:
        raise InputError(f"--days must be from 0 to 3650, got {args.days:g}")
    days = args.days if args.days is not None else ctx.sections.certificates.expiry_warning_days
    store = ctx.runtime.keys
    keys = [args.key] if args.key else [str(k.uri) for k in store.list() if k.certificate is not None]
    if not keys:
        raise InputError("no key on the token has a certificate: nothing to renew",
                         hint="import one with `tpp-agent cert import --key KEY FILE`")
    results: list[dict[str, Any]] = []
    for key in keys:
        found = key_certificates(store, key)
        cert = found.current
        if cert is None:
            raise InputError(f"key {found.key_label!r} has no certificate: nothing to renew",
                             hint="import one with `tpp-agent cert import --key KEY FILE`")
        due = renewal_due(cert.not_after, days)
        results.append({"key": found.key_label, "subject": cert.subject, "not_after": cert.not_after.isoformat(),
                        "days_left": round(days_left(cert), 1), "threshold_days": days, "renew": due})
    if args.json:
        print(json.dumps({"renew": any(r["renew"] for r in results), "certificates": results}, indent=2))
    else:
        for r in results:
            verdict = "renew" if r["renew"] else "ok"
            print(f"{verdict:<6} key {r['key']!r}: {r['subject']} until {r['not_after'][:16]} UTC "
                  f"({r['days_left']:.0f} days left, threshold {days:g})")
    return RENEW if any(r["renew"] for r in results) else NO_RENEWAL


# -- banks sync ------------------------------------------------------------------------------------

def sync_banks(args: argparse.Namespace, ctx: CliContext) -> int:
    source = args.participants or ctx.config.section("directory").get("participants_url")
    if not isinstance(source, str) or not source:
        raise InputError("no participants list named: give --participants URL|FILE",
                         hint="or set participants_url in [directory] of the configuration")
    if source.startswith("https://"):
        data = fetch(source, participants.MAX_BYTES, args.cacert)
    elif "://" in source:
        raise InputError(f"--participants {source!r}: only https:// URLs or file paths")
    else:
        data = _read_file(Path(source))
    servers = participants.parse(data, source)
    configured = dict(ctx.sections.banks)
    written_here = _banks_in(Path(args.write)) if args.write else set()
    # Banks the file being written holds are the directory's, not configured by hand: they are rewritten.
    by_hand = {name: bank for name, bank in configured.items() if name not in written_here}
    diff = participants.difference(servers, configured)
    _show(diff, args.json, source)
    if not args.write:
        return 0 if diff.in_sync else 1
    hand_issuers = {bank.issuer for bank in by_hand.values()}
    listed = [s for s in servers if s.issuer not in hand_issuers]
    named = participants.bank_names(listed, taken=list(by_hand))
    ca_bundle = args.ca_bundle or _shared_ca_bundle(configured)
    _write(Path(args.write), participants.banks_file(named, str(Path(ca_bundle).resolve()), source))
    if not args.json:
        print(f"wrote {len(named)} bank(s) to {args.write}; the configuration reads it with include = "
              f"[{json.dumps(args.write)}]")
    return 0


def _show(diff: participants.Difference, as_json: bool, source: str) -> None:
    if as_json:
        print(json.dumps({
            "in_sync": diff.in_sync,
            "added": [{"name": s.name, "issuer": s.issuer, "discovery_url": s.discovery_url,
                       "organisation_id": s.organisation_id, "authorisation_server_id": s.server_id}
                      for s in diff.added],
            "changed": [{"bank": b.name, "issuer": b.issuer, "configured_discovery_url": b.discovery_url,
                         "directory_discovery_url": s.discovery_url} for b, s in diff.changed],
            "unlisted": [{"bank": b.name, "issuer": b.issuer} for b in diff.unlisted],
            "unchanged": [b.name for b, _ in diff.unchanged]}, indent=2))
        return
    if diff.in_sync:
        print(f"in sync with {source}: {len(diff.unchanged)} bank(s)")
    for server in diff.added:
        print(f"+ {server.name} ({server.organisation_name}): issuer {server.issuer}")
    for bank, server in diff.changed:
        print(f"~ {bank.name}: discovery_url {bank.discovery_url} -> {server.discovery_url}")
    for bank in diff.unlisted:
        print(f"- {bank.name}: issuer {bank.issuer} is not in the participants list")


def _read_file(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(participants.MAX_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"participants file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a participants file") from None
    except PermissionError:
        raise InputError(f"participants file not readable: {path}") from None
    return data


def _banks_in(path: Path) -> set[str]:
    import tomllib

    try:
        with path.open("rb") as handle:
            return set(tomllib.load(handle).get("banks", {}))
    except FileNotFoundError:
        return set()
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"--write {path}: an existing file that is not a banks file ({exc})",
                         hint="name a new file, or one an earlier sync wrote") from None


def _shared_ca_bundle(configured: dict[str, Any]) -> str:
    bundles = {str(bank.tls.ca_bundle) for bank in configured.values() if bank.tls.ca_bundle is not None}
    if len(bundles) != 1:
        raise InputError("--ca-bundle is needed: the configured banks do not share one ca_bundle "
                         f"({', '.join(sorted(bundles)) or 'none configured'})",
                         hint="give --ca-bundle FILE, the PEM file with the ecosystem's CAs")
    return bundles.pop()


def _write(path: Path, text: str) -> None:
    # Write-then-rename: an agent reloading meanwhile reads the old file or the new one, never half.
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # names and URLs from a public list: readable by the agent's user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
