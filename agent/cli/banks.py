"""``tpp-agent discover|register``: a bank's discovery document, and registering the application with it
over mTLS. Both go through a running agent (see agent/cli/context.py); ``registrations`` is in
agent/cli/lifecycle.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from agent.cli.context import CliContext
from agent.openfinance.discovery import ENDPOINTS, DiscoveryDocument


def register(sub: Any) -> None:
    disc = sub.add_parser("discover", help="fetch (or show the cached) discovery document of a bank")
    disc.add_argument("bank", metavar="BANK", help="a [banks.NAME] of the configuration")
    disc.add_argument("--refresh", action="store_true", help="fetch even if the cached document is fresh")
    disc.add_argument("--json", action="store_true", help="print the document and its fetch time as JSON")
    disc.set_defaults(handler=discover)

    reg = sub.add_parser("register", help="register the application with a bank (POST registration_endpoint)",
                         description="BANK, or --all: every configured bank whose transport certificate is not "
                                     "registered at its registration endpoint yet (one line per bank; the exit "
                                     "status is the first failure's, 0 when none failed).")
    which = reg.add_mutually_exclusive_group(required=True)
    which.add_argument("bank", metavar="BANK", nargs="?", help="a [banks.NAME] of the configuration")
    which.add_argument("--all", action="store_true", help="every configured bank (admins, through an agent)")
    reg.add_argument("--force", action="store_true",
                     help="register again even if this certificate is already registered with the bank")
    reg.add_argument("--json", action="store_true")
    reg.set_defaults(handler=register_bank)


def discover(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("discovery", {"refresh": True} if args.refresh else {}, bank=args.bank)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    doc = DiscoveryDocument(answer["bank"], answer["url"], datetime.datetime.fromisoformat(answer["fetched_at"]),
                            answer["document"])
    use_aliases = answer["use_mtls_aliases"]
    age = int(doc.age().total_seconds())
    print(f"bank {args.bank}: issuer {doc.issuer} (matches the configuration)")
    print(f"  {'fetched now' if answer['fetched_now'] else f'cached, fetched {age} s ago'} from {doc.url}")
    print(f"  cache: {answer['cache_file']}")
    for name in ENDPOINTS:
        if name in doc.document:
            alias = use_aliases and name in (doc.document.get("mtls_endpoint_aliases") or {})
            print(f"  {name:<38} {doc.endpoint(name, use_aliases)}{'  (mTLS alias)' if alias else ''}")
    return 0


def register_bank(args: argparse.Namespace, ctx: CliContext) -> int:
    if args.all:
        return _register_all(args, ctx)
    result = ctx.backend.run("register", {"force": args.force}, bank=args.bank)
    if args.json:
        print(json.dumps(result, indent=2))
    elif result["already_registered"] is not None:
        earlier = result["already_registered"]  # this request's interaction_id is not the registration's
        print(f"already registered with {args.bank} at {earlier['attempted_at']} "
              f"(HTTP {result['status']}, x-fapi-interaction-id {earlier['interaction_id']}); nothing sent")
        print("use --force to register again")
    else:
        print(f"registered with {args.bank}: HTTP {result['status']} in {result['duration_ms']:.0f} ms")
        print(f"  endpoint: {result['endpoint']}")
        print(f"  x-fapi-interaction-id: {result['interaction_id']}")
    return 0



def _register_all(args: argparse.Namespace, ctx: CliContext) -> int:
    answer = ctx.backend.run("register_all", {"force": args.force})
    results = answer["banks"]
    if args.json:
        print(json.dumps(answer, indent=2))
    elif not results:
        print("no banks configured")
    for row in results if not args.json else ():
        if row["outcome"] == "failed":
            print(f"{row['bank']}: failed: {row['error']}")
            if row["hint"]:
                print(f"{'':<{len(row['bank'])}}  hint: {row['hint']}")
        elif row["already_registered"] is not None:
            print(f"{row['bank']}: already registered at {row['endpoint']} "
                  f"(x-fapi-interaction-id {row['already_registered']['interaction_id']}); nothing sent")
        else:
            print(f"{row['bank']}: registered at {row['endpoint']}: HTTP {row['status']} "
                  f"(x-fapi-interaction-id {row['interaction_id']})")
    failures = [row["exit_status"] for row in results if row["outcome"] == "failed"]
    return int(failures[0]) if failures else 0
