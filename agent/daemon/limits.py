"""The server's limits, as ``[daemon]`` sets them (apart from the server: the CLI reads the section too)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    max_connections: int = 256
    workers: int = 8                # for requests that stay on this host (token, policy, JWS)
    max_workers: int | None = None  # None: always ``workers``; else up to this many while requests block
    bank_workers: int = 8           # for requests that call a bank
    max_request_bytes: int = 1 << 20
    max_header_bytes: int = 16 << 10
    request_timeout: float = 10.0   # from a request's first byte to its last
    idle_timeout: float = 60.0      # keep-alive connection with no request under way
    write_timeout: float = 10.0
    drain_timeout: float = 30.0
    linger: float = 0.002           # a worker's wait for the same client's next request
    busy_poll: float = 50e-6        # of which spent polling without sleeping
    log_successes: bool = True      # a log line for every answer; False: only for 4xx/5xx and dropped ones
    # Per caller (peer uid): connections, and requests a lane's workers hold or will hold at once (0: the lane's
    # workers, as many as it has at the time). A caller over its share waits for its own earlier requests, never
    # for a worker another caller needs.
    connections_per_uid: int = 64
    in_flight_per_uid: int = 0
    # A caller that no policy rule names may only ask health and ready: a few connections, one request at a time.
    stranger_connections: int = 4
    stranger_in_flight: int = 1

