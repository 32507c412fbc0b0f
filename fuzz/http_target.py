"""atheris over :mod:`fuzz.http_harness`, with the agent's own modules instrumented for coverage.

    make fuzz                     # FUZZ_SECONDS (default 600) of fuzzing; new inputs join fuzz/corpus/http
    python -m fuzz.http_target fuzz/corpus/http -runs=0    # replay the corpus under atheris
"""

from __future__ import annotations

import sys


def main() -> None:
    import atheris  # only `make fuzz` installs it

    with atheris.instrument_imports(include=["agent"]):
        from fuzz.http_harness import one_input
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
