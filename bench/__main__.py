"""The benchmark suite (issue 7): every figure next to a baseline measured in the same run.

    make bench                                  # = python -m bench
    python -m bench --seconds 2 --only signing  # one benchmark, shorter windows
    python -m bench --repeat 1                  # one run per cell instead of 3
    python -m bench --docs                      # also put the tables and figures into docs/performance.md
    python -m bench --figures-only              # redraw the figures from docs/performance.json, run nothing

Benchmarks: ``signing`` (targets 1 and 4 of issue 7, p11-kit remoting next to it), ``network-hsm`` (issue 22:
a module whose signatures take milliseconds), ``forward`` (target 2), ``handshakes`` (target 3). Each creates its
own SoftHSM2 token in a temporary directory. Results go to ``.bench/results.md`` and ``.bench/results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench import forward, handshakes, network_hsm, signing
from bench.common import REPO, Check, Outcome, Table, machine
from bench.report import render, update_docs, update_figures

BENCHMARKS = ("signing", "network-hsm", "forward", "handshakes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window of each load (default 3)")
    parser.add_argument("--clients", default="1,2,8,32", help="concurrent clients for signing (default 1,2,8,32)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per cell, baseline and agent taking turns in short windows; all runs are "
                             "added up (default 3)")
    parser.add_argument("--hsm-delay-us", type=int, default=2000,
                        help="network-hsm: µs added to each signature (default 2000)")
    parser.add_argument("--hsm-clients", default="8,32", help="network-hsm: concurrent clients (default 8,32)")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, help="run only this benchmark (repeatable)")
    parser.add_argument("--profile", action="store_true", help="profile fresh handshakes with py-spy (on PATH)")
    parser.add_argument("--out", type=Path, default=REPO / ".bench", help="where results.md/json go")
    parser.add_argument("--docs", action="store_true",
                        help="also write the tables and the figures (docs/figures/*.png) into docs/performance.md")
    parser.add_argument("--figures-only", action="store_true",
                        help="only redraw the figures of docs/performance.md from docs/performance.json")
    parser.add_argument("--child", choices=BENCHMARKS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # Stopped (`timeout`, Ctrl-C's SIGTERM cousin): unwind, so that every daemon, load generator and p11-kit
    # server this run started is stopped by the code that started it.
    signal.signal(signal.SIGTERM, _stopped)
    if args.figures_only:
        for drawn in update_figures():
            print(f"drew docs/figures/{drawn.file}: {drawn.caption}")
        return 0
    _check(parser, args)
    if args.child:
        outcome = _run(args.child, args, args.out)
        args.result.write_text(json.dumps(dataclasses.asdict(outcome)))
        return 0
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    info = machine()
    outcomes: dict[str, Outcome] = {}
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="tpp-bench-"))
    for name in args.only or BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        outcomes[name] = _in_child(name, args, tmp)
    shutil.rmtree(tmp)  # kept when a benchmark failed: its daemons' logs are there
    info["load_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info["duration"] = f"{time.monotonic() - started:.0f} s"
    markdown = render(info, command, outcomes)
    args.out.mkdir(exist_ok=True)
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": info, "command": command,
         "results": {name: {"checks": [vars(c) for c in o.checks], "data": o.data} for name, o in outcomes.items()}},
        indent=2) + "\n")
    if args.docs:
        update_docs(markdown, args.out / "results.json")
    print(markdown)
    return 0 if all(c.ok for o in outcomes.values() for c in o.checks) else 1


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse settings that would fail minutes into a run."""
    if not args.seconds > 0:
        parser.error(f"--seconds must be a positive number of seconds, not {args.seconds:g}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1 (runs per cell), not {args.repeat}")
    for option, value in (("--clients", args.clients), ("--hsm-clients", args.hsm_clients)):
        if not all(c.strip().isdigit() and int(c) > 0 for c in value.split(",")):
            parser.error(f"{option} must be positive numbers separated by commas (e.g. 1,2,8,32), not {value!r}")
    if not 0 <= args.hsm_delay_us <= 1_000_000:
        parser.error(f"--hsm-delay-us must be from 0 to 1000000 µs, not {args.hsm_delay_us}")


def _in_child(name: str, args: argparse.Namespace, tmp: Path) -> Outcome:
    """Each benchmark in its own process: a process's PKCS#11 module (and libp11) only sees the tokens that
    existed when it was loaded, and each benchmark makes its own token."""
    work, result = tmp / name, tmp / f"{name}.json"
    work.mkdir()
    command = [sys.executable, "-m", "bench", "--child", name, "--result", str(result), "--out", str(work),
               "--seconds", str(args.seconds), "--clients", args.clients, "--repeat", str(args.repeat),
               "--hsm-delay-us", str(args.hsm_delay_us), "--hsm-clients", args.hsm_clients]
    command += ["--profile"] if args.profile else []
    child = subprocess.Popen(command, cwd=REPO)
    try:
        code = child.wait()
    finally:
        if child.poll() is None:  # this run was stopped: the child stops what it started, then ends
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
    if code:
        raise SystemExit(f"benchmark {name} failed (exit {code}): its error is above, its daemons' logs in {work}")
    raw = json.loads(result.read_text())
    return Outcome([Table(**t) for t in raw["tables"]], [Check(**c) for c in raw["checks"]], raw["data"])


def _stopped(signum: int, _: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _run(name: str, args: argparse.Namespace, work: Path) -> Outcome:
    clients = tuple(int(n) for n in args.clients.split(","))
    if name == "signing":
        return signing.run(work, args.seconds, clients, args.repeat)
    if name == "network-hsm":
        return network_hsm.run(work, args.seconds, args.repeat, args.hsm_delay_us,
                               tuple(int(n) for n in args.hsm_clients.split(",")))
    if name == "forward":
        return forward.run(work, args.seconds, args.repeat)
    return handshakes.run(work, args.seconds, args.profile)


if __name__ == "__main__":
    sys.exit(main())
