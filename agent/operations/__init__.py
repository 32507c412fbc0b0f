"""The agent's operations, each declared once (agent/operations/registry.py lists them all).

A :class:`~agent.operations.spec.Spec` says what an operation acts on, who may ask, which key purposes it
needs and whether it calls a bank; :func:`~agent.operations.core.execute` runs it. The socket's routes and
the CLI's commands are adapters over these.
"""
