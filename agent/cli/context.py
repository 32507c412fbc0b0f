"""What a CLI command gets: the config, the runtime and the backend, each built only when first used.

The backend: when an agent is running (``[daemon] socket`` answers ``GET /v1/health``), the operations it
serves go through it (no PIN here; its policy and audit trail apply); else, or with ``--direct``, they run in
this process on the token. Provisioning (keys generate, csr, cert import) always uses the token directly: it is
an operator's job, done before the agent serves, and ``cert import``/``generate`` change what the agent checked.

A running agent serves the configuration it loaded, not the CLI's: when the two differ (the agent reports its
configuration's digest to callers a rule names, in ``GET /v1/ready``), a ``--config`` given on the command line
is refused (exit 78: that file is not what would be used), and the default file, edited since the agent loaded
it, gets a warning (reload the agent).

Every key use in this process (a signature, a request sent to a bank with the transport key) goes into the
agent's audit trail (``[daemon] audit_file``), attributed to the operator running the command: a direct path
that cannot write it refuses to sign rather than sign unaudited.
"""

from __future__ import annotations

import functools

from agent import sections as sections_module
from agent.audit import AuditError, AuditTrail, find_anchor
from agent.cli.backend import Backend, Direct, ThroughAgent
from agent.client import AgentClient, AgentRequestError, AgentUnavailableError, UntrustedAgentError
from agent.config import Config
from agent.daemon.http import new_interaction_id
from agent.errors import ConfigError
from agent.log import get_logger
from agent.operations.core import Core
from agent.runtime import Runtime
from agent.sections import Sections

_HEALTH_TIMEOUT = 2.0


class ConfigMismatchError(ConfigError):
    """The --config given is not the configuration the running agent serves."""


_CALL_TIMEOUT = 60.0  # calls may wait for a bank (the agent's own read_timeout bounds that)


class CliContext:
    def __init__(self, config_path: str | None, direct: bool = False, interaction_id: str | None = None) -> None:
        self.config_path = config_path
        self.direct = direct
        # The command's one x-fapi-interaction-id: its operations', sent to the bank and audited (agent/interaction.py).
        self.interaction_id = interaction_id or new_interaction_id()

    @functools.cached_property
    def sections(self) -> Sections:
        """The whole configuration, every section checked (a mistake anywhere is an error before any work)."""
        return sections_module.load(self.config_path)

    @property
    def config(self) -> Config:
        return self.sections.config

    @functools.cached_property
    def runtime(self) -> Runtime:
        return Runtime(self.config, interactive=True)

    @functools.cached_property
    def audit(self) -> AuditTrail:
        """The agent's audit trail, shared with it (appends are locked across processes)."""
        settings = self.sections.daemon
        try:
            trail = AuditTrail(settings.audit_file, settings.audit_sync_interval)
        except AuditError as exc:
            raise AuditError(f"{exc}; nothing was signed", hint=(
                "signing on the token from the CLI is audited into [daemon] audit_file: run this as a user who "
                "may write it (e.g. the agent's user), or let a running agent do it (drop --direct)")) from None
        try:  # checkpointed like the agent's: one when this command starts using keys, one when it ends
            # Quiet when the key is missing: the agent warns at each start, `audit verify` says what it means.
            anchor = find_anchor(self.runtime.keys, settings.audit_checkpoint_key,
                                 required=settings.audit_checkpoint_required, warn=False)
            if anchor is not None:
                trail.anchor(anchor, None)
        except BaseException:
            trail.close()
            raise
        return trail

    @functools.cached_property
    def core(self) -> Core:
        """The operations' core on the token in this process; every signature recorded in :attr:`audit`."""
        core = Core(self.sections, self.runtime, lambda: self.audit)
        core.rotation.refresh()  # a rotated alias names the key the shared state says, here as in the agent
        return core

    @functools.cached_property
    def backend(self) -> Backend:
        agent = None if self.direct else self._running_agent()
        if agent is None:
            return Direct(self.core, self.interaction_id)
        get_logger("cli").info("through_agent", socket=agent.socket_path, hint="--direct uses the token instead")
        try:
            self._same_configuration(agent)
        except BaseException:
            agent.close()
            raise
        return ThroughAgent(agent, self.interaction_id, frozenset(self.config.keys))

    def _same_configuration(self, agent: AgentClient) -> None:
        """Refuse (an explicit --config) or warn (the default file) when the agent serves another configuration."""
        try:
            served = agent.ready()
        except (AgentRequestError, AgentUnavailableError):
            return  # not ready, or the caller may not learn more: the command's own answer says what is wrong
        digest = served.get("config_digest")
        if not isinstance(digest, str) or digest == self.config.digest:
            return
        mine = self.config.where
        theirs = served.get("config_file") or "its built-in defaults"
        differences = [
            f"{kind} only in {where}: {', '.join(sorted(names))}"
            for kind, mine_names, theirs_names in (("banks", set(self.sections.banks), set(served.get("banks", []))),
                                                   ("keys", set(self.config.keys), set(served.get("keys", []))))
            for where, names in ((mine, mine_names - theirs_names), ("the agent's", theirs_names - mine_names))
            if names]
        what = f" ({'; '.join(differences)})" if differences else " (settings differ)"
        served_as = (f"{mine} as it was when it loaded it: the file has changed since{what}" if theirs == mine
                     else f"{theirs}, which differs from {mine}{what}")
        message = (f"the agent running at {agent.socket_path} serves {served_as}; "
                   "what it serves would be used, not this file")
        hint = (f"to use {mine}: reload the agent with it (systemctl reload tpp-agent), or pass --direct to run "
                "this command on the token in this process")
        if self.config_path is not None:
            raise ConfigMismatchError(message, hint=hint)
        get_logger("cli").warning("agent_config_differs", detail=message, hint=hint)

    def _running_agent(self) -> AgentClient | None:
        path = self.sections.daemon.socket
        if not path.exists():
            return None
        probe = AgentClient(path, timeout=_HEALTH_TIMEOUT)
        try:
            probe.health()
        except UntrustedAgentError:
            raise  # never fall back silently: someone else answers where the agent should
        except AgentUnavailableError:
            return None
        finally:
            probe.close()
        return AgentClient(path, timeout=_CALL_TIMEOUT)

    def close(self) -> None:
        try:
            if "backend" in self.__dict__:
                self.backend.close()
            if "core" in self.__dict__:
                self.core.close()
            if "audit" in self.__dict__:
                self.audit.close()  # before the runtime: its closing checkpoint is signed on the token
        finally:
            if "runtime" in self.__dict__:
                self.runtime.close()
