"""Fuzz harness: bytes a caller sends the socket, through request framing, routing and JSON decoding.

``one_input`` is what the daemon's I/O thread and a worker do with a connection's bytes, without the
socket: split the stream where the fuzzer says, feed the reader, route each whole request, decode its
body as the endpoints do. :class:`HttpError` is the only way any of it may refuse; anything else
raised is a finding.

``fuzz.http_target`` runs it under atheris (``make fuzz``); ``tests/test_fuzz_corpus.py`` replays the corpus.
"""

from __future__ import annotations

import contextlib

from agent.daemon import api, banks, routing  # noqa: F401 (api and banks register the routes)
from agent.daemon.errors import HttpError
from agent.daemon.framing import CLOSED, NEED_DATA, Message, RequestReader
from agent.daemon.http import Request, interaction_id
from agent.daemon.policy import Peer

_PEER = Peer(uid=4242, gid=4242, pid=1, groups=frozenset({4242}))
_MAX_HEAD, _MAX_BODY = 1024, 4096  # small limits: the fuzzer reaches them instead of spending its time below


def one_input(data: bytes) -> None:
    """Feed ``data`` as a connection would deliver it; the first byte says where the reads split it."""
    if not data:
        return
    step, stream = data[0] % 17 or len(data), data[1:]
    reader = RequestReader(_MAX_HEAD, _MAX_BODY)
    try:
        for start in range(0, len(stream), step):
            reader.receive(stream[start:start + step])
            _drain(reader)
        reader.receive(b"")
        _drain(reader)
    except HttpError as error:
        assert 400 <= error.status < 600 and error.code and error.message, error


def _drain(reader: RequestReader) -> None:
    while (event := reader.next_event()) not in (NEED_DATA, CLOSED):
        if isinstance(event, Message):
            _serve(event)


def _serve(message: Message) -> None:
    head = message.head
    assert (head.path.startswith("/") and not head.path.startswith("//")) or "%2f" in head.target.lower(), head
    assert all(ord(c) >= 0x20 and c != "\x7f" for c in head.path), head.path
    try:
        request = Request(head, message.body, _PEER, interaction_id(head.headers))
    except HttpError:
        return
    found = routing.match(request.method, request.path)
    assert found.endpoint is not None or found.params == {}
    with contextlib.suppress(HttpError):
        request.json()
    dict(request.query)
