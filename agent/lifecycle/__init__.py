"""The certificate lifecycle: validity and renewal thresholds, registration status per bank, the directory's
participants list. The token and TLS layers call into :mod:`agent.lifecycle.validity`; nothing here builds a
TLS context of its own."""
