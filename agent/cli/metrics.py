"""``tpp-agent metrics``: the running agent's metrics, as Prometheus scrapes them (text format 0.0.4)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.context import CliContext


def register(sub: Any) -> None:
    metrics = sub.add_parser(
        "metrics", help="print the agent's metrics (Prometheus text format)",
        description="Prints what GET /v1/metrics answers: every serving process's requests, latencies, token "
                    "pool, audit trail, bank calls and certificates (docs/metrics.md). Needs the 'metrics' "
                    "operation in a [policy.rules.*] entry, or an admin. With --direct: this process's own view "
                    "(the token's certificates and sessions; no requests). --json: the same, parsed, as one JSON "
                    "document.")
    metrics.set_defaults(handler=metrics_command)


def metrics_command(args: argparse.Namespace, ctx: CliContext) -> int:
    text = str(ctx.backend.run("metrics"))
    if not args.json:
        sys.stdout.write(text)
        return 0
    # The same, read back by prometheus_client's own parser: a family per metric, each sample with its labels.
    from agent.metrics.text import families as read

    families = [{"name": family.name, "type": family.type, "help": family.documentation,
                 "samples": [{"name": sample.name, "labels": sample.labels, "value": sample.value}
                             for sample in family.samples]}
                for family in read(text)]
    print(json.dumps({"metrics": families}, indent=2))
    return 0
