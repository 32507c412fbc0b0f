"""The LFI-facing flows: bank configuration, discovery, registration."""
