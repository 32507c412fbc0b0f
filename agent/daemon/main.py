"""``tpp-agent serve``: start-up order, signals, watchdog, shutdown.

Order matters: the socket is bound first (socket-activated clients queue meanwhile),
then the token is logged in and checked, and only then READY=1 is sent. A wrong
PIN or a bad config ends the process with status 78 (EX_CONFIG), which the unit
file excludes from restarts: restarting would spend another PIN try.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path
from types import FrameType

from agent import sections as sections_module
from agent.audit import AuditTrail, find_anchor, own_trail
from agent.daemon import processes, systemd
from agent.daemon.app import Agent
from agent.daemon.listener import bind_unix
from agent.daemon.routing import Router, http_error
from agent.daemon.server import Accept, Server
from agent.daemon.settings import DaemonSettings
from agent.errors import EX_CONFIG, AgentError, ConfigError, exit_status
from agent.log import configure, get_logger
from agent.metrics import listener as metrics_listener
from agent.metrics.instruments import Metrics, shared_directory
from agent.metrics.sampler import STATE_SECONDS, Sampler, scrape
from agent.runtime import Runtime
from agent.sections import Sections
from agent.transport.places import BankPlaces
from pkcs11_backends.errors import PinError, Pkcs11Error, TokenTimeoutError
from pkcs11_backends.sessions import PoolState

log = get_logger("tpp-agent.daemon")


def run(config_path: str | None, socket_override: str | None) -> int:
    sections = sections_module.load(config_path)  # the whole file, every section checked, before anything runs
    settings = sections.daemon
    if socket_override:
        settings = dataclasses.replace(settings, socket=Path(socket_override))
    configure("json", settings.log_level, final=True)
    _raise_fd_limit()
    metrics_socket = metrics_listener.bind(sections.metrics)  # a port in use is refused before anything runs
    notifier = systemd.Notifier()
    activated = systemd.listen_sockets()
    if len(activated) > 1:
        raise ConfigError(f"systemd passed {len(activated)} sockets; the agent listens on one",
                          hint="give tpp-agent.socket a single ListenStream=")
    listener = activated[0] if activated else bind_unix(settings.socket, settings.socket_gid, settings.socket_mode)
    where = "socket activation" if activated else str(settings.socket)
    try:
        if settings.processes == 1:
            return serve(sections, settings, listener, where, notifier, metrics_socket=metrics_socket)
        # The serving processes' metrics meet in files there (agent/metrics/__init__.py says why); each bank's
        # max_in_flight counts the requests of them all (agent/transport/places.py).
        with shared_directory(_runtime_directory()) as shared, contextlib.closing(BankPlaces()) as places:
            # Nothing PKCS#11 has been loaded in this process yet: each serving process starts its own.
            def serving(channel: socket.socket) -> int:
                return serve(sections, settings, channel, where, systemd.Notifier(connected=channel),
                             accept=processes.connections_from(channel), shared=shared, metrics_socket=metrics_socket,
                             places=places)

            return processes.supervise(settings.processes, listener, serving, notifier,
                                       settings.limits.drain_timeout, pin=settings.cpu_affinity)
    finally:
        if metrics_socket is not None:
            metrics_socket.close()
        listener.close()
        if not activated:
            with contextlib.suppress(FileNotFoundError):
                Path(settings.socket).unlink()
        notifier.close()


def serve(sections: Sections, settings: DaemonSettings, listener: socket.socket, where: str,
          notifier: systemd.Notifier, *, accept: Accept | None = None, shared: Path | None = None,
          metrics_socket: socket.socket | None = None, places: BankPlaces | None = None) -> int:
    """One serving process: log in, check, serve ``listener``'s connections until SIGTERM; the exit status.

    ``shared``: the directory the serving processes' metrics meet in; ``metrics_socket``: ``[metrics] listen``;
    ``places``: the banks' places for requests in flight, shared with the other serving processes."""
    runtime = Runtime(sections.config, processes=settings.processes, places=places,
                      log_bank_successes=settings.limits.log_successes)
    metrics = Metrics(shared)
    # Serving processes side by side would take turns on one file's lock for every record: each has its own.
    audit = (own_trail(settings.audit_file, settings.audit_sync_interval) if settings.processes > 1
             else AuditTrail(settings.audit_file, settings.audit_sync_interval))
    try:
        agent = Agent(sections, settings, runtime, audit, metrics)
        notifier.status("logging in to the token and checking keys")
        started = time.monotonic()
        try:
            status = agent.preflight()
            anchor = find_anchor(runtime.keys, settings.audit_checkpoint_key,
                                 required=settings.audit_checkpoint_required)
            if anchor is not None:
                audit.anchor(anchor, settings.audit_checkpoint_interval)
        except (PinError, AgentError) as exc:
            log.error("startup_failed", error=str(exc), hint=exc.hint)
            notifier.status(f"start-up failed: {exc}")
            return EX_CONFIG
        except Pkcs11Error as exc:
            log.error("startup_failed", error=str(exc), hint=exc.hint)
            notifier.status(f"start-up failed: {exc}")
            return exit_status(exc)  # 69 (the HSM is away: systemd retries), 78 (a wrong module path: it does not)
        router = Router(agent)
        server = Server(listener, router, settings.limits, accept=accept, remote=router.remote, routine=router.routine,
                        known=lambda peer: agent.policy.knows(peer),  # noqa: PLW0108 (the policy a reload put in place)
                        observe=metrics.request)
        # Alone, the process is sampled by its own scrapes; beside others, each second for theirs.
        sampler = Sampler(lambda: agent.core, state_seconds=STATE_SECONDS if shared is not None else None)
        sampler.start()
        if metrics_socket is not None:
            metrics_listener.Listener(metrics_socket, lambda: scrape(agent.core, certificates=False)).start()
        runtime.pool.supervise(_AnswerHungCalls(server))
        stops = _install_signals(agent, server, notifier)
        stop_health = threading.Event()
        health = threading.Thread(target=_health_loop, args=(agent, server, notifier, settings, stop_health),
                                  name="health", daemon=True)
        health.start()
        log.info("ready", socket=where, status=status, audit_file=str(audit.path),
                 seconds=round(time.monotonic() - started, 3), signing=runtime.keys.capabilities.summary(),
                 cpus=processes.cpu_list(os.sched_getaffinity(0)))
        if not agent.readiness.ready:  # serving (health, signing), but /v1/ready says why not
            log.warning("not_ready", detail=agent.readiness.detail)
        notifier.ready(agent.readiness.detail)
        server.serve_forever()
        stop_health.set()
        sampler.stop()  # before the token closes: it may be reading the certificates
        signal_name, in_flight, stopping_since = stops[0]  # only a stop signal ends serve_forever
        log.info("stopped", signal=signal_name, in_flight_at_signal=in_flight,
                 drain_seconds=round(time.monotonic() - stopping_since, 3), audit_file=str(audit.path),
                 audit_last_seq=audit.last_seq)
        return 0
    finally:
        try:
            audit.close()  # first: the closing checkpoint is signed on the token
        finally:
            runtime.close()


class _AnswerHungCalls:
    """The session pool's supervisor: workers make token calls on their own thread, and a client whose call
    passes ``call_timeout`` gets its 503 from the watch thread instead of waiting for the HSM."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def covers(self, thread: int) -> bool:
        return self.server.serving(thread)

    def overdue(self, thread: int, error: TokenTimeoutError) -> None:
        self.server.answer_for(thread, http_error(error))


def _install_signals(agent: Agent, server: Server, notifier: systemd.Notifier) -> list[tuple[str, int, float]]:
    """The handlers; the stop signal received (name, connections in flight, when) lands in the list returned."""
    stops: list[tuple[str, int, float]] = []

    def terminate(signum: int, _: FrameType | None) -> None:
        # The handler runs on the main thread between two bytecodes, maybe inside a log write: logging here
        # would wait forever for the lock the interrupted write holds. And the stop signal often comes twice
        # (a serving process gets SIGTERM from systemd's cgroup kill and again from its supervisor).
        if stops:
            return
        stops.append((signal.Signals(signum).name, server.in_flight, time.monotonic()))
        notifier.stopping()
        server.stop()

    def reload(_: int, __: FrameType | None) -> None:
        # Token calls must not run in the signal handler (it interrupts the I/O loop).
        threading.Thread(target=_reload, args=(agent, notifier), name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGHUP, reload)
    return stops


def _reload(agent: Agent, notifier: systemd.Notifier) -> None:
    notifier.notify(RELOADING="1", STATUS="reloading configuration",
                    MONOTONIC_USEC=str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
    agent.reload()
    notifier.ready(agent.readiness.detail)


def _health_loop(agent: Agent, server: Server, notifier: systemd.Notifier, settings: DaemonSettings,
                 stop: threading.Event) -> None:
    """WATCHDOG=1 after each token check that *returned* and while the I/O loop turns.

    A token that is away is recovered in place (the check fails fast meanwhile), so
    only a hung token call or a stuck loop stops the pings and lets systemd restart us.
    """
    interval = systemd.watchdog_interval() or settings.health_interval
    last_ready = agent.readiness.ready
    while not stop.wait(interval):
        state = agent.health_check()
        if state.ready != last_ready:
            log.warning("readiness_changed", ready=state.ready, detail=state.detail)
            notifier.status(state.detail)
            last_ready = state.ready
        # A PKCS#11 call that does not return is a wedged HSM session: no ping, so that
        # systemd restarts us if it lasts past WatchdogSec; pings resume when it returns.
        hung = agent.runtime.pool.health.state is PoolState.HUNG
        if not hung and time.monotonic() - server.heartbeat < max(2 * interval, 2.0):
            notifier.watchdog()


def _runtime_directory() -> Path | None:
    """systemd's RuntimeDirectory= (memory, removed when the service stops), else the temporary directory."""
    value = os.environ.get("RUNTIME_DIRECTORY")
    return Path(value.split(":")[0]) if value else None


def _raise_fd_limit() -> None:
    # Each client connection is an fd; the soft default (1024) is too low for max_connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

