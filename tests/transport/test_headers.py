"""Header fields on a request to a bank: RFC 9110 names and values only, the framing is the transport's, and the
agent's User-Agent is always there. Checked at the transport, so every operation that calls a bank is covered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.runtime import Runtime
from agent.transport.client import BankTransport, open_transport
from agent.transport.headers import HeaderError, outgoing
from tests.transport.conftest import TestCa, client_identity, settings_for
from tests.transport.hostile import HostileBank

SMUGGLING_NAMES = ["Host ", "Transfer-Encoding ", "Content-Length\t", "x-fapi-interaction-id ", " Host", "X:Y",
                   "X Y", "", "X\x00", "Ä", "X\r\nTransfer-Encoding", "(x)"]
BAD_VALUES = ["a\x00b", "a\rb", "a\nb", "a\r\nTransfer-Encoding: chunked", "\x1b[31m", "a\x7fb", "\u0100", "\x0b"]


@pytest.fixture
def transport(shared_runtime: Runtime, bank_ca: TestCa) -> Iterator[BankTransport]:
    with open_transport(shared_runtime, settings_for("bank1", bank_ca, client_identity(shared_runtime, bank_ca))) as t:
        yield t


@pytest.mark.parametrize("name", SMUGGLING_NAMES)
def test_a_name_that_is_not_a_token_is_refused(name: str) -> None:
    with pytest.raises(HeaderError, match="not an HTTP token"):
        outgoing({name: "x"})


@pytest.mark.parametrize("value", BAD_VALUES)
def test_a_value_with_a_control_character_is_refused(value: str) -> None:
    with pytest.raises(HeaderError, match="cannot be sent"):
        outgoing({"X-Test": value})


def test_what_passes_and_what_the_transport_sets() -> None:
    sent = outgoing({"Accept": "application/json", "X-Tab": "a\tb", "X-Latin": "caf\xe9", "X-Space": "  padded  ",
                     "HOST": "evil", "Content-Length": "5", "Connection": "close", "TE": "trailers",
                     "X-FAPI-Interaction-ID": "forged", "X-Empty": ""})
    assert sent == {"accept": "application/json", "x-tab": "a\tb", "x-latin": "caf\xe9", "x-space": "padded",
                    "x-empty": "", "user-agent": "tpp-agent"}
    assert outgoing(None) == {"user-agent": "tpp-agent"}
    assert outgoing({"User-Agent": "payments-service/2.1"})["user-agent"] == "tpp-agent payments-service/2.1"


def test_the_same_field_twice_in_different_case_is_refused() -> None:
    with pytest.raises(HeaderError, match="given twice"):
        outgoing({"Authorization": "Bearer a", "authorization": "Bearer b"})


def test_too_many_or_too_long_fields_are_refused() -> None:
    with pytest.raises(HeaderError, match="at most 64"):
        outgoing({f"X-{i}": "v" for i in range(65)})
    with pytest.raises(HeaderError, match="longer than"):
        outgoing({"X-Big": "v" * 9000})


def test_the_bank_sees_our_user_agent_and_no_smuggled_field(transport: BankTransport, hostile: HostileBank) -> None:
    answer = transport.get(hostile.url("/echo"), headers={"Accept": "application/json", "Host": "other.example"})
    assert answer.status == 200
    seen = hostile.requests[-1]
    assert seen.header("user-agent") == "tpp-agent"  # lost whenever a caller passed headers, before
    assert seen.header("accept") == "application/json"
    assert seen.header("host") == f"localhost:{hostile.port}"
    assert seen.header("x-fapi-interaction-id") == answer.interaction_id
    for name in ("Transfer-Encoding ", "Content-Length\t"):
        with pytest.raises(HeaderError):
            transport.post(hostile.url("/echo"), body=b"{}", headers={name: "chunked"})
    with pytest.raises(HeaderError):
        transport.get(hostile.url("/echo"), headers={"X-Id": "a\x00b"})
    assert len(hostile.requests) == 1  # nothing of the refused requests reached the bank
