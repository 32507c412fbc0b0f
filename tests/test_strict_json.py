"""agent.strict_json decodes as json.loads does (bytes in UTF-8, -16 or -32; no byte order mark in a str), with
its own refusals on top."""

from __future__ import annotations

import json

import pytest

from agent import strict_json


@pytest.mark.parametrize("data", [b'{"a": [1, {"b": null}]}', '{"a": 1}', '{"a": 1}'.encode("utf-16"),
                                  '{"a": 1}'.encode("utf-32"), b'\xef\xbb\xbf{"a": 1}', '"\\ud800"'])
def test_what_json_reads_is_read_the_same(data: bytes | str) -> None:
    assert strict_json.loads(data) == json.loads(data)


@pytest.mark.parametrize("data", ['\ufeff{"a": 1}', b"[1", b"\x80", b""])
def test_what_json_refuses_is_refused(data: bytes | str) -> None:
    with pytest.raises(ValueError):
        json.loads(data)
    with pytest.raises(ValueError):
        strict_json.loads(data)


@pytest.mark.parametrize(("data", "why"), [(b'{"a": 1, "a": 2}', "the member 'a' appears twice"),
                                           (b'{"a": NaN}', "NaN is not JSON"), ('[Infinity]', "Infinity")])
def test_what_json_would_read_but_peers_may_not_is_refused(data: bytes | str, why: str) -> None:
    with pytest.raises(strict_json.StrictJsonError, match=why):
        strict_json.loads(data)
