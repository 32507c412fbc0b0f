"""Key rotation with an overlap (issue 20, item 1): a successor key next to the current one, its certificate,
the JWKS carrying both kids, the signing switch after the banks' JWKS cache window, the transport switch bank by
bank as each registers the new certificate, the old key retired and kept until an operator removes it.

``steps`` does each step; ``view`` is what a process (the agent, a CLI command) makes of the shared state: which
token key an alias names for signing and for each bank. The state itself lives in ``agent.state.rotation``.
docs/rotation.md is the operator's page.
"""
