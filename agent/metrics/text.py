"""The text format read back by prometheus_client's own parser (``tpp-agent metrics --json``, tests, bench)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# The parser has type hints in prometheus_client 0.21 (Debian 13), none in 0.16 (Debian 12): one typed name for both.
_parse = cast("Callable[[str], Iterable[Metric]]", text_string_to_metric_families)


def families(text: str) -> Iterable[Metric]:
    """The metric families of an exposition in the text format, each with its samples."""
    return _parse(text)
