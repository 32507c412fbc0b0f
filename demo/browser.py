"""``python -m demo.browser URL CA_BUNDLE``: the customer's browser at the bank's authorization endpoint.

Prints the redirect the bank sends the browser back with. The model bank asks every client for a TLS certificate,
a browser too, so the demo's browser borrows the transport key on the token (a real customer's browser needs
none). Runs in its own process with the demo's configuration ($TPP_AGENT_CONFIG), as demo.attributes does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agent import config
from agent.runtime import Runtime
from agent.transport.client import open_transport
from agent.transport.tls import TlsSettings


def main(argv: list[str]) -> int:
    url, ca_bundle = argv
    runtime = Runtime(config.load(None))
    try:
        key = str(runtime.keys.resolve("transport"))
        settings = TlsSettings(bank="modelbank", ca_bundle=Path(ca_bundle), client_key=key)
        with open_transport(runtime, settings) as browser:
            answer = browser.request("GET", url)
    finally:
        runtime.close()
    location = answer.headers.get("location")
    if answer.status != 302 or not location:
        print(f"the bank did not redirect the customer back: HTTP {answer.status} {answer.body[:200]!r}",
              file=sys.stderr)
        return 1
    print(location)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
