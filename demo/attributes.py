"""``python -m demo.attributes KEY``: the PKCS#11 attributes that keep a key on the token.

Runs in its own process with the demo's configuration ($TPP_AGENT_CONFIG), as the
agent would, and prints one line per attribute.
"""

from __future__ import annotations

import sys

from pkcs11 import Attribute, ObjectClass

from agent import config
from agent.runtime import Runtime

SHOWN = (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE)


def main(argv: list[str]) -> int:
    runtime = Runtime(config.load(None))
    try:
        uri = runtime.keys.resolve(argv[0])
        with runtime.pool.session() as pooled:
            key = runtime.keys.private_key(pooled, uri)
            for attribute in SHOWN:
                print(f"CKA_{attribute.name} = {bool(key[attribute])}")
            print(f"object class = {ObjectClass.PRIVATE_KEY.name}, label = {key[Attribute.LABEL]}")
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
