"""The long-running agent: HTTP/1.1 + JSON on a Unix socket, peer-credential policy, systemd integration."""
