"""The ``[metrics]`` section: where, besides the socket's ``GET /v1/metrics``, the metrics are served.

::

    [metrics]
    listen = "127.0.0.1:9464"   # plain HTTP, GET /metrics, for Prometheus; default: not served on TCP
    allow_remote = false        # true: listen may be an address other hosts reach (no authentication!)

Every local user can read a loopback port (the socket's policy does not apply there): what it shows is
counts, timings, key aliases, bank names and certificate end dates, never a caller's identity or input.
"""

from __future__ import annotations

import dataclasses
import ipaddress

from agent.config import Config
from agent.errors import ConfigError

_KNOWN = {"listen", "allow_remote"}


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    listen: tuple[str, int] | None = None  # (IP address, port)
    allow_remote: bool = False

    @classmethod
    def parse(cls, config: Config) -> MetricsSettings:
        section = config.section("metrics")
        unknown = sorted(set(section) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown setting(s) {', '.join(unknown)} in [metrics] of {config.where}",
                              hint=f"known settings: {', '.join(sorted(_KNOWN))}")
        allow_remote = section.get("allow_remote", False)
        if not isinstance(allow_remote, bool):
            raise ConfigError(f"[metrics] allow_remote must be true or false, got {allow_remote!r}")
        value = section.get("listen")
        if value is None:
            return cls(None, allow_remote)
        if not isinstance(value, str):
            raise ConfigError(f'[metrics] listen must be a string like "127.0.0.1:9464", got {value!r}')
        host, port = _address(value)
        if not ipaddress.ip_address(host).is_loopback and not allow_remote:
            raise ConfigError(f"[metrics] listen = {value!r} is not a loopback address: other hosts could read the "
                              "metrics, with no authentication",
                              hint='use "127.0.0.1:9464" (a local Prometheus, or a proxy that authenticates), or set '
                                   "[metrics] allow_remote = true if a firewall guards that address")
        return cls((host, port), allow_remote)


def _address(value: str) -> tuple[str, int]:
    """``IP:port`` or ``[IPv6]:port``; names are refused (one that resolves elsewhere would expose the metrics)."""
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    example = 'like "127.0.0.1:9464" or "[::1]:9464"'
    if not sep or not host:
        raise ConfigError(f"[metrics] listen must be an address and a port {example}, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"[metrics] listen must name an IP address, not {host!r}",
                          hint=f"write the address {example}" + (" (localhost is 127.0.0.1)"
                                                                 if host == "localhost" else "")) from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"[metrics] listen: the port must be a number from 1 to 65535, got {port_text!r}")
    return host, int(port_text)
