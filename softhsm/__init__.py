"""SoftHSM2 set-up for the demo and the tests (``make_token.py``, also run as a script)."""
