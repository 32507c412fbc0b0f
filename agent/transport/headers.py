"""The header fields a request to a bank carries: the caller's, checked, and the agent's own.

    sent = outgoing({"Accept": "application/json"})   # -> {"accept": ..., "user-agent": "tpp-agent"}

Every bank connection is a keep-alive mTLS connection that all local callers share, so a
header that the bank's parser reads differently from ours (``"Transfer-Encoding "`` with a
trailing space, a value with a NUL or a bare LF) could smuggle a second request onto it in
someone else's name. Hence, for every request whatever operation sends it:

* a name must be an RFC 9110 token (§5.1, ``tchar``): no spaces, tabs, colons or controls;
* a value must be RFC 9110 field content (§5.5): visible characters, spaces and tabs inside,
  obs-text (0x80-0xFF); no NUL, CR, LF or other control character; white space around it is
  dropped (a recipient ignores it);
* names are compared lower-cased, so ``HOST`` and ``host`` are one field; the same field twice
  in different case is refused rather than one of them picked;
* fields the transport sets itself, or that mean nothing across the hop, are dropped
  (:data:`TRANSPORT_FIELDS`): the connection's framing is never the caller's to choose;
* ``User-Agent`` is the agent's, followed by the caller's product tokens if it gave any.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from agent.errors import InputError

USER_AGENT = "tpp-agent"
INTERACTION_HEADER = "x-fapi-interaction-id"
# Set by the transport, or hop-by-hop (RFC 9110 §7.6.1) and so meaningless on our own connection.
TRANSPORT_FIELDS = frozenset({"host", "connection", "keep-alive", "proxy-connection", "content-length",
                              "transfer-encoding", "upgrade", "proxy-authorization", "te", "trailer",
                              INTERACTION_HEADER})
MAX_FIELDS = 64
MAX_FIELD_BYTES = 8192  # name and value together; banks' front ends refuse far less than the daemon accepts

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Field content: VCHAR and obs-text, with SP/HTAB allowed between them (not at either end).
_VALUE = re.compile(r"(?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?")


class HeaderError(InputError):
    hint = ("send header names made of letters, digits and !#$%&'*+-.^_`|~ only, and values without control "
            "characters (RFC 9110 §5)")


def check_field(name: str, value: str) -> tuple[str, str]:
    """The field's lower-cased name and its value without surrounding white space (RFC 9110 §5.5), or
    :class:`HeaderError` saying what is wrong with it."""
    value = value.strip(" \t")
    if not _TOKEN.fullmatch(name):
        raise HeaderError(f"header name {name[:60]!r} is not an HTTP token (no spaces, tabs, colons or control "
                          "characters)")
    if not _VALUE.fullmatch(value):
        bad = next((c for c in value if not ("\x20" <= c <= "\x7e" or "\x80" <= c <= "\xff" or c == "\t")), None)
        raise HeaderError(f"header {name!r}: the value has the character {bad!r}; control characters (NUL, CR, "
                          "LF...) and characters beyond U+00FF cannot be sent")
    if len(name) + len(value) > MAX_FIELD_BYTES:
        raise HeaderError(f"header {name!r} is longer than {MAX_FIELD_BYTES} bytes")
    return name.lower(), value


def outgoing(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's fields checked and normalised, without :data:`TRANSPORT_FIELDS`, with our User-Agent."""
    given = headers or {}
    if len(given) > MAX_FIELDS:
        raise HeaderError(f"{len(given)} header fields: at most {MAX_FIELDS} are sent to a bank")
    sent: dict[str, str] = {}
    for name, raw in given.items():
        key, value = check_field(name, raw)
        if key in sent:
            raise HeaderError(f"header {name!r} is given twice (names are case-insensitive)")
        sent[key] = value
    for key in TRANSPORT_FIELDS:
        sent.pop(key, None)
    theirs = sent.pop("user-agent", None)
    sent["user-agent"] = f"{USER_AGENT} {theirs}" if theirs else USER_AGENT
    return sent
