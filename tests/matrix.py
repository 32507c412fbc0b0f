"""`make test`'s runs of the core (``-m core``, ``CORE`` in tests/conftest.py) on the other modules of the matrix.

    python -m tests.matrix [--jobs N]

One pytest process per run, N at a time (default 2, one per core of the 2-core machines the suite is sized
for): p11kit and nss one process each, tpm2 one per file (tpm2-abrmd holds at most 100 loaded keys per
connection). The runs share nothing but the CPUs: each provisions its module under its own pytest temporary
directory (p11-kit's server, NSS's key database, swtpm and tpm2-abrmd on loopback ports probed free), so they
may overlap. A run's output is printed whole when it ends, so that runs do not interleave; the status is 1 if
any run failed, and every run is made either way, so that one failure does not hide another.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import CORE, REPO


def runs() -> list[list[str]]:
    """The pytest argument lists: p11kit and nss, the longest, first, so that the short tpm2 files fill in after."""
    core = ["-q", "-m", "core"]
    return [[*core, "--module", "p11kit"], [*core, "--module", "nss"],
            *([*core, "--module", "tpm2", path] for path in CORE)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.matrix",
                                     description="the core (-m core) on the p11kit, nss and tpm2 modules")
    parser.add_argument("--jobs", "-j", type=int, default=2, help="runs at a time (default: 2)")
    args = parser.parse_args(argv)
    printing = threading.Lock()

    def run(pytest_args: list[str]) -> bool:
        command = [sys.executable, "-m", "pytest", *pytest_args]
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        with printing:
            print(f"python -m pytest {' '.join(pytest_args)}  ({time.monotonic() - started:.0f} s, "
                  f"status {done.returncode})", flush=True)
            print(done.stdout, end="", flush=True)
        return done.returncode == 0

    all_runs = runs()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        passed = list(pool.map(run, all_runs))
    failed = [" ".join(pytest_args) for pytest_args, ok in zip(all_runs, passed, strict=True) if not ok]
    for pytest_args in failed:
        print(f"FAILED: python -m pytest {pytest_args}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
