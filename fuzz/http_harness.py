"""Fuzz harness: bytes a caller sends the socket, through request framing, routing and JSON decoding.

``one_input`` is what the daemon's I/O thread and a worker do with a connection's bytes, without the
socket: split the stream where the fuzzer says, feed the reader, route each whole request, decode its
body and parse it as its operation's typed input. :class:`HttpError` and the input's ``InvalidInput``
are the only ways any of it may refuse; anything else raised is a finding.

``fuzz.http_target`` runs it under atheris (``make fuzz``); ``tests/test_fuzz_corpus.py`` replays the corpus.
"""

from __future__ import annotations

import contextlib

from agent.daemon.errors import HttpError
from agent.daemon.framing import CLOSED, NEED_DATA, Message, RequestReader
from agent.daemon.http import Request, interaction_id
from agent.daemon.policy import Peer
from agent.daemon.routes import ROUTES, RouteTable
from agent.operations import inputs

_PEER = Peer(uid=4242, gid=4242, pid=1, groups=frozenset({4242}))
_MAX_HEAD, _MAX_BODY = 1024, 4096  # small limits: the fuzzer reaches them instead of spending its time below
_TABLE = RouteTable(ROUTES)


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
    found = _TABLE.match(request.method, request.path)
    assert found.route is not None or found.params == {}
    body = None
    with contextlib.suppress(HttpError):
        body = request.json()
    query = dict(request.query)
    if found.route is not None:  # the operation's typed input, as the router parses it
        given = query if found.route.from_query else body
        if given is not None:
            with contextlib.suppress(inputs.InvalidInput):
                inputs.parse(found.route.spec.input, given, from_query=found.route.from_query)
